"""`closedloop tune --bids-root`: a BIDS study (mne-bids) as input, validated by participant."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

mne_bids = pytest.importorskip("mne_bids")

from acquisition.simulator import simulate  # noqa: E402
from closedloop.errors import UserError  # noqa: E402
from closedloop.tuning import tune  # noqa: E402
from closedloop.tuning.study import find_recordings, read_bids_raw  # noqa: E402

MONTAGE = ["Fp1", "Fz", "FCz", "Cz", "Pz", "O1", "Oz", "O2"]
TASK = "neurofeedback"
# participant, run, seed: sub-01 has two runs, so participants (3) and recordings (4) differ
RUNS = (("01", "1", 11), ("01", "2", 14), ("02", "1", 12), ("03", "1", 13))
CONFIG_YAML = """\
source: {chunk_size: 16}
state: {calibration_s: 20.0, calibration_max_s: 60.0}
safety: {min_interval_s: 2.0}
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """A BIDS dataset of 4 simulated 100 s recordings (EDF; annotations -> events.tsv)."""
    base = tmp_path_factory.mktemp("bids")
    root = base / "ds"
    for sub, run, seed in RUNS:
        raw = simulate(
            100.0,
            128.0,
            MONTAGE,
            seed=seed,
            block_s=(10.0, 20.0),
            emg_per_min=0.0,
            bad_channel=False,
            counter=False,
        )
        raw.info["line_freq"] = 50.0  # mne-bids asks for it (sidecar PowerLineFrequency)
        bids_path = mne_bids.BIDSPath(subject=sub, task=TASK, run=run, datatype="eeg", root=root)
        mne_bids.write_raw_bids(
            raw, bids_path, format="EDF", allow_preload=True, overwrite=True, verbose=False
        )
    cfg = base / "tune.yaml"
    cfg.write_text(CONFIG_YAML, encoding="utf-8")
    return {"root": root, "config": cfg}


def _args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tune.add_tune_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_find_and_read(study):
    recs = find_recordings(study["root"], TASK)
    assert [(r.subject, r.run) for r in recs] == [(s, r) for s, r, _ in RUNS]
    assert all(r.path.endswith("_eeg.edf") for r in recs)
    only = find_recordings(study["root"], TASK, ["sub-02", "03"])
    assert [r.subject for r in only] == ["02", "03"]
    raw = read_bids_raw(recs[0].path)
    # the events come back from events.tsv as annotations (trial_type = label)
    assert {"meditation", "mind_wandering"} <= set(raw.annotations.description)
    assert raw.ch_names == MONTAGE
    assert raw.preload


def test_study_errors(study, tmp_path):
    with pytest.raises(UserError, match="no participant 07"):
        find_recordings(study["root"], TASK, ["07"])
    with pytest.raises(UserError, match=f"no EEG recording of task 'rest' \\(tasks: {TASK}\\)"):
        find_recordings(study["root"], "rest")
    with pytest.raises(UserError, match="not a BIDS dataset"):
        find_recordings(tmp_path, TASK)
    never = tmp_path / "never"
    base = ["--grid=state.enter=1.5,2", "--out", never, "--no-progress"]
    cases = [
        (["--bids-root", study["root"]], "needs --task"),
        ([], "no recording"),
        (["--task", TASK, Path("x.fif")], "select recordings of --bids-root"),
        (["--bids-root", study["root"], "--task", TASK, Path("x.fif")], "not both"),
        (
            ["--bids-root", study["root"], "--task", TASK, "--subjects", "01", "--validate"],
            "at least two participants",
        ),
    ]
    for argv, match in cases:
        with pytest.raises(UserError, match=match):
            tune.run_tune(_args(*argv, *base))
    assert not never.exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_tune_study_leave_one_participant_out(study, tmp_path):
    out = tmp_path / "out"
    args = _args(
        "--bids-root",
        study["root"],
        "--task",
        TASK,
        "--config",
        study["config"],
        "--grid=state.enter=1.5,2.5,3.5",  # above the default leave (1.0)
        "--grid=trigger.dwell_s=0.5,2",
        "--require",
        "hit_rate>=0.8",
        "--validate",
        "--jobs",
        "1",
        "--out",
        out,
        "--no-progress",
    )
    assert tune.run_tune(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert len(s["recordings"]) == 4
    v = s["validation"]
    # one fold per participant (sub-01's two runs held out together), not per recording
    assert v["unit"] == "participant"
    assert [f["held_out"] for f in v["folds"]] == ["sub-01", "sub-02", "sub-03"]
    assert v["pooled"]["epochs"] == sum(f["test"]["epochs"] for f in v["folds"])
    assert v["spread"]["precision_fired"]["n"] == 3
    # per participant: the recommended setting's scores, pooled over each one's recordings
    parts = s["participants"]["scores"]
    assert list(parts) == ["sub-01", "sub-02", "sub-03"]
    assert sum(p["epochs"] for p in parts.values()) == s["recommended"]["scores"]["epochs"]
    sp = s["participants"]["spread"]["hit_rate_fired"]
    values = [p["hit_rate_fired"] for p in parts.values()]
    assert sp["min"] == min(values)
    assert sp["max"] == max(values)
    assert sp["mean"] == pytest.approx(sum(values) / 3)
    # sub-01 pooled equals its two recordings pooled in scores_per_recording.csv
    with (out / "scores_per_recording.csv").open(newline="") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if int(r["setting"]) == s["recommended"]["setting"]
            and r["recording"].startswith("sub-01_")
        ]
    assert len(rows) == 2
    assert parts["sub-01"]["n_pulses_fired"] == sum(float(r["n_pulses_fired"]) for r in rows)
    report = (out / "report.md").read_text()
    assert "## Per participant" in report
    assert "| **pooled** | 4 |" in report
    assert "Held-out validation (leave one participant out)" in report
    assert "Spread over the 3 held-out participants" in report
    assert "Spread between the 3 participants" in report
    assert "leave one participant out" in (out / "recommended.yaml").read_text()

"""`closedloop export-bids`: a session written as BIDS with mne-bids and read back with
`read_raw_bids`: pulses at their samples, extra columns documented, the EEG intact."""

from __future__ import annotations

import csv
import json

import mne_bids
import numpy as np
import pytest

from acquisition.file_source import FileSource
from closedloop.app.cli import main
from closedloop.export.bids import EXTRA_COLUMNS
from closedloop.load import read_jsonl
from closedloop.session import Session
from tests.session_helpers import REPLAY_DATA, bundled_recording, fast_config


@pytest.fixture(scope="module")
def offline_session(tmp_path_factory):
    out = tmp_path_factory.mktemp("sessions")
    session = Session(
        # a request every second while the state holds, the default 3 s interval: refractory
        # vetoes for --include-vetoed to export
        fast_config(**{"trigger.mode": "repeat", "trigger.repeat_interval_s": 1.0}),
        FileSource(REPLAY_DATA / "sim_32ch_500hz.fif"),
        live=False,
        out_root=out,
        arm_action="offline_run",
    )
    session.run()
    return session.folder


@pytest.mark.timeout(120)
def test_export_reads_back_with_pulses_on_their_samples(offline_session, tmp_path):
    root = tmp_path / "bids"
    argv = ["export-bids", str(offline_session), "--bids-root", str(root), "--subject", "01"]
    argv += ["--session", "a", "--task", "neurofeedback", "--run", "2", "--include-vetoed"]
    assert main(argv) == 0
    attempts = [a for a in read_jsonl(offline_session / "audit.jsonl") if a["event"] == "attempt"]
    fired = [a for a in attempts if a["fired"]]
    vetoed = [a for a in attempts if not a["fired"]]
    assert fired
    assert vetoed  # refractory vetoes: the flag has work to do

    path = mne_bids.BIDSPath(
        subject="01", session="a", task="neurofeedback", run=2, datatype="eeg", root=root
    )
    raw = mne_bids.read_raw_bids(path, verbose="error")
    sfreq = raw.info["sfreq"]
    ann = raw.annotations
    pulses = np.round(ann.onset[ann.description == "pulse"] * sfreq).astype(int)
    # offline stream time starts at 0 on the first sample: t_stream * sfreq is the sample
    expected = [round(a["t_stream"] * sfreq) for a in fired]
    np.testing.assert_array_equal(pulses, expected)
    for a in vetoed:
        key = f"vetoed/{a['reason']}"
        onsets = np.round(ann.onset[ann.description == key] * sfreq).astype(int)
        assert round(a["t_stream"] * sfreq) in onsets
    assert "meditation" in set(ann.description)  # the recording's own epochs are kept

    # the EEG itself: EDF keeps 16 bits per channel over its own range
    orig = bundled_recording()
    picks = [c for c in orig.ch_names if c != "counter"]
    a = orig.get_data(picks=picks)
    b = raw.get_data(picks=picks)
    step = (a.max(axis=1) - a.min(axis=1)) / 65535
    assert np.all(np.abs(a - b).max(axis=1) <= step * 1.01)

    # events.tsv: the extra columns per attempt; events.json describes each of them
    events_tsv = path.copy().update(suffix="events", extension=".tsv").fpath
    with open(events_tsv, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    by_attempt = {int(r["attempt"]): r for r in rows if r["attempt"] != "n/a"}
    assert sorted(by_attempt) == [a["attempt"] for a in attempts]
    for a in attempts:
        r = by_attempt[a["attempt"]]
        assert int(r["sample"]) == round(a["t_stream"] * sfreq)
        assert r["reason"] == a["reason"]
        assert float(r["score"]) == pytest.approx(a["score"], rel=1e-5)
        assert float(r["latency_ms"]) == pytest.approx(a["latency_ms"], rel=1e-5)
    sidecar = json.loads(events_tsv.with_suffix(".json").read_text())
    for col in ("attempt", "reason", "score", "label", "latency_ms"):
        assert sidecar[col]["Description"] == EXTRA_COLUMNS[col]
    assert "sample_age_ms" not in rows[0]  # offline: no sample age, so no column
    assert "pulse" in sidecar["trial_type"]["Levels"]

    # stimulation parameters in the BEP037 draft's place, kept out of validation
    name = "sub-01_ses-a_task-neurofeedback_stimsys-tms_run-2_nibs.json"
    nibs = root / "sub-01" / "ses-a" / "nibs" / name
    doc = json.loads(nibs.read_text())
    assert doc["PulsesDelivered"] == len(fired)
    assert doc["SafetyLimits"]["min_interval_s"] == 3.0
    assert "**/nibs/" in (root / ".bidsignore").read_text()


def test_export_without_vetoed_and_bad_subject(offline_session, tmp_path, capsys):
    root = tmp_path / "bids"
    assert (
        main(["export-bids", str(offline_session), "--bids-root", str(root), "--subject", "02"])
        == 0
    )
    path = mne_bids.BIDSPath(subject="02", task="closedloop", datatype="eeg", root=root)
    raw = mne_bids.read_raw_bids(path, verbose="error")
    assert not [d for d in raw.annotations.description if d.startswith("vetoed")]
    assert (raw.annotations.description == "pulse").sum() >= 3
    bad = ["export-bids", str(offline_session), "--bids-root", str(root), "--subject", "a_b"]
    assert main(bad) == 2
    assert "BIDS entities" in capsys.readouterr().err

"""Issue 20: the estimator on real recordings: calibration that never stalls silently, only EEG
is EEG, bad channels found, limits that fit, failure loud at calibration_max_s."""

from __future__ import annotations

import numpy as np
import pytest

from acquisition.chunk import Chunk
from acquisition.file_source import FileSource
from acquisition.simulator import simulate
from closedloop import calibration
from closedloop.config import load_config
from closedloop.errors import ConfigError
from features.chain import FeatureChain
from features.settings import ArtifactSettings, BandPowerSettings, PreprocessSettings, StateSettings
from features.types import Label


def test_default_config_calibrates_on_the_physionet_motor_edf(shared_data):
    """configs/default.yaml, no edit: measured calibrated at 63.3 s of 125 s, 34 % of the
    calibration's decisions flagged (blinks at Fp1/Fpz/Fp2 every ~2 s: they veto, but they hold
    neither the powers nor the baseline of a 64-channel average reference; 104.0 s when they
    did)."""
    config = load_config("configs/default.yaml")
    r = calibration.check_recording(config, str(shared_data / "eegmmidb-S003R03-motor.edf"))
    assert r["status"] == "done", r
    assert r["calibrated_at_s"] < 125.0
    assert 0.2 < r["flagged_share"] < 0.7
    assert len(r["eeg_channels"]) == 64
    # only the score's channels and the blink channels are watched, not all 64
    assert set(r["watched_channels"]) == {"Fz", "FCz", "Pz", "O1", "Oz", "O2", "Fp1", "Fpz", "Fp2"}


def _sim_chain(raw, **state):
    src = FileSource(raw, chunk_size=10)
    mask = calibration.eeg_mask(src.ch_names, src.ch_types, PreprocessSettings().exclude)
    st = StateSettings(**{"calibration_s": 10.0, "calibration_max_s": 20.0, **state})
    chain = FeatureChain(
        PreprocessSettings(), BandPowerSettings(), ArtifactSettings(), st, src.ch_names,
        src.sfreq, mask,
    )  # fmt: skip
    return src, chain


def _feed(src, chain):
    src.connect()
    states = []
    while (c := src.pull()) is not None:
        if c.n_samples:
            states.append(chain.step(c))
    return states


def test_ecg_typed_channel_stays_out_and_a_dead_channel_is_found_bad():
    raw = simulate(40.0, 250.0, "standard_32", 5, ecg=True, dead_channels=["Pz"],
                   noisy_channels=["CP5"], bad_channel=False)  # fmt: skip
    src, chain = _sim_chain(raw)
    assert "ECG" not in chain.eeg_names
    assert "counter" not in chain.eeg_names
    _feed(src, chain)
    assert "Pz" in chain.bad_channels
    assert chain.bad_channels["Pz"].startswith("flat")
    assert "CP5" in chain.bad_channels
    assert chain.calibrated
    assert "Pz" not in chain.calibration_report()["limits"]


def test_calibration_fails_loudly_at_its_hard_end_never_restarts():
    """Every sample flagged (a 300 µV 2 Hz wave on O1): the baseline cannot fill, and at
    calibration_max_s the chain stops with a reason naming the channel, label uncalibrated."""
    raw = simulate(60.0, 250.0, "standard_32", 6, bad_channel=False)
    data = raw.get_data()
    t = np.arange(data.shape[1]) / 250.0
    data[raw.ch_names.index("O1")] += 300e-6 * np.sin(2 * np.pi * 2.0 * t) * (t > 14.0)
    raw._data[:] = data
    src, chain = _sim_chain(raw, calibration_max_s=20.0)
    states = _feed(src, chain)
    assert not chain.calibrating
    assert chain.calibration_failure is not None
    assert "amplitude:O1" in chain.calibration_failure
    assert "calibration_max_s" in chain.calibration_failure
    assert states[-1].label is Label.UNCALIBRATED
    rep = chain.calibration_report()
    assert rep["phase"] == "failed"


def test_short_recording_is_an_error_before_it_runs():
    raw = simulate(30.0, 250.0, "standard_32", 7, bad_channel=False)
    src, chain = _sim_chain(raw, calibration_s=20.0, calibration_max_s=40.0)
    with pytest.raises(ConfigError, match="under the"):
        calibration.check_length(chain, src.duration_s, "rec")


def test_target_annotations_never_enter_the_baseline():
    raw = simulate(60.0, 250.0, "standard_32", 8, bad_channel=False)
    src, chain = _sim_chain(raw, calibration_max_s=40.0)
    chain.exclude_from_calibration([(14.0, 30.0)], "meditation")
    _feed(src, chain)
    # warm-up 2 + learning 10 + settle 2.25: collection starts at 14.25 s; 14-30 s excluded
    assert chain.calibrated_at >= 30.0 + 10.0 - 0.01  # 10 s clean after 30 s (39.996 measured)


# ---------------------------------------------------------------- names as files write them
@pytest.mark.parametrize(
    ("config_name", "stream_name"),
    [("FCz", "Fcz"), ("FCz", "FCZ"), ("FCz", "Fcz."), ("PO7", "Po7.."), ("Fz", "EEG Fz"),
     ("Cz", "EEG CZ-REF"), ("O1", "o1")],
)  # fmt: skip
def test_config_names_match_as_files_spell_them(config_name, stream_name):
    from features import names

    stream = ["Fp1", stream_name, "P7", "FC1", "Oz"]
    assert names.resolve(config_name, stream) == stream_name


def test_hints_rank_by_spelling_and_the_full_list_is_offered():
    from features import names

    stream = [f"X{i}" for i in range(50)] + ["P7", "PO7x", "FCz", "Fz"]
    msg = names.missing_channel_msg("bandpower.groups.a", "Po7", stream)
    assert "did you mean 'PO7x'" in msg  # not P7
    assert "--channels" in msg  # 54 names: the rest on request
    assert names.suggest("Fcz1", stream)[0] == "FCz"


def test_groups_written_in_10_20_spelling_resolve_to_the_stream_names():
    bp = BandPowerSettings(groups={"post": ["PO7", "Oz"], "fm": ["FCz"]})
    ch = ["Po7.", "OZ", "Fcz", "Fp1"]
    assert bp.validate_for(ch, 250.0) == []
    assert bp.resolved_groups(ch) == {"post": ["Po7.", "OZ"], "fm": ["Fcz"]}


def test_latin1_edf_annotations_are_read_and_said(shared_data, tmp_path):
    """An EDF+ whose annotation channel holds a Latin-1 byte: mne refuses it as UTF-8 and
    suggests encoding='latin1'; the reader falls back and says so."""
    from acquisition.readers import LATIN1_NOTE, load_recording

    data = (shared_data / "eegmmidb-S003R03-motor.edf").read_bytes()
    j = data.find(b"T0\x14")
    path = tmp_path / "latin1.edf"
    path.write_bytes(data[:j] + b"\xc90" + data[j + 2 :])  # 'T0' -> 'É0', same length
    raw = load_recording(path)
    assert raw.info["description"] == LATIN1_NOTE
    assert "É0" in list(raw.annotations.description)


def test_tuner_writes_no_recommendation_when_nothing_was_scored(shared_data, tmp_path):
    """calibration_s 100 on the 125 s motor run with every channel checked at 20 µV: no run
    calibrates, so no recommended.yaml, and the reason is written."""
    import argparse

    from closedloop.tuning import tune

    parser = argparse.ArgumentParser()
    tune.add_tune_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        [str(shared_data / "eegmmidb-S003R03-motor.edf"), "--target", "T1",
         "--set", "state.calibration_s=100", "--set", "artifacts.amplitude_uv=20",
         "--set", "artifacts.amplitude_min_uv=20", "--set", "artifacts.adaptive=false",
         "--grid=state.enter=2,3", "--require", "none", "--jobs", "1", "--out", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert tune.run_tune(args) == 1
    assert not (out / "recommended.yaml").exists()
    why = (out / "NOTHING_SCORED.txt").read_text()
    assert "no run calibrated" in why
    assert "amplitude:" in why or "not completed" in why or "calibration" in why


def test_eyes_closed_alpha_config_pulses_only_with_eyes_closed(shared_data, tmp_path):
    """eyes_closed_alpha.yaml on the OpenBCI recording, as `closedloop offline` runs it
    (simulated stimulator): eyes closed 29-75.5 s (alpha at O1/O2 rises from 4-7 to 9-17 µV RMS
    at 29.5 s and falls back at 76 s; the file has no annotations). Its eyes-open stretch holds
    about 15 s of clean EEG among blinks and jaw clenches, too little for the shipped 16 s
    baseline (chosen on 64-channel eegmmidb, tests/test_estimator_eoec.py: unedited, this file
    calibrates at 33.0 s, on closed eyes), so the baseline is 8 s here. Measured: calibrated at
    24.5 s, 3 pulses, all with the eyes closed, the first 2.6 s after they closed (2.0 s with
    the 1.0 s hold-off once made for this file, which took eegmmidb subject 3 23 s to collect
    its 16 s baseline)."""
    import json

    from closedloop.config import apply_overrides
    from closedloop.session import Session

    cfg = apply_overrides(
        load_config("configs/eyes_closed_alpha.yaml"),
        {"recording.xdf": False, "state.calibration_s": 8.0},
    )
    src = FileSource(shared_data / "openbci-cyton-blinks-jaw-alpha.txt", chunk_size=10)
    session = Session(cfg, src, live=False, out_root=tmp_path, arm_action="offline_run")
    summary = session.run()
    assert summary["calibration"]["status"] == "done"
    assert summary["calibration"]["calibrated_at_s"] < 29.0  # on eyes-open data
    audit = [json.loads(x) for x in (session.folder / "audit.jsonl").read_text().splitlines()]
    fired = [a["t_stream"] for a in audit if a.get("event") == "attempt" and a["fired"]]
    inside = [t for t in fired if 29.0 <= t <= 75.5]
    assert len(fired) >= 3
    assert len(inside) / len(fired) >= 0.95
    assert min(inside) - 29.0 <= 3.0


# ---------------------------------------------------------------- attention: derived features
ATTN_FEATURES = [
    {"kind": "ratio", "band": "beta", "over": ["alpha", "theta"], "group": "post", "weight": 1.0},
    {"kind": "ratio", "band": "theta", "over": ["beta"], "group": "fm", "weight": -1.0},
    {"kind": "relative", "band": "alpha", "group": "post", "weight": 0.5},
    {"kind": "asymmetry", "band": "alpha", "group": "right", "versus": "left", "weight": 0.5},
]
ATTN_GROUPS = {"post": ["Pz", "O1", "O2"], "fm": ["Fz", "FCz"], "right": ["F4"], "left": ["F3"]}


def _attn_chain(raw):
    return FeatureChain(
        PreprocessSettings(),
        BandPowerSettings(groups=ATTN_GROUPS),
        ArtifactSettings(),
        StateSettings(features=ATTN_FEATURES, calibration_s=10.0, calibration_max_s=30.0),
        raw.ch_names,
        raw.info["sfreq"],
    )


def test_ratio_relative_and_asymmetry_features_are_what_they_say():
    raw = simulate(40.0, 250.0, "standard_32", 9, bad_channel=False)
    chain = _attn_chain(raw)
    x, t = raw.get_data().T, raw.times
    for i in range(0, len(t), 10):
        st = chain.step(Chunk(x[i : i + 10], t[i : i + 10], tuple(raw.ch_names), 250.0))
    assert chain.calibrated
    p = {k: 10.0**v for k, v in chain.latest_band_powers.items() if "/" not in k}
    f = st.features
    eng = np.log10(p["beta@post"] / (p["alpha@post"] + p["theta@post"]))
    assert f["beta/alpha+theta@post"] == pytest.approx(eng, abs=1e-9)
    assert f["theta/beta@fm"] == pytest.approx(np.log10(p["theta@fm"] / p["beta@fm"]), abs=1e-9)
    total = sum(p[f"{b}@post"] for b in ("delta", "theta", "alpha", "beta", "gamma"))
    assert f["rel_alpha@post"] == pytest.approx(np.log10(p["alpha@post"] / total), abs=1e-9)
    asym = np.log10(p["alpha@right"] / p["alpha@left"])
    assert f["asym_alpha-left@right"] == pytest.approx(asym, abs=1e-9)
    # each has its z against the baseline, and the score is their weighted sum
    assert set(st.z) == set(f)
    med = {k: chain.baseline[k][0] for k in f}
    assert all(np.sign(st.z[k]) == np.sign(f[k] - med[k]) for k in f)
    assert st.score == pytest.approx(
        st.z["beta/alpha+theta@post"] * 1.0
        - st.z["theta/beta@fm"]
        + 0.5 * st.z["rel_alpha@post"]
        + 0.5 * st.z["asym_alpha-left@right"]
    )


def test_derived_features_blocks_equal_chunks():
    """Offline blocks give the same States as live-sized chunks with derived features too."""
    import dataclasses

    raw = simulate(30.0, 250.0, "standard_32", 10, bad_channel=False)
    x, t, names = raw.get_data().T, raw.times, tuple(raw.ch_names)
    a, b = _attn_chain(raw), _attn_chain(raw)
    live = [a.step(Chunk(x[i : i + 10], t[i : i + 10], names, 250.0)) for i in range(0, len(t), 10)]
    blocks = []
    for i in range(0, len(t), 730):
        blocks += b.step_every(Chunk(x[i : i + 730], t[i : i + 730], names, 250.0), 10)
    assert a.calibrated
    assert [dataclasses.astuple(s) for s in blocks] == [dataclasses.astuple(s) for s in live]


@pytest.mark.parametrize("name", ["attention_engagement", "meditation_fm_theta"])
def test_shipped_state_configs_calibrate_on_the_physionet_edf(shared_data, name):
    """Measured: attention_engagement calibrated at 60.1 s, meditation_fm_theta at 63.3 s (80.9 s
    and 104.0 s while the blinks held the baseline)."""
    config = load_config(f"configs/{name}.yaml")
    r = calibration.check_recording(config, str(shared_data / "eegmmidb-S003R03-motor.edf"))
    assert r["status"] == "done", r


@pytest.mark.parametrize("seed", [1, 3])
def test_eyes_closed_alpha_config_on_a_simulated_64_channel_recording(tmp_path, seed):
    """eyes_closed_alpha.yaml with only montage edits on a 64-channel simulation (PhysioNet
    names, 250 Hz): eyes open 0-60 s, closed 60-120 s (alpha x2.75, ramping in over 1.5 s), a
    flat O2, a noisy T8, an ECG channel, 12 blinks a minute. Measured (seeds 1 and 3): O2 and
    T8 found bad, ECG not EEG, calibrated at 30.2 s (16.0 s of collection for 16 s: the blinks
    veto, but through a 62-channel average reference they reach O1/Oz at 1/62 and hold neither
    the alpha nor the baseline). Precision 1.0 (seed 1: 5 pulses, the first 2.0 s after the
    eyes closed; seed 3: 11 pulses, 2.3 s). The real-EEG counterpart, with the 2 s asked, is
    tests/test_estimator_eoec.py."""
    import json

    from acquisition.simulator import PRESETS
    from closedloop.config import apply_overrides
    from closedloop.session import Session

    raw = simulate(**{**PRESETS["eoec_64ch_250hz"], "seed": seed})
    cfg = apply_overrides(
        load_config("configs/eyes_closed_alpha.yaml"),
        {
            "recording.xdf": False,
            "preprocess.notch_hz": 50,
            "bandpower.groups": {"occipital": ["O1", "Oz", "O2"], "frontal": ["Fp1", "Fp2"]},
            "artifacts.channels": ["Fp1", "Fp2", "O1", "Oz", "O2", "T7", "T8", "P7", "P8"],
        },
    )
    session = Session(cfg, FileSource(raw, chunk_size=10), live=False, out_root=tmp_path,
                      arm_action="offline_run")  # fmt: skip
    cal = session.run()["calibration"]
    assert set(cal["bad_channels"]) == {"O2", "T8"}
    assert "ECG" not in cal["eeg_channels"]
    assert len(cal["eeg_channels"]) == 64
    start = 2.0 + 10.0 + 2.25  # warm-up, learning, settle
    assert cal["calibrated_at_s"] - start <= 1.2 * cfg.state.calibration_s
    audit = [json.loads(x) for x in (session.folder / "audit.jsonl").read_text().splitlines()]
    fired = [a["t_stream"] for a in audit if a.get("event") == "attempt" and a["fired"]]
    inside = [t for t in fired if t >= 60.0]
    assert len(inside) / len(fired) >= 0.95
    assert min(inside) - 60.0 <= 3.0  # seed 1: 2.0 s, seed 3: 2.3 s (of which 1.5 s is the ramp)


def test_check_config_runs_the_calibration_on_the_recording(shared_data, tmp_path, capsys):
    from closedloop.app.cli import main

    edf = shared_data / "eegmmidb-S003R03-motor.edf"
    assert main(["check-config", "configs/default.yaml", "--recording", str(edf)]) == 0
    out = capsys.readouterr().out
    assert "calibration done at 63.3 s of 125.0 s" in out
    assert "flagged during calibration: 33.7% of decisions (7.0% held the baseline" in out
    assert "flags that hold the baseline: FCz, Fz, Pz, O1, Oz, O2;" in out
    # a baseline longer than the recording allows: exit 2 with the reason, before running
    cfg = tmp_path / "long.yaml"
    cfg.write_text("state: {calibration_s: 120.0, calibration_max_s: 180.0}\n", encoding="utf-8")
    assert main(["check-config", str(cfg), "--recording", str(edf)]) == 2
    err = capsys.readouterr().err
    assert "under the" in err
    assert "lower state.calibration_s" in err


def test_offline_session_reports_a_failed_calibration_everywhere(tmp_path):
    """A calibration that cannot complete: the session's events hold progress (with what is
    flagged) and one 'failed' event with the reason; the summary says failed, why and what to
    change, and the warnings carry it; no restart happens."""
    import json

    from closedloop.config import apply_overrides
    from closedloop.session import Session, SessionConfig

    raw = simulate(60.0, 250.0, "standard_32", 6, bad_channel=False)
    t = np.arange(raw.n_times) / 250.0
    raw._data[raw.ch_names.index("O1")] += 300e-6 * np.sin(2 * np.pi * 2.0 * t) * (t > 14.0)
    cfg = apply_overrides(
        SessionConfig(),
        {"recording.xdf": False, "state.calibration_s": 10.0, "state.calibration_max_s": 20.0},
    )
    session = Session(cfg, FileSource(raw, chunk_size=10), live=False, out_root=tmp_path)
    summary = session.run()
    events = [json.loads(x) for x in (session.folder / "events.jsonl").read_text().splitlines()]
    cal = [e for e in events if e["kind"] == "calibration"]
    assert [e["phase"] for e in cal if e["phase"] != "progress"] == ["started", "failed"]
    progress = [e for e in cal if e["phase"] == "progress"]
    assert any(r == "amplitude:O1" for e in progress for r, _ in e["top"])
    failed = next(e for e in cal if e["phase"] == "failed")
    assert "amplitude:O1" in failed["reason"]
    assert "Change:" in failed["reason"]
    assert summary["calibration"]["status"] == "failed"
    assert "calibration_max_s" in summary["calibration"]["reason"]
    assert any("calibration failed" in w for w in summary["warnings"])
    assert summary["pulses"] == 0


@pytest.mark.lsl
@pytest.mark.timeout(90)
def test_live_stream_channel_types_keep_ecg_out(tmp_path, unique_name):
    """A real LSL stream (the replayer in its own process) whose description types one channel
    ECG: the session's EEG mask leaves it out of the chain."""
    from acquisition.lsl_source import LslSource
    from tests.session_helpers import end_process, start_replayer

    names = ["Fp1", "Fp2", "Fz", "C3", "C4", "Pz", "O1", "O2"]
    raw = simulate(20.0, 250.0, names, 3, ecg=True, bad_channel=False)
    path = tmp_path / "ecg_raw.fif"
    raw.save(path, verbose="error")
    proc = start_replayer(path, unique_name, speed=1.0)
    try:
        src = LslSource(name=unique_name, source_id=unique_name, stype=None, resolve_timeout_s=30.0)
        src.resolve()
        types = src.ch_types
        assert types is not None
        assert types[list(src.ch_names).index("ECG")].lower() == "ecg"
        mask = calibration.eeg_mask(src.ch_names, types, PreprocessSettings().exclude)
        chain = FeatureChain(
            PreprocessSettings(), BandPowerSettings(), ArtifactSettings(), StateSettings(),
            src.ch_names, src.sfreq, mask,
        )  # fmt: skip
        assert "ECG" not in chain.eeg_names
        assert "counter" not in chain.eeg_names
        assert set(chain.eeg_names) == set(names)
    finally:
        end_process(proc)

"""Input faults are not artifact settings (issue 14, item 9).

A railing channel disarms the interlock with the reason in the audit log, also with
`artifacts.enabled: false` (before: three pulses fired within 3 s with a channel railing).
"""

from __future__ import annotations

import numpy as np
import pytest

from acquisition.file_source import FileSource
from acquisition.simulator import simulate
from closedloop.config import SessionConfig, apply_overrides
from closedloop.load import read_jsonl
from closedloop.session import Session
from features.artifacts import ArtifactDetector
from features.settings import ArtifactSettings

pytestmark = pytest.mark.timeout(120)
SFREQ = 250.0
CHANNELS = ["Fz", "FCz", "Cz", "C3", "C4", "Pz", "P3", "P4", "O1", "Oz", "O2"]
RAIL_FROM_S, RAIL_TO_S = 25.0, 31.0


@pytest.mark.parametrize("kind", ["rail", "nonfinite"])
def test_rail_and_nonfinite_are_flagged_with_the_artifact_checks_off(kind):
    n = 500
    rng = np.random.default_rng(0)
    raw = 10e-6 * rng.standard_normal((n, 3))
    raw[200:210, 1] = 0.2 if kind == "rail" else np.nan  # 200 mV: beyond rail_uv (180 mV)
    raw[300:320, 0] += 400e-6  # a blink-sized step: 'amplitude' only when the checks are on
    det = ArtifactDetector(ArtifactSettings(enabled=False), ["a", "b", "c"], SFREQ)
    flags = set()
    for i in range(0, n, 10):
        block = raw[i : i + 10]
        bad = ~np.isfinite(block)
        filled = np.nan_to_num(block)
        det.process(block, filled, filled, bad if bad.any() else None)
        flags.update(det.reasons)
    assert flags == {f"{kind}:b"}


@pytest.mark.parametrize("enabled", [True, False])
def test_rail_outside_the_checked_channels_is_still_flagged(enabled):
    """artifacts.channels narrows the artifact checks (the watched channels), not the input
    faults: a railing channel outside the subset (which still feeds a common reference) is
    flagged, with its hold-off, also at the grid samples of an offline block. The chain checks
    every EEG channel and watches the subset, as here."""
    rng = np.random.default_rng(1)
    raw = 10e-6 * rng.standard_normal((400, 3))
    raw[100:105, 2] = -0.2  # channel c rails; only a and b are checked for artifacts
    settings = ArtifactSettings(
        enabled=enabled,
        channels=["a", "b"],
        holdoff_s=0.1,
        muscle_ratio=None,  # white noise
    )
    det = ArtifactDetector(settings, ["a", "b", "c"], SFREQ, None, watch_names=["a", "b"])
    grid = np.arange(9, 400, 10, dtype=np.int64)  # decisions every 10 samples, one block
    active = det.process(raw, raw, raw, None, grid)
    flagged = [g for g in range(len(grid)) if det.reasons_at(g)]
    assert flagged  # the grid samples from 109 to within the 0.1 s hold-off
    assert all(det.reasons_at(g) == ("rail:c",) for g in flagged)
    on = np.flatnonzero(active)
    assert on[0] == 100
    assert on[-1] == 104 + round(0.1 * SFREQ)
    assert det.reasons == ()  # over by the block's end
    # chunk by chunk (most chunks skip the full check of the other channels): the same flags
    det2 = ArtifactDetector(settings, ["a", "b", "c"], SFREQ, None, watch_names=["a", "b"])
    chunked, reasons = [], []
    for i in range(0, 400, 10):
        chunked.append(det2.process(raw[i : i + 10], raw[i : i + 10], raw[i : i + 10]))
        reasons.append(det2.reasons)
    np.testing.assert_array_equal(np.concatenate(chunked), active)
    assert reasons == [det.reasons_at(g) for g in range(len(grid))]


def test_railing_channel_disarms_with_artifacts_disabled_and_no_pulse_follows(tmp_path):
    raw = simulate(
        duration_s=40.0, sfreq=SFREQ, montage=CHANNELS, seed=11, bad_channel=False,
        blinks_per_min=0.0, emg_per_min=0.0,
    )  # fmt: skip
    data = raw.get_data()
    cz = raw.ch_names.index("Cz")
    a, b = round(RAIL_FROM_S * SFREQ), round(RAIL_TO_S * SFREQ)
    data[cz, a:b] = 0.2  # the amplifier rails at +200 mV on Cz for 6 s
    raw._data[:] = data
    config = apply_overrides(
        SessionConfig(),
        {
            "artifacts.enabled": False,
            "state.warmup_s": 1.0,
            "state.calibration_s": 5.0,
            "state.enter": -20.0,  # always the target state: a request every second
            "state.leave": -30.0,
            "trigger.mode": "repeat",
            "trigger.dwell_s": 0.0,
            "trigger.repeat_interval_s": 1.0,
            "safety.min_interval_s": 1.0,
            "safety.max_per_minute": 60,
            "recording.xdf": False,
        },
    )
    session = Session(
        config, FileSource(raw, chunk_size=10), live=False, out_root=tmp_path, arm_action="test"
    )
    summary = session.run()
    audit = read_jsonl(session.folder / "audit.jsonl")
    t0 = raw.times[0] + session.pipeline.first_t
    fired = [x["t_stream"] - t0 for x in audit if x.get("event") == "attempt" and x["fired"]]
    assert any(t < RAIL_FROM_S for t in fired)  # it was firing before the rail
    assert not [t for t in fired if t >= RAIL_FROM_S], fired
    disarms = [
        x for x in audit if x.get("event") == "interlock" and x["new"] == "disarmed"
        and "railing" in x["reason"]
    ]  # fmt: skip
    assert disarms
    assert disarms[0]["t_stream"] - t0 == pytest.approx(RAIL_FROM_S, abs=0.05)
    assert "rail:Cz" in disarms[0]["reason"]
    assert any("railing" in f for f in summary["faults"])

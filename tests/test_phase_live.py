"""Phase mode live: a signal with a known phase replayed over real LSL (its own process, real
time), the session schedules each pulse at the Oz trough, and the pulses' true phase (by the
sample counter in the session's XDF) is checked, as are the session's own reference figures."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from acquisition.lsl_source import LslSource
from closedloop.load import load_session
from closedloop.session import Session
from features.phase import phase_error_stats
from tests.phase_helpers import known_phase_raw, phase_config
from tests.session_helpers import end_process, start_replayer

pytestmark = [pytest.mark.lsl, pytest.mark.slow]
SFREQ = 500.0


@pytest.mark.timeout(240)
def test_live_phase_mode_fires_at_the_target_phase(unique_name, tmp_path):
    raw, sig = known_phase_raw(75.0, SFREQ, snr_db=10.0, seed=3)
    path = tmp_path / "known_phase_raw.fif"
    raw.save(path, verbose="error")
    replayer = start_replayer(path, unique_name, speed=1.0)
    config = phase_config(
        **{"recording.xdf": True, "session.name": unique_name, "trigger.repeat_interval_s": 1.2}
    )
    source = LslSource(name=unique_name, source_id=unique_name, stype=None, resolve_timeout_s=20.0)
    session = Session(config, source, live=True, out_root=tmp_path, arm_action="test_arm")

    def watch() -> None:
        replayer.wait()
        session.stop("replay finished")

    threading.Thread(target=watch, daemon=True).start()
    try:
        summary = session.run()
    finally:
        end_process(replayer)
    rec = load_session(session.folder)
    assert rec.eeg_source == "xdf"
    fired = [a for a in rec.audit if a.get("event") == "attempt" and a.get("fired")]
    assert len(fired) >= 15, summary["vetoes_by_reason"]
    # the pulse's stream time -> the replayed sample (the counter channel) -> the true phase
    times = rec.t0_stream + rec.raw.times
    counter = rec.raw.get_data(picks=["counter"])[0]
    errors = []
    for a in fired:
        k = int(np.searchsorted(times, a["phase"]["t_pulse"]))
        errors.append(sig.phase[round(counter[k])] - math.pi)
        assert abs(a["phase"]["sched_error_ms"]) < 10.0, a["phase"]
    st = phase_error_stats(np.asarray(errors))
    # Measured here (2 cores, this test alone, 25 pulses): against the truth bias +21.6 deg,
    # circular SD 39.2; against the acausal reference (what a real recording offers) +5.8 and
    # 20.4; scheduling error p99 0.92 ms. The truth and the reference part where the bursting
    # rhythm is weak (the gate here admits amplitudes down to the 25th percentile): the
    # reference follows the background there. Bounds with room for CI load and few pulses.
    print("live phase vs truth", st, "sched", summary["phase"]["sched_error_ms"])
    assert abs(st["bias_deg"]) < 30.0, st
    assert st["circ_sd_deg"] < 55.0, st
    # the session's windowed reference (as the console shows it) and load_session's
    # whole-recording reference: the same figures, within the stated accuracy
    live_ref, whole = summary["phase"]["stats"], rec.pulse_phases()["stats"]
    for got in (live_ref, whole):
        assert got["n"] == len(fired)
        assert abs(got["bias_deg"]) < 30.0, got
        assert got["circ_sd_deg"] < 50.0, got
    assert abs(live_ref["bias_deg"] - whole["bias_deg"]) < 3.0, (live_ref, whole)

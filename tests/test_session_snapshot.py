"""`Session.snapshot()`: what a console reads of a session, in one frozen, picklable value."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest

from acquisition.file_source import FileSource
from closedloop.session import Session, SessionSnapshot
from tests.session_helpers import bundled_recording, fast_config

pytestmark = pytest.mark.timeout(180)


def test_snapshot_follows_an_offline_session_from_idle_to_stopped(tmp_path):
    config = fast_config(**{"feedback.enabled": True, "feedback.publish_lsl": False})
    taken: list[SessionSnapshot] = []
    session = Session(
        config,
        FileSource(bundled_recording(), chunk_size=10),
        live=False,
        out_root=tmp_path,
        arm_action="snapshot_test",
        on_status=lambda _s: taken.append(session.snapshot()),
        status_period_s=0.5,
    )
    before = session.snapshot()
    assert before == SessionSnapshot()  # nothing yet: the "no session" view
    assert not before.ready
    summary = session.run()
    after = session.snapshot()

    phases = [s.phase for s in taken]
    assert phases[0] == "connecting"
    assert {"calibrating", "running"} <= set(phases)
    calibrating = [s for s in taken if s.ready and s.calibrating]
    progress = [s.calibration_progress for s in calibrating]
    assert progress == sorted(progress)  # the baseline fills up
    assert 0.0 <= progress[0] < progress[-1] <= 1.0
    assert all(s.baseline == () for s in calibrating)
    running = [s for s in taken if s.phase == "running"]
    assert running[-1].calibrated
    assert running[-1].calibration_progress == 1.0
    names = [name for name, _, _ in running[-1].baseline]
    assert names == sorted(names)
    assert len(names) >= 1
    assert all(math.isfinite(m) and d >= 0 for _, m, d in running[-1].baseline)
    assert {s.interlock for s in running} & {"armed", "refractory"}  # armed after calibration
    counts = [s.pulse_count for s in taken if s.ready]
    assert counts == sorted(counts)

    assert after.phase == "stopped"
    assert after.ready
    assert after.interlock == "disarmed"
    assert after.pulse_count == summary["pulses"] >= 1
    assert after.vetoes == sum(summary["vetoes_by_reason"].values())
    assert after.thresholds == (config.state.enter, config.state.leave)
    assert (after.session_cap, after.max_per_minute) == (
        config.safety.session_cap,
        config.safety.max_per_minute,
    )
    assert after.min_interval_s == config.safety.min_interval_s
    assert after.folder == str(session.folder)
    assert after.audio_device == "wav"  # offline: the feedback sound is rendered to a file
    assert math.isfinite(after.latency_p50_ms)
    assert after.latency_p99_ms >= after.latency_p50_ms
    # frozen and picklable: the process runner sends it over a pipe as is
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.phase = "running"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(after)) == after

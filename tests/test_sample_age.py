"""Late means the age of the EEG sample, on a real LSL stream (issue 14, item 3).

An amplifier-like outlet in this process pushes a simulated recording in real time, 10 samples
every 40 ms, stamped with the local clock minus a fixed delay (an amplifier app that stamps 1.26 s
late, or a backlog). A live session with an always-target state and a pulse request every second
must veto every request as `late` when the samples are 1.26 s old (before issue 14 they fired:
the chunk had just been pulled) and fire on the same stream stamped on time.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pylsl
import pytest

from acquisition.lsl_source import LslSource
from acquisition.simulator import simulate
from closedloop.config import SessionConfig, apply_overrides
from closedloop.load import read_jsonl
from closedloop.session import Session

pytestmark = [pytest.mark.lsl, pytest.mark.slow, pytest.mark.timeout(120)]
SFREQ = 250.0
CHUNK = 10
CHANNELS = ["Fz", "FCz", "Cz", "C3", "C4", "Pz", "P3", "P4", "O1", "Oz", "O2"]


class DelayedOutlet(threading.Thread):
    """Pushes `data` (µV, samples x channels) in real time, each chunk when its newest sample is
    due, every sample stamped `delay_s` before its due time on the local clock."""

    def __init__(self, name: str, data: np.ndarray, delay_s: float) -> None:
        super().__init__(daemon=True)
        info = pylsl.StreamInfo(name, "EEG", len(CHANNELS), SFREQ, "float32", name)
        chans = info.desc().append_child("channels")
        for label in CHANNELS:
            ch = chans.append_child("channel")
            ch.append_child_value("label", label)
            ch.append_child_value("unit", "microvolts")
            ch.append_child_value("type", "EEG")
        self.outlet = pylsl.StreamOutlet(info)
        self.data = data
        self.delay_s = delay_s
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = pylsl.local_clock()
        for k in range(0, self.data.shape[0] - CHUNK, CHUNK):
            stamps = t0 + np.arange(k, k + CHUNK) / SFREQ  # an exact grid, as the replayer's
            wait = stamps[-1] - pylsl.local_clock()
            if wait > 0 and self.stop.wait(wait):
                return
            self.outlet.push_chunk(self.data[k : k + CHUNK], (stamps - self.delay_s).tolist())


def run_session(name: str, delay_s: float, tmp_path) -> list[dict]:
    raw = simulate(
        duration_s=40.0, sfreq=SFREQ, montage=CHANNELS, seed=5, bad_channel=False,
        blinks_per_min=0.0, emg_per_min=0.0, counter=False,
    )  # fmt: skip
    data = (raw.get_data().T * 1e6).astype(np.float32)
    outlet = DelayedOutlet(name, data, delay_s)
    config = apply_overrides(
        SessionConfig(),
        {
            "session.name": name,
            "session.duration_s": 16.0,
            "session.publish_lsl": False,
            "recording.xdf": False,
            "state.warmup_s": 1.0,
            "state.calibration_s": 5.0,
            "artifacts.learn_s": 2.0,  # limit learning: 10 s by default, most of the session
            "state.enter": -20.0,  # always the target state: a request every second
            "state.leave": -30.0,
            "trigger.mode": "repeat",
            "trigger.dwell_s": 0.0,
            "trigger.repeat_interval_s": 1.0,
            "safety.min_interval_s": 1.0,
            "safety.max_per_minute": 60,
            "safety.latency_budget_ms": 50.0,
            "safety.stale_after_s": 2.0,  # so that 1.26 s old is late, not stale
        },
    )
    source = LslSource(name=name, source_id=name, stype=None, resolve_timeout_s=20.0)
    session = Session(config, source, live=True, out_root=tmp_path, arm_action="test_arm")
    outlet.start()
    try:
        session.run()
    finally:
        outlet.stop.set()
        outlet.join(5.0)
    time.sleep(0.1)
    return [a for a in read_jsonl(session.folder / "audit.jsonl") if a.get("event") == "attempt"]


def test_samples_stamped_1_26_s_late_are_vetoed_late_and_on_time_ones_fire(unique_name, tmp_path):
    late = run_session(unique_name + "-late", 1.26, tmp_path / "late")
    assert len(late) >= 3, late  # the policy asked, armed
    assert not any(a["fired"] for a in late), [a for a in late if a["fired"]]
    armed = [a for a in late if a["reason"] != "not_armed"]
    assert armed
    assert {a["reason"] for a in armed} == {"late"}
    assert all("ms old" in a["detail"] for a in armed)
    on_time = run_session(unique_name + "-ontime", 0.0, tmp_path / "on_time")
    assert sum(a["fired"] for a in on_time) >= 3, on_time

"""Shared by the fault tests (tests/faults/): a 45 s recording replayed over LSL at 4x, a
session armed before T_FAULT, and the checks every fault must pass (disarmed with its reason, no
pulse after it, no re-arm, the folder complete). Three files so pytest-xdist runs them side by
side (in one file they were 270 s of the suite's critical path)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from acquisition.lsl_source import LslSource
from closedloop.config import SessionConfig, apply_overrides
from closedloop.load import load_session, read_jsonl
from closedloop.session import Session
from tests.session_helpers import start_replayer

SFREQ = 250.0
SPEED = 4.0
CHANNELS = ["Fz", "FCz", "Cz", "C3", "C4", "Pz", "P3", "P4", "O1", "Oz", "O2"]
T_FAULT = 30.0  # stream seconds into the recording (after calibration and arming)


def config(name: str, **overrides) -> SessionConfig:
    base = {
        "state.calibration_s": 8.0,
        "artifacts.learn_s": 2.0,  # the default 10 s of limit learning: armed before T_FAULT
        "state.enter": 1.0,
        "state.leave": 0.0,
        "trigger.dwell_s": 0.5,
        "safety.min_interval_s": 1.0,
        "safety.max_per_minute": 60,
        "recording.xdf": True,
        "session.name": name,
    }
    base.update(overrides)
    return apply_overrides(SessionConfig(), base)


def replayer(path: Path, name: str, *extra: str) -> subprocess.Popen:
    return start_replayer(path, name, *extra, speed=SPEED)


def until_disarmed(session: Session) -> bool:
    return wait_for(lambda: session.pipeline.trigger.interlock.state.value == "disarmed", 10.0)


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def run_with(session: Session, action, stop_after_s: float = 3.0) -> dict:
    """Run the session; in a thread: wait until armed past T_FAULT, call action(), stop later."""
    info: dict = {}

    def driver():
        ok = wait_for(
            lambda: (
                session.pipeline is not None
                and session.pipeline.trigger.interlock.state.value != "disarmed"
                and session.pipeline.state is not None
                and session.pipeline.state.t_stream - session.pipeline.first_t >= T_FAULT
            ),
            60,
        )
        info["armed_before_fault"] = ok
        info["t_fault"] = (
            session.pipeline.state.t_stream if session.pipeline and session.pipeline.state else None
        )
        action(session)
        time.sleep(stop_after_s)
        session.stop("test over")

    t = threading.Thread(target=driver, daemon=True)
    t.start()
    session.run()
    t.join(timeout=10)
    return info


def assert_disarmed_with(session: Session, info: dict, *reasons: str) -> list[dict]:
    assert info["armed_before_fault"], "the interlock was never armed before the fault"
    audit = read_jsonl(session.folder / "audit.jsonl")
    disarms = [
        a
        for a in audit
        if a.get("event") == "interlock"
        and a["new"] == "disarmed"
        and a["t_stream"] is not None
        and a["t_stream"] >= info["t_fault"] - 0.5
    ]
    assert any(r in d["reason"] for d in disarms for r in reasons), (reasons, disarms)
    t_fault = min(d["t_stream"] for d in disarms if any(r in d["reason"] for r in reasons))
    after = [
        a for a in audit if a.get("event") == "attempt" and a["fired"] and a["t_stream"] > t_fault
    ]
    assert after == [], f"pulses after the fault: {after}"
    rearmed = [
        a
        for a in audit
        if a.get("event") == "interlock"
        and a["new"] == "armed"
        and a["t_stream"] is not None
        and a["t_stream"] > t_fault
    ]
    assert rearmed == [], "the interlock re-armed itself"
    # the folder is complete and loads back
    assert (session.folder / "summary.json").exists()
    rec = load_session(session.folder)
    assert rec.raw is not None
    assert rec.raw.n_times > 0
    return audit


def live_session(name: str, **overrides) -> Session:
    source = LslSource(
        name=name, source_id=name, stype=None, resolve_timeout_s=20.0, stale_after_s=0.5
    )
    return Session(
        config(name, **overrides),
        source,
        live=True,
        out_root=Path(os.environ.get("CL_TMP", "/tmp")),
        arm_action="test_arm",
    )


REPEAT_EVERY_SECOND = {  # a pulse request every second whatever the state
    "state.enter": -20.0,
    "state.leave": -30.0,
    "trigger.mode": "repeat",
    "trigger.repeat_interval_s": 1.0,
}


KILL_CHILD = """
import sys, time
from pathlib import Path
from acquisition.lsl_source import LslSource
from closedloop.config import SessionConfig, apply_overrides
from closedloop.session import Session
from triggers.outputs import SimulatedStimulator

def slow_after_the_ttl(self, pulse):  # a slow second device: the kill lands before the outcome
    time.sleep(5.0)

SimulatedStimulator.fire = slow_after_the_ttl
name, port, out = sys.argv[1:4]
cfg = apply_overrides(SessionConfig(), {
    "state.calibration_s": 8.0, "state.enter": -20.0, "state.leave": -30.0,
    "trigger.mode": "repeat", "trigger.repeat_interval_s": 1.0, "trigger.dwell_s": 0.5,
    "safety.min_interval_s": 1.0, "recording.xdf": False, "session.name": name,
    "outputs.outputs": [{"kind": "serial", "port": port}, {"kind": "simulated"}],
})
source = LslSource(name=name, source_id=name, stype=None, resolve_timeout_s=20.0)
Session(cfg, source, live=True, out_root=Path(out), arm_action="test_arm").run()
"""


SIGINT_CHILD = KILL_CHILD.replace(
    'Session(cfg, source, live=True, out_root=Path(out), arm_action="test_arm").run()',
    "from closedloop.app.status import install_signal_handlers\n"
    'session = Session(cfg, source, live=True, out_root=Path(out), arm_action="test_arm")\n'
    "install_signal_handlers(session)\n"
    "session.run()",
)

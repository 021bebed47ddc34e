"""Only live sessions reach hardware; hardware outputs keep their own guard of the hard limits.

Issue 14, items 1 and 2: an offline (or tuning) run replaces every stimulating output by the
simulated stimulator, whatever the config says; the serial TTL output refuses, on its own
monotonic clock and count, any fire that breaks a hard limit, even with the interlock bypassed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import select
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from features.types import Label, State
from triggers.audit import AuditLog, read_audit
from triggers.guard import OutputGuard
from triggers.interlock import InterlockState, SafetyInterlock
from triggers.outputs import (
    LslMarkerOutput,
    OutputGuardError,
    PulseInfo,
    SerialTtlOutput,
    SimulatedStimulator,
    TriggerOutput,
    simulate_stimulators,
)
from triggers.policy import TriggerPolicy
from triggers.settings import (
    HARD_MAX_PER_MINUTE,
    HARD_MIN_INTERVAL_S,
    HARD_SESSION_CAP,
    RATE_WINDOW_S,
    PolicySettings,
    SafetySettings,
)
from triggers.unit import TriggerUnit

REPO = Path(__file__).resolve().parents[1]
RECORDING = REPO / "replay_data" / "sim_32ch_500hz.fif"


def drain(fd: int, wait_s: float = 0.2) -> bytes:
    """Everything readable on fd now (waiting up to wait_s for the first byte)."""
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], wait_s)
        if not ready:
            return data
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other end is closed and nothing is left
            return data
        if not chunk:
            return data
        data += chunk
        wait_s = 0.0


# ---- item 1: offline never drives a stimulator -------------------------------------------------


@pytest.mark.timeout(180)
def test_offline_cli_with_a_serial_output_sends_nothing_and_says_so(tmp_path):
    """`closedloop offline` with a serial output on a real pty: 0 bytes arrive (before: 76
    pulses within 1 s of wall time), the pulses go to the simulated stimulator, and the summary
    (file and printed) and the audit log say which output was replaced."""
    master, slave = os.openpty()
    port = os.ttyname(slave)
    try:
        cfg = {
            "outputs": {"outputs": [{"kind": "serial", "port": port, "name": "ttl"}]},
            "state": {"enter": -20.0, "leave": -30.0, "calibration_s": 10.0},  # always target
            "trigger": {"mode": "repeat", "repeat_interval_s": 1.0, "dwell_s": 0.0},
            "safety": {"min_interval_s": 1.0, "max_per_minute": 60},
            "recording": {"xdf": False},
        }
        path = tmp_path / "lab.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        out = tmp_path / "out"
        proc = subprocess.run(
            [sys.executable, "-m", "closedloop.app.cli", "offline", str(RECORDING),
             "--config", str(path), "--out", str(out)],
            capture_output=True, text=True, timeout=170, stdin=subprocess.DEVNULL, check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert drain(master) == b""  # not one byte reached the port
    finally:
        os.close(master)
        os.close(slave)
    (folder,) = out.iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["pulses"] >= 10  # the run did fire, on the simulated stimulator
    (note,) = summary["simulated_outputs"]
    assert "serial output 'ttl'" in note
    assert port in note
    assert "simulated stimulator" in note
    assert "simulated_outputs" in proc.stdout
    assert "serial output 'ttl'" in proc.stdout
    audit = read_audit(folder / "audit.jsonl")
    assert audit[0]["event"] == "outputs_simulated"
    fired = [a for a in audit if a.get("event") == "attempt" and a["fired"]]
    assert len(fired) == summary["pulses"]
    assert all(list(a["output_ms"]) == ["ttl"] for a in fired)  # the simulated 'ttl'


def test_simulate_stimulators_keeps_records_and_replaces_every_stimulator():
    class OtherStimulator(TriggerOutput):  # a stimulator of a kind nobody has written yet
        kind = "coil"
        stimulates = True
        hardware = True
        order = 0

        def fire(self, pulse):  # pragma: no cover -- must never be called
            raise AssertionError("reached a stimulator offline")

    sim = SimulatedStimulator("sim")
    marker = LslMarkerOutput(f"test-{uuid.uuid4().hex[:6]}", name="marker")
    outs, notes = simulate_stimulators(
        [marker, SerialTtlOutput("/dev/null-nothing", name="ttl"), OtherStimulator("coil"), sim]
    )
    assert [type(o).__name__ for o in outs] == [
        "SimulatedStimulator",
        "SimulatedStimulator",
        "SimulatedStimulator",
        "LslMarkerOutput",
    ]
    assert [o.name for o in outs] == ["ttl", "coil", "sim", "marker"]
    assert outs[2] is sim
    assert outs[3] is marker
    assert len(notes) == 2
    assert not any(o.hardware for o in outs)


def test_an_offline_pipeline_refuses_hardware_outputs(tmp_path):
    from closedloop.config import SessionConfig
    from closedloop.pipeline import Pipeline

    built = Pipeline.build(
        SessionConfig(), ["Fz", "Pz", "O1", "Oz"], 250.0, tmp_path / "a.jsonl", live=False
    )
    ttl = SerialTtlOutput("/dev/null-nothing", name="ttl")
    unit = TriggerUnit(
        TriggerPolicy(PolicySettings()),
        SafetyInterlock(SafetySettings(), live=False),
        [ttl],
        AuditLog(tmp_path / "b.jsonl"),
    )
    with pytest.raises(ValueError, match="hardware outputs"):
        Pipeline(built.chain, unit, live=False)
    unit.close()
    built.close()


def test_a_live_pipeline_on_a_fast_replay_is_simulated_and_a_real_time_one_is_not(tmp_path):
    from closedloop.config import SessionConfig, apply_overrides
    from closedloop.pipeline import Pipeline

    config = apply_overrides(
        SessionConfig(), {"outputs.outputs": [{"kind": "serial", "port": "/dev/null-x"}]}
    )
    chans = ["Fz", "Pz", "O1", "Oz"]
    fast = Pipeline.build(config, chans, 250.0, tmp_path / "a.jsonl", live=True, replay_speed=4.0)
    assert [o.kind for o in fast.trigger.outputs] == ["simulated"]
    assert fast.simulated_outputs == [
        "serial output 'serial' (/dev/null-x) replaced by the simulated stimulator: "
        "a replay at 4x real time"
    ]
    real = Pipeline.build(config, chans, 250.0, tmp_path / "b.jsonl", live=True)
    assert [o.kind for o in real.trigger.outputs] == ["serial"]
    assert real.simulated_outputs == []
    fast.close()
    real.close()


# ---- item 2: the output's own guard -----------------------------------------------------------


class StepClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def reference_admits(accepted: list[float], now: float, cap: int) -> bool:
    """The hard limits, written out plainly: may a fire at `now` follow `accepted`?"""
    if math.isnan(now) or len(accepted) >= cap:
        return False
    if accepted and not now - accepted[-1] >= HARD_MIN_INTERVAL_S:
        return False
    return sum(1 for t in accepted if 0.0 <= now - t <= RATE_WINDOW_S) < HARD_MAX_PER_MINUTE


TIME_STEPS = st.one_of(
    st.sampled_from([0.0, 0.5, 0.999, 1.0, 1.001, 2.0, 60.0]),
    st.floats(-5.0, 70.0, allow_nan=False),  # clocks that go backwards, too
    st.just(float("nan")),
)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(TIME_STEPS, min_size=1, max_size=400),
    cap=st.one_of(st.integers(1, 40), st.just(HARD_SESSION_CAP), st.integers(1801, 10**6)),
)
def test_guard_holds_the_hard_limits_for_any_fire_times(steps, cap):
    clock = StepClock()
    guard = OutputGuard(clock=clock, session_cap=cap)
    accepted: list[float] = []
    t = 100.0
    for dt in steps:
        t = t if math.isnan(dt) else t + dt
        clock.t = float("nan") if math.isnan(dt) else t
        expected = reference_admits(accepted, clock.t, min(cap, HARD_SESSION_CAP))
        got = guard.admit() is None
        assert got == expected
        if got:
            accepted.append(clock.t)
    assert guard.count == len(accepted) <= min(cap, HARD_SESSION_CAP)
    assert all(b - a >= HARD_MIN_INTERVAL_S for a, b in itertools.pairwise(accepted))
    for i, end in enumerate(accepted):
        assert sum(1 for s in accepted[: i + 1] if end - s <= RATE_WINDOW_S) <= HARD_MAX_PER_MINUTE


def test_guard_admits_the_hard_rate_exactly():
    clock = StepClock(0.0)
    guard = OutputGuard(clock=clock)
    for k in range(HARD_MAX_PER_MINUTE):
        clock.t = 1.0 * k
        assert guard.admit() is None
    clock.t = 60.0  # the 61st at 60 s: 61 fires in the closed minute [0, 60]
    assert "60 fires" in guard.admit()
    clock.t = 60.000001
    assert guard.admit() is None


def pulse(n: int) -> PulseInfo:
    return PulseInfo(n, float(n), 0.0, 0.0, 0.0, 1.0, "target", "test")


def test_serial_output_guard_refuses_before_the_port_is_written():
    master, slave = os.openpty()
    try:
        clock = StepClock()
        ttl = SerialTtlOutput(os.ttyname(slave), name="ttl", guard=OutputGuard(clock=clock))
        ttl.check()
        ttl.fire(pulse(1))
        clock.t += 0.5
        with pytest.raises(OutputGuardError, match=r"output_guard.*0\.500 s after"):
            ttl.fire(pulse(2))
        clock.t += 0.5
        ttl.fire(pulse(3))
        assert drain(master) == b"\x01\x01"
        ttl.close()
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.timeout(60)
def test_guard_refuses_and_disarms_when_the_interlock_is_bypassed(tmp_path):
    """A live unit whose interlock approves everything (a bug, a bypass): the serial output's
    own guard, on the real monotonic clock, lets one TTL through, refuses the next, and the
    interlock disarms with the reason output_guard, audited."""
    master, slave = os.openpty()
    try:
        il = SafetyInterlock(SafetySettings(min_interval_s=1.0, max_per_minute=60), live=True)
        il._check = lambda *args, **kw: None  # bypassed: every request passes
        il.sample_age_veto = lambda *args, **kw: None  # and its re-check after the intent
        ttl = SerialTtlOutput(os.ttyname(slave), name="ttl")  # default guard: time.monotonic
        sim = SimulatedStimulator()
        unit = TriggerUnit(
            TriggerPolicy(PolicySettings(mode="repeat", dwell_s=0.0, repeat_interval_s=1.0)),
            il,
            [ttl, sim],
            AuditLog(tmp_path / "audit.jsonl"),
        )
        unit.arm("test")
        got = []
        for k in range(5):  # stream time says 1 s apart; the wall clock says microseconds
            t = float(k)
            got.append(unit.on_state(State(t, Label.TARGET, 2.0, t), t_arrival=math.nan))
        got = [a for a in got if a is not None]
        assert got[0].fired
        assert got[1].reason == "output_guard"
        assert not got[1].fired
        assert "HARD_MIN_INTERVAL_S" in got[1].detail
        assert all(not a.fired for a in got[1:])
        assert len(sim.pulses) == 1  # the other stimulator is skipped too
        assert il.state is InterlockState.DISARMED
        assert il.last_reason.startswith("output_guard: ttl")
        assert drain(master) == b"\x01"  # exactly one TTL
        unit.close()
        log = read_audit(tmp_path / "audit.jsonl")
        assert any(
            r["event"] == "interlock" and r["reason"].startswith("output_guard") for r in log
        )
    finally:
        os.close(master)
        os.close(slave)

"""TriggerUnit: the per-chunk facade (policy -> interlock -> outputs -> audit)."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import select
import textwrap
import threading
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acquisition.chunk import HealthEvent, HealthKind
from closedloop.bus import EventBus
from features.types import Label, State
from tests.kill_helpers import sigkill_after
from triggers.audit import AuditLog, read_audit
from triggers.guard import OutputGuard
from triggers.interlock import ArmError, InterlockState, SafetyInterlock
from triggers.outputs import (
    BusOutput,
    SerialTtlOutput,
    SimulatedStimulator,
    TriggerOutput,
)
from triggers.policy import TriggerPolicy
from triggers.settings import PolicySettings, SafetySettings
from triggers.unit import TriggerUnit


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_unit(tmp_path, outputs=None, live=False, policy=None, fsync=True, **safety):
    clock = FakeClock()
    safety.setdefault("min_interval_s", 1.0)
    il = SafetyInterlock(SafetySettings(**safety), clock=clock, live=live)
    pol = TriggerPolicy(policy or PolicySettings(mode="repeat", dwell_s=0.0, repeat_interval_s=1.0))
    outs = outputs if outputs is not None else [SimulatedStimulator()]
    audit = AuditLog(tmp_path / f"audit-{uuid.uuid4().hex[:6]}.jsonl", fsync=fsync)
    return TriggerUnit(pol, il, outs, audit, clock=clock), clock


def target(t: float, t_entry: float = 0.0, **kw) -> State:
    kw.setdefault("features", {"theta@fz": -11.5})
    return State(t_stream=t, label=Label.TARGET, score=2.0, time_in_state_s=t - t_entry, **kw)


def attempts(unit: TriggerUnit) -> list[dict]:
    return [r for r in read_audit(unit.audit.path) if r["event"] == "attempt"]


def test_fires_only_when_armed_and_audits_every_attempt(tmp_path):
    sim = SimulatedStimulator()
    unit, _ = make_unit(tmp_path, [sim])
    assert unit.interlock.state is InterlockState.DISARMED
    assert unit.on_state(target(0.5)) is not None  # a request while disarmed: vetoed, audited
    unit.arm("gui_button", operator="alice")
    results = [unit.on_state(target(0.5 + 0.1 * i)) for i in range(1, 40)]  # 0.6 .. 4.4 s
    got = [a for a in results if a is not None]
    assert [a.fired for a in got] == [True] * 4
    assert [a.pulse_number for a in got] == [1, 2, 3, 4]
    assert [p.pulse_number for p in sim.pulses] == [1, 2, 3, 4]
    assert [p.t_marker for p in sim.pulses] == [p.t_stream for p in sim.pulses]  # offline
    recs = attempts(unit)
    assert [r["reason"] for r in recs] == ["not_armed"] + ["fired"] * 4
    assert recs[1]["features"] == {"theta@fz": -11.5}
    assert recs[1]["label"] == "target"
    assert recs[1]["score"] == 2.0
    assert recs[1]["interlock"] == "refractory"
    assert set(recs[1]["output_ms"]) == {"simulated"}
    assert recs[1]["latency_ms"] >= 0.0
    log = read_audit(unit.audit.path)
    changes = [(r["old"], r["new"]) for r in log if r["event"] == "interlock"]
    assert changes[0] == ("disarmed", "armed")
    s = unit.stats
    assert s["attempts"] == 5
    assert s["fired"] == 4
    assert s["vetoes_by_reason"] == {"not_armed": 1}
    assert s["vetoed"] == 1
    assert s["latency_ms"]["n"] == 4
    unit.close()


def test_vetoed_attempt_latency_and_fields(tmp_path):
    unit, _ = make_unit(tmp_path)
    unit.arm("cli_flag")
    a = unit.on_state(target(1.0, artifacts=("amplitude:Fp1",)))
    assert not a.fired
    assert a.reason == "artifact"
    assert a.pulse_number is None
    assert unit.interlock.pulse_count == 0
    unit.close()


def test_policy_less_states_are_not_audited(tmp_path):
    unit, _ = make_unit(tmp_path)
    unit.arm("gui_button")
    for i in range(100):
        assert unit.on_state(State(i * 0.1, Label.NON_TARGET, 0.1, i * 0.1)) is None
    assert attempts(unit) == []
    unit.close()


def test_health_fault_disarms_with_reason_and_info_never_rearms(tmp_path):
    unit, _ = make_unit(tmp_path)
    unit.arm("gui_button")
    unit.on_health(HealthEvent(HealthKind.GAP, 3.0, 0.0, "42 ms"))
    assert unit.interlock.state is InterlockState.DISARMED
    assert unit.interlock.last_reason == "sample_gap: gap: 42 ms"
    unit.on_health(HealthEvent(HealthKind.FLOWING, 3.1, 0.0))
    unit.on_health(HealthEvent(HealthKind.RESTORED, 3.2, 0.0))
    assert unit.interlock.state is InterlockState.DISARMED
    a = unit.on_state(target(4.0))
    assert a.reason == "sample_gap"
    unit.close()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (HealthKind.STALE, "stale_data"),
        (HealthKind.LOST, "stream_lost"),
        (HealthKind.COUNTER_GAP, "sample_gap"),
        (HealthKind.NONFINITE, "bad_input"),
        (HealthKind.MISMATCH, "bad_input"),
    ],
)
def test_every_fault_kind_disarms(tmp_path, kind, reason):
    unit, _ = make_unit(tmp_path)
    unit.arm("gui_button")
    unit.on_health(HealthEvent(kind, 1.0, 0.0))
    assert unit.interlock.state is InterlockState.DISARMED
    assert unit.on_state(target(2.0)).reason == reason
    unit.close()


def test_arm_refused_when_serial_port_is_unplugged(tmp_path):
    missing = f"/dev/ttyUSB-closedloop-{uuid.uuid4().hex[:8]}"
    sim = SimulatedStimulator()
    unit, _ = make_unit(tmp_path, [SerialTtlOutput(missing, name="ttl"), sim])
    with pytest.raises(ArmError, match=f"output ttl not ready: .*{missing}"):
        unit.arm("gui_button")
    assert unit.interlock.state is InterlockState.DISARMED
    assert "arm refused" in unit.interlock.last_reason
    assert unit.on_state(target(1.0)).reason == "not_armed"
    assert sim.pulses == []
    recs = read_audit(unit.audit.path)
    assert recs[0]["event"] == "arm_refused"
    unit.close()


@pytest.mark.timeout(30)
def test_serial_ttl_through_the_unit_and_a_dying_port_disarms(tmp_path):
    master, slave = os.openpty()
    try:
        bus = EventBus()
        sub = bus.subscribe("test")
        sim = SimulatedStimulator()
        # the fires are microseconds apart in wall time: the guard sees 10 s between them
        steps = itertools.count(0.0, 10.0)
        guard = OutputGuard(clock=lambda: next(steps))
        ttl = SerialTtlOutput(os.ttyname(slave), byte=7, name="ttl", guard=guard)
        unit, _ = make_unit(tmp_path, [BusOutput(bus), sim, ttl])  # any order in, safe order out
        assert [o.name for o in unit.outputs] == ["ttl", "simulated", "bus"]
        unit.arm("gui_button")
        a = unit.on_state(target(1.0))
        assert a.fired
        assert list(a.output_ms) == ["ttl", "simulated", "bus"]
        ready, _, _ = select.select([master], [], [], 2.0)
        assert ready
        assert os.read(master, 16) == b"\x07"
        os.close(master)  # unplugged mid-session
        master = -1
        b = unit.on_state(target(2.5))
        assert not b.fired
        assert b.reason == "output_error"
        assert "ttl: write to" in b.detail
        assert b.pulse_number == 2  # counted: it may have gone out
        assert unit.interlock.state is InterlockState.DISARMED
        assert unit.interlock.last_reason.startswith("output_error: ttl")
        assert len(sim.pulses) == 1  # no other stimulator fires after the TTL failed
        pulses = [e.payload for e in sub.drain() if e.kind == "pulse"]
        assert [p["pulse_number"] for p in pulses] == [1, 2]  # the record still runs
        assert pulses[1]["reason"] == "repeat; output_error"
        with pytest.raises(ArmError, match=r"not responding|cannot open"):
            unit.arm("gui_button")
        assert unit.stats["output_errors"] == 1
        unit.close()
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)


class Exploding(TriggerOutput):
    kind = "test"
    stimulates = True
    order = 1

    def fire(self, pulse):
        raise ZeroDivisionError("bug")


def test_an_exception_in_an_output_is_a_fault(tmp_path):
    unit, _ = make_unit(tmp_path, [Exploding("boom")])
    unit.arm("gui_button")
    a = unit.on_state(target(1.0))
    assert a.reason == "output_error"
    assert "ZeroDivisionError" in a.detail
    assert unit.interlock.state is InterlockState.DISARMED
    assert unit.interlock.in_flight is False
    unit.close()


class Blocking(TriggerOutput):
    kind = "test"
    stimulates = True
    order = 1

    def __init__(self) -> None:
        super().__init__("blocking")
        self.entered = threading.Event()
        self.release = threading.Event()

    def fire(self, pulse):
        self.entered.set()
        assert self.release.wait(10.0)


@pytest.mark.timeout(30)
def test_a_pulse_in_flight_vetoes_another(tmp_path):
    out = Blocking()
    unit, _ = make_unit(tmp_path, [out], max_per_minute=60)
    unit.arm("gui_button")
    results = {}
    th = threading.Thread(target=lambda: results.setdefault("a", unit.on_state(target(1.0))))
    th.start()
    assert out.entered.wait(10.0)
    second = unit.on_state(target(5.0))
    assert second.reason == "in_flight"
    out.release.set()
    th.join(10.0)
    assert results["a"].fired
    unit.close()


def test_live_late_veto_and_latency_from_arrival(tmp_path):
    sim = SimulatedStimulator()
    unit, clock = make_unit(tmp_path, [sim], live=True, latency_budget_ms=50.0)
    unit.arm("gui_button")
    # live, sample stamps are on the local clock (LslSource adds the time correction)
    clock.t = 1.0 + 0.080
    a = unit.on_state(target(1.0), t_arrival=clock.t - 0.001)  # pulled 1 ms ago, 80 ms old
    assert a.reason == "late"
    assert a.latency_ms == pytest.approx(1.0)
    clock.t = 2.0 + 0.010
    b = unit.on_state(target(2.0), t_arrival=clock.t - 0.005)
    assert b.fired
    assert b.latency_ms == pytest.approx(5.0)
    # live: records are stamped with the firing time on the local clock, not stream time
    assert sim.pulses[0].t_marker == sim.pulses[0].t_fire == clock.t
    assert sim.pulses[0].t_stream == 2.0
    unit.close()


def test_emergency_stop_latches_and_close_is_ordered(tmp_path):
    class Closing(SimulatedStimulator):
        def close(self):
            self.state_at_close = unit.interlock.state

    sim = Closing()
    unit, _ = make_unit(tmp_path, [sim])
    unit.arm("gui_button")
    unit.emergency_stop("mqtt")
    with pytest.raises(ArmError, match="emergency stop"):
        unit.arm("gui_button")
    unit.close()
    unit.close()
    assert sim.state_at_close is InterlockState.DISARMED
    assert unit.audit.closed
    with pytest.raises(ArmError, match="closed"):
        unit.arm("gui_button")


def test_lead_facing_api(tmp_path):
    """fault(str), observers (state, reason), arm(t_stream=...), to_record(), close(reason)."""
    unit, _ = make_unit(tmp_path, arm_expiry_min=1.0)
    seen = []
    unit.add_observer(lambda state, reason: seen.append((state, reason)))
    unit.on_state(State(100.0, Label.NON_TARGET, 0.0, 0.0))
    unit.arm("gui_button", operator="bob", t_stream=150.0)  # expiry counts from 150 s
    unit.on_state(State(209.0, Label.NON_TARGET, 0.0, 1.0))
    assert unit.interlock.state is InterlockState.ARMED
    a = unit.on_state(target(209.5, t_entry=209.5))
    assert a.fired
    rec = a.to_record()
    assert rec["event"] == "attempt"
    assert rec["pulse_number"] == 1
    assert rec["reason"] == "fired"
    unit.fault("exception in features: ValueError: x", 209.6)
    assert unit.interlock.state is InterlockState.DISARMED
    assert unit.interlock.last_reason == "fault: exception in features: ValueError: x"
    assert seen == [
        ("armed", "armed: gui_button by bob"),
        ("refractory", "pulse 1"),
        ("disarmed", "fault: exception in features: ValueError: x"),
    ]
    unit.arm("gui_button")
    unit.close("session ended")
    assert seen[-1] == ("disarmed", "session ended")
    assert read_audit(unit.audit.path)[-1]["reason"] == "session ended"


def test_uncalibrated_arm_refused(tmp_path):
    unit, _ = make_unit(tmp_path)
    with pytest.raises(ArmError, match="calibrat"):
        unit.arm("gui_button", calibrated=False)
    assert read_audit(unit.audit.path)[-1]["event"] == "arm_refused"
    unit.close()


def test_an_exception_in_on_state_disarms_and_propagates(tmp_path):
    unit, _ = make_unit(tmp_path)
    unit.arm("gui_button")
    with pytest.raises(AttributeError):
        unit.on_state(None)  # a broken caller
    assert unit.interlock.state is InterlockState.DISARMED
    unit.close()


FAULT_KINDS = [HealthKind.STALE, HealthKind.GAP, HealthKind.LOST, HealthKind.NONFINITE]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["none"] * 10 + ["arm", "disarm", "fault", "info"]),
            st.sampled_from([Label.TARGET, Label.TARGET, Label.NON_TARGET, Label.ARTIFACT]),
            st.sampled_from([0.05, 0.1, 0.5, 1.0]),
        ),
        min_size=10,
        max_size=200,
    ),
    min_interval=st.sampled_from([1.0, 2.0]),
    cap=st.integers(1, 20),
)
def test_unit_invariants(tmp_path, steps, min_interval, cap):
    """Random states, arming and health: the stimulator sees only allowed pulses, every attempt
    is one audit line, and every fault ends disarmed."""
    sim = SimulatedStimulator()
    unit, _ = make_unit(
        tmp_path, [sim], fsync=False, min_interval_s=min_interval, max_per_minute=5, session_cap=cap
    )
    t = 0.0
    label_prev, t_change = None, 0.0
    n_attempts = 0
    for op, label, dt in steps:
        if op == "arm":
            with contextlib.suppress(ArmError):
                unit.arm("gui_button")
        elif op == "disarm":
            unit.disarm("test")
        elif op == "fault":
            unit.on_health(HealthEvent(FAULT_KINDS[int(t) % 4], t, 0.0))
            assert unit.interlock.state is InterlockState.DISARMED
        elif op == "info":
            before = unit.interlock.state
            unit.on_health(HealthEvent(HealthKind.RESTORED, t, 0.0))
            assert unit.interlock.state is before
        t += dt
        if label is not label_prev:
            label_prev, t_change = label, t
        before = unit.interlock.state
        a = unit.on_state(State(t, label, 1.0, t - t_change))
        if a is not None:
            n_attempts += 1
            if a.fired:
                assert before is not InterlockState.DISARMED
    ts = [p.t_stream for p in sim.pulses]
    assert len(ts) <= cap
    assert all(b - a >= min_interval for a, b in itertools.pairwise(ts))
    assert all(sum(1 for u in ts if 0 <= s - u <= 60.0) <= 5 for s in ts)
    assert len(attempts(unit)) == n_attempts == unit.stats["attempts"]
    unit.close()


@pytest.mark.timeout(60)
def test_killed_session_leaves_a_complete_audit_log(tmp_path):
    """A process running a TriggerUnit is SIGKILLed mid-session: every attempt it returned is in
    the audit log, in order, with nothing missing."""
    path = tmp_path / "audit.jsonl"
    child = textwrap.dedent(
        f"""
        import sys
        from features.types import Label, State
        from triggers.audit import AuditLog
        from triggers.interlock import SafetyInterlock
        from triggers.outputs import SimulatedStimulator
        from triggers.policy import TriggerPolicy
        from triggers.settings import PolicySettings, SafetySettings
        from triggers.unit import TriggerUnit
        unit = TriggerUnit(
            TriggerPolicy(PolicySettings(mode="repeat", dwell_s=0.0, repeat_interval_s=1.0)),
            SafetyInterlock(SafetySettings(min_interval_s=1.0, max_per_minute=60,
                                           session_cap=1800), live=False),
            [SimulatedStimulator()], AuditLog({str(path)!r}),
        )
        unit.arm("cli_flag")
        i = 0
        while True:
            t = i * 0.25
            a = unit.on_state(State(t, Label.TARGET, 1.0, t, features={{"f": 1.0}}))
            if a is not None:
                print(a.attempt_number, flush=True)
            i += 1
        """
    )
    last = sigkill_after(child, 200)
    recs = [r for r in read_audit(path) if r["event"] == "attempt"]
    numbers = [r["attempt"] for r in recs]
    assert numbers == list(range(1, len(numbers) + 1))
    assert numbers[-1] >= last
    fired = [r["pulse_number"] for r in recs if r["fired"]]
    assert fired == list(range(1, len(fired) + 1))
    assert all(not math.isnan(r["latency_ms"]) for r in recs)

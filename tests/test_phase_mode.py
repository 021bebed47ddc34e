"""Phase mode at the trigger unit (live scheduling against the real clock, with a gate that
returns a fixed plan) and in offline sessions on a signal of known phase (the real gate)."""

from __future__ import annotations

import math
import threading
import time
import uuid

import numpy as np
import pytest
from pylsl import local_clock

from acquisition.file_source import FileSource
from closedloop.session import Session
from features.phase import phase_error_stats
from features.types import Label
from tests.phase_helpers import known_phase_raw, phase_config
from tests.test_triggers_unit import make_unit, target
from triggers.audit import AuditLog, read_audit
from triggers.interlock import InterlockState, SafetyInterlock
from triggers.outputs import SimulatedStimulator
from triggers.phase_gate import PhasePlan, PhaseSettings
from triggers.policy import TriggerPolicy
from triggers.settings import PolicySettings, SafetySettings
from triggers.unit import TriggerUnit

pytestmark = pytest.mark.timeout(120)


class FixedGate:
    """A PhaseGate stand-in: every plan says 'fire in delay_s' (or the given veto)."""

    def __init__(self, delay_s: float, veto: str | None = None, holds: int = 0) -> None:
        self.settings = PhaseSettings(enabled=True, channels=["Oz"], spatial="channel")
        self.target = math.pi
        self.output_latency_s = 0.0
        self.delay_s, self.veto, self.holds = delay_s, veto, holds
        self.ages: list[float] = []
        self.waited: list[float] = []

    def plan_live(self, age_s: float, waited_s: float = 0.0) -> PhasePlan:
        self.ages.append(age_s)
        self.waited.append(waited_s)
        if len(self.waited) <= self.holds:
            return PhasePlan("phase_hold", 0.08, 0.3, math.pi, 10.0, 7.5, 1e-5)
        if self.veto is not None:
            return PhasePlan(self.veto, math.nan, 0.3, math.nan, 10.0, 7.5, 1e-5)
        return PhasePlan(None, self.delay_s, 0.3, math.pi, 10.0, 7.5, 1.2e-5)


def live_unit(tmp_path, gate, **safety) -> tuple[TriggerUnit, SimulatedStimulator]:
    safety.setdefault("min_interval_s", 1.0)
    il = SafetyInterlock(SafetySettings(**safety), live=True)
    pol = TriggerPolicy(PolicySettings(mode="repeat", dwell_s=0.0, repeat_interval_s=1.0))
    sim = SimulatedStimulator()
    audit = AuditLog(tmp_path / f"audit-{uuid.uuid4().hex[:6]}.jsonl")
    unit = TriggerUnit(pol, il, [sim], audit)
    unit.phase = gate
    return unit, sim


def now_state():
    t = local_clock()
    return target(t, t_entry=t - 1.0), t


def test_a_scheduled_pulse_leaves_at_the_planned_instant_and_keeps_the_watchdog_fed(tmp_path):
    gate = FixedGate(0.08)  # 80 ms: longer than the 50 ms latency budget, on purpose
    unit, sim = live_unit(tmp_path, gate)
    fed: list[float] = []
    unit.keepalive = lambda: fed.append(local_clock())
    unit.arm("gui_button")
    state, t_arr = now_state()
    a = unit.on_state(state, t_arr)
    assert a.fired, a
    assert a.reason == "fired", a
    assert len(sim.pulses) == 1
    waited_ms = 1000 * (sim.pulses[0].t_fire - t_arr)
    assert 80.0 <= waited_ms < 80.0 + 25.0, waited_ms  # the intent fsync counts into the 80 ms
    # the wait fed the watchdog at least every WAIT_SLICE_S (5 ms) plus scheduling slack
    assert len(fed) >= 8, fed
    assert max(np.diff(fed)) < 0.05, np.diff(fed)
    log = read_audit(unit.audit.path)
    intent = next(r for r in log if r["event"] == "intent")
    assert intent["scheduled_in_ms"] == 80.0
    rec = next(r for r in log if r["event"] == "attempt")
    ph = rec["phase"]
    assert ph["target_deg"] == 180.0
    assert ph["estimator"] == "echt"
    assert ph["phase_predicted_deg"] == 180.0
    assert ph["phase_snr_db"] == 7.5
    assert ph["phase_amplitude"] == 1.2e-5
    assert ph["phase_delay_ms"] == 80.0
    # scheduling error: actual fire minus planned (sleep then spin: well under a millisecond
    # idle; bound for a loaded CI machine)
    assert 0.0 <= ph["sched_error_ms"] < 5.0, ph
    assert unit.stats["phase_sched_error_ms"]["n"] == 1
    unit.close()


def test_a_disarm_during_the_wait_stops_the_scheduled_pulse(tmp_path):
    unit, sim = live_unit(tmp_path, FixedGate(0.4))
    unit.arm("gui_button")
    threading.Timer(0.05, unit.disarm, args=("operator",)).start()
    state, t_arr = now_state()
    t0 = time.perf_counter()
    a = unit.on_state(state, t_arr)
    took = time.perf_counter() - t0
    assert took < 0.25, took  # returned at the disarm, not at the scheduled 0.4 s
    assert not a.fired
    assert a.reason == "halted"
    assert sim.pulses == []
    assert unit.interlock.state is InterlockState.DISARMED
    assert not unit.interlock.in_flight
    unit.close()


def test_a_plan_without_the_phase_in_reach_is_a_phase_timeout_veto(tmp_path):
    unit, sim = live_unit(tmp_path, FixedGate(0.0, veto="phase_timeout"))
    unit.arm("gui_button")
    state, t_arr = now_state()
    a = unit.on_state(state, t_arr)
    assert not a.fired
    assert a.reason == "phase_timeout"
    assert a.pulse_number is None
    assert sim.pulses == []
    assert unit.interlock.pulse_count == 0
    assert unit.interlock.state is InterlockState.ARMED  # a veto, not a fault
    rec = next(r for r in read_audit(unit.audit.path) if r["event"] == "attempt")
    assert rec["phase"]["phase_veto"] == "phase_timeout"
    assert unit.stats["vetoes_by_reason"] == {"phase_timeout": 1}
    unit.close()


def test_the_interlock_is_asked_before_the_phase_is_planned(tmp_path):
    gate = FixedGate(0.05)
    unit, sim = live_unit(tmp_path, gate)  # disarmed
    state, t_arr = now_state()
    a = unit.on_state(state, t_arr)
    assert a.reason == "not_armed"
    assert gate.ages == []
    assert sim.pulses == []
    unit.close()


def test_a_far_target_is_held_and_planned_again_on_the_next_chunks(tmp_path):
    """Offline unit (stream time): two holds, then the plan fires; the held request writes no
    audit line until it is decided, and the waited time reaches the gate."""
    unit, _ = make_unit(tmp_path)
    sim = unit.outputs[0]
    unit.phase = FixedGate(0.004, holds=2)
    unit.arm("gui_button")
    assert unit.on_state(target(1.00)) is None  # held
    assert unit.on_state(target(1.02)) is None  # held again
    a = unit.on_state(target(1.04))
    assert a.fired
    assert a.t_stream == 1.04
    assert unit.phase.waited == pytest.approx([0.0, 0.02, 0.04])
    assert sim.pulses[0].t_marker == pytest.approx(1.044)  # placed at the planned sample
    assert [r["reason"] for r in read_audit(unit.audit.path) if r["event"] == "attempt"] == [
        "fired"
    ]
    unit.close()


def test_a_held_request_ends_when_the_state_leaves(tmp_path):
    unit, _ = make_unit(tmp_path)
    unit.phase = FixedGate(0.004, holds=5)
    unit.arm("gui_button")
    assert unit.on_state(target(1.00)) is None
    left = target(1.02)
    left = type(left)(
        t_stream=1.02, label=Label.NON_TARGET, score=0.0, time_in_state_s=0.0, features={}
    )
    a = unit.on_state(left)
    assert not a.fired
    assert a.reason == "phase_state_left"
    assert unit.interlock.pulse_count == 0
    assert unit.outputs[0].pulses == []
    assert unit.on_state(left) is None  # nothing held any more
    unit.close()


# ---- offline sessions with the real gate ------------------------------------------------------
def run_offline(tmp_path, snr_db=10.0, seed=3, duration_s=240.0, **overrides):
    raw, sig = known_phase_raw(duration_s, 500.0, snr_db=snr_db, seed=seed)
    session = Session(
        phase_config(**{"trigger.repeat_interval_s": 1.2, **overrides}),
        FileSource(raw, chunk_size=10),
        live=False,
        out_root=tmp_path,
        arm_action="test_arm",
    )
    summary = session.run()
    audit = read_audit(f"{summary['folder']}/audit.jsonl")
    fired = [a for a in audit if a.get("event") == "attempt" and a.get("fired")]
    return summary, sig, fired


@pytest.mark.slow
def test_offline_pulses_land_on_the_target_phase_of_the_true_rhythm(tmp_path):
    """Offline, each pulse is placed at the predicted sample: its true phase (known by
    construction) is near the target; the summary's reference-based figures agree."""
    summary, sig, fired = run_offline(tmp_path)
    assert len(fired) >= 100, summary["vetoes_by_reason"]
    errors = np.array([sig.phase[round(a["phase"]["t_pulse"] * 500.0)] - math.pi for a in fired])
    st = phase_error_stats(errors)
    # measured (seed 3, 10 dB, 112 pulses): bias -1.1 deg, circular SD 34.9, within 45: 0.84.
    # Seeds 2 and 4: -4.4 / +3.2 deg, SD 30.1 / 32.3; seed 1: -32.2 deg (its rhythm drifts
    # 0.5-1 Hz away from where the 20 s calibration put the band: ecHT's causal filter then
    # lags; see the README). Bounds tighter than the live test's.
    assert abs(st["bias_deg"]) < 15.0, st
    assert st["circ_sd_deg"] < 45.0, st
    assert st["within_45"] >= 0.7, st
    ph = summary["phase"]
    assert ph["fitted"]["band"]
    assert ph["fit_error"] is None
    assert ph["stats"]["n"] == len(fired)
    # the acausal reference around each pulse tells the same story as the truth
    # (measured: within 7.5 deg of the truth on seeds 1-4)
    diff = math.remainder(math.radians(ph["stats"]["bias_deg"] - st["bias_deg"]), 2 * math.pi)
    assert abs(diff) < math.radians(15.0), (ph["stats"], st)
    for a in fired:
        p = a["phase"]
        assert 0.0 <= p["phase_delay_ms"] <= 1000.0 / 8.0  # one cycle at most
        assert p["sched_error_ms"] == 0.0
        assert p["phase_snr_db"] >= 0.0  # the quality gate's threshold in phase_config


@pytest.mark.slow
def test_offline_timeout_when_the_look_ahead_is_too_short(tmp_path):
    """A look-ahead of 0.2 cycles: most requests find no target phase in reach."""
    summary, _, fired = run_offline(tmp_path, duration_s=90.0, **{"phase.max_wait_cycles": 0.2})
    vetoes = summary["vetoes_by_reason"]
    assert vetoes.get("phase_timeout", 0) >= 2 * len(fired), vetoes
    for a in fired:  # those that fired were within the look-ahead
        assert a["phase"]["phase_delay_ms"] <= 0.2 * 1000.0 / a["phase"]["phase_freq_hz"] + 1e-6

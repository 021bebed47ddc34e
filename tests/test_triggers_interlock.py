"""SafetyInterlock: hard limits, vetoes, and property tests over random operation sequences."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from triggers.interlock import (
    ArmError,
    HardLimitError,
    InterlockState,
    SafetyInterlock,
    VetoReason,
)
from triggers.settings import (
    HARD_MAX_PER_MINUTE,
    HARD_MIN_INTERVAL_S,
    HARD_SESSION_CAP,
    RATE_WINDOW_S,
    SafetySettings,
)


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(live: bool = False, **kw) -> tuple[SafetyInterlock, FakeClock]:
    clock = FakeClock()
    return SafetyInterlock(SafetySettings(**kw), clock=clock, live=live), clock


# ---- construction and hard limits --------------------------------------------------------------


def test_fresh_interlock_is_disarmed_with_zero_pulses():
    il, _ = make()
    assert il.state is InterlockState.DISARMED
    assert il.pulse_count == 0
    veto = il.request(10.0)
    assert veto is not None
    assert veto.reason is VetoReason.NOT_ARMED
    assert il.pulse_count == 0


def test_defaults_are_stricter_than_hard_limits():
    s = SafetySettings()
    assert s.min_interval_s == 3.0 > HARD_MIN_INTERVAL_S
    assert s.max_per_minute < HARD_MAX_PER_MINUTE
    assert s.session_cap == 300 < HARD_SESSION_CAP


@pytest.mark.parametrize(
    ("key", "value", "limit_name"),
    [
        ("min_interval_s", 0.999, "HARD_MIN_INTERVAL_S"),
        ("min_interval_s", math.nan, "finite number"),  # refused before the limit check
        ("max_per_minute", 61, "HARD_MAX_PER_MINUTE"),
        ("session_cap", 1801, "HARD_SESSION_CAP"),
    ],
)
def test_settings_above_hard_limits_are_errors_naming_the_limit(key, value, limit_name):
    with pytest.raises(ValidationError, match=limit_name):
        SafetySettings(**{key: value})


@pytest.mark.parametrize(
    ("key", "value", "limit_name"),
    [
        ("min_interval_s", 0.5, "HARD_MIN_INTERVAL_S"),
        ("min_interval_s", math.nan, "HARD_MIN_INTERVAL_S"),
        ("max_per_minute", 1000, "HARD_MAX_PER_MINUTE"),
        ("session_cap", 10_000, "HARD_SESSION_CAP"),
        ("stale_after_s", -1.0, "stale_after_s"),
        ("stale_after_s", 2.5, "stale_after_s"),  # above MAX_STALE_AFTER_S (issue 14)
        ("latency_budget_ms", 1500.0, "latency_budget_ms"),  # above MAX_LATENCY_BUDGET_MS
    ],
)
def test_interlock_refuses_unvalidated_settings(key, value, limit_name):
    """model_construct skips validation: the interlock must still refuse (defense in depth)."""
    bad = SafetySettings.model_construct(**{key: value})
    assert getattr(bad, key) == value or math.isnan(value)
    with pytest.raises(HardLimitError, match=limit_name):
        SafetyInterlock(bad, clock=FakeClock(), live=False)


def test_hard_limits_are_the_documented_values():
    assert (HARD_MIN_INTERVAL_S, HARD_MAX_PER_MINUTE, HARD_SESSION_CAP) == (1.0, 60, 1800)


# ---- arming -----------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["", "   ", None])
def test_arm_needs_an_operator_action(action):
    il, _ = make()
    with pytest.raises(ArmError, match="operator action"):
        il.arm(action, 0.0)
    assert il.state is InterlockState.DISARMED


def test_arm_refused_when_uncalibrated_and_required():
    il, _ = make()
    with pytest.raises(ArmError, match="calibrat"):
        il.arm("gui_button", 0.0, calibrated=False)
    assert il.state is InterlockState.DISARMED
    il2, _ = make(require_calibration=False)
    il2.arm("gui_button", 0.0, calibrated=False)
    assert il2.state is InterlockState.ARMED


def test_observers_see_transitions_with_reasons():
    il, _ = make()
    seen = []
    il.add_observer(lambda old, new, reason, t: seen.append((old, new, reason)))
    il.arm("cli_flag", 0.0, operator="alice")
    assert il.request(0.0) is None
    il.pulse_done()
    il.fault(VetoReason.SAMPLE_GAP, 0.5, "12 ms")
    assert [(o.value, n.value) for o, n, _ in seen] == [
        ("disarmed", "armed"),
        ("armed", "refractory"),
        ("refractory", "disarmed"),
    ]
    assert "cli_flag" in seen[0][2]
    assert "alice" in seen[0][2]
    assert seen[2][2] == "sample_gap: 12 ms"


def test_fault_disarms_and_vetoes_with_its_reason_until_rearmed():
    il, _ = make(min_interval_s=1.0)
    il.arm("gui_button", 0.0)
    il.fault(VetoReason.STREAM_LOST, 1.0, "no samples")
    assert il.state is InterlockState.DISARMED
    veto = il.request(2.0)
    assert veto.reason is VetoReason.STREAM_LOST
    assert "no samples" in veto.detail
    il.arm("gui_button", 3.0)
    assert il.request(3.0) is None


def test_arm_expiry_offline_uses_stream_time():
    il, _ = make(arm_expiry_min=1.0)
    il.arm("gui_button", 100.0)
    il.tick(159.9)
    assert il.state is InterlockState.ARMED
    il.tick(160.1)
    assert il.state is InterlockState.DISARMED
    assert il.last_reason == "arm expired"


def test_arm_expiry_live_uses_the_clock():
    il, clock = make(live=True, arm_expiry_min=0.5)
    il.arm("gui_button", 5.0)
    clock.t += 31.0
    il.tick(5.0)  # stream time stalled, the clock did not
    assert il.state is InterlockState.DISARMED


def test_emergency_stop_latches():
    il, _ = make()
    il.arm("gui_button", 0.0)
    il.emergency_stop("operator pressed STOP")
    assert il.state is InterlockState.DISARMED
    with pytest.raises(ArmError, match="emergency stop"):
        il.arm("gui_button", 1.0)


# ---- individual vetoes --------------------------------------------------------------------------


def test_refractory_then_armed_again():
    il, _ = make(min_interval_s=3.0)
    il.arm("gui_button", 0.0)
    assert il.request(10.0) is None
    il.pulse_done()
    assert il.state is InterlockState.REFRACTORY
    assert il.request(12.9).reason is VetoReason.REFRACTORY
    il.tick(13.0)
    assert il.state is InterlockState.ARMED
    assert il.request(13.0) is None


def test_in_flight_vetoes_a_second_pulse():
    il, _ = make(min_interval_s=1.0)
    il.arm("gui_button", 0.0)
    assert il.request(0.0) is None
    assert il.request(5.0).reason is VetoReason.IN_FLIGHT
    il.pulse_done()
    assert il.request(5.0) is None


def test_rate_limit_counts_a_closed_minute_of_fired_pulses():
    il, _ = make(min_interval_s=1.0, max_per_minute=3)
    il.arm("gui_button", 0.0)
    for t in (0.0, 1.0, 2.0):
        assert il.request(t) is None
        il.pulse_done()
    assert il.request(59.0).reason is VetoReason.RATE_LIMIT
    assert il.request(60.0).reason is VetoReason.RATE_LIMIT  # t=0 pulse still within 60 s
    assert il.request(60.001) is None


def test_vetoes_do_not_count_towards_the_rate():
    il, _ = make(min_interval_s=1.0, max_per_minute=2)
    for t in range(10):  # disarmed: all vetoed
        assert il.request(float(t)) is not None
    il.arm("gui_button", 10.0)
    assert il.request(10.0) is None


def test_live_limits_also_hold_on_the_clock():
    """A fast-forwarded stream (replay bug, clock jump) cannot bypass the interval live.

    Stamps ahead of the clock are themselves vetoed as late live; to test the clock limits on
    their own, this interlock takes them as a declared fast replay does (aged by the pull)."""
    clock = FakeClock(0.0)
    s = SafetySettings(min_interval_s=2.0, max_per_minute=2)
    il = SafetyInterlock(s, clock=clock, live=True, stamps_ahead_ok=True)
    il.arm("gui_button", 0.0)
    assert il.request(0.0, clock.t) is None
    il.pulse_done()
    clock.t += 1.0
    assert il.request(100.0, clock.t).reason is VetoReason.REFRACTORY  # stream 100 s, clock 1
    clock.t += 1.0
    assert il.request(200.0, clock.t) is None
    il.pulse_done()
    clock.t += 2.0
    assert il.request(300.0, clock.t).reason is VetoReason.RATE_LIMIT  # 2 in the clock minute
    clock.t += RATE_WINDOW_S
    assert il.request(400.0, clock.t) is None


def test_live_stream_stamped_ahead_of_the_clock_never_fires():
    il, clock = make(live=True, min_interval_s=1.0)
    il.arm("gui_button", 0.0)
    assert il.request(clock.t, clock.t) is None
    il.pulse_done()
    clock.t += 5.0
    veto = il.request(clock.t + 100.0, clock.t)  # the stream jumped 100 s ahead
    assert veto.reason is VetoReason.LATE
    assert "ahead of the clock" in veto.detail


def test_session_cap_disarms_and_blocks_arming():
    il, _ = make(min_interval_s=1.0, session_cap=2)
    il.arm("gui_button", 0.0)
    for t in (0.0, 1.0):
        assert il.request(t) is None
        il.pulse_done()
    assert il.state is InterlockState.DISARMED
    assert il.request(5.0).reason is VetoReason.SESSION_CAP
    with pytest.raises(ArmError, match="session cap"):
        il.arm("gui_button", 6.0)


def test_late_and_stale_live_are_the_age_of_the_sample():
    """Live, the deciding sample's age on the local clock decides, not the pull's: a backlog
    pulled 0.25 ms ago whose sample is 1.26 s old is late (it fired before issue 14)."""
    il, clock = make(live=True, min_interval_s=1.0, latency_budget_ms=50, stale_after_s=2.0)
    il.arm("gui_button", 0.0)
    now = clock.t
    assert il.request(now - 1.26, t_arrival=now - 0.00025).reason is VetoReason.LATE
    assert il.request(now - 0.060, t_arrival=now - 0.001).reason is VetoReason.LATE
    assert il.request(now - 2.5, t_arrival=now - 0.001).reason is VetoReason.STALE_DATA
    assert il.request(now + 0.010, t_arrival=now).reason is VetoReason.LATE  # ahead of the clock
    assert il.request(now - 0.010, t_arrival=math.nan).reason is VetoReason.LATE  # no arrival
    assert il.request(math.nan, t_arrival=now).reason is not None  # no timestamp
    assert il.pulse_count == 0
    assert il.request(now - 0.010, t_arrival=now - 0.001) is None


def test_a_declared_fast_replay_ages_samples_stamped_ahead_by_their_pull():
    clock = FakeClock()
    s = SafetySettings(min_interval_s=1.0, latency_budget_ms=50)
    il = SafetyInterlock(s, clock=clock, live=True, stamps_ahead_ok=True)
    il.arm("gui_button", 0.0)
    now = clock.t
    assert il.request(now - 0.080, t_arrival=now - 0.001).reason is VetoReason.LATE  # old: late
    assert il.request(now + 30.0, t_arrival=now - 0.080).reason is VetoReason.LATE  # late pull
    assert il.request(now + 30.0, t_arrival=now - 0.001) is None


@settings(max_examples=300, deadline=None)
@given(
    age=st.one_of(
        st.floats(-1.0, 3.0),
        st.sampled_from([0.0, 0.05, 0.0500001, -1e-9, math.nan, math.inf, -math.inf]),
    ),
    pulled=st.one_of(st.floats(0.0, 3.0), st.sampled_from([0.0, math.nan, math.inf])),
    budget_ms=st.floats(1.0, 1000.0),
    stale=st.floats(0.01, 2.0),
)
def test_sample_age_veto_fires_only_for_a_known_age_within_budget(age, pulled, budget_ms, stale):
    il, clock = make(
        live=True, min_interval_s=1.0, latency_budget_ms=budget_ms, stale_after_s=stale
    )
    il.arm("gui_button", 0.0)
    veto = il.request(clock.t - age, t_arrival=clock.t - pulled)
    fires = veto is None
    sample_age = clock.t - (clock.t - age)  # as the interlock sees it (float rounding)
    known = math.isfinite(sample_age) and math.isfinite(pulled)
    assert fires == (known and 0.0 <= sample_age <= budget_ms / 1000.0 and sample_age <= stale), (
        veto,
        sample_age,
    )
    if not fires:
        assert veto.reason in (VetoReason.LATE, VetoReason.STALE_DATA)


def test_stale_offline_is_stream_time_behind_newest():
    il, _ = make(min_interval_s=1.0, stale_after_s=0.5)
    il.arm("gui_button", 0.0)
    il.tick(10.0)
    assert il.request(9.4).reason is VetoReason.STALE_DATA
    assert il.request(9.6, t_arrival=math.nan) is None  # offline: no late check


@pytest.mark.parametrize("t", [math.nan, math.inf])
def test_non_finite_time_never_fires(t):
    il, _ = make(min_interval_s=1.0)
    il.arm("gui_button", 0.0)
    il.tick(1.0)
    assert il.request(t) is not None


def test_a_scheduled_pulse_counts_from_when_it_leaves():
    """Phase mode: a pulse granted at 0 s to leave at 0.4 s blocks the next until 1.4 s (one
    pulse in flight; the interval counts from the scheduled instant, not from the grant)."""
    il = SafetyInterlock(SafetySettings(min_interval_s=1.0, max_per_minute=60), live=False)
    il.arm("test", 0.0)
    assert il.request(0.0, delay_s=0.4) is None
    assert il.request(0.1).reason is VetoReason.IN_FLIGHT  # still one pulse in flight
    il.pulse_done()
    il.tick(1.2)
    assert il.request(1.2).reason is VetoReason.REFRACTORY  # 0.8 s after it left
    il.tick(1.41)
    assert il.request(1.41) is None
    il.pulse_done()


@pytest.mark.parametrize("delay", [-0.01, math.nan, math.inf, 0.51])
def test_a_schedule_outside_the_look_ahead_is_a_bug_not_a_pulse(delay):
    il = SafetyInterlock(SafetySettings(), live=False)
    il.arm("test", 0.0)
    with pytest.raises(ValueError, match="delay"):
        il.request(0.0, delay_s=delay)
    assert il.pulse_count == 0
    assert not il.in_flight


def test_artifact_and_uncalibrated_vetoes():
    il, _ = make(min_interval_s=1.0)
    il.arm("gui_button", 0.0)
    assert il.request(0.0, artifact=True).reason is VetoReason.ARTIFACT
    assert il.request(0.0, calibrated=False).reason is VetoReason.UNCALIBRATED
    assert il.pulse_count == 0


# ---- property tests ---------------------------------------------------------------------------

FAULTS = [
    VetoReason.STALE_DATA,
    VetoReason.SAMPLE_GAP,
    VetoReason.STREAM_LOST,
    VetoReason.OUTPUT_ERROR,
    VetoReason.BAD_INPUT,
    VetoReason.FAULT,
]

# One step = a chunk (stream and clock steps, maybe a pulse request) plus, sometimes, a control
# operation before it. Steps mostly around the limits so that pulses do fire and limits do bind.
STEP_S = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 3.0]), st.floats(0.0, 6.0))
CONTROL = st.one_of(
    *[st.just(("none",))] * 12,
    *[st.tuples(st.just("arm"), st.sampled_from(["gui_button", "cli_flag", "mqtt_remote"]))] * 2,
    st.tuples(st.just("arm"), st.sampled_from(["gui_button", "cli_flag", "mqtt_remote", ""])),
    st.tuples(st.just("disarm")),
    st.tuples(st.just("fault"), st.sampled_from(FAULTS)),
    st.tuples(st.just("jump"), st.floats(-30.0, 30.0)),  # stream clock jumps (restart, bug)
)
# 12 in 18 steps carry no control operation; arming is twice as common as each fault kind
op_strategy = st.tuples(
    CONTROL,
    STEP_S,  # stream time step (s)
    STEP_S,  # local clock step (s): differs on purpose
    st.booleans(),  # a pulse request on this chunk
    st.sampled_from([True, True, True, False]),  # pulse_done afterwards (False: stays in flight)
    st.sampled_from([0.0, 0.001, 0.049, 0.2]),  # arrival age (s) at decision time
    # phase mode: the pulse is scheduled this far ahead (0: at once), up to MAX_SCHEDULE_S
    st.one_of(st.just(0.0), st.sampled_from([0.001, 0.1, 0.25, 0.5]), st.floats(0.0, 0.5)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    live=st.booleans(),
    min_interval=st.floats(HARD_MIN_INTERVAL_S, 5.0),
    max_per_minute=st.one_of(st.integers(1, 4), st.integers(1, HARD_MAX_PER_MINUTE)),
    cap=st.integers(1, 40),
    expiry=st.one_of(st.none(), st.floats(0.05, 3.0)),
    ops=st.lists(op_strategy, min_size=20, max_size=400),
)
def test_interlock_invariants(live, min_interval, max_per_minute, cap, expiry, ops):
    s = SafetySettings(
        min_interval_s=min_interval,
        max_per_minute=max_per_minute,
        session_cap=cap,
        arm_expiry_min=expiry,
        latency_budget_ms=50.0,
        stale_after_s=0.5,
    )
    clock = FakeClock()
    il = SafetyInterlock(s, clock=clock, live=live)
    assert il.state is InterlockState.DISARMED
    assert il.pulse_count == 0
    t_stream = 0.0
    fired: list[tuple[float, float]] = []
    armed_since_fault = in_flight = False
    for control, dts, dtl, want, done, age, delay in ops:
        if control[0] == "arm":
            try:
                il.arm(control[1], t_stream)
                armed_since_fault = True
            except ArmError:
                assert il.state is InterlockState.DISARMED or control[1] == ""
        elif control[0] == "disarm":
            il.disarm("test", t_stream)
            assert il.state is InterlockState.DISARMED
            armed_since_fault = False
        elif control[0] == "fault":
            il.fault(control[1], t_stream, "injected")
            assert il.state is InterlockState.DISARMED  # every fault ends disarmed
            armed_since_fault = False
            assert il.request(t_stream) is not None
        elif control[0] == "jump":
            t_stream = max(0.0, t_stream + control[1])
        t_stream += dts
        clock.t += dtl
        il.tick(clock.t if live else t_stream)  # live: stamps on the local clock
        if want:
            before = il.state
            # live, the deciding sample is stamped on the local clock, `age` old; offline the
            # stream has its own clock and no age
            t_req = clock.t - age if live else t_stream
            veto = il.request(t_req, t_arrival=clock.t - age / 2, delay_s=delay)
            if veto is None:
                assert before is not InterlockState.DISARMED  # nothing fires while disarmed
                assert armed_since_fault
                assert not in_flight  # one pulse at a time
                in_flight = True
                assert il.state is not InterlockState.ARMED  # refractory (or capped)
                if live:
                    assert age * 1000.0 <= 50.0
                # a scheduled pulse leaves `delay` later (stream and clock): the limits hold
                # between the instants the pulses leave
                fired.append((t_req + delay, clock.t + delay))
            if done:
                il.pulse_done()
                in_flight = False
        assert il.pulse_count <= cap
    # no two pulses closer than the interval; no closed minute above the rate; cap never passed
    assert len(fired) == il.pulse_count <= cap
    times = [f[0] for f in fired]
    clocks = [f[1] for f in fired]
    series = [times, clocks] if live else [times]
    for ts in series:
        for i in range(1, len(ts)):
            assert abs(ts[i] - ts[i - 1]) >= min_interval
        for i in range(len(ts)):
            in_window = sum(1 for j in range(i + 1) if 0.0 <= ts[i] - ts[j] <= RATE_WINDOW_S)
            assert in_window <= max_per_minute

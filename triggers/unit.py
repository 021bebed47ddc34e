"""TriggerUnit: policy -> interlock -> outputs -> audit, called once per chunk by the pipeline.

`on_state` runs in the acquisition thread, right after the estimator. Only a PulseRequest of the
policy is an attempt: it is checked by the interlock, fired on every output in the fixed order
(serial TTL, simulated, LSL marker, bus), timed, and audited as one JSON line whether it fired or
was vetoed. Any output error or exception while firing is a fault: the interlock disarms.

Write-ahead audit: a granted pulse first writes and fsyncs an `intent` line (attempt, pulse
number, t_stream, outputs), then fires, then writes the outcome (`attempt` line, same attempt
number). A process killed between the two leaves the intent: `closedloop.load` reports it as
"fired, outcome unknown". An intent that cannot be written means no pulse; any audit failure
disarms (reason `audit`) and the log refuses every later line, so no further pulse and no arming.

`arm`, `disarm` and `emergency_stop` may come from other threads (GUI, MQTT, the watchdog).
Disarm and emergency stop never wait for the firing thread: the interlock's lock is held only
briefly, `_io_lock` (held while outputs fire) is not taken, and the firing thread checks
`SafetyInterlock.halted()` (an int compare) before each stimulating output. They also close the
stimulating outputs, from a helper thread, so a write blocked in a driver fails at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pylsl import local_clock

from acquisition.chunk import HealthEvent, HealthKind
from features.types import Label, State
from triggers.audit import AuditError, AuditLog
from triggers.interlock import ArmError, InterlockState, SafetyInterlock, VetoReason
from triggers.outputs import (
    OutputError,
    OutputGuardError,
    PulseInfo,
    TriggerOutput,
    sort_outputs,
)
from triggers.policy import PulseRequest, TriggerPolicy

# health faults -> interlock veto reasons (other fault kinds map to BAD_INPUT)
HEALTH_REASONS = {
    HealthKind.STALE: VetoReason.STALE_DATA,
    HealthKind.GAP: VetoReason.SAMPLE_GAP,
    HealthKind.COUNTER_GAP: VetoReason.SAMPLE_GAP,
    HealthKind.LOST: VetoReason.STREAM_LOST,
    HealthKind.NONFINITE: VetoReason.BAD_INPUT,
    HealthKind.MISMATCH: VetoReason.BAD_INPUT,
}
UNCALIBRATED_LABELS = frozenset({Label.UNCALIBRATED, Label.CALIBRATING})
LATENCY_HISTORY = 10_000  # fired-pulse latencies kept for stats (about 5 h at the hard rate)
# how long disarm / emergency stop wait for the stimulating outputs to close before returning
# (the close goes on in its thread): closing a pty or USB serial port takes 20-60 µs here
HALT_JOIN_S = 0.02
HALTED = "halted"  # outcome reason: disarmed between the grant and a stimulating output
# Phase mode (triggers/phase_gate.py). The scheduled wait sleeps in slices of at most
# WAIT_SLICE_S (the watchdog is fed and a disarm seen between slices) and spins the last SPIN_S:
# time.sleep overshoots by 50-100 µs here, a spin on local_clock by under 5 µs.
WAIT_SLICE_S = 0.005
SPIN_S = 0.0015
PHASE_LATE = "phase_late"  # outcome: the scheduled instant had passed by more than the tolerance
SCHED_HISTORY = 10_000


@dataclass(frozen=True, slots=True)
class Attempt:
    """One pulse request and what became of it (also one line of the audit log).

    fired: every stimulating output (serial, simulated) returned without error.
    reason: 'fired', a VetoReason value, 'output_error' (any output failed; the interlock is
    then DISARMED; fired stays True when only a record output such as the marker failed),
    'output_guard' (a hardware output's own guard refused the fire: nothing was sent), 'audit'
    (the intent line could not be written: nothing fired), or 'halted' (a disarm, emergency
    stop or watchdog came between the grant and a stimulating output, which was skipped;
    `stimulated` says which fired before it).
    pulse_number: the session pulse count for a pulse that went to the outputs (also on output
    error or halt: the interlock counts it, conservatively), None when vetoed.
    stimulated: the stimulating outputs that fired without error (a halt or an error can stop
    a pulse between two of them).
    t_local: clock when the outputs began firing (the pulse's marker time; after the intent
    line is durable), or when the veto was decided. latency_ms: arrival of the deciding chunk (or,
    offline, the policy's request) to the last output returning (to the veto when vetoed).
    output_ms: each output's fire() duration.
    """

    fired: bool
    reason: str
    detail: str
    attempt_number: int
    pulse_number: int | None
    t_stream: float
    t_local: float
    latency_ms: float
    score: float
    label: str
    features: dict[str, float]
    request: str
    interlock: str
    output_ms: dict[str, float] = field(default_factory=dict)
    stimulated: tuple[str, ...] = ()
    phase: dict[str, Any] | None = None  # phase mode: target, predicted, estimator, SNR, ...

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict (the core of the audit line; also the bus 'attempt' payload)."""
        rec = self._core()
        if self.phase is not None:
            rec["phase"] = self.phase
        return rec

    def _core(self) -> dict[str, Any]:
        return {
            "event": "attempt",
            "fired": self.fired,
            "reason": self.reason,
            "detail": self.detail,
            "attempt": self.attempt_number,
            "pulse_number": self.pulse_number,
            "t_stream": self.t_stream,
            "t_local": self.t_local,
            "latency_ms": round(self.latency_ms, 4),
            "output_ms": {k: round(v, 4) for k, v in self.output_ms.items()},
            "stimulated": list(self.stimulated),
            "label": self.label,
            "score": self.score,
            "features": self.features,
            "request": self.request,
            "interlock": self.interlock,
        }


class TriggerUnit:
    """The trigger stage facade. Construct with validated parts; `close()` when done."""

    def __init__(
        self,
        policy: TriggerPolicy,
        interlock: SafetyInterlock,
        outputs: Sequence[TriggerOutput],
        audit: AuditLog,
        clock: Callable[[], float] = local_clock,
    ) -> None:
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"output names must be unique: {names}")
        self.policy = policy
        self.interlock = interlock
        self.outputs = sort_outputs(outputs)
        self.audit = audit
        self._clock = clock
        self._live = interlock.live
        self._io_lock = threading.Lock()  # firing vs. output checks from an arming thread
        self._stim_busy = False  # a stimulating output is inside fire() (read by disarm)
        self._closed = False
        self._t_stream_last = math.nan
        self._n_attempts = 0
        self._n_fired = 0
        self._n_output_errors = 0
        self._vetoes: Counter[str] = Counter()
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_HISTORY)
        self._output_max_ms = dict.fromkeys(names, 0.0)
        self._output_names = [o.name for o in self.outputs]  # firing order, for intent lines
        # interlock changes are queued by the observer and written with the next audit line
        # (the intent, the outcome, or an operator action): one fsync for all of them
        self._pending: deque[dict[str, Any]] = deque()
        interlock.add_observer(self._on_interlock_change)
        # phase mode (set by Pipeline.build when config.phase.enabled): a PhaseGate
        self.phase = None
        # live: called while a scheduled pulse waits (the session feeds its watchdog with it)
        self.keepalive: Callable[[], None] | None = None
        self._sched_err_ms: deque[float] = deque(maxlen=SCHED_HISTORY)
        # fired phase pulses (t_pulse stream s, target rad, attempt) for closedloop.phase_monitor
        self.phase_pulses: deque[tuple[float, float, int]] = deque(maxlen=SCHED_HISTORY)
        self.last_phase: dict[str, Any] | None = None  # the newest phase plan's record
        # a request held for its phase (re-planned on each chunk): (request, t_stream first plan)
        self._held: tuple[PulseRequest, float] | None = None

    # ---- per chunk (acquisition thread) ----------------------------------------------------
    def on_state(self, state: State, t_arrival: float = math.nan) -> Attempt | None:
        """Feed one estimator output; returns the Attempt when the policy asked for a pulse.

        t_arrival: local_clock() when the deciding chunk arrived (nan offline).
        Any exception disarms (fault) and is re-raised: loud, and safe.
        """
        try:
            return self._on_state(state, t_arrival)
        except Exception as exc:
            if not isinstance(exc, AuditError):  # an audit failure already disarmed: 'audit'
                t_stream = getattr(state, "t_stream", math.nan)
                self.interlock.fault(VetoReason.FAULT, t_stream, f"{type(exc).__name__}: {exc}")
            self._flush_pending()
            raise

    def _on_state(self, state: State, t_arrival: float) -> Attempt | None:
        self._t_stream_last = state.t_stream
        self.interlock.tick(state.t_stream)
        request = self.policy.update(state)
        if self.phase is not None and (request is not None or self._held is not None):
            return self._on_request_phase(state, request, t_arrival)
        if request is None:
            if self._pending:  # e.g. end of refractory, arm expiry: durable with the next fsync
                self._flush_pending(sync=False)
            return None
        # offline (no arrival time) the latency counts from the request: the clock is read only
        # when there is one (0.4 µs a read, 50 states per stream second offline)
        t_start = t_arrival if math.isfinite(t_arrival) else self._clock()
        calibrated = state.label not in UNCALIBRATED_LABELS and math.isfinite(state.score)
        artifact = bool(state.artifacts) or state.label is Label.ARTIFACT
        veto = self.interlock.request(
            state.t_stream, t_arrival, calibrated=calibrated, artifact=artifact
        )
        t_decided = self._clock()
        if veto is not None:
            attempt = self._attempt(
                state,
                request,
                fired=False,
                reason=veto.reason.value,
                detail=veto.detail,
                pulse_number=None,
                t_local=t_decided,
                t_start=t_start,
                output_ms={},
            )
        else:
            attempt = self._fire(state, request, t_decided, t_start, t_arrival)
        self._write(attempt, state)
        return attempt

    def _on_request_phase(
        self, state: State, request: PulseRequest | None, t_arrival: float
    ) -> Attempt | None:
        """Phase mode: the interlock would allow a pulse -> plan the target phase's instant ->
        grant it scheduled that far ahead -> intent -> wait -> re-check -> fire. A target
        further than max_lead_ms is held and planned again on the next chunk (None returned,
        no audit line yet); a plan that fails (quality, no target phase within the look-ahead,
        the state ended while held) is an audited veto."""
        gate = self.phase
        t_first = state.t_stream
        if request is None:  # a held request: plan again on this chunk
            request, t_first = self._held
            self._held = None
            if not state.is_target:
                return self._phase_veto(state, request, t_arrival, "phase_state_left", None)
        t_start = t_arrival if math.isfinite(t_arrival) else self._clock()
        calibrated = state.label not in UNCALIBRATED_LABELS and math.isfinite(state.score)
        artifact = bool(state.artifacts) or state.label is Label.ARTIFACT
        il = self.interlock
        veto = il.check(state.t_stream, t_arrival, calibrated=calibrated, artifact=artifact)
        plan = None
        if veto is None:
            # live: from the deciding (newest) sample's age on the clock; offline the plan
            # starts at the sample itself and the pulse is placed at the predicted sample
            age_s = self._clock() - state.t_stream if self._live else 0.0
            plan = gate.plan_live(age_s, state.t_stream - t_first)
            if plan.veto == "phase_hold":
                self._held = (request, t_first)
                if self._pending:
                    self._flush_pending(sync=False)
                return None
            if plan.veto is None:
                veto = il.request(
                    state.t_stream,
                    t_arrival,
                    calibrated=calibrated,
                    artifact=artifact,
                    delay_s=plan.delay_s,
                )
        t_decided = self._clock()
        record = self.last_phase = self._phase_record(plan)
        if veto is not None or (plan is not None and plan.veto is not None):
            reason = veto.reason.value if veto is not None else plan.veto
            attempt = self._attempt(
                state,
                request,
                fired=False,
                reason=reason,
                detail=veto.detail if veto is not None else "",
                pulse_number=None,
                t_local=t_decided,
                t_start=t_start,
                output_ms={},
            )
            attempt = replace(attempt, phase=record)
        else:
            attempt = self._fire(
                state, request, t_decided, t_start, t_arrival, plan=plan, phase=record
            )
        self._write(attempt, state)
        return attempt

    def _phase_veto(
        self, state: State, request: PulseRequest, t_arrival: float, reason: str, plan
    ) -> Attempt:
        t_start = t_arrival if math.isfinite(t_arrival) else self._clock()
        attempt = self._attempt(
            state,
            request,
            fired=False,
            reason=reason,
            detail="",
            pulse_number=None,
            t_local=self._clock(),
            t_start=t_start,
            output_ms={},
        )
        attempt = replace(attempt, phase=self._phase_record(plan))
        self._write(attempt, state)
        return attempt

    def _phase_record(self, plan) -> dict[str, Any]:
        gate = self.phase
        rec: dict[str, Any] = {
            "target_deg": round(gate.settings.target_deg, 2),
            "estimator": gate.settings.estimator,
        }
        if plan is not None:
            rec.update(plan.record(gate.target))
            rec.pop("phase_target_deg", None)
        return rec

    def _wait_until(self, t_target: float) -> None:
        """Sleep, then spin, until the clock reaches t_target; feed the watchdog; return early
        on a disarm (the caller's halted() check then stops the stimulating outputs)."""
        il, clock, keep = self.interlock, self._clock, self.keepalive
        while True:
            rem = t_target - clock()
            if rem <= 0.0 or il.halted():
                return
            if keep is not None:
                keep()
            if rem > SPIN_S:
                time.sleep(min(rem - SPIN_S, WAIT_SLICE_S))

    def _fire(
        self,
        state: State,
        request: PulseRequest,
        t_decided: float,
        t_start: float,
        t_arrival: float,
        plan=None,
        phase: dict[str, Any] | None = None,
    ) -> Attempt:
        il = self.interlock
        n = il.pulse_count
        # write-ahead: the intent is durable before any output fires (one write and one fsync,
        # with the interlock lines of the grant); without it there is no pulse
        intent = {
            "event": "intent",
            "attempt": self._n_attempts + 1,
            "pulse_number": n,
            "t_stream": state.t_stream,
            "t_local": t_decided,
            "t_wall": time.time(),
            "outputs": self._output_names,
        }
        if plan is not None:  # a scheduled pulse: when it is meant to leave
            intent["scheduled_in_ms"] = round(1000.0 * plan.delay_s, 3)
        try:
            self.audit.write_many([*self._drain_pending(), intent])
        except Exception as exc:
            il.fault(VetoReason.AUDIT, state.t_stream, f"intent not written, no pulse: {exc}")
            il.pulse_done()
            return self._attempt(
                state,
                request,
                fired=False,
                reason=VetoReason.AUDIT.value,
                detail=str(exc),
                pulse_number=None,
                t_local=t_decided,
                t_start=t_start,
                output_ms={},
            )
        delay_s = 0.0 if plan is None else plan.delay_s
        t_planned = math.nan
        if plan is not None and self._live:
            # scheduled: the outputs go at the planned instant (the intent's fsync counts in)
            t_planned = t_decided + delay_s
            self._wait_until(t_planned)
        t_fire = self._clock()
        # the sample's age beyond the planned wait (the wait is by design, not staleness); a
        # wait cut short by a disarm goes on to the outputs' halted() check ('halted')
        cut_short = plan is not None and self._live and il.halted()
        late = (
            None if cut_short else il.sample_age_veto(state.t_stream + delay_s, t_arrival + delay_s)
        )
        if late is None and plan is not None and self._live and not cut_short:
            # past the planned instant by more than the tolerance: not at the target phase
            # (e.g. a 70 ms intent fsync on a busy disk); a pulse in flight, not fired
            overdue_s = t_fire - t_planned
            tol_s = math.radians(self.phase.settings.tolerance_deg) / (2 * math.pi * plan.freq_hz)
            if overdue_s > tol_s:
                il.pulse_done()
                attempt = self._attempt(
                    state,
                    request,
                    fired=False,
                    reason=PHASE_LATE,
                    detail=f"{1000 * overdue_s:.1f} ms after the planned instant",
                    pulse_number=n,
                    t_local=t_fire,
                    t_start=t_start,
                    output_ms={},
                )
                return replace(attempt, phase=phase)
        if late is not None:
            # the intent's fsync (4-5 ms median, 70 ms max on a busy disk here) pushed the
            # deciding sample past the latency budget: the brain state has moved on
            il.pulse_done()
            attempt = self._attempt(
                state,
                request,
                fired=False,
                reason=late.reason.value,
                detail=f"{late.detail}, once the intent was durable",
                pulse_number=n,
                t_local=t_fire,
                t_start=t_start,
                output_ms={},
            )
            return replace(attempt, phase=phase) if phase is not None else attempt
        info = PulseInfo(
            pulse_number=n,
            t_stream=state.t_stream,
            t_fire=t_fire,
            # offline, a scheduled pulse is placed at its planned stream time
            t_marker=t_fire if self._live else state.t_stream + delay_s,
            t_start=t_start,
            score=state.score,
            label=state.label.value,
            reason=request.reason,
        )
        output_ms: dict[str, float] = {}
        stimulated: list[str] = []
        error = ""
        code = VetoReason.OUTPUT_ERROR  # OUTPUT_GUARD when a hardware output's guard refused
        stim_error = False
        halted = False
        with self._io_lock:
            try:
                for out in self.outputs:
                    if out.stimulates:
                        if error:
                            continue  # never stimulate again once this pulse had an error
                        if il.halted():  # disarm / e-stop / watchdog since the grant
                            halted = True
                            continue
                    elif halted and not stimulated:
                        continue  # nothing reached a stimulator: no record of a pulse
                    t0 = self._clock()
                    self._stim_busy = out.stimulates
                    try:
                        out.fire(info)
                    except Exception as exc:  # OutputError, or a bug: both are faults
                        stim_error = stim_error or out.stimulates
                        if not error:
                            error = (
                                str(exc)
                                if isinstance(exc, OutputError)
                                else (f"{out.name}: {type(exc).__name__}: {exc}")
                            )
                            if isinstance(exc, OutputGuardError):
                                code = VetoReason.OUTPUT_GUARD
                            info = replace(info, reason=f"{info.reason}; {code.value}")
                            il.fault(code, state.t_stream, error)
                    else:
                        if out.stimulates:
                            stimulated.append(out.name)
                    dt_ms = 1000.0 * (self._clock() - t0)
                    output_ms[out.name] = dt_ms
                    self._output_max_ms[out.name] = max(self._output_max_ms[out.name], dt_ms)
            finally:
                self._stim_busy = False
                il.pulse_done()
        if error:
            self._n_output_errors += 1
            reason, detail = code.value, error
        elif halted:
            reason, detail = HALTED, f"disarmed before the output fired: {il.last_reason}"
        else:
            reason, detail = "fired", ""
        attempt = self._attempt(
            state,
            request,
            fired=not (stim_error or halted),
            reason=reason,
            detail=detail,
            pulse_number=n,
            t_local=t_fire,
            t_start=t_start,
            output_ms=output_ms,
            stimulated=tuple(stimulated),
        )
        if phase is None:
            return attempt
        phase = dict(phase)
        if self._live:
            err_ms = 1000.0 * (t_fire - t_planned)
            phase["sched_error_ms"] = round(err_ms, 4)
            # the pulse's stream time: live stamps are on the local clock (LslSource corrects)
            phase["t_pulse"] = t_fire + self.phase.output_latency_s
            if attempt.fired:
                self._sched_err_ms.append(err_ms)
        else:
            phase["sched_error_ms"] = 0.0  # placed at the planned sample by construction
            phase["t_pulse"] = state.t_stream + delay_s + self.phase.output_latency_s
        if attempt.fired:
            self.phase_pulses.append((phase["t_pulse"], self.phase.target, attempt.attempt_number))
        return replace(attempt, phase=phase)

    def _attempt(
        self,
        state: State,
        request: PulseRequest,
        *,
        fired: bool,
        reason: str,
        detail: str,
        pulse_number: int | None,
        t_local: float,
        t_start: float,
        output_ms: dict[str, float],
        stimulated: tuple[str, ...] = (),
    ) -> Attempt:
        latency_ms = 1000.0 * (self._clock() - t_start)
        self._n_attempts += 1
        if fired:
            self._n_fired += 1
            self._latencies_ms.append(latency_ms)
        elif pulse_number is None:
            self._vetoes[reason] += 1
        return Attempt(
            fired=fired,
            reason=reason,
            detail=detail,
            attempt_number=self._n_attempts,
            pulse_number=pulse_number,
            t_stream=state.t_stream,
            t_local=t_local,
            latency_ms=latency_ms,
            score=state.score,
            label=state.label.value,
            features=state.features,
            request=request.reason,
            interlock=self.interlock.state.value,
            output_ms=output_ms,
            stimulated=stimulated,
        )

    def _write(self, attempt: Attempt, state: State) -> None:
        record = attempt.to_record()
        record["t_wall"] = time.time()  # for humans only; intervals use the clocks
        record["time_in_state_s"] = state.time_in_state_s
        record["z"] = state.z
        record["artifacts"] = list(state.artifacts)
        records = [*self._drain_pending(), record]  # interlock lines first: the log stays in order
        try:
            self.audit.write_many(records)  # one fsync per attempt
        except Exception as exc:
            # an attempt that cannot be audited must not be followed by more pulses (the log
            # now refuses every line, so no intent, so no pulse, and arming is refused)
            self.interlock.fault(VetoReason.AUDIT, attempt.t_stream, f"audit log: {exc}")
            raise

    def on_health(self, event: HealthEvent) -> None:
        """A fault disarms with its reason; info events (flowing, restored) never re-arm."""
        if event.is_fault:
            reason = HEALTH_REASONS.get(event.kind, VetoReason.BAD_INPUT)
            detail = f"{event.kind.value}: {event.detail}" if event.detail else event.kind.value
            self.interlock.fault(reason, event.t_stream, detail)
            self._flush_pending()

    def fault(self, reason: str | VetoReason, t_stream: float = math.nan, detail: str = "") -> None:
        """Any fault found outside the trigger stage (exception in features, a tap): DISARMED.
        A plain string is a generic fault ('fault: <reason>')."""
        if isinstance(reason, VetoReason):
            self.interlock.fault(reason, t_stream, detail)
        else:
            text = f"{reason}: {detail}" if detail else reason
            self.interlock.fault(VetoReason.FAULT, t_stream, text)
        self._flush_pending()

    # ---- operator (any thread) -------------------------------------------------------------
    def arm(
        self,
        action: str,
        operator: str = "",
        *,
        t_stream: float = math.nan,
        calibrated: bool = True,
    ) -> None:
        """Check every output (serial opened and probed), then arm. Raises ArmError if refused.

        action: the operator action ('gui_button', 'cli_flag', 'mqtt_remote'). t_stream: stream
        time of the arming (for arm expiry offline); defaults to the newest state's time.
        The interlock is armed when this returns, and disarmed when it raises (also when the
        arming itself could not be audited).
        """
        if not math.isfinite(t_stream):
            t_stream = self._t_stream_last
        if self._closed:
            raise ArmError("trigger unit is closed")
        if self.audit.failed:
            raise ArmError(f"audit log failed ({self.audit.failed}): no arming this session")
        with self._io_lock:
            for out in self.outputs:
                try:
                    out.check()
                except Exception as exc:
                    msg = f"output {out.name} not ready: {exc}"
                    self._audit_event("arm_refused", msg, action=action, operator=operator)
                    self.interlock.disarm(f"arm refused: {msg}", t_stream)
                    self._flush_pending()
                    raise ArmError(msg) from exc
        try:
            self.interlock.arm(action, t_stream, operator, calibrated=calibrated)
        except ArmError as exc:
            self._audit_event("arm_refused", str(exc), action=action, operator=operator)
            self._flush_pending()
            raise
        if self._closed:  # closed by another thread while this arm was checking outputs
            self.interlock.disarm("arm raced close", t_stream)
            self._flush_pending()
            raise ArmError("trigger unit is closed")
        if not self._flush_pending():  # armed, but the arming is not in the log: undo it
            raise ArmError(f"the arming could not be audited ({self.audit.failed}): disarmed")

    def disarm(self, reason: str) -> None:
        """Disarm now from any thread: the interlock first (a pulse granted but not yet fired
        is stopped before its stimulating outputs), then, when a stimulating output is inside
        fire() (maybe blocked), the stimulating outputs are closed (`arm` opens them again),
        then the audit line. Never waits for the firing thread.

        Outputs are not closed on every disarm: the latch already stops the next fire, and
        re-opening a port at each arming could glitch RTS/DTR lines (pyserial raises them at
        open). The emergency stop and the watchdog always close them."""
        self.interlock.disarm(reason, self._t_stream_last)
        if self._stim_busy:
            self._halt_outputs()
        self._flush_pending()

    def emergency_stop(self, source: str = "operator") -> None:
        """Disarm and latch for the rest of the session (arming is refused afterwards); as
        `disarm`, it never waits for the firing thread."""
        self.interlock.emergency_stop(f"emergency stop ({source})", self._t_stream_last)
        self._halt_outputs()
        self._flush_pending()

    def audit_note(self, event: str, reason: str, **extra: Any) -> None:
        """Write one operator record (e.g. event 'thresholds', reason = who changed them) to
        the audit log, in order with the attempts and interlock lines (any thread; fsynced).
        Raises AuditError when the line could not be written (the unit is then disarmed,
        reason `audit`): the caller decides whether to undo its change."""
        if not self._audit_event(event, reason, **extra):
            raise AuditError(f"audit log failed: {self.audit.failed}")

    def halt(self, reason: VetoReason, detail: str = "") -> None:
        """A fault seen from outside the loop (the watchdog): disarm, close the stimulating
        outputs, audit. Like `disarm`, never waits for the firing thread; it can never fire."""
        self.interlock.fault(reason, self._t_stream_last, detail)
        self._halt_outputs()
        self._flush_pending()

    def _halt_outputs(self) -> None:
        """Close the stimulating outputs without `_io_lock` (the firing thread may hold it,
        blocked in a write): a closed port makes that write fail. In a helper thread, joined
        for at most HALT_JOIN_S, so a close that hangs in a driver cannot hold the caller."""
        stim = [o for o in self.outputs if o.stimulates]
        if not stim:
            return

        def close_all() -> None:
            for out in stim:
                try:
                    out.close()
                except Exception as exc:  # reported in the audit; the latch already holds
                    self._pending.append(
                        {
                            "event": "close_error",
                            "t_wall": time.time(),
                            "t_local": self._clock(),
                            "reason": f"{out.name}: {type(exc).__name__}: {exc}",
                        }
                    )

        t = threading.Thread(target=close_all, name="halt-outputs", daemon=True)
        t.start()
        t.join(HALT_JOIN_S)

    def close(self, reason: str = "shutdown") -> None:
        """Disarm, close every output, then flush and close the audit log. Idempotent.

        Every step runs whatever an earlier one raised; an audit failure is raised at the end
        (AuditError), after the outputs are closed."""
        if self._closed:
            return
        self._closed = True
        self.interlock.disarm(reason, self._t_stream_last)
        audited = self._flush_pending()
        errors = []
        # the loop has ended when close runs; a fire hung in another thread must not stop the
        # outputs from closing (they are closed without the lock after this wait)
        locked = self._io_lock.acquire(timeout=1.0)
        try:
            for out in self.outputs:
                try:
                    out.close()
                except Exception as exc:
                    errors.append(f"{out.name}: {exc}")
        finally:
            if locked:
                self._io_lock.release()
        if errors:
            audited = self._audit_event("close_error", "; ".join(errors)) and audited
        try:
            self.audit.close()
        except Exception as exc:
            raise AuditError(f"audit log close failed: {exc}") from exc
        if not audited:
            raise AuditError(f"audit log incomplete: {self.audit.failed}")

    def __enter__(self) -> TriggerUnit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_observer(self, fn: Callable[[str, str], None]) -> None:
        """Call fn(state, reason) (e.g. 'disarmed', 'sample_gap: 12 ms') on each interlock state
        change, in the thread that caused it (maybe the acquisition thread just before the
        outputs fire): fn must be cheap and must not block (a bus emit is fine)."""
        self.interlock.add_observer(lambda old, new, reason, t: fn(new.value, reason))

    # ---- records -------------------------------------------------------------------------
    def _on_interlock_change(
        self, old: InterlockState, new: InterlockState, reason: str, t_stream: float
    ) -> None:
        self._pending.append(
            {
                "event": "interlock",
                "t_wall": time.time(),
                "t_local": self._clock(),
                "reason": reason,
                "old": old.value,
                "new": new.value,
                "t_stream": t_stream,
                "pulse_count": self.interlock.pulse_count,
            }
        )

    def _drain_pending(self) -> list[dict[str, Any]]:
        out = []
        while self._pending:
            try:
                out.append(self._pending.popleft())
            except IndexError:  # drained by another thread
                break
        return out

    def _flush_pending(self, sync: bool = True) -> bool:
        """Write the queued interlock lines. False (after disarming, reason `audit`) when the
        log failed: callers in fault paths go on (the disarm they made stands)."""
        records = self._drain_pending()
        if not records:
            return not self.audit.failed
        if self.audit.closed:  # after close(): nothing more can be recorded (not a failure)
            return False
        try:
            self.audit.write_many(records, sync)
        except Exception as exc:
            self._audit_failed(exc)
            return False
        return True

    def _audit_failed(self, exc: Exception) -> None:
        """Fail closed: disarmed with reason `audit`; the log refuses every later line."""
        self.interlock.fault(VetoReason.AUDIT, self._t_stream_last, str(exc))
        self._pending.clear()  # unwritable; the state they describe is DISARMED now

    def _audit_event(self, event: str, reason: str, **extra: Any) -> bool:
        record = {
            "event": event,
            "t_wall": time.time(),
            "t_local": self._clock(),
            "reason": reason,
            **extra,
        }
        records = [*self._drain_pending(), record]  # keep the log in order
        try:
            self.audit.write_many(records)
        except Exception as exc:
            self._audit_failed(exc)
            return False
        return True

    @property
    def counts(self) -> tuple[int, int]:
        """(fired, vetoed) so far: cheap, for status lines (`stats` computes percentiles)."""
        return self._n_fired, sum(self._vetoes.values())

    @property
    def stats(self) -> dict[str, Any]:
        """Counts and latencies (ms) so far; computed on demand (not for the per-chunk path)."""
        lat = np.asarray(self._latencies_ms, dtype=float)
        summary = (
            {
                "median": float(np.median(lat)),
                "p99": float(np.percentile(lat, 99)),
                "max": float(lat.max()),
                "n": int(lat.size),
            }
            if lat.size
            else {"median": math.nan, "p99": math.nan, "max": math.nan, "n": 0}
        )
        out = {
            "attempts": self._n_attempts,
            "fired": self._n_fired,
            "output_errors": self._n_output_errors,
            "vetoed": sum(self._vetoes.values()),
            "vetoes_by_reason": dict(self._vetoes),
            "latency_ms": summary,
            "output_max_ms": dict(self._output_max_ms),
            "pulse_count": self.interlock.pulse_count,
            "state": self.interlock.state.value,
        }
        if self.phase is not None:
            sched = np.asarray(self._sched_err_ms, dtype=float)
            out["phase_sched_error_ms"] = (
                {
                    "median": float(np.median(sched)),
                    "p99": float(np.percentile(np.abs(sched), 99)),
                    "max": float(np.abs(sched).max()),
                    "n": int(sched.size),
                }
                if sched.size
                else {"n": 0}
            )
        return out

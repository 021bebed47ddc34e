"""TriggerUnit: policy -> interlock -> outputs -> audit, called once per chunk by the pipeline.

`on_state` runs in the acquisition thread, right after the estimator. Only a PulseRequest of the
policy is an attempt: it is checked by the interlock, fired on every output in the fixed order
(serial TTL, simulated, LSL marker, bus), timed, and audited as one JSON line whether it fired or
was vetoed. Any output error or exception while firing is a fault: the interlock disarms.
`arm`, `disarm` and `emergency_stop` may come from other threads (GUI, MQTT).
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
from triggers.audit import AuditLog
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


@dataclass(frozen=True, slots=True)
class Attempt:
    """One pulse request and what became of it (also one line of the audit log).

    fired: every stimulating output (serial, simulated) returned without error.
    reason: 'fired', a VetoReason value, or 'output_error' (any output failed; the interlock is
    then DISARMED; fired stays True when only a record output such as the marker failed), or
    'output_guard' (a hardware output's own guard refused the fire: nothing was sent).
    pulse_number: the session pulse count for a pulse that went to the outputs (also on output
    error: the interlock counts it, conservatively), None when vetoed.
    t_local: clock when the decision was taken. latency_ms: arrival of the deciding chunk (or,
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

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict (the core of the audit line; also the bus 'attempt' payload)."""
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
        self._closed = False
        self._t_stream_last = math.nan
        self._n_attempts = 0
        self._n_fired = 0
        self._n_output_errors = 0
        self._vetoes: Counter[str] = Counter()
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_HISTORY)
        self._output_max_ms = dict.fromkeys(names, 0.0)
        # interlock changes are queued by the observer and written after the attempt: an fsync
        # (0.13 ms median, 0.8 ms max) must not sit between the decision and the TTL
        self._pending: deque[dict[str, Any]] = deque()
        interlock.add_observer(self._on_interlock_change)

    # ---- per chunk (acquisition thread) ----------------------------------------------------
    def on_state(self, state: State, t_arrival: float = math.nan) -> Attempt | None:
        """Feed one estimator output; returns the Attempt when the policy asked for a pulse.

        t_arrival: local_clock() when the deciding chunk arrived (nan offline).
        Any exception disarms (fault) and is re-raised: loud, and safe.
        """
        try:
            return self._on_state(state, t_arrival)
        except Exception as exc:
            t_stream = getattr(state, "t_stream", math.nan)
            self.interlock.fault(VetoReason.FAULT, t_stream, f"{type(exc).__name__}: {exc}")
            self._flush_pending()
            raise

    def _on_state(self, state: State, t_arrival: float) -> Attempt | None:
        self._t_stream_last = state.t_stream
        self.interlock.tick(state.t_stream)
        request = self.policy.update(state)
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
            attempt = self._fire(state, request, t_decided, t_start)
        self._write(attempt, state)
        return attempt

    def _fire(self, state: State, request: PulseRequest, t_fire: float, t_start: float) -> Attempt:
        n = self.interlock.pulse_count
        info = PulseInfo(
            pulse_number=n,
            t_stream=state.t_stream,
            t_fire=t_fire,
            t_marker=t_fire if self._live else state.t_stream,
            t_start=t_start,
            score=state.score,
            label=state.label.value,
            reason=request.reason,
        )
        output_ms: dict[str, float] = {}
        error = ""
        code = VetoReason.OUTPUT_ERROR  # OUTPUT_GUARD when a hardware output's guard refused
        stim_error = False
        with self._io_lock:
            try:
                for out in self.outputs:
                    if error and out.stimulates:
                        continue  # never stimulate again once this pulse had an error
                    t0 = self._clock()
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
                            self.interlock.fault(code, state.t_stream, error)
                    dt_ms = 1000.0 * (self._clock() - t0)
                    output_ms[out.name] = dt_ms
                    self._output_max_ms[out.name] = max(self._output_max_ms[out.name], dt_ms)
            finally:
                self.interlock.pulse_done()
        if error:
            self._n_output_errors += 1
        return self._attempt(
            state,
            request,
            fired=not stim_error,
            reason=code.value if error else "fired",
            detail=error,
            pulse_number=n,
            t_local=t_fire,
            t_start=t_start,
            output_ms=output_ms,
        )

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
            # an attempt that cannot be audited must not be followed by more pulses
            self.interlock.fault(VetoReason.FAULT, attempt.t_stream, f"audit log: {exc}")
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
        """
        if not math.isfinite(t_stream):
            t_stream = self._t_stream_last
        if self._closed:
            raise ArmError("trigger unit is closed")
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
            raise
        finally:
            self._flush_pending()

    def disarm(self, reason: str) -> None:
        self.interlock.disarm(reason, self._t_stream_last)
        self._flush_pending()

    def emergency_stop(self, source: str = "operator") -> None:
        """Disarm and latch for the rest of the session (arming is refused afterwards)."""
        self.interlock.emergency_stop(f"emergency stop ({source})", self._t_stream_last)
        self._flush_pending()

    def close(self, reason: str = "shutdown") -> None:
        """Disarm, close every output, then flush and close the audit log. Idempotent."""
        if self._closed:
            return
        self.interlock.disarm(reason, self._t_stream_last)
        self._flush_pending()
        self._closed = True
        errors = []
        with self._io_lock:
            for out in self.outputs:
                try:
                    out.close()
                except Exception as exc:
                    errors.append(f"{out.name}: {exc}")
        if errors:
            self._audit_event("close_error", "; ".join(errors))
        self.audit.close()

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

    def _flush_pending(self, sync: bool = True) -> None:
        records = self._drain_pending()
        if records:
            self.audit.write_many(records, sync)

    def _audit_event(self, event: str, reason: str, **extra: Any) -> None:
        self._flush_pending()  # keep the log in order
        record = {
            "event": event,
            "t_wall": time.time(),
            "t_local": self._clock(),
            "reason": reason,
            **extra,
        }
        self.audit.write(record)

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
        return {
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

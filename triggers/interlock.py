"""The safety interlock: may a pulse happen at all? Small and boring on purpose.

States: DISARMED (start, after any fault or disarm) -> ARMED (only by `arm`, naming the operator
action) -> pulse -> REFRACTORY (min interval not elapsed) -> ARMED. Every limit holds on stream
time; in live mode also on the monotonic `clock` (a stalled or fast-forwarded stream cannot
bypass it). The hard limits of `triggers.settings` are checked again here, whatever the settings.

Thread model: the acquisition thread calls `tick`, `check`, `request`, `pulse_done`; front ends
(GUI, MQTT) call `arm`, `disarm`, `emergency_stop` from their threads. One lock guards the state;
observers are called after the lock is released, so they may call back into the interlock.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from pylsl import local_clock

from triggers.settings import (
    HARD_MAX_PER_MINUTE,
    HARD_MIN_INTERVAL_S,
    HARD_SESSION_CAP,
    MAX_LATENCY_BUDGET_MS,
    MAX_STALE_AFTER_S,
    RATE_WINDOW_S,
    SafetySettings,
)

# The longest a granted pulse may be scheduled ahead (phase mode waits at most one cycle of the
# slowest rhythm it serves, theta at 4 Hz: 250 ms; `triggers.phase_gate.MAX_WAIT_S`)
MAX_SCHEDULE_S = 0.5


class InterlockState(str, Enum):
    DISARMED = "disarmed"
    ARMED = "armed"
    REFRACTORY = "refractory"


class VetoReason(str, Enum):
    NOT_ARMED = "not_armed"
    REFRACTORY = "refractory"
    RATE_LIMIT = "rate_limit"
    SESSION_CAP = "session_cap"
    STALE_DATA = "stale_data"
    SAMPLE_GAP = "sample_gap"
    STREAM_LOST = "stream_lost"
    ARTIFACT = "artifact"
    UNCALIBRATED = "uncalibrated"
    OUTPUT_ERROR = "output_error"
    OUTPUT_GUARD = "output_guard"  # a hardware output's own guard refused a fire (triggers.guard)
    LATE = "late"
    IN_FLIGHT = "in_flight"
    BAD_INPUT = "bad_input"  # fault: non-finite samples, channel mismatch
    WATCHDOG = "watchdog"  # the loop completed no step within safety.watchdog_ms while armed
    AUDIT = "audit"  # the audit log could not be written: no pulse may go unrecorded
    FAULT = "fault"  # any other fault (exception, shutdown, emergency stop)


@dataclass(frozen=True, slots=True)
class Veto:
    reason: VetoReason
    detail: str = ""


class HardLimitError(ValueError):
    """Settings beyond a hard safety limit (raised at construction)."""


class ArmError(RuntimeError):
    """Arming was refused; the message says why. The interlock stays DISARMED."""


# observer(old, new, reason, t_stream)
Observer = Callable[[InterlockState, InterlockState, str, float], None]


def check_hard_limits(s: SafetySettings) -> None:
    """Raise HardLimitError if `s` exceeds a hard limit (works on unvalidated models too)."""
    if not s.min_interval_s >= HARD_MIN_INTERVAL_S:  # `not >=` also refuses nan
        raise HardLimitError(
            f"min_interval_s={s.min_interval_s} below HARD_MIN_INTERVAL_S={HARD_MIN_INTERVAL_S}"
        )
    if not 1 <= s.max_per_minute <= HARD_MAX_PER_MINUTE:
        raise HardLimitError(
            f"max_per_minute={s.max_per_minute} outside "
            f"1..HARD_MAX_PER_MINUTE={HARD_MAX_PER_MINUTE}"
        )
    if not 1 <= s.session_cap <= HARD_SESSION_CAP:
        raise HardLimitError(
            f"session_cap={s.session_cap} outside 1..HARD_SESSION_CAP={HARD_SESSION_CAP}"
        )
    for name, most in (
        ("latency_budget_ms", MAX_LATENCY_BUDGET_MS),
        ("stale_after_s", MAX_STALE_AFTER_S),
    ):
        if not 0.0 < getattr(s, name) <= most:
            raise HardLimitError(f"{name}={getattr(s, name)} must be > 0 and <= {most:g}")
    if s.arm_expiry_min is not None and not s.arm_expiry_min > 0.0:
        raise HardLimitError(f"arm_expiry_min={s.arm_expiry_min} must be > 0 or None")


class SafetyInterlock:
    """Arming, refractory, rate, cap, staleness and latency checks. See the module docstring."""

    def __init__(
        self,
        settings: SafetySettings,
        clock: Callable[[], float] = local_clock,
        live: bool = True,
        stamps_ahead_ok: bool = False,
    ) -> None:
        """clock: the local clock; live, sample timestamps must be on it (LslSource adds the
        inlet's time correction). stamps_ahead_ok: the stream is a declared replay faster than
        real time (its stamps run ahead of the clock by design; only simulated outputs then):
        a sample stamped ahead of the clock is aged by its pull instead of being vetoed."""
        check_hard_limits(settings)
        self.settings = settings
        self._clock = clock
        self._live = live
        self.live = live  # read-only for callers: limits also hold on `clock` when True
        self._stamps_ahead_ok = stamps_ahead_ok
        self._lock = threading.Lock()
        self._observers: list[Observer] = []
        self._min_interval_s = float(settings.min_interval_s)
        self._max_per_window = int(settings.max_per_minute)
        self._cap = int(settings.session_cap)
        self._expiry_s = (
            math.inf if settings.arm_expiry_min is None else 60.0 * settings.arm_expiry_min
        )
        self._stale_s = float(settings.stale_after_s)
        self._budget_s = settings.latency_budget_ms / 1000.0
        self._reset()

    def _reset(self) -> None:
        self.state = InterlockState.DISARMED
        self.last_reason = "start"
        self.pulse_count = 0
        self.in_flight = False
        self.locked_out = False  # after emergency_stop: never arms again
        # +1 on every entry into DISARMED (lock held). `request` notes it for a granted pulse
        # (`granted_epoch`); the trigger unit compares the two before each stimulating output
        # fires, so a disarm or emergency stop from any thread stops a pulse already in flight
        # without waiting for any lock the firing thread holds (a plain int read)
        self.disarm_epoch = 0
        self.granted_epoch = -1
        self._disarm_code = VetoReason.NOT_ARMED
        self._t_newest_stream = -math.inf  # newest stream time seen by tick/check
        self._t_armed_stream = math.nan
        self._t_armed_local = math.nan
        # (t_stream, t_local) of fired pulses in the rolling window; oldest first
        self._recent: deque[tuple[float, float]] = deque(maxlen=HARD_MAX_PER_MINUTE + 1)

    # ---- observers -------------------------------------------------------------------------
    def add_observer(self, fn: Observer) -> None:
        """Call fn(old, new, reason, t_stream) on every state change, in the thread that caused
        it (possibly the acquisition thread between decision and outputs): keep fn cheap."""
        self._observers.append(fn)

    def _notify(self, changes: list[tuple[InterlockState, InterlockState, str, float]]) -> None:
        for old, new, reason, t in changes:
            for fn in self._observers:
                fn(old, new, reason, t)

    def _set(self, new: InterlockState, reason: str, t: float, changes: list) -> None:
        if new is InterlockState.DISARMED:
            self.disarm_epoch += 1
        if new is not self.state:
            changes.append((self.state, new, reason, t))
            self.state = new
        self.last_reason = reason

    # ---- operator and fault transitions --------------------------------------------------
    def arm(
        self, action: str, t_stream: float = math.nan, operator: str = "", calibrated: bool = True
    ) -> None:
        """Arm by an explicit operator action ('gui_button', 'cli_flag', 'mqtt_remote').

        Raises ArmError (and stays DISARMED) when refused. Arming while armed renews the expiry.
        """
        changes: list = []
        with self._lock:
            if not isinstance(action, str) or not action.strip():
                raise ArmError("arm needs the name of the operator action, e.g. 'gui_button'")
            if self.locked_out:
                raise ArmError(f"emergency stop latched ({self.last_reason}); restart the session")
            if self.pulse_count >= self._cap:
                raise ArmError(f"session cap of {self._cap} pulses reached")
            if self.settings.require_calibration and not calibrated:
                raise ArmError("not calibrated: run the baseline calibration before arming")
            t_known = t_stream if math.isfinite(t_stream) else self._t_newest_stream
            self._t_armed_stream = t_known if math.isfinite(t_known) else math.nan
            self._t_armed_local = self._clock()
            who = f" by {operator}" if operator else ""
            if self.state is InterlockState.DISARMED:
                self._set(InterlockState.ARMED, f"armed: {action}{who}", t_stream, changes)
        self._notify(changes)

    def disarm(self, reason: str, t_stream: float = math.nan) -> None:
        """Disarm now (always allowed, idempotent)."""
        self._disarm(VetoReason.NOT_ARMED, reason, t_stream)

    def fault(self, reason: VetoReason, t_stream: float = math.nan, detail: str = "") -> None:
        """A fault: DISARMED with the reason; later vetoes carry this reason until re-armed."""
        self._disarm(reason, f"{reason.value}: {detail}" if detail else reason.value, t_stream)

    def emergency_stop(self, reason: str = "emergency stop", t_stream: float = math.nan) -> None:
        """Disarm and latch: `arm` is refused for the rest of this interlock's life."""
        with self._lock:
            self.locked_out = True
        self._disarm(VetoReason.FAULT, reason, t_stream)

    def _disarm(self, code: VetoReason, reason: str, t_stream: float) -> None:
        changes: list = []
        with self._lock:
            self._disarm_code = code
            self._set(InterlockState.DISARMED, reason, t_stream, changes)
        self._notify(changes)

    # ---- per-chunk calls (acquisition thread) ----------------------------------------------
    def tick(self, t_stream: float) -> None:
        """Advance time: arm expiry and the end of REFRACTORY. Call once per chunk."""
        changes: list = []
        with self._lock:
            self._advance(t_stream, changes)
        self._notify(changes)

    def check(
        self,
        t_sample: float,
        t_arrival: float = math.nan,
        *,
        calibrated: bool = True,
        artifact: bool = False,
    ) -> Veto | None:
        """Would a pulse decided on the sample at stream time `t_sample` be allowed now?

        t_arrival: local clock when the deciding chunk arrived (nan offline: no 'late' check).
        Live, the sample's age (clock now - t_sample, both on the local clock) decides: older
        than stale_after_s is 'stale_data', older than latency_budget_ms (or stamped ahead of
        the clock, or any time unknown) is 'late'.
        """
        changes: list = []
        with self._lock:
            veto = self._check(t_sample, t_arrival, calibrated, artifact, changes)
        self._notify(changes)
        return veto

    def request(
        self,
        t_sample: float,
        t_arrival: float = math.nan,
        *,
        calibrated: bool = True,
        artifact: bool = False,
        delay_s: float = 0.0,
    ) -> Veto | None:
        """`check` and, when allowed, record the pulse atomically (it is then in flight).

        The caller fires its outputs and must then call `pulse_done()`; before each stimulating
        output it checks `halted()` (a disarm since the grant).
        delay_s: a pulse scheduled this far ahead (phase mode, at most a cycle): it is checked
        now (the interval from the previous pulse's recorded time to now, the rate over the
        minute before now: both only shorter than at the pulse) and recorded at now + delay_s,
        when it leaves, so the next pulse's interval counts from there.
        """
        if not 0.0 <= delay_s <= MAX_SCHEDULE_S:  # nan too: a bug in the caller, never a pulse
            raise ValueError(f"pulse delay {delay_s!r} s outside 0..{MAX_SCHEDULE_S:g} s")
        changes: list = []
        with self._lock:
            veto = self._check(t_sample, t_arrival, calibrated, artifact, changes)
            if veto is None:
                self._record(t_sample, changes, delay_s)
                # after _record: the pulse that reaches the session cap disarms, yet may fire
                self.granted_epoch = self.disarm_epoch
        self._notify(changes)
        return veto

    def halted(self) -> bool:
        """True when a disarm, fault or emergency stop came after the last granted pulse (no
        lock: read by the firing thread before each stimulating output)."""
        return self.disarm_epoch != self.granted_epoch

    def pulse_done(self) -> None:
        """The outputs of the pulse in flight have returned."""
        with self._lock:
            self.in_flight = False

    # ---- internals (lock held) -------------------------------------------------------------
    def _advance(self, t_stream: float, changes: list) -> None:
        self._t_newest_stream = max(self._t_newest_stream, t_stream)  # nan leaves it as is
        if self.state is InterlockState.DISARMED:
            return
        if self._live:
            armed_for = self._clock() - self._t_armed_local
        else:
            if math.isnan(self._t_armed_stream) and math.isfinite(self._t_newest_stream):
                self._t_armed_stream = self._t_newest_stream  # armed before any data
            armed_for = self._t_newest_stream - self._t_armed_stream  # nan before data
        if armed_for > self._expiry_s:
            self._disarm_code = VetoReason.NOT_ARMED
            self._set(InterlockState.DISARMED, "arm expired", t_stream, changes)
        elif self.state is InterlockState.REFRACTORY and self._interval_elapsed(t_stream):
            self._set(InterlockState.ARMED, "refractory over", t_stream, changes)

    def _interval_elapsed(self, t_stream: float) -> bool:
        if not self._recent:
            return True
        last_stream, last_local = self._recent[-1]
        # `not (a >= b)` is also True for nan: unknown time counts as "too soon"
        if not t_stream - last_stream >= self._min_interval_s:
            return False
        return not (self._live and not self._clock() - last_local >= self._min_interval_s)

    def _window_count(self, t_stream: float) -> int:
        """Fired pulses within RATE_WINDOW_S on stream time (or, live, on the local clock).

        The window is closed: pulses 1.0 s apart at 0, 1, ..., 60 s would put 61 in [0, 60], so
        with max_per_minute=60 the 61st waits until just after 60 s."""
        now = self._clock() if self._live else math.nan
        n = 0
        for ts, tl in self._recent:
            if t_stream - ts <= RATE_WINDOW_S or (self._live and now - tl <= RATE_WINDOW_S):
                n += 1
        return n

    def _check(  # noqa: PLR0911 -- one return per veto, in priority order
        self, t_sample: float, t_arrival: float, calibrated: bool, artifact: bool, changes: list
    ) -> Veto | None:
        self._advance(t_sample, changes)
        if self.in_flight:
            return Veto(VetoReason.IN_FLIGHT)
        if self.state is InterlockState.DISARMED:
            return Veto(self._disarm_code, self.last_reason)
        if self.pulse_count >= self._cap:
            return Veto(VetoReason.SESSION_CAP, f"{self.pulse_count} pulses")
        if not self._interval_elapsed(t_sample):
            return Veto(VetoReason.REFRACTORY)
        if self._window_count(t_sample) >= self._max_per_window:
            return Veto(VetoReason.RATE_LIMIT, f"{self._max_per_window} per {RATE_WINDOW_S:g} s")
        if not self._t_newest_stream - t_sample <= self._stale_s:
            return Veto(VetoReason.STALE_DATA, "behind newest sample")
        if self._live:
            veto = self._age_veto(t_sample, t_arrival)
            if veto is not None:
                return veto
        if artifact:
            return Veto(VetoReason.ARTIFACT)
        if self.settings.require_calibration and not calibrated:
            return Veto(VetoReason.UNCALIBRATED)
        return None

    def sample_age_veto(self, t_sample: float, t_arrival: float) -> Veto | None:
        """Live: `late` / `stale_data` by the deciding sample's age now (None offline). The trigger
        unit asks again once the write-ahead intent is durable (its fsync takes time)."""
        return self._age_veto(t_sample, t_arrival) if self._live else None

    def _age_veto(self, t_sample: float, t_arrival: float) -> Veto | None:
        """Live: the age of the deciding EEG sample, not of the pull (a backlog pulled 0.25 ms
        ago can hold samples 1.26 s old). Fires only when 0 <= age <= budget."""
        now = self._clock()
        age_s = now - t_sample
        pulled_s = now - t_arrival
        if not (math.isfinite(age_s) and math.isfinite(pulled_s)):
            return Veto(VetoReason.LATE, "sample timestamp or arrival time unknown")
        if age_s < 0.0 and self._stamps_ahead_ok:
            age_s = max(pulled_s, 0.0)  # a declared fast replay: only the pull age is known
        if not age_s >= 0.0:
            return Veto(
                VetoReason.LATE, f"sample stamped {-1000 * age_s:.1f} ms ahead of the clock"
            )
        if not age_s <= self._stale_s:
            return Veto(VetoReason.STALE_DATA, f"sample {age_s:.3f} s old")
        if not age_s <= self._budget_s:
            return Veto(VetoReason.LATE, f"sample {1000 * age_s:.1f} ms old")
        return None

    def _record(self, t_sample: float, changes: list, delay_s: float = 0.0) -> None:
        self.pulse_count += 1
        self.in_flight = True
        t_local = self._clock() + delay_s if self._live else math.nan
        self._recent.append((t_sample + delay_s, t_local))
        if self.pulse_count >= self._cap:
            self._disarm_code = VetoReason.SESSION_CAP
            self._set(
                InterlockState.DISARMED, f"session cap of {self._cap} reached", t_sample, changes
            )
        else:
            self._set(InterlockState.REFRACTORY, f"pulse {self.pulse_count}", t_sample, changes)

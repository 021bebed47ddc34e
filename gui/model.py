"""What the console shows, kept apart from Qt: events in, plain values out (testable headless).

`ConsoleModel.apply(events)` folds bus events (drained on each GUI tick) into counters, the pulse
raster, calibration results, health figures and the banner. `Snapshot` is what the window reads
from the running session on each tick (`Session.snapshot()`: plain values, no session lock).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from closedloop.bus import Event
from closedloop.session import SessionSnapshot

GUI_EVENT_KINDS = frozenset(
    {
        "state",
        "attempt",
        "health",
        "interlock",
        "calibration",
        "thresholds",
        "health_event",
        "error",
        "session",
        "emergency_stop",
        "audio_device",
    }
)
# The console does not need per-chunk 'state' events (the scope tap has them as arrays).
POLLED_KINDS = GUI_EVENT_KINDS - {"state"}
MAX_ATTEMPTS_SHOWN = 5000  # raster memory: hours of pulses at the hard rate limit
RATE_WINDOW_S = 60.0  # rolling-minute count shown next to the per-minute limit
LOSS_KINDS = frozenset({"lost", "stale"})
GAP_KINDS = frozenset({"gap", "counter_gap"})
# Disarm reasons that come from this console's own buttons carry this prefix (no banner).
GUI_REASON_PREFIX = "operator (console)"
_NO_BANNER_PREFIXES = (
    GUI_REASON_PREFIX,
    "emergency stop",
    "shutdown",
    "calibration restarted (console",
)


@dataclass(frozen=True, slots=True)
class AttemptMark:
    """One pulse attempt for the raster: stream time (s), fired or vetoed, and why."""

    t_stream: float
    fired: bool
    reason: str = ""
    latency_ms: float = float("nan")

    @property
    def tip(self) -> str:
        what = "fired" if self.fired else f"vetoed: {self.reason or '?'}"
        lat = "" if math.isnan(self.latency_ms) else f" ({self.latency_ms:.2f} ms)"
        return f"{what}{lat}"


# What the window reads from the session each tick (closedloop.session.SessionSnapshot).
Snapshot = SessionSnapshot


def snapshot_of(session: Any) -> Snapshot:
    """The session's own snapshot (a Session, or anything with `snapshot()`)."""
    return session.snapshot()


def latency_samples_ms(pipeline: Any) -> np.ndarray:
    """Recent decision latencies (ms) of a Pipeline, finite values only, copied."""
    lat = np.asarray(pipeline.latency_samples(), dtype=float)
    return lat[np.isfinite(lat)]


@dataclass
class Banner:
    text: str
    t_local: float
    level: str = "alarm"  # alarm (red) or info (amber)


@dataclass
class ConsoleModel:
    """Everything the console derives from events (no Qt, no session access)."""

    attempts: deque[AttemptMark] = field(default_factory=lambda: deque(maxlen=MAX_ATTEMPTS_SHOWN))
    n_fired: int = 0
    n_vetoed: int = 0
    interlock: str = "disarmed"
    interlock_reason: str = ""
    estopped: bool = False
    banner: Banner | None = None
    baseline: dict[str, tuple[float, float]] = field(default_factory=dict)
    calibration_phase: str = "idle"  # idle, started, done, failed
    # what holds the baseline back (progress events), its failure, the channels found bad and
    # the baseline's own score spread (a baseline taken in the target state shows there)
    calibration_note: str = ""
    bad_channels: dict[str, str] = field(default_factory=dict)
    baseline_score: dict[str, float] = field(default_factory=dict)
    thresholds: tuple[float, float] | None = None
    thresholds_source: str = ""
    health: dict[str, Any] = field(default_factory=dict)
    stream_state: str = "not connected"  # connected, flowing, stale, lost, restored
    n_gaps: int = 0
    n_health_faults: int = 0
    session_phase: str = "idle"
    session_folder: str = ""
    stop_reason: str = ""
    errors: list[str] = field(default_factory=list)
    audio_state: str = ""  # participant audio device: open, lost, reopened, wav ('' none)
    audio_backend: str = ""
    audio_detail: str = ""
    audio_losses: int = 0
    audio_reopens: int = 0
    changed_attempts: bool = False  # set when the raster needs a redraw
    changed_baseline: bool = False
    changed_thresholds: bool = False

    def apply(self, events: Iterable[Event]) -> None:
        for ev in events:
            handler = getattr(self, f"_on_{ev.kind}", None)
            if handler is not None:
                handler(ev)

    # ---- handlers ---------------------------------------------------------------------------
    def _on_attempt(self, ev: Event) -> None:
        p = ev.payload
        fired = bool(p.get("fired", False))
        reason = p.get("veto") or p.get("reason") or ""
        detail = p.get("detail") or ""
        reason = getattr(reason, "value", reason)
        if detail and detail != reason:
            reason = f"{reason} ({detail})" if reason else detail
        t = p.get("t_stream", ev.t_stream)
        lat = p.get("latency_ms", float("nan"))
        self.attempts.append(
            AttemptMark(
                float(t), fired, str(reason), float(lat) if lat is not None else float("nan")
            )
        )
        if fired:
            self.n_fired += 1
        else:
            self.n_vetoed += 1
        self.changed_attempts = True

    def _on_interlock(self, ev: Event) -> None:
        p = ev.payload
        state = str(getattr(p.get("state"), "value", p.get("state", "")))
        reason = str(p.get("reason", ""))
        previous = self.interlock
        self.interlock, self.interlock_reason = state, reason
        if state == "disarmed" and previous != "disarmed" and not _from_operator(reason):
            self.raise_banner(f"INTERLOCK DISARMED ITSELF: {reason}. Re-arm is manual.", ev.t_local)

    def _on_emergency_stop(self, ev: Event) -> None:
        self.estopped = True
        src = ev.payload.get("source", "?")
        self.raise_banner(
            f"EMERGENCY STOP ({src}): stimulation ended for this session.", ev.t_local
        )

    def _on_health_event(self, ev: Event) -> None:
        kind = str(ev.payload.get("health", ev.payload.get("kind", "")))  # HealthKind value
        detail = str(ev.payload.get("detail", ""))
        if kind in GAP_KINDS:
            self.n_gaps += 1
        if kind in LOSS_KINDS:
            self.n_health_faults += 1
            self.stream_state = kind
            what = "STREAM LOST" if kind == "lost" else "STREAM STALE"
            self.raise_banner(
                f"{what}: {detail or 'no data'}. Interlock disarmed; re-arm is manual.", ev.t_local
            )
        elif kind in ("connected", "flowing", "restored"):
            self.stream_state = kind
            if self.banner is not None and kind in ("flowing", "restored"):
                self.banner.text += f"  [stream {kind} again]"
        elif kind in ("nonfinite", "mismatch"):
            self.n_health_faults += 1

    def _on_health(self, ev: Event) -> None:
        self.health = dict(ev.payload)

    def _on_calibration(self, ev: Event) -> None:
        p = ev.payload
        phase = p.get("phase", "")
        if phase == "started":
            self.calibration_phase = "started"
            self.baseline = {}
            self.calibration_note = ""
            self.changed_baseline = True
        elif phase == "progress":
            top = ", ".join(f"{r} {v:.0%}" for r, v in p.get("top") or [])
            flagged = float(p.get("recent_flagged") or 0.0)
            self.calibration_note = (
                f"clean {float(p.get('clean_s') or 0):.0f}/{float(p.get('target_s') or 0):g} s; "
                f"{flagged:.0%} of the last {p.get('recent_s', 10)} s held back by artifacts"
                + (f": {top}" if top else "")
            )
            self.bad_channels = dict(p.get("bad_channels") or {})
        elif phase == "failed":
            self.calibration_phase = "failed"
            self.calibration_note = str(p.get("reason", "calibration failed"))
            self.raise_banner(f"CALIBRATION FAILED: {self.calibration_note}", ev.t_local)
        elif phase == "done":
            self.calibration_phase = "done"
            self.bad_channels = dict(p.get("bad_channels") or {})
            self.baseline_score = dict(p.get("baseline_score") or {})
            bs = self.baseline_score
            self.calibration_note = (
                f"baseline score p10/p50/p90 {bs['p10']:+.1f}/{bs['p50']:+.1f}/{bs['p90']:+.1f}"
                if {"p10", "p50", "p90"} <= set(bs)
                else ""
            )
            if self.bad_channels:
                self.calibration_note += "; bad: " + ", ".join(self.bad_channels)
            base = p.get("baseline") or {}
            self.baseline = {
                k: (float(v["median"]), float(v["mad"]))
                if isinstance(v, dict)
                else (float(v[0]), float(v[1]))
                for k, v in base.items()
            }
            self.changed_baseline = True

    def _on_thresholds(self, ev: Event) -> None:
        p = ev.payload
        self.thresholds = (float(p["enter"]), float(p["leave"]))
        self.thresholds_source = str(p.get("source", ""))
        self.changed_thresholds = True

    def _on_session(self, ev: Event) -> None:
        p = ev.payload
        self.session_phase = str(p.get("phase", ""))
        if "folder" in p:
            self.session_folder = str(p["folder"])
        if self.session_phase == "stopped":
            self.stop_reason = str(p.get("reason", ""))

    def _on_audio_device(self, ev: Event) -> None:
        """The participant audio output opened, was lost, or was reopened (the session goes on
        either way: the sound is for the participant, not a safety signal)."""
        p = ev.payload
        state = str(p.get("state", ""))
        self.audio_state = state
        self.audio_backend = str(p.get("backend") or self.audio_backend)
        self.audio_detail = str(p.get("detail", ""))
        if state == "lost":
            self.audio_losses += 1
        elif state == "reopened":
            self.audio_reopens += 1

    def _on_error(self, ev: Event) -> None:
        reason = str(ev.payload.get("reason", "error"))
        self.errors.append(reason)
        self.raise_banner(f"ERROR: {reason}", ev.t_local)

    # ---- derived values ----------------------------------------------------------------------
    def raise_banner(self, text: str, t_local: float, level: str = "alarm") -> None:
        self.banner = Banner(text, t_local, level)

    def acknowledge(self) -> None:
        self.banner = None

    def fired_in_window(self, t_now: float, window_s: float = RATE_WINDOW_S) -> int:
        """Fired pulses within `window_s` stream seconds before `t_now`."""
        n = 0
        for a in reversed(self.attempts):
            if t_now - a.t_stream > window_s:
                break
            n += a.fired
        return n


def _from_operator(reason: str) -> bool:
    """A disarm the operator asked for here, or the session's own end (no banner)."""
    low = reason.lower()
    return low.startswith(_NO_BANNER_PREFIXES)


def effective_rate(
    arrival: np.ndarray, n_samples: np.ndarray, t: np.ndarray, window_s: float = 5.0
) -> float:
    """Samples per second over the last `window_s` (local clock live, stream clock offline).

    arrival / n_samples / t: (n,) from `Scope.decisions`; nan when fewer than two chunks.
    """
    if n_samples.size < 2:
        return float("nan")
    clock = arrival if np.isfinite(arrival[-1]) else t
    start = int(np.searchsorted(clock, clock[-1] - window_s))
    start = min(start, n_samples.size - 2)
    dt = clock[-1] - clock[start]
    if not dt > 0:
        return float("nan")
    return float((n_samples[-1] - n_samples[start]) / dt)

"""Neurofeedback for the participant: score -> feedback value, LSL stream, trace, audio, sham.

`Feedback` is set up by the session from the `feedback:` YAML section. Its `tap` runs in the
acquisition thread after every decision (Pipeline.taps) and only does cheap things: smooth and
map the score (or look the value up in a sham trace), push one LSL sample, write one row of a
preallocated ring. A writer thread drains the ring every WRITER_PERIOD_S into `feedback.csv`
and the WAV renderer; an audio device's thread and the participant window read the newest row
themselves (the device every `audio.period_ms`, the window on its own QTimer).

Feedback value: v = clip((ema(score) - lo) / (hi - lo), 0, 1), ema an exponential moving average
with time constant `smoothing_s` in stream seconds (so replay at any speed or chunk size gives
the same trace); nan (no feedback: idle display, silence) while the score is nan (before
calibration). `target` is the estimator's label == TARGET.

Sham: the value and target shown at stream time t are those the earlier session's trace had at
the same elapsed time, elapsed = t - t_first, t_first the stream time of the session's first
decision (the first tap call; within one chunk of the session start); the newest earlier row at
or before that elapsed time is used (zero-order hold), nan before its first row and after its
last. Pulses still follow the live state (`sham.pulses: live`) or are disabled (`disabled`).
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pylsl

from closedloop.participant.audio import DeviceFeedbackAudio, GuidedAudio, open_feedback_audio
from closedloop.participant.settings import (
    TRACE_NAME,
    FeedbackSettings,
    trace_path,
)
from features.types import Label, State

SUMMARY_NAME = "feedback.json"
TRACE_COLUMNS = ("t_stream", "elapsed_s", "score", "value", "target", "entry", "mode")
RING_ROWS = 1 << 16  # 65536 updates: > 10 min of 10-sample chunks at 1 kHz
WRITER_PERIOD_S = 0.05  # trace / audio writer wake-up period
SHAM_TOL_S = 1e-6  # elapsed-time match tolerance: absorbs float rounding of t - t0
FRAME_RING = 4096  # participant-window frame latencies kept for percentiles


def read_trace(path: Path) -> dict[str, np.ndarray]:
    """Read a feedback trace. Returns column -> array (n,); 'mode' as str, the rest float64."""
    path = trace_path(path)
    with path.open(encoding="utf-8") as f:
        header = f.readline().strip().split(",")
        if tuple(header) != TRACE_COLUMNS:
            raise ValueError(f"{path}: not a feedback trace (header {header})")
        rows = [line.rstrip("\n").split(",") for line in f if line.strip()]
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(TRACE_COLUMNS):
        col = [r[i] for r in rows]
        out[name] = np.array(col, dtype=str if name == "mode" else float)
    return out


class FeedbackMapper:
    """Score -> feedback value: exponential smoothing in stream time, then a clipped range map."""

    def __init__(self, smoothing_s: float, score_range: tuple[float, float]) -> None:
        self.tau = smoothing_s
        self.lo, self.hi = score_range
        self.ema = math.nan
        self._t = math.nan

    def reset(self) -> None:
        self.ema = self._t = math.nan

    def step(self, t_stream: float, score: float) -> float:
        """One update; returns the feedback value in 0..1 (nan while the score is nan)."""
        if not math.isfinite(score):
            self.reset()  # restart smoothing from the next finite score (no stale memory)
            return math.nan
        if not math.isfinite(self.ema) or self.tau == 0.0:
            self.ema = score
        else:
            dt = max(0.0, t_stream - self._t)
            self.ema += (1.0 - math.exp(-dt / self.tau)) * (score - self.ema)
        self._t = t_stream
        v = (self.ema - self.lo) / (self.hi - self.lo)
        return 0.0 if v < 0.0 else 1.0 if v > 1.0 else v


class ShamSource:
    """An earlier session's feedback trace, looked up by elapsed time (zero-order hold)."""

    def __init__(self, path: Path) -> None:
        self.path = trace_path(path)
        tr = read_trace(self.path)
        order = np.argsort(tr["elapsed_s"], kind="stable")
        self.elapsed = np.ascontiguousarray(tr["elapsed_s"][order])
        self.value = np.ascontiguousarray(tr["value"][order])
        self.target = np.ascontiguousarray(tr["target"][order] > 0.5)
        self.end_s = float(self.elapsed[-1]) if len(self.elapsed) else -math.inf

    def lookup(self, elapsed_s: float) -> tuple[float, bool]:
        """(value, target) shown at `elapsed_s` in the earlier session; (nan, False) outside it."""
        if elapsed_s > self.end_s + SHAM_TOL_S:
            return math.nan, False
        i = int(np.searchsorted(self.elapsed, elapsed_s + SHAM_TOL_S, side="right")) - 1
        if i < 0:
            return math.nan, False
        return float(self.value[i]), bool(self.target[i])


class FeedbackOutlet:
    """Irregular-rate float32 LSL stream: feedback (0..1, nan = none), target (0/1), score."""

    CHANNELS = ("feedback", "target", "score")

    def __init__(self, name: str, source_id: str, mode: str) -> None:
        info = pylsl.StreamInfo(
            name, "Feedback", len(self.CHANNELS), pylsl.IRREGULAR_RATE, pylsl.cf_float32, source_id
        )
        chans = info.desc().append_child("channels")
        for label in self.CHANNELS:
            ch = chans.append_child("channel")
            ch.append_child_value("label", label)
            ch.append_child_value("type", "feedback")
        info.desc().append_child_value("mode", mode)  # 'live' or 'sham': the score is always live
        self.source_id = source_id
        self._outlet: pylsl.StreamOutlet | None = pylsl.StreamOutlet(info)
        self._sample = np.zeros(len(self.CHANNELS), dtype=np.float32)  # reused per update

    def push(self, t_stream: float, value: float, target: bool, score: float) -> None:
        if self._outlet is None:
            return
        s = self._sample
        s[0], s[1], s[2] = value, float(target), score
        self._outlet.push_sample(s, t_stream)

    def close(self) -> None:
        self._outlet = None


class Feedback:
    """Participant feedback for one session. `tap` goes into Pipeline.taps.

    Life cycle: `from_settings(...)` (opens LSL outlets, the trace file and audio) ->
    `start()` (writer thread, guided audio autostart) -> `tap(chunk, state)` per decision ->
    `close()` (idempotent: stops guided audio, drains the ring, writes feedback.json).
    """

    def __init__(
        self,
        settings: FeedbackSettings,
        folder: Path,
        bus=None,
        clock: Callable[[], float] = pylsl.local_clock,
        live: bool = True,
    ) -> None:
        self.settings = settings
        self.live = live
        self.folder = Path(folder)
        self.bus = bus
        self.clock = clock
        self.mode = settings.mode
        self.mapper = FeedbackMapper(settings.smoothing_s, settings.score_range)
        self.sham = ShamSource(settings.sham.source) if settings.mode == "sham" else None
        tag = uuid.uuid4().hex[:8]
        self.outlet = (
            FeedbackOutlet(settings.lsl_name, f"{settings.lsl_name}-{tag}", settings.mode)
            if settings.publish_lsl
            else None
        )
        # guided audio runs on the local clock: meaningless against a replay's stream time
        self.guided_skipped = settings.guided.path is not None and not live
        self.guided = (
            GuidedAudio(
                settings.guided,
                f"{settings.guided.marker_stream}-{tag}",
                emit=self._emit,
                clock=clock,
                device=settings.audio.device,
            )
            if settings.guided.path is not None and live
            else None
        )
        # ring of updates, written by the acquisition thread only (single producer)
        self._t = np.full(RING_ROWS, np.nan)
        self._elapsed = np.full(RING_ROWS, np.nan)
        self._score = np.full(RING_ROWS, np.nan)
        self._value = np.full(RING_ROWS, np.nan)
        self._target = np.zeros(RING_ROWS, dtype=bool)
        self._entry = np.zeros(RING_ROWS, dtype=bool)
        self._t_local = np.full(RING_ROWS, np.nan)
        self.n = 0  # updates so far (published after the row is written)
        self._n_written = 0  # rows drained by the writer
        self.overruns = 0  # rows lost because the writer fell RING_ROWS behind
        self.entries = 0
        self.t_first = math.nan
        self._prev_target = False
        self._sham_exhausted = False
        self._frame_ms = np.full(FRAME_RING, np.nan)
        self.n_frames = 0
        # after the ring: a device's thread polls it from the start.
        # offline (replay as fast as the CPU allows) a device would play garbage: render to WAV
        audio = settings.audio if live else settings.audio.model_copy(update={"output": "wav"})
        try:
            self.audio = (
                open_feedback_audio(audio, self.folder, poll=self._audio_poll)
                if audio.enabled
                else None
            )
        except Exception:
            if self.guided is not None:  # release its outlet and device before failing
                self.guided.close()
            raise
        self._trace = (self.folder / TRACE_NAME).open("w", encoding="utf-8")
        self._trace.write(",".join(TRACE_COLUMNS) + "\n")
        self._stop = threading.Event()
        self._writer = threading.Thread(
            target=self._run_writer, name="feedback-writer", daemon=True
        )
        self._closed = False
        self.error: str | None = None

    @classmethod
    def from_settings(
        cls, settings: FeedbackSettings, session_folder: Path, bus=None, live: bool = True
    ) -> Feedback:
        """Set up for one session. live=False (offline replay): audio renders to WAV whatever
        `audio.output` says, and guided audio is skipped (it runs on the local clock)."""
        return cls(settings, session_folder, bus, live=live)

    # ---- properties for the session / GUI ------------------------------------------------------
    @property
    def pulses_allowed(self) -> bool:
        """False in sham mode with `sham.pulses: disabled` (the session must refuse to arm)."""
        return not (self.mode == "sham" and self.settings.sham.pulses == "disabled")

    @property
    def source_ids(self) -> list[str]:
        """LSL source ids to record into the session XDF (feedback stream, guided markers)."""
        ids = [self.outlet.source_id] if self.outlet is not None else []
        if self.guided is not None:
            ids.append(self.guided.source_id)
        return ids

    def latest(self) -> tuple[float, bool, float, int]:
        """(value, target, t_local of the tap, update count) of the newest update; GUI thread."""
        n = self.n
        if n == 0:
            return math.nan, False, math.nan, 0
        i = (n - 1) % RING_ROWS
        return float(self._value[i]), bool(self._target[i]), float(self._t_local[i]), n

    def _audio_poll(self) -> tuple[float, float, int, int]:
        """For the audio device's thread: (value, t_local, update count, target entries)."""
        value, _, t_local, n = self.latest()
        return value, t_local, n, self.entries

    def note_frame(self, latency_s: float) -> None:
        """The window reports score-computed -> frame-shown latency of each new frame."""
        self._frame_ms[self.n_frames % FRAME_RING] = latency_s * 1e3
        self.n_frames += 1

    def frame_latency_ms(self) -> dict[str, float]:
        """p50 / p99 / max of the frame latencies reported so far (nan if none)."""
        k = min(self.n_frames, FRAME_RING)
        if k == 0:
            return {"p50": math.nan, "p99": math.nan, "max": math.nan, "n": 0}
        lat = self._frame_ms[:k]
        p50, p99 = np.percentile(lat, [50, 99])
        return {"p50": float(p50), "p99": float(p99), "max": float(lat.max()), "n": self.n_frames}

    # ---- hot path --------------------------------------------------------------------------
    def tap(self, chunk, state: State) -> None:
        """Pipeline tap (acquisition thread): one update per decision; cheap, never blocks."""
        self.push(state.t_stream, state.score, state.label is Label.TARGET)

    def push(self, t_stream: float, score: float, live_target: bool) -> None:
        t_local = self.clock()
        if self.n == 0:
            self.t_first = t_stream
        elapsed = t_stream - self.t_first
        if self.sham is None:
            value, target = self.mapper.step(t_stream, score), live_target
        else:
            self.mapper.step(t_stream, score)  # kept warm: a record of what live would have shown
            value, target = self.sham.lookup(elapsed)
            if not self._sham_exhausted and elapsed > self.sham.end_s + SHAM_TOL_S:
                self._sham_exhausted = True
                self._emit("feedback", t_stream, event="sham_exhausted", elapsed_s=elapsed)
        entry = target and not self._prev_target
        self._prev_target = target
        i = self.n % RING_ROWS
        self._t[i], self._elapsed[i], self._score[i] = t_stream, elapsed, score
        self._value[i], self._target[i], self._entry[i], self._t_local[i] = (
            value,
            target,
            entry,
            t_local,
        )
        self.n += 1
        if self.outlet is not None:
            self.outlet.push(t_stream, value, target, score)
        if entry:
            self.entries += 1
            self._emit("feedback", t_stream, event="target_entry", mode=self.mode)

    # ---- life cycle ------------------------------------------------------------------------
    def start(self) -> Feedback:
        self._emit("feedback", event="started", **self._record())
        if isinstance(self.audio, DeviceFeedbackAudio):
            self._emit("audio_device", state="open", detail="", backend=self.audio.backend)
        if self.guided_skipped:
            self._emit(
                "guided_audio",
                action="skipped",
                file=str(self.settings.guided.path),
                detail="offline session: guided audio plays only in live sessions",
            )
        self._writer.start()
        if self.guided is not None and self.settings.guided.autostart:
            self.guided.start()
        return self

    def _emit(self, kind: str, t_stream: float | None = None, **payload: Any) -> None:
        if self.bus is None:
            return
        if t_stream is None:
            t_stream = float(self._t[(self.n - 1) % RING_ROWS]) if self.n else math.nan
        self.bus.emit(kind, t_stream, **payload)

    def _drain(self) -> None:
        n = self.n
        start = self._n_written
        if n - start > RING_ROWS:
            self.overruns += n - start - RING_ROWS
            start = n - RING_ROWS
        if n == start:
            return
        idx = np.arange(start, n) % RING_ROWS
        t, value, entry = self._t[idx], self._value[idx], self._entry[idx]
        lines = [
            f"{a!r},{b!r},{c!r},{d!r},{int(e)},{int(f)},{self.mode}\n"
            for a, b, c, d, e, f in zip(
                t.tolist(),
                self._elapsed[idx].tolist(),
                self._score[idx].tolist(),
                value.tolist(),
                self._target[idx].tolist(),
                entry.tolist(),
                strict=True,
            )
        ]
        self._trace.writelines(lines)
        self._trace.flush()
        if self.audio is not None:
            self.audio.feed(t, value, entry)
        self._n_written = n

    def _check_audio(self) -> None:
        """A lost audio output is reported, and reopened when it is back (the session goes on)."""
        check = getattr(self.audio, "check", None)
        change = check() if check is not None else None
        if change is not None:
            state, detail = change
            self._emit("audio_device", state=state, detail=detail, backend=self.audio.backend)

    def _run_writer(self) -> None:
        while not self._stop.wait(WRITER_PERIOD_S):
            self._check_audio()
            try:
                self._drain()
            except Exception as exc:  # loud, but the session (and its pulses) go on
                self.error = f"feedback writer: {type(exc).__name__}: {exc}"
                self._emit("error", reason=self.error)
                return

    def _record(self) -> dict[str, Any]:
        s = self.settings
        return {
            "mode": self.mode,
            "sham_source": str(self.sham.path) if self.sham is not None else None,
            "sham_pulses": s.sham.pulses if self.mode == "sham" else None,
            "pulses_allowed": self.pulses_allowed,
            "audio": None if self.audio is None else self.audio.kind,
            "audio_file": str(getattr(self.audio, "path", "")) or None,
            "guided_file": str(s.guided.path) if s.guided.path is not None else None,
            "guided_skipped": self.guided_skipped,
            "live": self.live,
            "lsl_stream": s.lsl_name if s.publish_lsl else None,
        }

    def summary(self) -> dict[str, Any]:
        """What ran (mode first: the session record must say clearly live or sham) and figures."""
        return {
            **self._record(),
            "updates": self.n,
            "target_entries": self.entries,
            "chimes": len(self.audio.chimes_at) if self.audio is not None else 0,
            # device only: backend, seconds played vs open, score computed -> rendered into
            # the device (p50/p99/max ms; the device's buffer comes on top), first error
            "audio_device": self.audio.health()
            if isinstance(self.audio, DeviceFeedbackAudio)
            else None,
            "overruns": self.overruns,
            "sham_exhausted": self._sham_exhausted,
            "frame_latency_ms": self.frame_latency_ms(),
            "guided_markers": [m for _, m in self.guided.markers]
            if self.guided is not None
            else [],
            "error": self.error,
            "settings": json.loads(self.settings.model_dump_json()),
        }

    def close(self) -> dict[str, Any]:
        """Stop guided audio, drain everything, close files and outlets; returns summary()."""
        if self._closed:
            return self.summary()
        self._closed = True
        if self.guided is not None:
            self.guided.close()
        self._stop.set()
        if self._writer.is_alive():
            self._writer.join(timeout=5.0)
        if self.error is None:
            self._drain()
        self._trace.close()
        if self.audio is not None:
            self.audio.close()
        if self.outlet is not None:
            self.outlet.close()
        summary = self.summary()
        device = summary["audio_device"]
        if device is not None and device["error"] is not None:
            self._emit("error", reason=f"feedback audio: {device['error']}")
        (self.folder / SUMMARY_NAME).write_text(
            json.dumps(summary, indent=2, default=str, allow_nan=True), encoding="utf-8"
        )
        self._emit(
            "feedback",
            event="stopped",
            mode=self.mode,
            updates=self.n,
            target_entries=self.entries,
            overruns=self.overruns,
        )
        return summary

    def __enter__(self) -> Feedback:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

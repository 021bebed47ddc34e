"""Phase mode, seen as it runs: the acausal reference phase at each fired pulse, computed on the
data around it once that data has arrived, and the rhythm's narrow-band SNR.

`PhaseMonitor` is a pipeline tap (it runs after the decision, so it never delays a pulse). It
keeps the newest few seconds of the phase gate's spatially filtered signal with their stream
times; for each fired pulse (the trigger unit's `phase_pulses`) it waits until `AFTER_S` of
data past the pulse is there, then takes the zero-phase reference (`features.phase.
reference_phase`: five equivalent filters averaged) over `BEFORE_S` + `AFTER_S` around it and
reads the phase at the pulse's time. That is the same reference the benchmark scores against,
on a window rather than the whole recording: 1 s on each side is over five cycles of the
slowest filter's impulse response at 8 Hz, so the edge effects have died out at the centre.
`closedloop.load.pulse_phases` does the same on a finished session's whole recording.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from features.phase import narrowband_snr_db, phase_error_stats, reference_phase

BEFORE_S = 1.5  # data before the pulse in the reference window
AFTER_S = 1.0  # data after the pulse needed before its reference phase is computed
KEEP_S = 4.0  # ring length (s): the window plus a chunk backlog
# stream s between SNR updates (0.1-0.2 ms each at 1 kHz: a tap, after the decision)
SNR_PERIOD_S = 1.0
ERRORS_KEPT = 2000  # per-pulse results kept for the console and the summary


def phase_at(times: np.ndarray, phase: np.ndarray, t: float) -> float:
    """The phase (rad) at time t, linear between the two nearest samples (times ascending)."""
    k = int(np.searchsorted(times, t))
    if k <= 0 or k >= times.size:
        return math.nan
    t0, t1 = times[k - 1], times[k]
    frac = 0.0 if t1 <= t0 else (t - t0) / (t1 - t0)
    step = math.remainder(phase[k] - phase[k - 1], 2 * math.pi)
    return math.remainder(phase[k - 1] + frac * step, 2 * math.pi)


class PhaseMonitor:
    """Tap: `__call__(chunk, state)`; `results` holds one dict per resolved pulse."""

    def __init__(self, gate, pulses: deque) -> None:
        self.gate = gate
        self.pulses = pulses  # (t_pulse, target rad, attempt number), appended by TriggerUnit
        self.sfreq = gate.tracker.sfreq
        n = max(8, round(KEEP_S * self.sfreq))
        self._x = np.zeros(n)
        self._t = np.full(n, np.nan)
        self._n = 0
        self.snr_db = math.nan
        self._t_snr = -math.inf
        self.results: deque[dict[str, Any]] = deque(maxlen=ERRORS_KEPT)

    def __call__(self, chunk, state) -> None:
        x = chunk.data @ self.gate.tracker.weights
        m, n = x.size, self._x.size
        if m >= n:
            self._x[:], self._t[:] = x[-n:], chunk.timestamps[-n:]
        else:
            i = self._n % n
            first = min(m, n - i)
            self._x[i : i + first], self._t[i : i + first] = x[:first], chunk.timestamps[:first]
            self._x[: m - first], self._t[: m - first] = x[first:], chunk.timestamps[first:]
        self._n += m
        t_new = float(chunk.timestamps[-1])
        if t_new >= self._t_snr + SNR_PERIOD_S and self.gate.tracker.ready:
            self._t_snr = t_new
            tr = self.gate.tracker
            self.snr_db = narrowband_snr_db(tr.window(), tr.sfreq, tr.band)
        while self.pulses and self.pulses[0][0] + AFTER_S <= t_new:
            self._resolve(*self.pulses.popleft())

    def _ordered(self) -> tuple[np.ndarray, np.ndarray]:
        n = self._x.size
        if self._n < n:
            return self._x[: self._n], self._t[: self._n]
        i = self._n % n
        return np.roll(self._x, -i), np.roll(self._t, -i)

    def _resolve(self, t_pulse: float, target: float, attempt: int) -> None:
        x, t = self._ordered()
        sel = (t >= t_pulse - BEFORE_S) & (t <= t_pulse + AFTER_S)
        error = ref = spread_deg = math.nan
        if sel.sum() >= 0.9 * (BEFORE_S + AFTER_S) * self.sfreq:
            ref_phase, _, spread = reference_phase(
                x[sel], self.sfreq, self.gate.tracker.configured_band
            )
            ref = phase_at(t[sel], ref_phase, t_pulse)
            error = math.remainder(ref - target, 2 * math.pi)
            k = int(np.clip(np.searchsorted(t[sel], t_pulse), 0, spread.size - 1))
            spread_deg = math.degrees(float(spread[k]))
        self.results.append(
            {
                "attempt": attempt,
                "t_pulse": t_pulse,
                "reference_deg": math.degrees(ref),
                "error_deg": math.degrees(error),
                "reference_spread_deg": spread_deg,
            }
        )

    def flush(self) -> None:
        """At the end: resolve what is left with the data there is (nan when too little)."""
        while self.pulses:
            self._resolve(*self.pulses.popleft())

    def errors_deg(self) -> tuple[float, ...]:
        """Phase errors (deg) of the resolved pulses, oldest first (nan: too little data)."""
        return tuple(r["error_deg"] for r in list(self.results))

    def stats(self) -> dict[str, float]:
        """bias, circular SD, PLV, shares within +-30 / +-45 deg (features.phase)."""
        e = np.radians(np.asarray(self.errors_deg(), dtype=float))
        return phase_error_stats(e)

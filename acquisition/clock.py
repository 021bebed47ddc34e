"""Clock model of a regular stream: sample index against time, fitted online.

Real amplifier apps stamp each chunk with `local_clock()` when they push it (LSL back-dates the
other samples by 1/sfreq), USB delivers in bursts (FTDI latency timer: 16 ms) and the sender is
descheduled now and then, so the step between consecutive timestamps ranges from below zero to
several sample periods while no sample is missing (DESIGN: "Facts measured"). Those delays are
almost all positive: a sample is stamped late, rarely early. So the model is the *lower
envelope* of `offset(k) = t(k) - k / sfreq` (k: index of the sample since the anchor):

- The minimum offset of each `BLOCK_S` block of samples is kept in a ring of `WINDOW_BLOCKS`
  blocks (20 s); at each closed block a robust line (median of the slopes between blocks half
  the window apart, median intercept: robust to a quarter of outlying blocks) is fitted, so
  the line follows slow drift (a crystal that is 100 ppm off moves the offset by 6 ms a
  minute) and ignores late chunks. Before the first fit (`MIN_FIT_BLOCKS` blocks) the running
  minimum is the model.
- A chunk whose last sample lies more than `tolerance_s` above the line is a *suspect*; the
  next chunks confirm it (late by as much for `confirm_s` of samples: samples are missing, a
  gap is reported and the line starts again from there) or clear it (on time again: the
  suspect was only stamped late; or less late by a sample or more: a sender that stalled, e.g.
  descheduled for 50 ms, pushing its backlog, all stamped at once; then that chunk is the
  suspect and the next ones judge).
  Symmetrically, a chunk more than `tolerance_s` below the line, confirmed by the next, is a
  clock reset (the sender's clock jumped back; the model starts again). Within the tolerance,
  every step is jitter.
- An effective rate more than `MAX_RATE_SHORTFALL` below nominal over the window (the fitted
  line rising faster than any crystal drifts) is reported once too: samples lost a few at a
  time, each loss below the tolerance.
- The dejittered timestamps are the line itself (an exact grid at the fitted rate), slewed by
  at most half a period per chunk when a refit moves the line, so they never step backwards.

Prior art: LSL's `proc_dejitter` (recursive least squares with a 90 s half-life: tens of seconds
to settle, mean not envelope), pyxdf's `_jitter_removal` (offline least squares per segment,
new segment after a 1 s / 500-sample break), mne-lsl (uses LSL's flags). This one has to judge
each chunk as it arrives, in O(1): per chunk a few numpy calls on preallocated arrays
(~6-10 µs, benchmarks/bench_clock.py), plus a ~30 µs refit every `BLOCK_S`.
"""

from __future__ import annotations

import math

import numpy as np

# Block of samples whose minimum offset is one point of the fit (0.5 s: 12 chunks of 10 at
# 250 Hz, so a block holds at least one chunk stamped with the smallest delay).
BLOCK_S = 0.5
# Blocks in the fitting window (20 s): long enough for the slope to be exact to ~0.1 ms/s with
# 16 ms of jitter, short enough to follow a drift that changes with temperature.
WINDOW_BLOCKS = 40
# Blocks before the first line fit (until then: the running minimum, and no reset reports).
MIN_FIT_BLOCKS = 3
# Before the first fit, a chunk this far below the running minimum (and the next one too) is a
# clock reset; less is the first chunks having been stamped late (pyxdf: 1 s jitter break).
UNFITTED_RESET_S = 1.0
# Offset rising faster than this (1% of the nominal rate) over the window: the effective rate
# falls short (crystals are 20-100 ppm off; 1% is 2.5 samples a second lost at 250 Hz).
MAX_RATE_SHORTFALL = 0.01

# The arrival check (report_early=False) judges lateness only while the fitted rate is within
# this fraction of nominal (a live sender; crystals are 20-100 ppm off).
MAX_ARRIVAL_RATE_DEV = 0.02

# Verdicts of ClockModel.update.
OK = 0
GAP = 1  # samples missing (confirmed late chunk)
RESET = 2  # clock jumped backwards (confirmed early chunk)
RATE = 3  # effective rate short of nominal over the window


def _median(values: np.ndarray) -> float:
    """Median of a short array (<= WINDOW_BLOCKS): sorted() on a list takes ~3 µs here where
    np.median's Python overhead took ~20 µs."""
    v = sorted(values.tolist())
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


class ClockModel:
    """Lower-envelope line of `t(k) - k / sfreq`, judged and updated once per chunk.

    sfreq: nominal rate (Hz, > 0). tolerance_s: how far a chunk may lie from the line before it
    is suspect (seconds). max_chunk: largest chunk `update` is given (buffers are sized to it).
    report_early: False for the arrival check (see `update_backdated`): early is never a fault.
    confirm_s: a late suspect is a loss once the chunks spanning this much stream time (from
    the suspect's first sample; at least the next chunk) were all late, never less so: 40 ms
    for timestamps (LslSource.TIMESTAMP_CONFIRM_S), 1 s for the arrival check (the arrival of
    samples whose sender stamps them by count carries its scheduling stalls).
    After `update` returns GAP / RESET / RATE, `missing` (samples), `excess_s` (seconds from
    the line) and `t_event` (the dejittered time, as emitted, of the first sample after the
    hole / jump; the suspect chunk's stamps still continue the line: the jump shows from the
    confirming chunk on) tell
    what happened.
    """

    def __init__(
        self,
        sfreq: float,
        tolerance_s: float,
        max_chunk: int,
        *,
        report_early: bool = True,
        confirm_s: float = 0.0,
    ) -> None:
        if not sfreq > 0 or not math.isfinite(sfreq):
            raise ValueError(f"sfreq must be > 0 and finite, got {sfreq}")
        if not tolerance_s > 0:
            raise ValueError(f"tolerance_s must be > 0, got {tolerance_s}")
        self.sfreq = float(sfreq)
        self.period = 1.0 / self.sfreq
        self.tolerance_s = float(tolerance_s)
        self.report_early = report_early
        self._confirm_n = round(confirm_s * self.sfreq)
        self._block_n = max(1, round(BLOCK_S * self.sfreq))
        self._ramp = np.arange(max_chunk, dtype=np.float64) * self.period  # i / sfreq
        self._x = np.empty(max_chunk)  # offsets of the current chunk (scratch)
        self._bk = np.empty(WINDOW_BLOCKS)  # block minima: sample index ...
        self._bx = np.empty(WINDOW_BLOCKS)  # ... and offset, oldest first
        self._dx = np.empty(WINDOW_BLOCKS)  # refit scratch
        self._dk = np.empty(WINDOW_BLOCKS)
        self._res = np.empty(WINDOW_BLOCKS)
        self.missing = 0
        self.excess_s = 0.0
        self.t_event = math.nan
        self.n_gaps = 0
        self.n_resets = 0
        self.n_suspects = 0  # late / early chunks that the next one cleared (jitter)
        self.reset()

    def reset(self, keep_slope: bool = False) -> None:
        """Forget the timeline (a new stream, a clock reset); keep the drift if asked."""
        self._anchor = math.nan  # time of sample 0
        self._k = 0.0  # index of the next sample
        self._a = math.nan  # line: offset(k) = a + b * (k - k_ref)
        self._b = self._b if keep_slope and hasattr(self, "_b") else 0.0
        self._k_ref = 0.0
        self._fitted = False
        self._run_min = math.inf
        self._n_blocks = 0
        self._block_min = math.inf
        self._block_k = 0.0
        self._block_left = self._block_n
        self._pending = 0  # +1 late suspect, -1 early suspect
        self._pending_excess = 0.0
        self._pending_seen = 0
        self._pending_first = 0.0
        self._pending_n0 = 0
        self._pending_t = math.nan
        self._last_out = math.nan
        self._rate_short = False

    # ------------------------------------------------------------------ read-outs
    @property
    def fitted(self) -> bool:
        """True once the line has been fitted (MIN_FIT_BLOCKS blocks since the last reset)."""
        return self._fitted

    @property
    def rate_hz(self) -> float:
        """Effective sampling rate the line says (nominal until fitted)."""
        return 1.0 / (self.period + self._b)

    @property
    def n_samples(self) -> float:
        """Index of the next sample (received plus counted missing) since the anchor."""
        return self._k

    def _predict(self, k: float) -> float:
        if self._fitted:
            return self._a + self._b * (k - self._k_ref)
        return self._run_min

    # -------------------------------------------------------------------- update
    def update(self, ts: np.ndarray, out: np.ndarray | None = None) -> int:
        """Judge a chunk of timestamps (shape (n,), 1 <= n <= max_chunk, seconds), update.

        out: if given (shape (n,)), receives the dejittered timestamps.
        Returns OK, GAP, RESET or RATE (see the module docstring).
        """
        n = ts.shape[0]
        if math.isnan(self._anchor):
            self._anchor = float(ts[0])
        x = self._x[:n]
        np.subtract(ts, self._ramp[:n], out=x)
        x -= self._anchor + self._k * self.period
        return self._judge(float(x[0]), float(x[-1]), float(x.min()), n, out, float(ts[0]), x)

    def update_backdated(self, t_last: float, n: int) -> int:
        """Judge n samples of which the last one exists at t_last (the others back-dated by
        1/sfreq), as LSL stamps a chunk pushed with one timestamp: the arrival check."""
        t_first = t_last - (n - 1) * self.period
        if math.isnan(self._anchor):
            self._anchor = t_first
        x = t_first - self._anchor - self._k * self.period
        return self._judge(x, x, x, n, None, t_first, None)

    def skip(self, n: int) -> None:
        """Count n samples (received, or missing as another check found) without judging."""
        self._k += n
        self._pending = 0

    def _judge(
        self,
        x_first: float,
        x_last: float,
        x_min: float,
        n: int,
        out: np.ndarray | None,
        t_first: float,
        x: np.ndarray | None,
    ) -> int:
        """The chunk's offsets (first, last, smallest; seconds; all of them in x if known)
        against the line."""
        period = self.period
        if math.isinf(self._run_min):
            self._run_min = x_min
        tol = self.tolerance_s
        verdict = OK
        pred = self._predict(self._k)

        # A suspect from the previous chunk: this one confirms or clears it.
        jump = False
        if self._pending > 0:
            late = x_first - pred
            late_last = x_last - pred
            # Still late: samples are missing, once late for confirm_s of samples and not
            # less late by half the samples since the suspect. A sender that stalled and then
            # pushes its backlog stamps it all at about the same time, so the lateness drops
            # by the length of each push, the samples since (a 60 ms stall at 1 kHz: 60, 50,
            # 40, 30 ms late); a loss keeps it, give or take the jitter. If it dropped, this
            # chunk becomes the suspect (below) and the next ones judge.
            if late > tol and late_last > tol:
                self._pending_excess = min(self._pending_excess, late, late_last)
                self._pending_seen += n
                if self._pending_seen < self._confirm_n:  # late, not yet for long enough
                    self._emit(pred, n, out, False)
                    self._k += n
                    return OK
                since = (self._pending_seen - self._pending_n0) * period
                confirmed = self._pending_first - late_last < 0.5 * since
            else:
                confirmed = False
            if confirmed:
                excess = self._pending_excess
                self.missing = max(1, round(excess / period))
                self.excess_s = excess
                self.t_event = self._pending_t  # as emitted: the chunks' timeline
                self.n_gaps += 1
                verdict = GAP
                jump = True
            else:
                self.n_suspects += 1
            self._pending = 0
        elif self._pending < 0:
            early = pred - x_first
            if early > tol:  # still early: the clock went back
                self.excess_s = -min(self._pending_excess, early)
                self.missing = 0
                self.t_event = t_first
                self.n_resets += 1
                verdict = RESET
                jump = True
            else:
                self.n_suspects += 1
            self._pending = 0
        if jump:
            # Start the line again from this chunk (drift kept): after a reset the old line is
            # meaningless, and after a gap this chunk may itself have been stamped late (a
            # sender stalled longer than tolerance + one chunk looks like a loss); the chunks
            # after it then only lower the running minimum, with no reset reported.
            self.reset(keep_slope=True)
            self._anchor = t_first
            if x is not None:
                x -= x_first
            x_min -= x_first
            x_last -= x_first
            x_first = 0.0
            self._run_min = x_min
            pred = x_min
        dev = x_last - pred
        # The arrival check judges only a sender running at about real time: a replay at
        # speed 8 that hiccups is behind its own fast line, not missing samples (measured: a
        # false gap in the demo at --speed 8).
        live_rate = self.report_early or abs(self._b) <= MAX_ARRIVAL_RATE_DEV * period
        if dev > tol and live_rate:
            # Late: keep it out of the fit until the next chunk says why.
            self._pending = 1
            self._pending_excess = dev
            self._pending_first = dev
            self._pending_n0 = n
            self._pending_seen = n
            first = self._emit(pred, n, out, jump)
            # the first late sample: the first one after the hole (rare path, one numpy call)
            i = 0 if x is None or x_first - pred > tol else int(np.argmax(x > pred + tol))
            self._pending_t = first + i * (self.period + self._b)
        elif -dev > tol and self._fitted and not self.report_early:
            # Arrival check: samples coming faster than the line (a replay at speed, a burst
            # after a stall) are no fault; start the line again from here.
            self.reset(keep_slope=True)
            self._anchor = t_first
            self._run_min = x_min - x_first
            self._emit(self._run_min, n, out, True)
        elif -dev > (tol if self._fitted else UNFITTED_RESET_S):
            self._pending = -1
            self._pending_excess = -dev
            self._pending_t = self._emit(pred, n, out, jump)
        else:
            self._run_min = min(self._run_min, x_min)
            if x_min < self._block_min:
                self._block_min = x_min
                self._block_k = self._k + 0.5 * (n - 1)
            self._block_left -= n
            if self._block_left <= 0 and self._close_block() and verdict == OK:
                verdict = RATE
            self._emit(self._predict(self._k), n, out, jump)
        self._k += n
        return verdict

    def _emit(self, pred: float, n: int, out: np.ndarray | None, jump: bool) -> float:
        """Dejittered stamps of the chunk starting at self._k; returns the first one."""
        step = self.period + self._b
        first = self._anchor + self._k * self.period + pred
        if not math.isnan(self._last_out) and not jump:
            # Continue the previous chunk's grid, slewing at most half a period towards the line.
            expected = self._last_out + step
            first = min(max(first, expected - 0.5 * self.period), expected + 0.5 * self.period)
        if out is not None:
            np.multiply(self._ramp[:n], step / self.period, out=out)
            out += first
        self._last_out = first + (n - 1) * step
        return first

    def _close_block(self) -> bool:
        """Push the block minimum into the window and refit; True if the rate became short."""
        m = self._n_blocks
        if m == WINDOW_BLOCKS:
            self._bk[:-1] = self._bk[1:]
            self._bx[:-1] = self._bx[1:]
            m -= 1
        self._bk[m] = self._block_k
        self._bx[m] = self._block_min
        m += 1
        self._n_blocks = m
        self._block_min = math.inf
        self._block_left += self._block_n
        if m < MIN_FIT_BLOCKS:
            return False
        k = self._bk[:m]
        x = self._bx[:m]
        # Slopes between blocks half the window apart (m // 2 pairs, each spanning >= 10 s
        # once the window is full), their median: robust to a quarter of outlying blocks, and
        # O(m), where Theil-Sen's m(m-1)/2 pairs cost as much again.
        h = m - m // 2
        dx = self._dx[: m - h]
        dk = self._dk[: m - h]
        np.subtract(x[h:], x[: m - h], out=dx)
        np.subtract(k[h:], k[: m - h], out=dk)
        dx /= dk
        b = _median(dx)
        self._k_ref = float(k[-1])
        res = self._res[:m]
        np.subtract(k, self._k_ref, out=res)
        res *= -b
        res += x
        self._a = _median(res)
        self._b = b
        self._fitted = True
        short = b > MAX_RATE_SHORTFALL * self.period and m >= WINDOW_BLOCKS // 2
        newly = short and not self._rate_short
        self._rate_short = short
        if newly:
            self.missing = 0
            self.excess_s = 0.0
            self.t_event = self._anchor + self._k * self.period + self._predict(self._k)
        return newly

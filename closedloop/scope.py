"""Scope: ring buffers of the latest EEG and decisions, fed by a pipeline tap, read by the GUI.

The tap runs in the acquisition thread after every decision (`Pipeline.taps`), so it only copies
the chunk into buffers preallocated at construction: no allocation, no lock, no logging.
Measured here (64 ch, 10-sample chunks): about 10 µs per call; `samples(10 s)` copies in 0.16 ms.

Readers (the GUI thread) copy what they need without a lock. The writer stores the samples first
and publishes the new total (`n_samples`) afterwards; a reader takes the total, copies the newest
rows, and copies again if the writer overwrote them meanwhile (it would have to write more than
`RING_MARGIN_S` of data during one copy, which takes well under a millisecond).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from acquisition.chunk import Chunk
from features.types import Label, State

SCOPE_SECONDS = 30.0  # longest trace window the console can show
RING_MARGIN_S = 2.0  # extra ring length so a reader never races the writer
DECISION_RATE_MAX_HZ = 200.0  # decisions per second the decision ring is sized for
LABELS: tuple[Label, ...] = tuple(Label)
_LABEL_INDEX = {lab: i for i, lab in enumerate(LABELS)}
_READ_RETRIES = 3


@dataclass(frozen=True, slots=True)
class SampleView:
    """A copy of the newest samples. t (n,) stream s; data (n, n_channels) volts; art (n,) bool."""

    t: np.ndarray
    data: np.ndarray
    art: np.ndarray
    n_total: int


@dataclass(frozen=True, slots=True)
class DecisionView:
    """A copy of the newest decisions (one per chunk).

    t (n,) stream s of the deciding sample; score (n,); label (n,) index into LABELS;
    features (n, n_features) as State.features; arrival (n,) local_clock() of the pull (nan
    offline); n_samples (n,) samples received up to and including that chunk.
    """

    t: np.ndarray
    score: np.ndarray
    label: np.ndarray
    features: np.ndarray
    arrival: np.ndarray
    n_samples: np.ndarray
    n_total: int


class Scope:
    """Newest `seconds` of EEG and of the state, for display only (never feeds a decision).

    ch_names / sfreq: the stream's channels and nominal rate (Hz).
    feature_names: the State.features keys in order (the chain's `feature_names`).
    """

    def __init__(
        self,
        ch_names: tuple[str, ...] | list[str],
        sfreq: float,
        feature_names: tuple[str, ...] | list[str] = (),
        seconds: float = SCOPE_SECONDS,
    ) -> None:
        if not sfreq > 0:
            raise ValueError(f"sfreq must be > 0, got {sfreq}")
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        self.ch_names = tuple(ch_names)
        self.sfreq = float(sfreq)
        self.feature_names = tuple(feature_names)
        self.seconds = float(seconds)
        n_ch = len(self.ch_names)
        self.capacity = int(np.ceil((seconds + RING_MARGIN_S) * sfreq))
        # float32: display only; halves the copy the GUI makes each frame (64 ch x 32 s x 1 kHz
        # is 8 MB instead of 16 MB).
        self._data = np.zeros((self.capacity, n_ch), dtype=np.float32)
        self._t = np.zeros(self.capacity)
        self._art = np.zeros(self.capacity, dtype=bool)
        self.n_samples = 0  # total written; published after each write
        self.dec_capacity = int(np.ceil((seconds + RING_MARGIN_S) * DECISION_RATE_MAX_HZ))
        self._d_t = np.full(self.dec_capacity, np.nan)
        self._d_score = np.full(self.dec_capacity, np.nan)
        self._d_label = np.zeros(self.dec_capacity, dtype=np.int8)
        self._d_feat = np.full((self.dec_capacity, len(self.feature_names)), np.nan)
        self._d_arrival = np.full(self.dec_capacity, np.nan)
        self._d_nsamp = np.zeros(self.dec_capacity, dtype=np.int64)
        self.n_decisions = 0
        self.last_arrival = float("nan")  # local_clock() of the newest chunk with samples
        self.last_state: State | None = None

    # ---- writer: the pipeline tap (acquisition thread) --------------------------------------
    def __call__(self, chunk: Chunk, state: State) -> None:
        """Pipeline tap: copy the chunk and the decision in (no allocation beyond numpy views)."""
        n = chunk.n_samples
        if n == 0:
            return
        cap = self.capacity
        data, t = chunk.data, chunk.timestamps
        if n > cap:  # only the newest `cap` samples can be kept
            data, t, skipped = data[-cap:], t[-cap:], n - cap
        else:
            skipped = 0
        m = n - skipped
        i = (self.n_samples + skipped) % cap
        art = bool(state.artifacts)
        first = min(m, cap - i)
        self._data[i : i + first] = data[:first]
        self._t[i : i + first] = t[:first]
        self._art[i : i + first] = art
        if first < m:
            rest = m - first
            self._data[:rest] = data[first:]
            self._t[:rest] = t[first:]
            self._art[:rest] = art
        self.n_samples += n
        self.last_arrival = chunk.t_arrival

        j = self.n_decisions % self.dec_capacity
        self._d_t[j] = state.t_stream
        self._d_score[j] = state.score
        self._d_label[j] = _LABEL_INDEX[state.label]
        row = self._d_feat[j]
        for k, value in enumerate(state.features.values()):
            if k < row.shape[0]:
                row[k] = value
        self._d_arrival[j] = chunk.t_arrival
        self._d_nsamp[j] = self.n_samples
        self.last_state = state
        self.n_decisions += 1

    # ---- readers (GUI thread) ---------------------------------------------------------------
    def samples(self, seconds: float) -> SampleView:
        """The newest `seconds` of samples (fewer at the start), copied."""
        want = int(min(round(seconds * self.sfreq), self.capacity - RING_MARGIN_S * self.sfreq))
        for _ in range(_READ_RETRIES):
            total = self.n_samples
            n = min(want, total)
            t, data, art = (_ring_copy(a, total, n) for a in (self._t, self._data, self._art))
            if self.n_samples - total <= self.capacity - n:  # nothing we copied was overwritten
                break
        return SampleView(t, data, art, total)

    def decisions(self, seconds: float) -> DecisionView:
        """The decisions of the newest `seconds` of stream time (at most the ring), copied."""
        want = int(min(seconds * DECISION_RATE_MAX_HZ, self.dec_capacity - 1))
        for _ in range(_READ_RETRIES):
            total = self.n_decisions
            n = min(want, total)
            idx = _ring_index(total, n, self.dec_capacity)
            view = DecisionView(
                self._d_t[idx],
                self._d_score[idx],
                self._d_label[idx],
                self._d_feat[idx],
                self._d_arrival[idx],
                self._d_nsamp[idx],
                total,
            )
            if self.n_decisions - total <= self.dec_capacity - n:
                break
        if n and np.isfinite(view.t[-1]):
            keep = view.t >= view.t[-1] - seconds
            if not keep.all():
                view = DecisionView(
                    view.t[keep],
                    view.score[keep],
                    view.label[keep],
                    view.features[keep],
                    view.arrival[keep],
                    view.n_samples[keep],
                    view.n_total,
                )
        return view


def _ring_copy(ring: np.ndarray, total: int, n: int) -> np.ndarray:
    """Copy of the newest `n` of `total` rows written to `ring`, oldest first (two slices)."""
    cap = ring.shape[0]
    end = total % cap
    if n <= end:
        return ring[end - n : end].copy()
    return np.concatenate([ring[cap - (n - end) :], ring[:end]])


def _ring_index(total: int, n: int, capacity: int) -> np.ndarray:
    """Ring positions of the newest `n` of `total` written items, oldest first."""
    return np.arange(total - n, total) % capacity

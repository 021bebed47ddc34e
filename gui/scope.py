"""Scope: ring buffers of the latest EEG and decisions, fed by a pipeline tap, read by the GUI.

The tap runs in the acquisition thread after every decision (`Pipeline.taps`), so it only copies
the chunk into buffers preallocated at construction: no allocation, no lock, no logging.
Measured here (64 ch, 10-sample chunks): about 10 µs per call; `samples(10 s)` copies in 0.16 ms.

Readers (the GUI thread) copy what they need without a lock. The writer stores the samples first
and publishes the new total (`n_samples`) afterwards; a reader takes the total, copies the newest
rows, and copies again if the writer overwrote them meanwhile (it would have to write more than
`RING_MARGIN_S` of data during one copy, which takes well under a millisecond).

All arrays, the counters and the newest state live in one flat byte buffer (`buffer=`), so the
writer can sit in the session's process and the reader in the console's, through
`multiprocessing.shared_memory` (gui/procrunner.py). The ordering argument above holds across
processes: the counters are plain stores into the same mapping, written after the data.
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
_ALIGN_BYTES = 64
# header slots (float64): newest chunk arrival and the newest State's scalar fields
_LAST_ARRIVAL, _LAST_T, _LAST_LABEL, _LAST_SCORE, _LAST_TIME_IN, _LAST_DWELL = range(6)


def _layout(n_ch: int, n_feat: int, capacity: int, dec_capacity: int) -> list[tuple]:
    """(attribute, dtype, shape, byte offset) of every array in the flat scope buffer."""
    fields = [
        ("_count", np.int64, (2,)),  # n_samples, n_decisions
        ("_last", np.float64, (6,)),
        ("_data", np.float32, (capacity, n_ch)),
        ("_t", np.float64, (capacity,)),
        ("_art", np.bool_, (capacity,)),
        ("_d_t", np.float64, (dec_capacity,)),
        ("_d_score", np.float64, (dec_capacity,)),
        ("_d_label", np.int8, (dec_capacity,)),
        ("_d_feat", np.float64, (dec_capacity, n_feat)),
        ("_d_arrival", np.float64, (dec_capacity,)),
        ("_d_nsamp", np.int64, (dec_capacity,)),
    ]
    out, offset = [], 0
    for name, dtype, shape in fields:
        out.append((name, dtype, shape, offset))
        nbytes = int(np.dtype(dtype).itemsize * np.prod(shape, dtype=np.int64))
        offset += -(-nbytes // _ALIGN_BYTES) * _ALIGN_BYTES
    out.append(("", None, (), offset))  # total size
    return out


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
    buffer: a writable buffer of at least `buffer_size(...)` bytes to keep everything in (e.g.
        `SharedMemory.buf`), else a private one. init: False to attach a reader to a buffer a
        writer already fills (nothing is reset).
    """

    def __init__(
        self,
        ch_names: tuple[str, ...] | list[str],
        sfreq: float,
        feature_names: tuple[str, ...] | list[str] = (),
        seconds: float = SCOPE_SECONDS,
        *,
        buffer: bytearray | memoryview | None = None,
        init: bool = True,
    ) -> None:
        if not sfreq > 0:
            raise ValueError(f"sfreq must be > 0, got {sfreq}")
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        self.ch_names = tuple(ch_names)
        self.sfreq = float(sfreq)
        self.feature_names = tuple(feature_names)
        self.seconds = float(seconds)
        # float32 data: display only; halves the copy the GUI makes each frame (64 ch x 32 s x
        # 1 kHz is 8 MB instead of 16 MB).
        self.capacity = int(np.ceil((seconds + RING_MARGIN_S) * sfreq))
        self.dec_capacity = int(np.ceil((seconds + RING_MARGIN_S) * DECISION_RATE_MAX_HZ))
        n_ch, n_feat = len(self.ch_names), len(self.feature_names)
        layout = _layout(n_ch, n_feat, self.capacity, self.dec_capacity)
        self.nbytes = layout[-1][3]
        if buffer is None:
            buffer = bytearray(self.nbytes)
        elif len(memoryview(buffer).cast("B")) < self.nbytes:
            raise ValueError(f"scope buffer of {len(memoryview(buffer))} bytes < {self.nbytes}")
        self.buffer = buffer
        for name, dtype, shape, offset in layout[:-1]:
            count = int(np.prod(shape, dtype=np.int64))
            arr = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)
            setattr(self, name, arr)
        self._last_obj: State | None = None  # the writer's own newest State (same process)
        if init:
            self._count[:] = 0
            self._last[:] = np.nan
            for a in (self._d_t, self._d_score, self._d_feat, self._d_arrival):
                a[:] = np.nan

    @staticmethod
    def buffer_size(
        n_channels: int, sfreq: float, n_features: int = 0, seconds: float = SCOPE_SECONDS
    ) -> int:
        """Bytes of the flat buffer a Scope with these dimensions needs."""
        cap = int(np.ceil((seconds + RING_MARGIN_S) * sfreq))
        dcap = int(np.ceil((seconds + RING_MARGIN_S) * DECISION_RATE_MAX_HZ))
        return _layout(n_channels, n_features, cap, dcap)[-1][3]

    # ---- counters and the newest state (stored in the buffer) ------------------------------
    @property
    def n_samples(self) -> int:
        """Samples written so far (published after each write)."""
        return int(self._count[0])

    @property
    def n_decisions(self) -> int:
        return int(self._count[1])

    @property
    def last_arrival(self) -> float:
        """local_clock() of the newest chunk with samples (nan before; nan offline)."""
        return float(self._last[_LAST_ARRIVAL])

    @property
    def last_state(self) -> State | None:
        """The newest State: the object itself in the writer's process, else rebuilt from its
        scalar fields (no features, z or artifacts; display only)."""
        if self._last_obj is not None:
            return self._last_obj
        if self.n_decisions == 0:
            return None
        v = self._last.copy()
        return State(
            float(v[_LAST_T]),
            LABELS[int(v[_LAST_LABEL])],
            float(v[_LAST_SCORE]),
            float(v[_LAST_TIME_IN]),
            float(v[_LAST_DWELL]),
        )

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
        i = (int(self._count[0]) + skipped) % cap
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
        self._count[0] += n
        self._last[_LAST_ARRIVAL] = chunk.t_arrival

        j = self.n_decisions % self.dec_capacity
        self._d_t[j] = state.t_stream
        self._d_score[j] = state.score
        self._d_label[j] = _LABEL_INDEX[state.label]
        row = self._d_feat[j]
        for k, value in enumerate(state.features.values()):
            if k < row.shape[0]:
                row[k] = value
        self._d_arrival[j] = chunk.t_arrival
        self._d_nsamp[j] = self._count[0]
        self._last_obj = state
        last = self._last
        last[_LAST_T] = state.t_stream
        last[_LAST_LABEL] = _LABEL_INDEX[state.label]
        last[_LAST_SCORE] = state.score
        last[_LAST_TIME_IN] = state.time_in_state_s
        last[_LAST_DWELL] = state.dwell_progress
        self._count[1] += 1

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

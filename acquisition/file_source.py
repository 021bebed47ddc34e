"""Offline source: a recording served as Chunks on a virtual clock, as fast as the caller pulls.

Same life cycle and Chunk type as the live `LslSource`, so pipelines, policies and fault tests
run unchanged on files. Timestamps are exactly ``t0 + sample_index / sfreq``; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mne
import numpy as np

from acquisition.chunk import Chunk, HealthEvent, HealthKind
from acquisition.contract import Source
from acquisition.readers import load_recording

_NAN = float("nan")


class FileSource(Source):
    """Serve a recording as consecutive Chunks of `chunk_size` samples (the last may be shorter).

    recording: a file path (anything `load_recording` reads) or an mne Raw (not modified).
    picks: channels to serve (mne picks: names, types like "eeg", indices; None = all).
    t0: stream time of the first sample, in seconds.
    counter_channel: a channel holding the sample index; when present (picked or not), a jump
        other than +1 is reported as a COUNTER_GAP event on the chunk holding the later sample.

    Health events on chunks: CONNECTED on the first chunk, NONFINITE on any chunk holding a NaN
    or inf, COUNTER_GAP as above, END on the last chunk. After the last chunk `pull()` returns
    None and `finished` is True. Events carry t_local = nan (offline: there is no local clock),
    like `Chunk.t_arrival`.

    Chunk arrays are read-only views into one array built at construction: no per-chunk copies.
    """

    def __init__(
        self,
        recording: str | Path | mne.io.BaseRaw,
        chunk_size: int = 10,
        picks=None,
        t0: float = 0.0,
        counter_channel: str | None = "counter",
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
            raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not np.isfinite(t0):
            raise ValueError(f"t0 must be finite, got {t0}")
        raw = recording if isinstance(recording, mne.io.BaseRaw) else load_recording(recording)
        if not raw.preload:
            raw = raw.copy().load_data(verbose="error")
        self._name = getattr(raw, "filenames", [None])[0] or "<Raw>"
        self.raw = raw  # the recording itself (offline sessions save it as their EEG record)
        self._chunk_size = int(chunk_size)
        self._t0 = float(t0)
        self._sfreq = float(raw.info["sfreq"])

        # Resolve picks once, on a one-sample stand-in, so the real data are copied only once.
        probe = mne.io.RawArray(
            np.zeros((len(raw.ch_names), 1)), raw.info.copy(), verbose="error"
        ).pick(picks if picks is not None else "all", verbose="error")
        self._ch_names = tuple(probe.ch_names)
        self._ch_types = tuple(probe.get_channel_types())
        if not self._ch_names:
            raise ValueError(f"picks={picks!r} selects no channel of {self._name}")
        idx = [raw.ch_names.index(name) for name in self._ch_names]
        data = np.ascontiguousarray(raw.get_data(picks=idx).T, dtype=np.float64)  # (n, ch)
        data.flags.writeable = False
        self._data = data
        n = data.shape[0]
        times = self._t0 + np.arange(n, dtype=np.float64) / self._sfreq
        times.flags.writeable = False
        self._times = times

        # Faults are properties of the file: find them once; pull() only walks pointers.
        self._nonfinite_rows = np.flatnonzero(~np.isfinite(data).all(axis=1))
        self._counter_name = None
        self._gap_rows = np.zeros(0, dtype=np.int64)
        self._counter = None
        if counter_channel is not None and counter_channel in raw.ch_names:
            self._counter_name = counter_channel
            counter = raw.get_data(picks=[counter_channel])[0]
            self._counter = counter
            self._gap_rows = np.flatnonzero(np.diff(counter) != 1.0) + 1

        ann = raw.annotations
        # With orig_time set, onsets count from meas_date; first_time is the first sample's time.
        offset = raw.first_time if ann.orig_time is not None else 0.0
        self._annotations = mne.Annotations(
            onset=self._t0 + (np.asarray(ann.onset) - offset),
            duration=np.asarray(ann.duration),
            description=list(ann.description),
            ch_names=list(ann.ch_names),
            orig_time=None,
        )
        self._connected = False
        self._stops: dict[float, int] = {}  # pull_chunks: duration -> end sample
        self._reset()

    # ---------------------------------------------------------------- life cycle

    def _reset(self) -> None:
        """All per-run state, in one place."""
        self._pos = 0
        self._next_nonfinite = 0
        self._next_gap = 0
        self._finished = False

    def connect(self) -> FileSource:
        """Start (or restart after disconnect) at sample 0. Idempotent while connected."""
        if not self._connected:
            self._reset()
            self._connected = True
        return self

    def disconnect(self) -> None:
        """Stop serving; safe to call any number of times."""
        self._connected = False

    close = disconnect

    def __enter__(self) -> FileSource:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.disconnect()

    def __iter__(self) -> Iterator[Chunk]:
        """Pull until the data are exhausted (connects if needed)."""
        self.connect()
        while (chunk := self.pull()) is not None:
            yield chunk

    # ---------------------------------------------------------------- hot path

    def pull(self, timeout_s: float = 0.0) -> Chunk | None:
        """The next Chunk, or None when the recording is exhausted.

        timeout_s is accepted for call compatibility with LslSource.pull and ignored: a file
        never waits.
        """
        return self._pull(self._chunk_size)

    def pull_chunks(self, k: int, stop_after_s: float | None = None) -> Chunk | None:
        """The next k chunks as one Chunk (None when exhausted), with the health events the k
        chunks would have carried, in time order: offline blocks that a FeatureChain splits
        back into the chunk grid (`step_every`).

        stop_after_s: end the block with the first chunk whose last sample is at least this
        many seconds after the recording's first sample (where a session of that duration fed
        single chunks stops).
        """
        n = self._chunk_size * max(1, int(k))
        if stop_after_s is not None:
            stop = self._stops.get(stop_after_s)
            if stop is None:
                cs = self._chunk_size
                # the first sample at or after the duration, as a live loop computes it
                last = int(np.searchsorted(self._times - self._times[0], stop_after_s))
                stop = self._stops[stop_after_s] = min(self._data.shape[0], (last // cs + 1) * cs)
            n = max(0, min(n, stop - self._pos))
            if n == 0:
                return None
        return self._pull(n)

    def _pull(self, size: int) -> Chunk | None:
        if not self._connected:
            raise RuntimeError("FileSource.pull() before connect()")
        i0 = self._pos
        n = self._data.shape[0]
        if i0 >= n:
            self._finished = True
            return None
        i1 = min(i0 + size, n)
        self._pos = i1
        times = self._times[i0:i1]
        events: tuple[HealthEvent, ...] = ()
        if i0 == 0:
            events = (HealthEvent(HealthKind.CONNECTED, self._t0, _NAN, self._name),)
        rows = self._nonfinite_rows
        while self._next_nonfinite < rows.size and rows[self._next_nonfinite] < i1:
            # one event per chunk of chunk_size holding a non-finite sample
            c0 = max(i0, int(rows[self._next_nonfinite]) // self._chunk_size * self._chunk_size)
            events += (self._nonfinite_event(c0, min(c0 + self._chunk_size, i1)),)
        gaps = self._gap_rows
        while self._next_gap < gaps.size and gaps[self._next_gap] < i1:
            events += (self._gap_event(int(gaps[self._next_gap])),)
            self._next_gap += 1
        if i1 == n:
            events += (HealthEvent(HealthKind.END, float(times[-1]), _NAN, "end of recording"),)
        if len(events) > 1:
            events = tuple(sorted(events, key=lambda e: e.t_stream))
        return Chunk(self._data[i0:i1], times, self._ch_names, self._sfreq, events, _NAN)

    # Rare paths: formatting only happens when there is something to report.

    def _nonfinite_event(self, i0: int, i1: int) -> HealthEvent:
        rows = self._nonfinite_rows
        k0 = self._next_nonfinite
        k1 = int(np.searchsorted(rows, i1))
        self._next_nonfinite = k1
        block = self._data[i0:i1]
        bad_ch = np.flatnonzero(~np.isfinite(block).all(axis=0))
        names = ", ".join(self._ch_names[c] for c in bad_ch[:5]) + (
            ", ..." if bad_ch.size > 5 else ""
        )
        first = int(rows[k0])
        return HealthEvent(
            HealthKind.NONFINITE,
            float(self._times[first]),
            _NAN,
            f"{k1 - k0} of {i1 - i0} samples non-finite (from sample {first}) in {names}",
        )

    def _gap_event(self, row: int) -> HealthEvent:
        assert self._counter is not None
        before, after = self._counter[row - 1], self._counter[row]
        return HealthEvent(
            HealthKind.COUNTER_GAP,
            float(self._times[row]),
            _NAN,
            f"{self._counter_name} went {before:.0f} -> {after:.0f} at sample {row} "
            f"({after - before - 1:.0f} samples missing)",
        )

    # ---------------------------------------------------------------- properties

    @property
    def ch_names(self) -> tuple[str, ...]:
        return self._ch_names

    @property
    def sfreq(self) -> float:
        return self._sfreq

    @property
    def ch_types(self) -> tuple[str, ...]:
        """mne channel type of each served channel ('eeg', 'ecg', 'eog', 'misc', 'stim', ...)."""
        return self._ch_types

    @property
    def n_channels(self) -> int:
        return len(self._ch_names)

    @property
    def n_samples(self) -> int:
        return int(self._data.shape[0])

    @property
    def duration_s(self) -> float:
        return self.n_samples / self._sfreq

    @property
    def t0(self) -> float:
        return self._t0

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def annotations(self) -> mne.Annotations:
        """The recording's annotations with onsets in stream time (t0 + seconds from sample 0)."""
        return self._annotations

    @property
    def counter_channel(self) -> str | None:
        """The counter channel in use, or None when the recording has none."""
        return self._counter_name

    @property
    def position(self) -> int:
        """Index of the next sample to be served."""
        return self._pos

    @property
    def recording(self) -> mne.io.BaseRaw:
        return self.raw

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def finished(self) -> bool:
        """True once pull() has returned None (all data served)."""
        return self._finished

    def __repr__(self) -> str:
        return (
            f"FileSource({self._name!s}, {self.n_channels} ch, {self._sfreq:g} Hz, "
            f"{self.duration_s:.1f} s, chunk {self._chunk_size}, at {self._pos}/{self.n_samples})"
        )

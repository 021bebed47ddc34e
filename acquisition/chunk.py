"""The one data type every source yields and every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np


class HealthKind(str, Enum):
    """What a source noticed about its stream. Faults disarm the interlock."""

    CONNECTED = "connected"  # stream opened (info)
    STALE = "stale"  # no sample for longer than the staleness time (fault)
    FLOWING = "flowing"  # samples arrive again after STALE (info; never re-arms)
    GAP = "gap"  # samples missing: late against the stream's clock model (fault)
    COUNTER_GAP = "counter_gap"  # sample-counter channel skipped values (fault)
    LOST = "lost"  # stream gone from the network (fault)
    RESTORED = "restored"  # a lost stream is back, possibly restarted (info; never re-arms)
    NONFINITE = "nonfinite"  # NaN or inf samples in the chunk (fault)
    CLOCK_RESET = "clock_reset"  # timestamps jumped back beyond the jitter tolerance (fault)
    MISMATCH = "mismatch"  # channel count / rate differ from what was expected (fault)
    END = "end"  # a finite source has no more data (info)


FAULT_KINDS = frozenset(
    {
        HealthKind.STALE,
        HealthKind.GAP,
        HealthKind.COUNTER_GAP,
        HealthKind.CLOCK_RESET,
        HealthKind.LOST,
        HealthKind.NONFINITE,
        HealthKind.MISMATCH,
    }
)


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """A health observation. `t_stream` in LSL seconds (nan if unknown), `t_local` local_clock()."""

    kind: HealthKind
    t_stream: float
    t_local: float
    detail: str = ""

    @property
    def is_fault(self) -> bool:
        return self.kind in FAULT_KINDS


@dataclass(slots=True)
class Chunk:
    """A block of consecutive samples.

    data: float64 array (n_samples, n_channels), volts for EEG channels.
    timestamps: float64 array (n_samples,), seconds of the LSL clock (stream time).
    ch_names: channel labels, length n_channels.
    sfreq: nominal sampling rate in Hz.
    events: health observations made while pulling this chunk (may come with zero samples).
    t_arrival: local_clock() when the pull returned (for decision latency), nan offline.
    raw_timestamps: the sender's timestamps (n_samples,) when `timestamps` were dejittered
        (LslSource), else None (they are the same).
    """

    data: np.ndarray
    timestamps: np.ndarray
    ch_names: tuple[str, ...]
    sfreq: float
    events: tuple[HealthEvent, ...] = field(default=())
    t_arrival: float = float("nan")
    raw_timestamps: np.ndarray | None = None

    @property
    def n_samples(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.data.shape[1])

    @property
    def t_last(self) -> float:
        """Stream time of the newest sample (nan for an empty chunk)."""
        return float(self.timestamps[-1]) if self.timestamps.size else float("nan")

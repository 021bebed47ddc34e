"""TriggerPolicy: when would we like a pulse? Pure and deterministic, driven by stream time.

The policy only asks; the SafetyInterlock decides. Each request is one audited attempt, so the
policy asks rarely: once per entry into the target state ('dwell_once'), or once per repeat
interval while it holds ('repeat'). A vetoed request is not retried on the next chunk (that
would write one audit line per chunk); in 'repeat' mode the next interval is the retry.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from features.types import State
from triggers.settings import PolicySettings

# Without a sample rate: float rounding of stream sums (t - time_in_state_s, entry + dwell).
TIME_TOLERANCE_S = 1e-6
# With one, a quarter of a sample: live stamps are an LSL source's clock model, a grid at the
# *fitted* rate plus a refreshed time correction, so a 1 s dwell between two stamps measured
# 0.99998 s in a CI run (20 ppm) and the request slipped one decision (20 ms at 500 Hz) after
# the offline one on the same samples. A quarter sample (0.5 ms at 500 Hz) absorbs that and
# still never counts a sample that is a whole period short.
SAMPLE_TOLERANCE = 0.25


@dataclass(frozen=True, slots=True)
class PulseRequest:
    """A wish for a pulse. t_stream: the deciding sample; t_entry: when the target state began;
    n_in_entry: 1 for the first request of this entry, 2 for the first repeat, ..."""

    t_stream: float
    t_entry: float
    n_in_entry: int
    reason: str


class TriggerPolicy:
    """`update(state)` once per estimator output; returns a PulseRequest or None.

    sfreq: the stream's nominal rate (Hz); due times are then met within a quarter sample.
    """

    def __init__(self, settings: PolicySettings, sfreq: float | None = None) -> None:
        self.settings = settings
        self._tol = SAMPLE_TOLERANCE / sfreq if sfreq else TIME_TOLERANCE_S
        self._repeat = settings.mode == "repeat"
        self._dwell_s = float(settings.dwell_s)
        self._interval_s = float(settings.repeat_interval_s)
        self._jitter_s = float(settings.jitter_s)
        self.reset()

    def reset(self) -> None:
        """Forget the current entry and restart the jitter sequence (same seed: same jitter)."""
        self._rng = random.Random(self.settings.seed)
        self._t_entry = math.nan  # stream time the current target entry began (nan: none)
        self._t_next = math.nan  # stream time of the next request in this entry
        self._n_in_entry = 0

    def update(self, state: State) -> PulseRequest | None:
        if not state.is_target or not math.isfinite(state.t_stream):
            self._t_entry = math.nan
            return None
        t = state.t_stream
        t_entry = t - state.time_in_state_s
        if math.isnan(self._t_entry) or t_entry > self._t_entry + self._tol:
            # a new entry (the estimator's label changed since our last target state)
            self._t_entry = t_entry
            self._t_next = t_entry + self._dwell_s
            self._n_in_entry = 0
        if not t + self._tol >= self._t_next:  # False after 'dwell_once' fired (inf)
            return None
        self._n_in_entry += 1
        if self._repeat:
            jitter = self._rng.uniform(0.0, self._jitter_s) if self._jitter_s > 0.0 else 0.0
            # from the due time, not from t, so chunk boundaries do not drift the train; from t
            # after a long gap in the states, so one gap does not release a burst of requests
            t_next = self._t_next + self._interval_s + jitter
            self._t_next = t_next if t_next > t else t + self._interval_s + jitter
            reason = "dwell" if self._n_in_entry == 1 else "repeat"
        else:
            self._t_next = math.inf
            reason = "dwell"
        return PulseRequest(t, self._t_entry, self._n_in_entry, reason)

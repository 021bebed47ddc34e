"""OutputGuard: a second, independent check of the hard limits at a hardware output.

The interlock decides whether a pulse may happen; the guard sits inside each output that reaches
hardware (`SerialTtlOutput`) and refuses, on its own monotonic clock and with its own count, any
fire that would break a hard limit, whatever the interlock, the settings or a caller said:
no two fires closer than HARD_MIN_INTERVAL_S, at most HARD_MAX_PER_MINUTE in any closed
RATE_WINDOW_S, at most the session cap (HARD_SESSION_CAP, or a lower cap given at construction).
A refusal raises `OutputGuardError` in the output; the trigger unit then disarms the interlock
with the reason `output_guard`.

Why only hardware outputs: offline and tuning runs (stream time, hundreds of times faster than
real time) never reach hardware (`simulate_stimulators`), so a wall-clock guard there could
only veto the simulated stimulator for no safety gain. The simulated stimulator is unguarded.

At the hard floor itself (a config with min_interval_s = 1.0) the interlock's clock read and
the guard's are a few µs apart, so a pulse exactly 1.0 s after the previous one by the
interlock's clock can be 1.0 s minus a few µs by the guard's: refused and disarmed (safe, rare;
the default interval is 3 s).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from triggers.settings import (
    HARD_MAX_PER_MINUTE,
    HARD_MIN_INTERVAL_S,
    HARD_SESSION_CAP,
    RATE_WINDOW_S,
)


class OutputGuard:
    """Admits or refuses each fire of one output on its own clock (seconds, monotonic)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        session_cap: int = HARD_SESSION_CAP,
    ) -> None:
        self._clock = clock
        cap = HARD_SESSION_CAP if math.isnan(session_cap) else int(session_cap)
        self.cap = max(0, min(cap, HARD_SESSION_CAP))  # a higher cap cannot loosen the hard one
        self._lock = threading.Lock()
        # the last HARD_MAX_PER_MINUTE admitted fire times, oldest first
        self._times: deque[float] = deque(maxlen=HARD_MAX_PER_MINUTE)
        self.count = 0  # admitted fires
        self.refused = 0

    def admit(self) -> str | None:
        """Record a fire now and return None, or return why it is refused (nothing recorded)."""
        with self._lock:
            now = self._clock()
            why = self._why_not(now)
            if why is None:
                self._times.append(now)
                self.count += 1
            else:
                self.refused += 1
            return why

    def _why_not(self, now: float) -> str | None:
        if not math.isfinite(now):
            return f"clock read {now}"
        if self.count >= self.cap:
            return f"session cap of {self.cap} fires reached"
        times = self._times
        if times:
            since = now - times[-1]
            # `not >=` also refuses a clock that went backwards or a nan difference
            if not since >= HARD_MIN_INTERVAL_S:
                return (
                    f"{since:.3f} s after the previous fire "
                    f"(hard floor HARD_MIN_INTERVAL_S={HARD_MIN_INTERVAL_S} s)"
                )
            # full deque: its oldest is the HARD_MAX_PER_MINUTE-th most recent fire
            if len(times) == HARD_MAX_PER_MINUTE and now - times[0] <= RATE_WINDOW_S:
                return (
                    f"{HARD_MAX_PER_MINUTE} fires in the last {RATE_WINDOW_S:g} s "
                    f"(hard ceiling HARD_MAX_PER_MINUTE={HARD_MAX_PER_MINUTE})"
                )
        return None

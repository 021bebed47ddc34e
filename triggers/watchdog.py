"""The watchdog: disarms an armed session whose loop stopped completing steps. It can only
disarm (through `TriggerUnit.halt`, which also closes the stimulating outputs); it never arms or
fires.

The loop marks progress with one float store per step (`watchdog.t_progress = now`, no lock, no
call). The watchdog thread wakes every `timeout_s / 5` and, while the interlock is not DISARMED,
disarms with reason `watchdog` when neither a step nor the arming happened within `timeout_s`
(the arming counts as progress: a step that armed after a slow calibration is not a stall).
A hang is then caught within timeout_s + timeout_s / 5.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

from pylsl import local_clock

from triggers.interlock import InterlockState, VetoReason
from triggers.settings import WATCHDOG_MAX_MS, WATCHDOG_MIN_MS

log = logging.getLogger(__name__)


class Watchdog:
    """Watches `trigger` (a TriggerUnit); `start()`, then the loop stores `t_progress`."""

    def __init__(self, trigger, timeout_s: float, clock: Callable[[], float] = local_clock) -> None:
        if not WATCHDOG_MIN_MS <= 1000.0 * timeout_s <= WATCHDOG_MAX_MS:  # also refuses nan
            raise ValueError(
                f"watchdog timeout {1000.0 * timeout_s:g} ms outside "
                f"{WATCHDOG_MIN_MS:g}..{WATCHDOG_MAX_MS:g} ms"
            )
        self.trigger = trigger
        self.timeout_s = float(timeout_s)
        self.period_s = self.timeout_s / 5.0
        self._clock = clock
        self.t_progress = clock()  # the loop's last completed step (local clock)
        self.n_tripped = 0
        self.last_detail = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        self.t_progress = self._clock()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        armed_since = math.nan  # when this thread first saw the interlock armed
        interlock = self.trigger.interlock
        while not self._stop.wait(self.period_s):
            if interlock.state is InterlockState.DISARMED:
                armed_since = math.nan
                continue
            now = self._clock()
            if math.isnan(armed_since):
                armed_since = now
            stalled_s = now - max(self.t_progress, armed_since)
            if stalled_s > self.timeout_s:
                self.n_tripped += 1
                self.last_detail = (
                    f"no loop step completed for {1000 * stalled_s:.0f} ms "
                    f"(limit {1000 * self.timeout_s:g} ms)"
                )
                try:
                    self.trigger.halt(VetoReason.WATCHDOG, self.last_detail)
                except Exception:  # the interlock is disarmed before anything else can fail
                    log.exception("watchdog: after disarming")
                armed_since = math.nan

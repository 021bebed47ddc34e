"""Running the tuner's settings: one offline `Session` per (setting, recording) through the same
path as `closedloop offline` (`run_task`, the unit an executor runs), and the pooled score rows."""

from __future__ import annotations

import csv
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from closedloop.config import SessionConfig
from closedloop.errors import UserError
from closedloop.tuning.grid import EXTRA_COLUMNS, Grid
from closedloop.tuning.scoring import (
    METRICS,
    PULSE_SETS,
    Counts,
    Outcome,
    read_outcome,
    score_outcome,
    score_table,
    target_epochs,
)

if TYPE_CHECKING:
    from closedloop.tuning.executors import Executor

ARM_ACTION = "offline_run"  # the operator action `closedloop offline` arms with


@dataclass(frozen=True)
class Task:
    setting: int
    recording: int
    path: str
    config: SessionConfig
    keep_dir: str | None = None  # keep the session folder under this root
    digest: str = ""  # content digest of the recording (executors.recording_digest)
    reader: str = "file"  # how a worker reads `path` itself: "file" (load_recording) or "bids"


_RAWS: dict[str, Any] = {}
_DIGESTS: dict[str, str] = {}  # path -> digest of the recording loaded in this process
_SOURCES: dict[tuple, Any] = {}


def _read_raw(path: str, reader: str = "file"):
    if reader == "bids":
        from closedloop.tuning.study import read_bids_raw

        return read_bids_raw(path)
    from acquisition.readers import load_recording

    return load_recording(path)


def _source_for(
    path: str, chunk_size: int, raw: Any = None, digest: str | None = None, reader: str = "file"
):
    """A FileSource per (recording, chunk size), loaded once per process and rewound per run.

    raw: the recording already loaded (a Dask worker's copy); else it is read from `path` once.
    The cache key holds the content digest (a long-lived Dask worker may see a rewritten file
    at the same path in a later sweep) and, off the main thread, the thread (Dask runs tasks on
    worker threads: two runs must never rewind one FileSource under each other).
    """
    from acquisition.file_source import FileSource
    from closedloop.tuning.executors import thread_key

    if digest is None:
        digest = _DIGESTS.get(path, "")
    key = (path, digest, chunk_size, thread_key())
    src = _SOURCES.get(key)
    if src is None:
        if raw is None:
            raw = _RAWS.get(path) if _DIGESTS.get(path, "") == digest else None
        if raw is None:
            raw = _RAWS[path] = _read_raw(path, reader)
            _DIGESTS[path] = digest
        src = _SOURCES[key] = FileSource(raw, chunk_size=chunk_size)
    src.disconnect()  # Session.run connects, which rewinds to sample 0
    return src


def run_session(
    path: str,
    config: SessionConfig,
    out_root: Path,
    bus=None,
    *,
    raw: Any = None,
    digest: str | None = None,
    reader: str = "file",
):
    """One offline Session on a recording, exactly as `closedloop offline` runs it.

    Returns (session, wall seconds). The session folder is `session.folder`.
    """
    from closedloop.session import Session

    source = _source_for(path, config.source.chunk_size, raw, digest, reader)
    session = Session(config, source, live=False, bus=bus, out_root=out_root, arm_action=ARM_ACTION)
    t = time.perf_counter()
    session.run()
    return session, time.perf_counter() - t


def run_task(task: Task, raw: Any = None) -> tuple[int, int, Outcome]:
    """Worker entry point: run one (setting, recording) and read its outcome.

    raw: the loaded recording when the executor ships it (Dask); None reads `task.path` once
    per worker process.
    """
    with tempfile.TemporaryDirectory(prefix="cltune-") as tmp:
        root = Path(task.keep_dir) if task.keep_dir else Path(tmp)
        session, wall = run_session(
            task.path, task.config, root, raw=raw, digest=task.digest, reader=task.reader
        )
        outcome = read_outcome(session.folder)
        outcome.wall_s = wall
        if task.keep_dir:
            session.folder.rename(root / f"setting{task.setting:04d}-rec{task.recording}")
    return task.setting, task.recording, outcome


def run_all(
    tasks: Sequence[Task], jobs: int, progress: bool = True, executor: Executor | None = None
) -> dict[tuple[int, int], Outcome]:
    """Run tasks on `executor` (default: in-process with jobs=1, else a spawn process pool) with
    a tqdm bar and time left; results arrive in completion order from either executor."""
    from tqdm import tqdm

    from closedloop.tuning.executors import LocalExecutor

    executor = executor or LocalExecutor(jobs)
    results: dict[tuple[int, int], Outcome] = {}
    bar = tqdm(
        total=len(tasks),
        desc="tune",
        unit="run",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    recordings = {t.path: _RAWS[t.path] for t in tasks if t.path in _RAWS}
    try:
        for _, (s, r, out) in executor.run(run_task, tasks, recordings):
            results[(s, r)] = out
            bar.update()
        return results
    except KeyboardInterrupt:
        raise UserError("interrupted: no output written") from None
    finally:
        bar.close()


def trace_run(
    path: str, config: SessionConfig, out_root: Path
) -> tuple[Outcome, dict[str, np.ndarray]]:
    """Re-run one setting collecting the state trace from the bus (t, score, label per chunk)."""
    from closedloop.bus import EventBus

    bus = EventBus()
    src = _source_for(path, config.source.chunk_size)
    n_chunks = src.n_samples // config.source.chunk_size + 16
    sub = bus.subscribe("tune-trace", maxlen=n_chunks, kinds={"state"})
    session, wall = run_session(path, config, out_root, bus=bus)
    outcome = read_outcome(session.folder)
    outcome.wall_s = wall
    events = sub.drain()
    trace = {
        "t": np.array([e.t_stream for e in events], dtype=float),
        "score": np.array([_nan(e.payload.get("score")) for e in events], dtype=float),
        "target": np.array([e.payload.get("label") == "target" for e in events], dtype=bool),
    }
    return outcome, trace


def _nan(v) -> float:
    return math.nan if v is None else float(v)


# ------------------------------------------------------------------------------ scoring tables


@dataclass
class Recording:
    path: str
    name: str
    epochs: np.ndarray  # (n, 2) target epochs in stream seconds
    duration_s: float
    ch_names: list[str]
    sfreq: float
    subject: str | None = None  # BIDS participant label (validation holds one out at a time)
    digest: str = ""  # executors.recording_digest of the loaded recording
    reader: str = "file"  # "file" or "bids" (how a worker reads `path`)


def score_rows(
    grid: Grid,
    recs: Sequence[Recording],
    outcomes: dict[tuple[int, int], Outcome],
    rec_idx: Sequence[int],
    min_epoch_s: float,
) -> list[dict[str, float]]:
    """Pooled scores per setting over the recordings `rec_idx`."""
    rows = []
    for s in range(len(grid.settings)):
        counts: list[dict[str, Counts]] = []
        target_s = window_s = 0.0
        for r in rec_idx:
            out = outcomes[(s, r)]
            counts.append(score_outcome(out, recs[r].epochs, min_epoch_s))
            target_s += out.target_s
            window_s += out.window_s
        rows.append(score_table(counts, target_s, window_s))
    return rows


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.10g}" if math.isfinite(v) else ""  # empty cell: undefined (no pulse, no hit)
    if isinstance(v, list | dict):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return v


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow([_csv_value(v) for v in row])


SCORE_COLUMNS = [f"{m}_{s}" for s in PULSE_SETS for m in METRICS] + list(EXTRA_COLUMNS)


def load_recordings(
    paths: Sequence[Path], target: str, chunk_size: int, study: Sequence[Any] = ()
) -> list[Recording]:
    """Load every recording (plain files, or the StudyRecordings of a BIDS study) once, here.

    Each is kept in this process (in-process runs and trace plots reuse it; the Dask executor
    ships it to its workers) with its content digest.
    """
    from acquisition.file_source import FileSource
    from acquisition.readers import RecordingError, load_recording
    from closedloop.tuning.executors import recording_digest

    items = [(str(p), p.name, None, "file") for p in paths] + [
        (r.path, Path(r.path).name, r.subject, "bids") for r in study
    ]
    recs = []
    for path, name, subject, reader in items:
        try:
            raw = load_recording(path) if reader == "file" else _read_raw(path, reader)
        except RecordingError as exc:
            raise UserError(str(exc)) from None
        digest = recording_digest(raw)
        _RAWS[path] = raw
        _DIGESTS[path] = digest
        src = FileSource(raw, chunk_size=chunk_size)  # its annotations are what the Session sees
        _SOURCES[(path, digest, chunk_size, None)] = src
        epochs = target_epochs(src.annotations, target)
        if not len(epochs):
            labels = ", ".join(sorted(set(src.annotations.description))) or "none"
            raise UserError(f"{path}: no '{target}' annotation (labels: {labels}); set --target")
        recs.append(
            Recording(
                path,
                name,
                epochs,
                src.duration_s,
                list(src.ch_names),
                src.sfreq,
                subject,
                digest,
                reader,
            )
        )
    if len({r.name for r in recs}) != len(recs):
        for r in recs:
            r.name = r.path
    return recs

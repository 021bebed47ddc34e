"""Where the tuner's runs happen: a local process pool or a Dask cluster, behind one interface.

Both run the same task unit, `closedloop.tuning.runner.run_task` (one setting on one recording
through the offline Session), and yield `(task, result)` as runs finish, in completion order, so
the tuner's progress bar and time left work the same on either. Results do not depend on where a
run ran: the pipeline is deterministic and a run only sees its config and the recording.

How a recording reaches the workers:

- local: each spawn worker process reads the file the first time it runs a task on it and keeps
  it (and its FileSource) for the rest of the sweep (`runner._source_for`): once per worker.
- dask: the client scatters every loaded recording once, to every worker (`broadcast=True`; to
  one worker each when they add up to more than BROADCAST_MAX_BYTES, the others fetching a copy
  on their first run of it), and each task takes the scattered recording as an argument; Dask
  hands the worker's own copy to every task there (no per-task transfer). The worker keeps its
  FileSource in a cache keyed by path, content digest, chunk size and thread, so a worker reused
  across sweeps never serves a stale file and two task threads never share a FileSource. A
  worker that joins later (or replaces a lost one) fetches a copy from another worker on its
  first task. Not broadcast, a recording whose only copy was on a lost worker is gone: the
  sweep stops with an error naming the run (Dask cannot recompute scattered data).

A worker lost mid-sweep (killed, out of memory, node gone): the scheduler sends the tasks it was
running to other workers (up to `distributed.scheduler.allowed-failures`, 3, per task); the
executor reads the scheduler's `remove-worker` events and reports which runs were re-run
(`DaskExecutor.notes`, printed on stderr and written in the report).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

EXECUTORS = ("local", "dask")
LOCAL_HOST = "127.0.0.1"  # a LocalCluster listens on loopback only (no other interface)
DASK_TASK_PREFIX = "closedloop-tune"
RECONNECT_TRIES = 3  # fresh clients tried after a sweep that stopped early
QUERY_TRIES = 3  # tries of an idempotent query to the scheduler (see DaskExecutor._query)
# a task that fails with a Python exception is a bug or a bad file, not a lost worker: the same
# input fails the same way again, so it is not retried (worker loss is retried by the scheduler)
DASK_RETRIES = 0
# recordings (float64 samples, all of them) sent to every worker up front when at most this
# much; above it each goes to one worker and moves on demand (a 10-minute 64-channel 1 kHz
# recording is 0.3 GB: 8 of them fit)
BROADCAST_MAX_BYTES = 2 * 2**30
WATCH_EVERY_S = 1.0  # how often the sweep looks for workers that joined (an RPC to the scheduler)


class Executor(Protocol):
    """Runs `fn(task)` for every task and yields (task, result) in completion order."""

    name: str  # e.g. "local (2 processes)", "dask tcp://127.0.0.1:8786 (4 workers)"
    workers: int
    notes: list[str]  # what the sweep should say (re-runs after a lost worker)

    def run(
        self, fn: Callable[..., Any], tasks: Sequence[Any], recordings: dict[str, Any]
    ) -> Iterator[tuple[Any, Any]]: ...

    def close(self) -> None: ...


def recording_digest(raw) -> str:
    """sha256 (hex, 16 chars) of what a run sees of a loaded Raw: data, names, rate, annotations.

    Keys the worker-side cache together with the path, so a file rewritten between two sweeps
    on a long-lived cluster is never served from the old copy. sha256: 1.3 s per GiB of samples
    here (the fastest of sha256, sha1, md5, blake2b on this CPU).
    """
    h = hashlib.sha256()
    h.update(repr((raw.ch_names, float(raw.info["sfreq"]))).encode())
    # the preloaded array itself: raw.get_data() copies (1.5 s for 0.3 GB, more than the hash)
    data = raw._data if raw.preload else raw.get_data()
    h.update(np.ascontiguousarray(data))
    ann = raw.annotations
    h.update(repr((list(ann.onset), list(ann.duration), list(ann.description))).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ local


class LocalExecutor:
    """A spawn process pool on this machine (spawn: safe with Qt/LSL libraries loaded).

    jobs=1 runs in this process (no pool; the recordings loaded for the checks are reused).
    """

    def __init__(self, jobs: int) -> None:
        self.workers = max(1, int(jobs))
        self.name = "local (this process)" if self.workers == 1 else f"local ({jobs} processes)"
        self.notes: list[str] = []

    def run(
        self, fn: Callable[..., Any], tasks: Sequence[Any], recordings: dict[str, Any]
    ) -> Iterator[tuple[Any, Any]]:
        # workers read each recording from its path once (runner._source_for): on one machine
        # the file is in the page cache, cheaper than pickling the Raw to every process
        del recordings
        if self.workers <= 1:
            for task in tasks:
                yield task, fn(task)
            return
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"))
        pending: dict = {}
        try:
            pending = {pool.submit(fn, t): t for t in tasks}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = pending.pop(fut)
                    exc = fut.exception()
                    if exc is not None:
                        raise RuntimeError(
                            f"setting {task.setting} on {task.path} failed: "
                            f"{type(exc).__name__}: {exc}"
                        ) from exc
                    yield task, fut.result()
        except BaseException:
            # stop now rather than finish the runs in flight: end our own workers, by handle
            workers = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in workers:
                proc.terminate()
            for proc in workers:
                proc.join(timeout=5)
            raise
        pool.shutdown(wait=True)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------ dask


def _nbytes(raw: Any) -> int:
    data = getattr(raw, "_data", None)
    return int(getattr(data, "nbytes", 0))


def _dask_run(fn: Callable[..., Any], task: Any, raw: Any) -> Any:
    """Worker side: the task with the worker's copy of its recording."""
    return fn(task, raw)


class DaskExecutor:
    """dask.distributed: an existing scheduler (`tcp://host:8786`) or a LocalCluster.

    scheduler=None starts a LocalCluster of `workers` processes with one thread each, on
    127.0.0.1 with no dashboard (nothing listens beyond loopback). With a scheduler address,
    the cluster is the caller's: its workers need closedloop installed (the same version) and
    are used as they are (`--nthreads 1` per worker process is what the tuner expects: the
    pipeline holds the GIL most of the time, so more threads per process add little).
    """

    def __init__(self, scheduler: str | None = None, workers: int = 2) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:  # pragma: no cover - dask is a dev/cluster dependency
            from closedloop.errors import UserError

            raise UserError(
                "--executor dask needs dask.distributed: pip install 'closedloop[cluster]'"
            ) from exc
        # distributed logs every worker start and stop at INFO; the tuner's stderr is for the
        # progress bar and what went wrong (lost workers are still logged, at WARNING)
        logging.getLogger("distributed").setLevel(logging.WARNING)
        self.notes: list[str] = []
        self.rerun: list[tuple[int, int]] = []  # (setting, recording) of each re-run task
        self._cluster = None
        self._stale = False  # the last sweep stopped early: the next one starts on a new client
        if scheduler:
            self.client = Client(scheduler, timeout="30s")
            where = scheduler
        else:
            self._cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host=LOCAL_HOST,
                dashboard_address=None,
                worker_dashboard_address=None,
            )
            self.client = Client(self._cluster)
            where = "LocalCluster"
        info = self.client.scheduler_info()
        self.workers = max(1, sum(w["nthreads"] for w in info["workers"].values()))
        n = len(info["workers"])
        self.name = (
            f"dask {where} ({n} worker{'s' * (n != 1)}, {self.workers} "
            f"thread{'s' * (self.workers != 1)})"
        )
        self.scheduler_address = self.client.scheduler.address
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._watched: set[str] = set()
        self._last_watch = 0.0

    def _watch(self) -> None:
        """Subscribe to the event topic of every worker not yet watched.

        A worker's own topic carries its `remove-worker` event (with the tasks it was running).
        Not the scheduler's "all" topic: with a broadcast scatter it also carries a 'replicate'
        event holding WorkerState objects that cannot be sent to a client (distributed
        2026.8: "can not serialize 'WorkerState' object").
        """
        for addr in self._query(self.client.scheduler_info, n_workers=-1)["workers"]:
            if addr not in self._watched:
                self._watched.add(addr)

                def handler(event: tuple[float, Any], addr: str = addr) -> None:
                    # runs on the client's event loop thread: hand over, never block
                    self._events.put((addr, event[1]))

                self.client.subscribe_topic(addr, handler)
        self._last_watch = time.monotonic()

    def _query(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """An idempotent request to the scheduler (events, worker list), asked again on a new
        connection when the one it went out on broke.

        A clean-clone CI run (3 test workers on 2 cores, distributed 2026.8 / tornado 6.6.1)
        saw `get_events` die inside tornado's write buffer (`AssertionError` in
        `_StreamBuffer.advance`) on a client made after an aborted sweep; distributed aborts
        that connection, so the same request on the next one from the pool is safe to repeat.
        """
        for attempt in range(1, QUERY_TRIES):
            try:
                return call(*args, **kwargs)
            except (AssertionError, OSError) as exc:
                log.warning("dask: %s, try %d of %d: %r", call.__name__, attempt, QUERY_TRIES, exc)
                self._stale = True  # the next sweep starts on a new client
        return call(*args, **kwargs)

    def _lost_workers(self, msgs: Sequence[Any], ours: dict[str, Any], seen: set) -> None:
        """Note (and say on stderr) each remove-worker event that took runs of ours."""
        for worker, msg in msgs:
            if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
                continue
            keys = tuple(sorted(k for k in msg.get("processing-tasks", ()) if k in ours))
            if not keys or (worker, keys) in seen:
                continue
            seen.add((worker, keys))
            runs = [ours[k] for k in keys]
            self.rerun += [(t.setting, t.recording) for t in runs]
            which = ", ".join(f"setting {t.setting} on {os.path.basename(t.path)}" for t in runs)
            note = (
                f"worker {worker} was lost mid-sweep; its {len(runs)} run(s) in flight were "
                f"re-run on other workers ({which})"
            )
            self.notes.append(note)
            print(f"tune: {note}", file=sys.stderr, flush=True)

    def _drain(self) -> list[Any]:
        msgs = []
        while True:
            try:
                msgs.append(self._events.get_nowait())
            except queue.Empty:
                return msgs

    def run(
        self, fn: Callable[..., Any], tasks: Sequence[Any], recordings: dict[str, Any]
    ) -> Iterator[tuple[Any, Any]]:
        from distributed import as_completed

        if self._stale:
            self._reconnect()
        sweep = uuid.uuid4().hex[:8]
        seen: set = set()
        self._watch()
        # once per worker, up front: every worker needs every recording (settings x recordings)
        # and a lost worker's copy is not the only one. A study too large to sit whole on every
        # worker goes to one worker each instead; the others fetch a recording on their first
        # run of it and keep it while runs of it are waiting.
        total = sum(_nbytes(raw) for raw in recordings.values())
        broadcast = total <= BROADCAST_MAX_BYTES
        data = {
            path: self.client.scatter(raw, broadcast=broadcast, hash=False)
            for path, raw in recordings.items()
        }
        futures = {}
        ours: dict[str, Any] = {}
        for t in tasks:
            key = f"{DASK_TASK_PREFIX}-{sweep}-s{t.setting}-r{t.recording}"
            fut = self.client.submit(
                _dask_run, fn, t, data.get(t.path), key=key, pure=False, retries=DASK_RETRIES
            )
            futures[fut] = t
            ours[key] = t
        completed = False
        try:
            # with_results: results are gathered in the background as tasks finish, rather
            # than one fut.result() round trip per task
            done = as_completed(futures, with_results=True, raise_errors=False)
            for fut, result in done:
                if time.monotonic() - self._last_watch > WATCH_EVERY_S:
                    self._watch()  # workers that joined (e.g. a lost one's replacement)
                self._lost_workers(self._drain(), ours, seen)
                task = futures[fut]
                if fut.status != "finished":
                    exc = result[1] if isinstance(result, tuple) else result
                    raise RuntimeError(
                        f"setting {task.setting} on {task.path} failed: {type(exc).__name__}: {exc}"
                    ) from exc
                yield task, result
                fut.release()
            # an event may arrive after the last result: ask the scheduler for each worker's
            for addr in sorted(self._watched):
                events = self._query(self.client.get_events, addr)
                self._lost_workers([(addr, m) for _, m in events], ours, seen)
            completed = True
        finally:
            for addr in self._watched:
                self.client.unsubscribe_topic(addr)
            self._watched.clear()
            self.client.cancel(list(futures), force=True)
            for d in data.values():
                d.release()
            if not completed:
                self._stale = True

    def _reconnect(self) -> None:
        """A fresh client for the sweep after one that stopped early (a failed run, Ctrl-C).

        The next sweep on the old client broke in about 1 of 15 tries (2 cores, under load):
        its first request to the scheduler died inside tornado's write buffer (`AssertionError`
        in `_StreamBuffer.advance`, distributed 2026.x), after the aborted sweep's cancelled
        tasks; a new connection does not carry whatever the abort left behind. Made right after
        the abort, with the old client closed after it, the new one still broke 2 runs of 6
        (tests/test_tune_dask.py); made at the next sweep with the old one closed first: 0 of 12,
        4 of them beside two busy loops on the 2 cores.
        """
        from distributed import Client

        old = self.client
        old.close()  # first: its teardown must not overlap the new client's first requests
        self._stale = False
        for attempt in range(1, RECONNECT_TRIES + 1):
            try:
                self.client = Client(self._cluster or self.scheduler_address, timeout="30s")
                break
            except (AssertionError, OSError, TimeoutError) as exc:
                # seen once in 12 clean-clone runs: distributed's own handshake asserted
                # (`assert len(msg) == 1` in Client._ensure_connected) while 3 test workers
                # loaded the 2 cores; the aborted sweep's error must still be the one raised
                log.warning("dask: new client, try %d of %d: %r", attempt, RECONNECT_TRIES, exc)
        else:
            raise RuntimeError(f"dask: no new client after {RECONNECT_TRIES} tries")

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def make_executor(kind: str, *, jobs: int, scheduler: str | None = None) -> Executor:
    """'local' with `jobs` processes, or 'dask' (a cluster at `scheduler`, else a LocalCluster
    of `jobs` worker processes)."""
    if kind == "local":
        return LocalExecutor(jobs)
    if kind == "dask":
        return DaskExecutor(scheduler, workers=jobs)
    raise ValueError(f"unknown executor {kind!r} (choose from {', '.join(EXECUTORS)})")


__all__ = [
    "EXECUTORS",
    "DaskExecutor",
    "Executor",
    "LocalExecutor",
    "make_executor",
    "recording_digest",
]


def thread_key() -> int | None:
    """None on the main thread (local pool processes), else the thread id (Dask task threads)."""
    return None if threading.current_thread() is threading.main_thread() else threading.get_ident()

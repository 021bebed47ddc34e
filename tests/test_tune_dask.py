"""`closedloop tune --executor dask`: the same scores as the local pool, and lost workers re-run.

Every cluster here is a LocalCluster of 2 worker processes on 127.0.0.1 without a dashboard
(no network beyond loopback). The sweep: 4 settings on the bundled 4-channel recording (180 s),
about 0.3 s per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")

from closedloop.errors import UserError  # noqa: E402
from closedloop.tuning import runner, tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECORDING = ROOT / "replay_data" / "sim_4ch_256hz.fif"
CONFIG = ROOT / "configs" / "consumer_4ch.yaml"
GRID = ["state.enter=0.5,1.5", "trigger.dwell_s=0.5,2"]
TABLES = ("scores.csv", "pulses.csv")


def _argv(out: Path, *extra: str) -> list[str]:
    return [
        str(RECORDING),
        "--config",
        str(CONFIG),
        *(f"--grid={g}" for g in GRID),
        "--require",
        "none",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tune.add_tune_arguments(parser)
    return parser.parse_args(argv)


def _rows(path: Path, drop: tuple[str, ...] = ()) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(fh)]


def _same_tables(a: Path, b: Path) -> None:
    for name in TABLES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # per recording: everything but the speed of each run
    drop = ("x_real_time",)
    assert _rows(a / "scores_per_recording.csv", drop) == _rows(
        b / "scores_per_recording.csv", drop
    )


@pytest.fixture(scope="module")
def local_out(tmp_path_factory) -> Path:
    """The reference: the same sweep on the local spawn pool (2 processes)."""
    out = tmp_path_factory.mktemp("tune-local") / "out"
    assert tune.run_tune(_args(_argv(out, "--jobs", "2"))) == 0
    return out


@pytest.fixture
def cluster():
    """A LocalCluster of our own (2 processes, 1 thread each), on loopback, no dashboard."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            worker_dashboard_address=None,
        ) as cl,
        Client(cl) as client,
    ):
        yield cl, client


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dask_local_cluster_scores_equal_local_pool(local_out, tmp_path, capsys, monkeypatch):
    """Also the path for studies too large to broadcast: each recording scattered to one
    worker, the other fetching it on its first run (the lost-worker test below broadcasts)."""
    from closedloop.tuning import executors

    monkeypatch.setattr(executors, "BROADCAST_MAX_BYTES", 0)
    out = tmp_path / "dask"
    rc = tune.run_tune(_args(_argv(out, "--executor", "dask", "--workers", "2")))
    assert rc == 0
    _same_tables(local_out, out)
    assert (local_out / "recommended.yaml").read_text() == (out / "recommended.yaml").read_text()
    s = json.loads((out / "summary.json").read_text())
    assert s["speed"]["executor"].startswith("dask LocalCluster (2 workers")
    assert s["speed"]["rerun"] == []
    assert json.loads((local_out / "summary.json").read_text())["speed"]["executor"] == (
        "local (2 processes)"
    )
    assert "executor: dask LocalCluster" in (out / "report.md").read_text()
    assert "re-run" not in capsys.readouterr().err


def _kill_a_busy_worker(client, killed: list, stop: threading.Event) -> None:
    """Kill (SIGKILL) the first worker seen running a tuner run, once; its nanny restarts it."""
    while not stop.is_set():
        busy = {
            w: keys
            for w, keys in client.processing().items()
            if any(str(k).startswith("closedloop-tune-") for k in keys)
        }
        if busy:
            addr = sorted(busy)[0]
            pid = client.run(os.getpid, workers=[addr])[addr]
            os.kill(pid, signal.SIGKILL)  # a worker process this test's cluster started
            killed.append((addr, pid))
            return
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_lost_worker_runs_rerun_same_scores(local_out, cluster, tmp_path, capsys):
    """A worker killed mid-sweep: its runs are re-run elsewhere, the tables are unchanged, and
    the sweep says so (stderr, report, summary). Also the --scheduler path, and the recording
    cached once per worker (one FileSource per worker, not one per run)."""
    cl, client = cluster
    killed: list = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_busy_worker, args=(client, killed, stop))
    killer.start()
    out = tmp_path / "dask"
    try:
        rc = tune.run_tune(
            _args(_argv(out, "--executor", "dask", "--scheduler", cl.scheduler_address))
        )
    finally:
        stop.set()
        killer.join(timeout=30)
    assert rc == 0
    assert len(killed) == 1
    _same_tables(local_out, out)
    err = capsys.readouterr().err
    addr = killed[0][0]
    assert f"worker {addr} was lost mid-sweep" in err
    assert "re-run on other workers" in err
    s = json.loads((out / "summary.json").read_text())
    assert len(s["speed"]["rerun"]) == 1
    assert addr in s["speed"]["rerun"][0]
    assert "**re-run**: worker" in (out / "report.md").read_text()
    # each live worker built one FileSource for the one recording and chunk size, reused by
    # every run it did (the killed worker's replacement may have run none)
    cached = client.run(lambda: len(__import__("closedloop.tuning.runner").tuning.runner._SOURCES))
    assert set(cached.values()) <= {0, 1}
    assert 1 in cached.values()


def test_executor_argument_errors(tmp_path):
    cases = [
        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler needs --executor dask"),
        (["--workers", "2"], "--workers sizes the LocalCluster"),
        (
            ["--executor", "dask", "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"],
            "--workers sizes the LocalCluster",
        ),
        (["--executor", "dask", "--workers", "0"], "--workers must be >= 1"),
    ]
    for extra, match in cases:
        with pytest.raises(UserError, match=match):
            tune.run_tune(_args(_argv(tmp_path / "never", *extra)))
    assert not (tmp_path / "never").exists()


class _Job:
    def __init__(self, setting: int) -> None:
        self.setting, self.recording, self.path = setting, 0, "job"


def _fails_on_setting_2(task: _Job, raw=None) -> int:
    if task.setting == 2:
        raise ValueError("bad input")
    return task.setting


def test_dask_task_error_names_the_run(cluster):
    """A run that raises is an error of the sweep naming the setting (not retried: the same
    input fails the same way), and the executor stays usable."""
    from closedloop.tuning.executors import DaskExecutor

    cl, _ = cluster
    ex = DaskExecutor(cl.scheduler_address)
    try:
        assert ex.workers == 2
        with pytest.raises(RuntimeError, match="setting 2 on job failed: ValueError: bad input"):
            list(ex.run(_fails_on_setting_2, [_Job(i) for i in range(4)], {}))
        got = sorted(r for _, r in ex.run(_fails_on_setting_2, [_Job(0), _Job(1)], {}))
        assert got == [0, 1]
        assert ex.notes == []
    finally:
        ex.close()


def test_recording_digest_and_worker_cache():
    """The worker cache is keyed by content: a rewritten recording at the same path gets a new
    FileSource; the same content reuses it."""
    import mne

    from closedloop.tuning.executors import recording_digest

    raw = mne.io.read_raw_fif(RECORDING, preload=True, verbose="error")
    same = raw.copy()
    d0 = recording_digest(raw)
    assert recording_digest(same) == d0
    changed = raw.copy()
    changed._data[1, 100] += 1e-9
    assert recording_digest(changed) != d0
    relabelled = raw.copy()
    relabelled.annotations.description[0] = "other"
    assert recording_digest(relabelled) != d0

    path = "/nonexistent/rec.fif"  # never read: the executor hands the worker the recording
    try:
        a = runner._source_for(path, 16, raw, d0)
        assert runner._source_for(path, 16, same, d0) is a
        d1 = recording_digest(changed)
        b = runner._source_for(path, 16, changed, d1)
        assert b is not a
        assert b.raw is changed
    finally:
        for key in [k for k in runner._SOURCES if k[0] == path]:
            del runner._SOURCES[key]


def test_a_query_that_breaks_in_transit_is_asked_again_and_the_next_sweep_reconnects(caplog):
    """The CI failure: `get_events` died in tornado's write buffer (AssertionError); the
    executor asks again (distributed aborted that connection) and starts the next sweep on a
    new client. A query that keeps failing is still an error."""
    from closedloop.tuning.executors import QUERY_TRIES, DaskExecutor

    ex = DaskExecutor.__new__(DaskExecutor)  # no cluster: only the retry is under test
    ex._stale = False
    calls = []

    def get_events(addr):
        calls.append(addr)
        if len(calls) == 1:
            raise AssertionError  # what tornado's _StreamBuffer.advance raised
        return [(0.0, {"action": "add-worker"})]

    with caplog.at_level("WARNING", logger="closedloop.tuning.executors"):
        assert ex._query(get_events, "tcp://w") == [(0.0, {"action": "add-worker"})]
    assert calls == ["tcp://w", "tcp://w"]
    assert ex._stale
    assert "get_events, try 1 of 3" in caplog.text

    def broken(addr):
        calls.append(addr)
        raise OSError("connection reset")

    calls.clear()
    with pytest.raises(OSError, match="connection reset"):
        ex._query(broken, "tcp://w")
    assert len(calls) == QUERY_TRIES

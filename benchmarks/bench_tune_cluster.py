"""Tuner sweep throughput: local process pool vs a 2-worker Dask LocalCluster, and the
scheduling overhead per task.

    python -m benchmarks tune_cluster [--quick]

The sweep: `closedloop.tuning.runner.run_all` (the tuner's own loop, without the report and plots)
over a grid of `state.enter` values x simulated 32-channel 500 Hz recordings (2 x 150 s; 2 x 60 s
with --quick), default config. Each executor runs the same tasks; the outcomes are checked to be
identical. Throughput = runs (settings x recordings) per minute of wall time, worker start included
(the spawn pool starts its processes in the sweep; the LocalCluster's start is given apart, since a
real cluster is already up).

Scheduling overhead per task: a task that does nothing (returns its argument), N of them
through each executor, wall from the first result to the last / (N - 1): what the executor adds
to every run once its workers are up. In the sweep, the cost
per run beyond the Session itself is also given: wall x workers / runs - median Session wall.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from acquisition.simulator import simulate
from closedloop.config import SessionConfig
from closedloop.tuning import runner
from closedloop.tuning.executors import DaskExecutor, LocalExecutor
from closedloop.tuning.grid import build_grid

WORKERS = 2
ENTER_VALUES = tuple(0.5 + 0.25 * i for i in range(12))  # 0.5 .. 3.25


def _noop(task: Any, raw: Any = None) -> Any:
    return task


class _Noop:
    """A stand-in task with the fields the executors read."""

    def __init__(self, i: int) -> None:
        self.setting, self.recording, self.path = i, 0, "noop"


def _overhead(executor, n: int) -> float:
    """Seconds per empty task in steady state: from the first result to the last of n, over
    n - 1 (the start of the local pool's processes, new in every sweep, is left out)."""
    list(executor.run(_noop, [_Noop(i) for i in range(WORKERS * 4)], {}))  # warm
    stamps = [time.perf_counter() for _ in executor.run(_noop, [_Noop(i) for i in range(n)], {})]
    assert len(stamps) == n
    return (stamps[-1] - stamps[0]) / (n - 1)


def _sweep(executor, tasks) -> tuple[float, dict]:
    t = time.perf_counter()
    out = runner.run_all(tasks, executor.workers, progress=False, executor=executor)
    return time.perf_counter() - t, out


def run(quick: bool, log=print) -> dict[str, Any]:
    duration_s = 60.0 if quick else 150.0
    n_noop = 100 if quick else 400
    enters = ENTER_VALUES[:3] if quick else ENTER_VALUES
    with tempfile.TemporaryDirectory(prefix="bench-tune-cluster-") as tmp:
        paths = []
        for seed in (1, 2):
            raw = simulate(duration_s, 500.0, "standard_32", seed=seed)
            p = Path(tmp) / f"sim{seed}_raw.fif"
            raw.save(p, verbose="error")
            paths.append(p)
        base = SessionConfig()
        recs = runner.load_recordings(paths, "meditation", base.source.chunk_size)
        grid = build_grid(
            base, {"state.enter": list(enters)}, [(r.name, r.ch_names, r.sfreq) for r in recs]
        )
        tasks = [
            runner.Task(s, r, rec.path, cfg, None, rec.digest, rec.reader)
            for s, cfg in enumerate(grid.configs)
            for r, rec in enumerate(recs)
        ]
        n = len(tasks)
        log(f"  sweep: {len(grid.configs)} settings x {len(recs)} recordings = {n} runs")
        rows = []
        reference = None

        def add(name: str, wall: float, outcomes: dict, workers: int, extra: dict) -> None:
            nonlocal reference
            session_s = float(np.median([o.wall_s for o in outcomes.values()]))
            same = None
            if reference is None:
                reference = outcomes
            else:
                same = all(
                    np.array_equal(outcomes[k].fired, reference[k].fired)
                    and np.array_equal(outcomes[k].requested, reference[k].requested)
                    for k in reference
                )
            row = {
                "executor": name,
                "workers": workers,
                "runs": n,
                "wall_s": round(wall, 2),
                "runs_per_min": round(n / wall * 60.0, 1),
                "session_median_s": round(session_s, 3),
                "overhead_per_run_s": round(wall * workers / n - session_s, 3),
                "same_outcomes_as_first": same,
                **extra,
            }
            rows.append(row)
            log(
                f"  {name}: {wall:.1f} s for {n} runs -> {row['runs_per_min']:.0f} runs/min "
                f"(Session median {session_s:.2f} s; beyond it {row['overhead_per_run_s']:.2f} "
                f"s per run){'' if same is None else f'; same outcomes: {same}'}"
            )

        ex1 = LocalExecutor(1)
        wall, out = _sweep(ex1, tasks)
        add("local, 1 process (in this one)", wall, out, 1, {})
        ex = LocalExecutor(WORKERS)
        wall, out = _sweep(ex, tasks)
        add(f"local pool, {WORKERS} processes", wall, out, WORKERS, {})
        noop_local = _overhead(ex, n_noop)

        t = time.perf_counter()
        dx = DaskExecutor(None, workers=WORKERS)
        start_s = time.perf_counter() - t
        try:
            wall, out = _sweep(dx, tasks)
            add(
                f"dask LocalCluster, {WORKERS} workers",
                wall,
                out,
                WORKERS,
                {"cluster_start_s": round(start_s, 2)},
            )
            wall, out = _sweep(dx, tasks)
            add(f"dask LocalCluster, {WORKERS} workers, warm", wall, out, WORKERS, {})
            noop_dask = _overhead(dx, n_noop)
        finally:
            dx.close()
        log(
            f"  empty task round trip: local pool {noop_local * 1e3:.2f} ms, "
            f"dask {noop_dask * 1e3:.2f} ms (of {n_noop}); LocalCluster start {start_s:.1f} s"
        )
    return {
        "recordings": f"2 x {duration_s:.0f} s, 32 ch x 500 Hz (simulated), default config",
        "settings": len(grid.configs),
        "rows": rows,
        "noop_tasks": n_noop,
        "noop_ms_per_task": {"local_pool": noop_local * 1e3, "dask": noop_dask * 1e3},
        "cores": os.cpu_count(),
    }


def markdown(r: dict[str, Any]) -> list[str]:
    lines = [
        "## Tuner sweep: local pool vs Dask (bench_tune_cluster.py)",
        "",
        f"{r['settings']} settings x {r['recordings']}; runs per minute of wall time, worker "
        "start included (the LocalCluster's own start apart). 'Beyond the Session' = wall x "
        "workers / runs - median Session wall: what each run costs besides the pipeline.",
        "",
        "| executor | runs | wall (s) | runs / min | Session median (s) | beyond the Session "
        "per run (s) | same outcomes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        same = {None: "(reference)", True: "yes", False: "**no**"}[row["same_outcomes_as_first"]]
        lines.append(
            f"| {row['executor']} | {row['runs']} | {row['wall_s']:.1f} | "
            f"{row['runs_per_min']:.0f} | {row['session_median_s']:.2f} | "
            f"{row['overhead_per_run_s']:.2f} | {same} |"
        )
    start = next((x["cluster_start_s"] for x in r["rows"] if "cluster_start_s" in x), None)
    o = r["noop_ms_per_task"]
    lines += [
        "",
        f"Scheduling overhead per task (an empty task, {r['noop_tasks']} of them): local pool "
        f"{o['local_pool']:.2f} ms, Dask {o['dask']:.2f} ms. LocalCluster start: "
        f"{start:.1f} s.",
        "",
    ]
    return lines

"""`closedloop tune`: run the offline pipeline over a grid of settings and recommend one.

Every setting runs through `Session` exactly as `closedloop offline` does (FileSource, calibration,
arming with 'offline_run', policy, interlock, audit); the tuner only reads the session folder back
(`closedloop.tuning.scoring.read_outcome`) and scores the pulses against the annotated target
epochs. So a setting's scores equal those of `closedloop offline` on the same file with the same
config.

A few things differ from a plain offline run, none of which changes a decision (TUNER_OVERRIDES):
outputs are replaced by the simulated stimulator (a tuner must never drive a TTL box or publish
markers from worker processes), `session.publish_lsl` and participant feedback are off.

Work is spread by an executor (closedloop/tuning/executors.py): a local process pool (spawn, so
it is safe with Qt/LSL libraries loaded) or a Dask cluster (`--executor dask`); each worker gets a
recording once and reuses its FileSource across settings (disconnect/connect rewinds it). Input is
recording files or a BIDS study (`--bids-root`, closedloop/tuning/study.py).

This file is the command (arguments, checks, the run, what it prints); the parts live beside it:
grid.py (`--grid`, `--objective`, ranking), runner.py (one run per setting and recording, the
pooled scores), scoring.py (pulses against annotated epochs), report.py (the output folder:
tables, recommended.yaml, report.md, validation), plots.py (the pictures).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from closedloop.errors import UserError
from closedloop.tuning.grid import (
    DEFAULT_REQUIRE,
    build_grid,
    check_keys,
    parse_grid,
    parse_objective,
    rank,
)
from closedloop.tuning.report import (
    TuneResult,
    fmt,
    make_plots,
    setting_str,
    validate_loro,
    write_recommended,
    write_report,
    write_summary,
    write_tables,
)
from closedloop.tuning.runner import Task, load_recordings, run_all, score_rows

if TYPE_CHECKING:
    pass


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `closedloop tune` (closedloop/app/cli.py adds the subparser)."""
    parser.add_argument(
        "recordings",
        type=Path,
        nargs="*",
        metavar="RECORDING",
        help="annotated recordings (any format load_recording reads); or --bids-root",
    )
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="base session YAML (default: built-in defaults)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config key (repeatable)",
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=VALUES",
        help="a tuned key: a range START:STOP:STEP (inclusive) or a list "
        "v1,v2,... e.g. --grid state.enter=0.5:2.5:0.25 "
        "--grid trigger.dwell_s=0.5,1,2 (repeatable)",
    )
    parser.add_argument(
        "--target",
        default="meditation",
        help="annotation label of the target epochs (default: meditation)",
    )
    parser.add_argument(
        "--maximize",
        default=None,
        metavar="METRIC",
        help="metric to maximise (default: precision); plain names mean what "
        "fired, add _requested for every request of the policy",
    )
    parser.add_argument(
        "--minimize",
        default=None,
        metavar="METRIC",
        help="metric to minimise instead, e.g. false_per_min, or phase_sd_deg to tune phase "
        "mode (phase.tolerance_deg, phase.estimator, phase.window_s, ...) for phase accuracy",
    )
    parser.add_argument(
        "--require",
        action="append",
        default=None,
        metavar="EXPR",
        help="constraint, e.g. hit_rate>=0.8 or false_per_min<=0.5 "
        "(repeatable; default hit_rate>=0.8; 'none' for none)",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="leave-one-recording-out: held-out scores beside the tuned ones",
    )
    parser.add_argument(
        "--min-epoch-s",
        type=float,
        default=5.0,
        help="target epochs with less than this inside the scored window are "
        "not scored (default 5)",
    )
    parser.add_argument(
        "--jobs", "-j", type=int, default=None, help="worker processes (default: all cores)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: tune-<UTC time>)"
    )
    parser.add_argument(
        "--keep-sessions",
        action="store_true",
        help="keep every run's session folder under OUT/sessions (large)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    study = parser.add_argument_group("a BIDS study as input (instead of RECORDING files)")
    study.add_argument(
        "--bids-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="a BIDS dataset: every EEG recording of --task (target epochs from events.tsv, "
        "--target names the trial_type); --validate then holds out one participant at a time",
    )
    study.add_argument("--task", default=None, help="the BIDS task of the recordings to tune on")
    study.add_argument(
        "--subjects",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="only these participants (labels with or without 'sub-'; default: all)",
    )
    where = parser.add_argument_group("where the runs happen")
    where.add_argument(
        "--executor",
        choices=("local", "dask"),
        default="local",
        help="local: a process pool on this machine (default); dask: a dask.distributed "
        "cluster (--scheduler, else a LocalCluster of --workers processes on 127.0.0.1)",
    )
    where.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="the Dask scheduler to run on, e.g. tcp://host:8786 (its workers need closedloop "
        "installed); with --executor dask",
    )
    where.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes of the LocalCluster when --executor dask has no --scheduler "
        "(default: --jobs, else all cores)",
    )


def run_tune(args: argparse.Namespace) -> int:
    """`closedloop tune`: check everything, run the grid, score, write the output folder.

    Every check (grid keys and values, objective, recordings, target label, each setting against
    each recording's channels and rate) happens before the first run. Returns 0 when the
    recommended setting meets the objective on the tuning data, 1 when none does.
    """
    from closedloop.config import config_from_args  # the same --config + --set as `offline`

    wall0 = time.perf_counter()
    base = config_from_args(args)
    grid_values = parse_grid(args.grid)
    require = (
        DEFAULT_REQUIRE
        if args.require is None
        else [r for r in args.require if r.lower() != "none"]
    )
    objective = parse_objective(args.maximize, args.minimize, require)
    if not (args.min_epoch_s >= 0 and math.isfinite(args.min_epoch_s)):
        raise UserError(f"--min-epoch-s must be >= 0 (got {args.min_epoch_s})")
    bids_root = args.bids_root
    if bids_root is not None and args.recordings:
        raise UserError("give RECORDING files or --bids-root, not both")
    if bids_root is None and not args.recordings:
        raise UserError("no recording: give RECORDING files or --bids-root DIR --task T")
    if bids_root is None and (args.task or args.subjects):
        raise UserError("--task and --subjects select recordings of --bids-root")
    if bids_root is not None and not args.task:
        raise UserError("--bids-root needs --task (the BIDS task to tune on)")
    if args.validate and bids_root is None and len(args.recordings) < 2:
        raise UserError("--validate needs at least two recordings (it holds one out at a time)")
    jobs = args.jobs or os.cpu_count() or 1
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1 (got {jobs})")
    executor_kind = args.executor
    if args.scheduler and executor_kind != "dask":
        raise UserError("--scheduler needs --executor dask")
    if args.workers is not None and (executor_kind != "dask" or args.scheduler):
        raise UserError("--workers sizes the LocalCluster of --executor dask without --scheduler")
    workers = args.workers if args.workers is not None else args.jobs or os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"--workers must be >= 1 (got {workers})")
    check_keys(base, list(grid_values))  # key typos before reading any recording
    study = []
    if bids_root is not None:
        from closedloop.tuning.study import find_recordings

        study = find_recordings(bids_root, args.task, args.subjects)
        if args.validate and len({r.subject for r in study}) < 2:
            raise UserError(
                "--validate needs recordings of at least two participants "
                "(it holds one out at a time)"
            )
    recs = load_recordings(args.recordings, args.target, base.source.chunk_size, study)
    grid = build_grid(base, grid_values, [(r.name, r.ch_names, r.sfreq) for r in recs])

    out_dir = args.out or Path(f"tune-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}")
    keep = out_dir / "sessions" if args.keep_sessions else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    tasks = [
        Task(s, r, rec.path, cfg, str(keep) if keep else None, rec.digest, rec.reader)
        for s, cfg in enumerate(grid.configs)
        for r, rec in enumerate(recs)
    ]
    from closedloop.tuning.executors import make_executor

    jobs = min(jobs, len(tasks))
    executor = make_executor(
        executor_kind,
        jobs=jobs if executor_kind == "local" else workers,
        scheduler=args.scheduler,
    )
    try:
        jobs = executor.workers
        print(
            f"tune: {len(grid.settings)} settings x {len(recs)} recording(s) = {len(tasks)} runs "
            f"on {executor.name}; {len(grid.skipped)} invalid combinations skipped",
            file=sys.stderr,
        )
        outcomes = run_all(tasks, jobs, progress=not args.no_progress, executor=executor)
    finally:
        executor.close()
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = score_rows(grid, recs, outcomes, range(len(recs)), args.min_epoch_s)
    order, feasible = rank(rows, objective)
    validation = (
        validate_loro(grid, recs, outcomes, objective, args.min_epoch_s, by_subject=bool(study))
        if args.validate
        else None
    )
    res = TuneResult(
        recs,
        grid_values,
        grid,
        objective,
        args.target,
        args.min_epoch_s,
        outcomes,
        rows,
        order,
        feasible,
        validation,
        jobs,
        executor=executor.name,
        executor_notes=list(executor.notes),
    )
    write_tables(out_dir, res)
    why = res.nothing_scored
    if why:  # no recommended.yaml: a config chosen from nothing would look like a result
        (out_dir / "recommended.yaml").unlink(missing_ok=True)
        (out_dir / "NOTHING_SCORED.txt").write_text(why + "\n", encoding="utf-8")
        write_summary(out_dir / "summary.json", res)
        print(f"tune: no recommended.yaml: {why}", file=sys.stderr)
        print(f"  wrote {out_dir}/ (scores.csv, NOTHING_SCORED.txt)", file=sys.stderr)
        return 1
    write_recommended(out_dir / "recommended.yaml", base, res)
    make_plots(out_dir, res)
    res.wall_s = time.perf_counter() - wall0
    write_report(out_dir / "report.md", res)
    write_summary(out_dir / "summary.json", res)
    _print_result(out_dir, res)
    return 0 if res.met else 1


def _print_result(out_dir: Path, res: TuneResult) -> None:
    row = res.row
    verdict = "met" if res.met else "NOT met by any setting; closest shown"
    print(f"recommended: {setting_str(res.grid.settings[res.chosen])}")
    print(f"  objective {res.objective.describe()}: {verdict}")
    print(
        f"  tuned     hit rate {fmt(row['hit_rate_fired'])}  precision "
        f"{fmt(row['precision_fired'])}  false/min {fmt(row['false_per_min_fired'])}  "
        f"median delay {fmt(row['delay_median_s_fired'])} s"
    )
    if res.validation:
        p = res.validation["pooled"]
        meets = "meets" if res.validation["pooled_meets"] else "misses"
        print(
            f"  held out  hit rate {fmt(p['hit_rate_fired'])}  precision "
            f"{fmt(p['precision_fired'])}  false/min {fmt(p['false_per_min_fired'])}  "
            f"({meets} the objective)"
        )
    speeds = res.speeds()
    if speeds.size:
        print(f"  speed     {np.median(speeds):.0f}x real time per run (median of {speeds.size})")
    for w in res.warnings():
        print(f"  warning: {w}")
    print(f"  wrote {out_dir}/ (report.md, scores.csv, recommended.yaml, plots)")

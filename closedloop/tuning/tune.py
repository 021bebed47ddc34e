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
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from closedloop.config import SessionConfig, apply_overrides, dump_config, validate_for_stream
from closedloop.errors import ConfigError, UserError
from closedloop.tuning.scoring import (
    METRICS,
    PHASE_METRICS,
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

MAX_GRID_VALUES = 10_000  # values one range may expand to (a typo like 0:100:0.0001 stops here)
MAX_SETTINGS = 100_000  # combinations in one grid
MAX_TRACE_PLOTS = 4  # score-over-time plots (one re-run each) for the first recordings
ARM_ACTION = "offline_run"  # the operator action `closedloop offline` arms with
DEFAULT_REQUIRE = ("hit_rate>=0.8",)
TUNER_OVERRIDES: dict[str, Any] = {
    # never drive hardware or open LSL outlets from a tuner; decisions do not depend on either
    "outputs.outputs": [{"kind": "simulated"}],
    "session.publish_lsl": False,
    "feedback.enabled": False,  # participant feedback is a tap after the decision: no effect
}
_RANGE = re.compile(r"^\s*([-+0-9.eE]+)\s*:\s*([-+0-9.eE]+)\s*:\s*([-+0-9.eE]+)\s*$")
_REQUIRE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([-+0-9.eE]+%?)\s*$")


# ------------------------------------------------------------------------------ the grid


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: '1,[8,12],3' -> ['1', '[8,12]', '3']."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_values(text: str, key: str = "?") -> list[Any]:
    """Grid values: 'a:b:step' (inclusive range), 'v1,v2,...' (YAML scalars), or one value."""
    m = _RANGE.match(text)
    if m:
        try:
            start, stop, step = (float(g) for g in m.groups())
        except ValueError:
            raise UserError(f"--grid {key}={text}: range must be START:STOP:STEP numbers") from None
        if not (math.isfinite(start) and math.isfinite(stop) and math.isfinite(step)):
            raise UserError(f"--grid {key}={text}: range bounds must be finite")
        if step <= 0:
            raise UserError(f"--grid {key}={text}: step must be > 0 (got {step:g})")
        if stop < start:
            raise UserError(f"--grid {key}={text}: stop ({stop:g}) is below start ({start:g})")
        n = math.floor((stop - start) / step + 1e-9) + 1
        if n > MAX_GRID_VALUES:
            raise UserError(f"--grid {key}={text}: {n} values (limit {MAX_GRID_VALUES})")
        values = [round(start + i * step, 10) for i in range(n)]
        all_int = (
            all(float(g).is_integer() for g in (start, step))
            and "." not in text
            and "e" not in text.lower()
        )
        return [int(v) for v in values] if all_int else values
    parts = _split_top_level(text)
    if any(not p.strip() for p in parts):
        raise UserError(f"--grid {key}={text}: empty value in the list")
    out = []
    for p in parts:
        try:
            out.append(yaml.safe_load(p))
        except yaml.YAMLError as exc:
            raise UserError(f"--grid {key}={text}: cannot read value {p!r}: {exc}") from None
    return out


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """['state.enter=0.5:2.5:0.25', 'trigger.dwell_s=0.5,1,2'] -> {key: values} (order kept)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise UserError(f"--grid {item!r}: expected KEY=VALUES, e.g. state.enter=0.5:2.5:0.25")
        if key in grid:
            raise UserError(f"--grid {key}: given twice")
        values = parse_values(text.strip(), key)
        if len(set(map(repr, values))) != len(values):
            raise UserError(f"--grid {key}={text}: repeated values")
        grid[key] = values
    return grid


def _check_keys(base: SessionConfig, keys: Sequence[str]) -> None:
    """Unknown keys as one ConfigError (with "did you mean" from apply_overrides)."""
    errors = []
    data = base.model_dump(mode="json")
    for key in keys:
        node: Any = data
        ok = True
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                ok = False
                break
            node = node[part]
        if not ok:
            try:
                apply_overrides(base, {key: node})
            except ConfigError as exc:
                errors += exc.errors
            else:  # pragma: no cover - apply_overrides refuses what the walk refused
                errors.append(f"{key}: unknown key")
    if errors:
        raise ConfigError("--grid", errors)


@dataclass
class Grid:
    """Validated settings: `settings[i]` is the overrides of setting i, `configs[i]` its config."""

    keys: list[str]
    settings: list[dict[str, Any]]
    configs: list[SessionConfig]
    skipped: list[tuple[dict[str, Any], str]] = field(default_factory=list)


def build_grid(
    base: SessionConfig,
    grid: dict[str, list[Any]],
    streams: Sequence[tuple[str, list[str], float]] = (),
) -> Grid:
    """Every combination validated (config and, per recording, against its channels and rate).

    A value that is invalid in every combination it appears in is an error (ConfigError listing
    all of them); combinations that fail only together (e.g. state.enter <= state.leave) are
    skipped and listed in `skipped`. streams: (name, ch_names, sfreq) per recording.
    """
    keys = list(grid)
    _check_keys(base, keys)
    n = math.prod(len(v) for v in grid.values()) if grid else 1
    if n > MAX_SETTINGS:
        raise UserError(f"--grid: {n} combinations (limit {MAX_SETTINGS}); use coarser ranges")
    ok_values: dict[str, set[int]] = {k: set() for k in keys}
    first_error: dict[tuple[str, int], str] = {}
    settings, configs, skipped = [], [], []
    for combo in itertools.product(*(range(len(grid[k])) for k in keys)):
        overrides = {k: grid[k][i] for k, i in zip(keys, combo, strict=True)}
        try:
            config = apply_overrides(base, {**overrides, **TUNER_OVERRIDES})
            for name, ch_names, sfreq in streams:
                try:
                    validate_for_stream(config, ch_names, sfreq)
                except ConfigError as exc:
                    raise ConfigError(f"{name}", exc.errors) from None
        except ConfigError as exc:
            msg = "; ".join(exc.errors)
            skipped.append((overrides, msg))
            for k, i in zip(keys, combo, strict=True):
                first_error.setdefault((k, i), msg)
            continue
        for k, i in zip(keys, combo, strict=True):
            ok_values[k].add(i)
        settings.append(overrides)
        configs.append(config)
    errors = [
        f"{k}={grid[k][i]!r}: invalid in every combination ({first_error[(k, i)]})"
        for k in keys
        for i in range(len(grid[k]))
        if i not in ok_values[k]
    ]
    if not keys and skipped:
        errors = [skipped[0][1]]
    if errors:
        raise ConfigError("--grid", errors)
    return Grid(keys, settings, configs, skipped)


# ------------------------------------------------------------------------------ the objective


@dataclass(frozen=True)
class Objective:
    """Best `metric` (max or min) among settings meeting every (metric, op, value) constraint."""

    metric: str
    maximize: bool = True
    constraints: tuple[tuple[str, str, float], ...] = ()

    def describe(self) -> str:
        goal = f"{'highest' if self.maximize else 'lowest'} {self.metric}"
        if not self.constraints:
            return goal
        return goal + " with " + " and ".join(f"{m} {op} {v:g}" for m, op, v in self.constraints)


_OPS = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}
_EXTRA_COLUMNS = ("time_in_state_s", "time_in_state_frac", "epochs", *PHASE_METRICS)


def metric_column(name: str) -> str:
    """'precision' -> 'precision_fired' (what really fired is the default); full names pass."""
    if name in _EXTRA_COLUMNS or any(name == f"{m}_{s}" for m in METRICS for s in PULSE_SETS):
        return name
    if name in METRICS:
        return f"{name}_fired"
    known = [*METRICS, *(f"{m}_{s}" for m in METRICS for s in PULSE_SETS), *_EXTRA_COLUMNS]
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
    raise UserError(f"unknown metric {name!r}{hint}")


def parse_objective(
    maximize: str | None, minimize: str | None, require: Sequence[str]
) -> Objective:
    if maximize and minimize:
        raise UserError("give --maximize or --minimize, not both")
    metric = metric_column(minimize or maximize or "precision")
    constraints = []
    for text in require:
        m = _REQUIRE.match(text)
        if not m:
            raise UserError(f"--require {text!r}: expected METRIC OP VALUE, e.g. hit_rate>=0.8")
        name, op, value = m.groups()
        v = float(value[:-1]) / 100.0 if value.endswith("%") else float(value)
        constraints.append((metric_column(name), op, v))
    return Objective(metric, not minimize, tuple(constraints))


def _sort_value(row: dict[str, float], column: str, higher_better: bool) -> float:
    v = row.get(column, math.nan)
    if v is None or not math.isfinite(v):
        return math.inf  # undefined sorts last
    return -v if higher_better else v


def rank(rows: Sequence[dict[str, float]], objective: Objective) -> tuple[list[int], list[bool]]:
    """Indices best first, and whether each row meets every constraint (nan never does).

    Order: meets all constraints, then fewer constraints missed, then the objective, then
    higher hit rate, fewer false pulses per minute, shorter median delay, then grid order.
    """
    feasible = []
    missed = []
    for row in rows:
        bad = 0
        for col, op, value in objective.constraints:
            v = row.get(col, math.nan)
            if v is None or not math.isfinite(v) or not _OPS[op](v, value):
                bad += 1
        missed.append(bad)
        feasible.append(bad == 0)
    order = sorted(
        range(len(rows)),
        key=lambda i: (
            missed[i],
            _sort_value(rows[i], objective.metric, objective.maximize),
            _sort_value(rows[i], "hit_rate_fired", True),
            _sort_value(rows[i], "false_per_min_fired", False),
            _sort_value(rows[i], "delay_median_s_fired", False),
            i,
        ),
    )
    return order, feasible


# ------------------------------------------------------------------------------ running


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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return ""
        return f"{v:.4g}"
    return str(v)


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


SCORE_COLUMNS = [f"{m}_{s}" for s in PULSE_SETS for m in METRICS] + list(_EXTRA_COLUMNS)


# ------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window (and no display on lab servers)
    import matplotlib.pyplot as plt

    return plt


@dataclass
class TracePlot:
    """What the score-over-time plot of one recording shows."""

    rec: Recording
    trace: dict[str, np.ndarray]  # 't', 'score', 'target' per chunk
    outcome: Outcome
    enter: float
    leave: float
    title: str


def plot_trace(path: Path, tp: TracePlot) -> None:
    """Score over time with thresholds, target epochs shaded, fired pulses and vetoed requests."""
    plt = _pyplot()
    rec, trace, outcome = tp.rec, tp.trace, tp.outcome
    fig, ax = plt.subplots(figsize=(12, 3.8), dpi=100)
    for i, (a, b) in enumerate(rec.epochs):
        ax.axvspan(
            a,
            b,
            color="tab:green",
            alpha=0.15,
            lw=0,
            label="annotated target epochs" if i == 0 else None,
        )
    if math.isfinite(outcome.scored_from):
        ax.axvspan(
            0, outcome.scored_from, color="0.85", alpha=0.6, lw=0, label="calibration (not scored)"
        )
    t, score = trace["t"], trace["score"]
    ax.plot(t, score, color="tab:blue", lw=0.8, label="score")
    ax.axhline(tp.enter, color="tab:red", ls="--", lw=1, label=f"enter {tp.enter:g}")
    ax.axhline(tp.leave, color="tab:orange", ls=":", lw=1, label=f"leave {tp.leave:g}")
    finite = score[np.isfinite(score)]
    top = float(np.percentile(finite, 99.5)) if finite.size else tp.enter + 1
    bottom = float(np.percentile(finite, 0.5)) if finite.size else tp.leave - 1
    top, bottom = max(top, tp.enter) + 0.5, min(bottom, tp.leave) - 0.8
    # the estimator's label as a strip at the bottom: where the pipeline believed 'target'
    ax.fill_between(
        t,
        bottom,
        bottom + 0.25,
        where=trace["target"],
        color="tab:purple",
        step="post",
        lw=0,
        label="estimated target state",
    )
    vetoed = np.setdiff1d(outcome.requested, outcome.fired)
    if vetoed.size:
        ax.plot(
            vetoed, np.full(vetoed.size, top - 0.25), "x", color="0.3", ms=7, label="vetoed request"
        )
    if outcome.fired.size:
        ax.vlines(outcome.fired, bottom, top, color="k", lw=0.9, label="pulse (fired)")
    ax.set_ylim(bottom, top)
    ax.set_xlim(0, max(rec.duration_s, float(t[-1]) if t.size else 0.0))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("state score (z)")
    ax.set_title(tp.title, fontsize=10)
    ax.legend(loc="upper left", fontsize=7, ncol=5, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_tradeoff(
    path: Path,
    rows: Sequence[dict[str, float]],
    chosen: int,
    objective: Objective,
    held_out: dict[str, float] | None = None,
) -> None:
    """Precision against hit rate (what fired) for every setting; the chosen one marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5), dpi=100)
    hit = np.array([r["hit_rate_fired"] for r in rows], dtype=float)
    prec = np.array([r["precision_fired"] for r in rows], dtype=float)
    fpm = np.array([r["false_per_min_fired"] for r in rows], dtype=float)
    ok = np.isfinite(hit) & np.isfinite(prec)
    sc = ax.scatter(hit[ok], prec[ok], c=np.nan_to_num(fpm[ok]), cmap="viridis", s=26, alpha=0.85)
    fig.colorbar(sc, ax=ax, label="false pulses / min (fired)")
    for col, op, value in objective.constraints:
        if col == "hit_rate_fired":
            ax.axvline(value, color="tab:red", ls="--", lw=1, label=f"hit rate {op} {value:g}")
        if col == "precision_fired":
            ax.axhline(value, color="tab:red", ls="--", lw=1, label=f"precision {op} {value:g}")
    ax.plot(
        hit[chosen],
        prec[chosen],
        marker="*",
        color="tab:red",
        ms=18,
        ls="",
        mec="k",
        label="recommended (tuned)",
    )
    if held_out is not None and math.isfinite(held_out["hit_rate_fired"]):
        ax.plot(
            held_out["hit_rate_fired"],
            held_out["precision_fired"],
            marker="D",
            color="tab:orange",
            ms=9,
            ls="",
            mec="k",
            label="held out (pooled LORO)",
        )
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("target epochs hit (fraction)")
    ax.set_ylabel("precision (pulses inside target epochs)")
    ax.set_title(
        f"{len(rows)} settings ({int((~ok).sum())} without pulses or epochs not shown)", fontsize=10
    )
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------ results


def _setting_str(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(base config)"


def _md_scores(row: dict[str, float], columns: Sequence[str]) -> str:
    return " | ".join(_fmt(float(row.get(c, math.nan))) or "n/a" for c in columns)


@dataclass
class TuneResult:
    """Everything the output files are made from."""

    recs: list[Recording]
    grid_values: dict[str, list[Any]]
    grid: Grid
    objective: Objective
    target: str
    min_epoch_s: float
    outcomes: dict[tuple[int, int], Outcome]
    rows: list[dict[str, float]]  # pooled scores per setting
    order: list[int]  # settings best first
    feasible: list[bool]
    validation: dict[str, Any] | None
    jobs: int
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file, caption)
    executor: str = ""  # where the runs happened (executors.Executor.name)
    executor_notes: list[str] = field(default_factory=list)  # e.g. runs re-run after a lost worker
    wall_s: float = math.nan

    @property
    def chosen(self) -> int:
        return self.order[0]

    @property
    def row(self) -> dict[str, float]:
        return self.rows[self.chosen]

    @property
    def met(self) -> bool:
        return self.feasible[self.chosen]

    @property
    def nothing_scored(self) -> str:
        """Why no setting can be recommended ('' when something was scored): no run calibrated,
        or no setting scored a single target epoch."""
        if not any(math.isfinite(o.scored_from) for o in self.outcomes.values()):
            reasons = sorted({o.calibration for o in self.outcomes.values() if o.calibration})
            why = "; ".join(reasons[:3]) or "calibration never finished"
            return f"no run calibrated, so nothing was scored ({why})"
        if not any(r["epochs"] for r in self.rows):
            return (
                f"no setting scored a '{self.target}' epoch (none after calibration, or all "
                "shorter than --min-epoch-s in the scored window)"
            )
        return ""

    def warnings(self) -> list[str]:
        """What makes the scores weak or undefined, in words."""
        out = []
        never = sorted(
            {
                self.recs[r].name
                for (_, r), o in self.outcomes.items()
                if not math.isfinite(o.scored_from)
            }
        )
        n_never = sum(not math.isfinite(o.scored_from) for o in self.outcomes.values())
        if n_never:
            out.append(
                f"{n_never} of {len(self.outcomes)} runs never armed, so they score nothing "
                f"(calibration did not finish on {', '.join(never)}: recording too short "
                "for state.calibration_s, or every sample flagged as an artifact?)"
            )
        if not self.row["epochs"]:
            out.append(
                "no target epoch was scored (epochs that start before arming or have less "
                "than --min-epoch-s in the scored window are left out): hit rate and delays "
                "are undefined"
            )
        return out

    def speeds(self) -> np.ndarray:
        """Seconds of data per wall second of every run (x real time)."""
        return np.array([o.duration_s / o.wall_s for o in self.outcomes.values() if o.wall_s > 0])


def validate_loro(
    grid: Grid,
    recs: Sequence[Recording],
    outcomes: dict[tuple[int, int], Outcome],
    objective: Objective,
    min_epoch_s: float,
    by_subject: bool = False,
) -> dict[str, Any]:
    """Leave-one-out: pick on the others, score the held-out recording (or, by_subject, all
    recordings of the held-out participant pooled)."""
    folds = []
    held_counts: list[dict[str, Counts]] = []
    target_s = window_s = 0.0
    for name, group in _groups(recs, by_subject):
        train = [r for r in range(len(recs)) if r not in group]
        rows = score_rows(grid, recs, outcomes, train, min_epoch_s)
        order, feasible = rank(rows, objective)
        s = order[0]
        counts_g = [score_outcome(outcomes[(s, k)], recs[k].epochs, min_epoch_s) for k in group]
        g_target_s = sum(outcomes[(s, k)].target_s for k in group)
        g_window_s = sum(outcomes[(s, k)].window_s for k in group)
        held_counts += counts_g
        target_s += g_target_s
        window_s += g_window_s
        test = score_table(counts_g, g_target_s, g_window_s)
        folds.append(
            {
                "held_out": name,
                "setting": s,
                "overrides": grid.settings[s],
                "train": rows[s],
                "train_meets": feasible[s],
                "test": test,
                "test_meets": rank([test], objective)[1][0],
            }
        )
    pooled = score_table(held_counts, target_s, window_s)
    return {
        "folds": folds,
        "pooled": pooled,
        "pooled_meets": rank([pooled], objective)[1][0],
        "unit": "participant" if by_subject else "recording",
    }


def _groups(recs: Sequence[Recording], by_subject: bool) -> list[tuple[str, list[int]]]:
    """(name, recording indices) per recording, or per participant ('sub-01') in first-seen
    order."""
    if not by_subject:
        return [(rec.name, [k]) for k, rec in enumerate(recs)]
    groups: dict[str, list[int]] = {}
    for k, rec in enumerate(recs):
        groups.setdefault(f"sub-{rec.subject}", []).append(k)
    return list(groups.items())


SPREAD_COLUMNS = ("hit_rate_fired", "precision_fired", "false_per_min_fired")


def spread(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per column of SPREAD_COLUMNS: mean, sd (n-1), min, max over rows (undefined ones left
    out; n counts the defined)."""
    out = {}
    for c in SPREAD_COLUMNS:
        v = np.array([r[c] for r in rows], dtype=float)
        v = v[np.isfinite(v)]
        out[c] = {
            "n": int(v.size),
            "mean": float(v.mean()) if v.size else math.nan,
            "sd": float(v.std(ddof=1)) if v.size > 1 else math.nan,
            "min": float(v.min()) if v.size else math.nan,
            "max": float(v.max()) if v.size else math.nan,
        }
    return out


def per_participant(res: TuneResult) -> list[tuple[str, dict[str, float]]]:
    """Scores of the recommended setting per participant (their recordings pooled)."""
    out = []
    for name, group in _groups(res.recs, True):
        out.append((name, score_rows(res.grid, res.recs, res.outcomes, group, res.min_epoch_s)))
    return [(name, rows[res.chosen]) for name, rows in out]


def write_tables(out_dir: Path, res: TuneResult) -> None:
    """scores.csv, scores_per_recording.csv, pulses.csv, validation.csv (full precision)."""
    grid, keys = res.grid, res.grid.keys
    rank_of = {s: i + 1 for i, s in enumerate(res.order)}
    write_csv(
        out_dir / "scores.csv",
        ["setting", *keys, *SCORE_COLUMNS, "meets_objective", "rank"],
        [
            [
                s,
                *grid.settings[s].values(),
                *(res.rows[s][c] for c in SCORE_COLUMNS),
                int(res.feasible[s]),
                rank_of[s],
            ]
            for s in range(len(res.rows))
        ],
    )
    per_rec = []
    for r, rec in enumerate(res.recs):
        rows = score_rows(grid, res.recs, res.outcomes, [r], res.min_epoch_s)
        for s, row in enumerate(rows):
            o = res.outcomes[(s, r)]
            per_rec.append(
                [
                    s,
                    rec.name,
                    *grid.settings[s].values(),
                    *(row[c] for c in SCORE_COLUMNS),
                    o.duration_s / o.wall_s,
                ]
            )
    write_csv(
        out_dir / "scores_per_recording.csv",
        ["setting", "recording", *keys, *SCORE_COLUMNS, "x_real_time"],
        per_rec,
    )
    pulses = []
    for (s, r), o in sorted(res.outcomes.items()):
        fired = set(o.fired.tolist())
        pulses += [[s, res.recs[r].name, float(t), int(t in fired)] for t in o.requested]
    write_csv(out_dir / "pulses.csv", ["setting", "recording", "t_stream", "fired"], pulses)
    if res.validation:
        write_csv(
            out_dir / "validation.csv",
            [
                "held_out",
                "setting",
                *keys,
                *(f"tuned_{c}" for c in SCORE_COLUMNS),
                *(f"heldout_{c}" for c in SCORE_COLUMNS),
                "heldout_meets_objective",
            ],
            [
                [
                    f["held_out"],
                    f["setting"],
                    *f["overrides"].values(),
                    *(f["train"][c] for c in SCORE_COLUMNS),
                    *(f["test"][c] for c in SCORE_COLUMNS),
                    int(f["test_meets"]),
                ]
                for f in res.validation["folds"]
            ],
        )


def write_recommended(path: Path, base: SessionConfig, res: TuneResult) -> SessionConfig:
    """The user's base config (outputs included) with the chosen values, as a ready YAML."""
    config = apply_overrides(base, res.grid.settings[res.chosen])
    row = res.row
    head = [
        "# closedloop tune: recommended setting",
        f"# recordings: {', '.join(r.name for r in res.recs)}; target '{res.target}'",
        f"# objective: {res.objective.describe()}: "
        f"{'met' if res.met else 'NOT met by any setting (closest shown)'}",
        f"# tuned: {_setting_str(res.grid.settings[res.chosen])}",
        f"# tuned scores (fired): hit rate {_fmt(row['hit_rate_fired'])}, precision "
        f"{_fmt(row['precision_fired'])}, false/min {_fmt(row['false_per_min_fired'])}, "
        f"median delay {_fmt(row['delay_median_s_fired'])} s",
    ]
    if res.validation:
        p = res.validation["pooled"]
        head.append(
            f"# held out (leave one {res.validation.get('unit', 'recording')} out, pooled): "
            f"hit rate {_fmt(p['hit_rate_fired'])}, "
            f"precision {_fmt(p['precision_fired'])}, false/min {_fmt(p['false_per_min_fired'])}"
        )
    path.write_text("\n".join(head) + "\n" + dump_config(config), encoding="utf-8")
    return config


def make_plots(out_dir: Path, res: TuneResult) -> None:
    """tradeoff.png, and trace_<i>.png of the chosen setting on the first 4 recordings.

    The traces come from re-running the chosen setting with a bus subscriber (the grid runs keep
    no trace); a re-run that fires differently would mean a non-deterministic pipeline: warned.
    """
    plot_tradeoff(
        out_dir / "tradeoff.png",
        res.rows,
        res.chosen,
        res.objective,
        res.validation["pooled"] if res.validation else None,
    )
    res.plots.append(
        (
            "tradeoff.png",
            "precision against epochs hit for every setting (what fired); star: recommended",
        )
    )
    cfg = res.grid.configs[res.chosen]
    setting = _setting_str(res.grid.settings[res.chosen])
    with tempfile.TemporaryDirectory(prefix="cltune-trace-") as tmp:
        for r, rec in enumerate(res.recs[:MAX_TRACE_PLOTS]):
            outcome, trace = trace_run(rec.path, cfg, Path(tmp))
            if not np.array_equal(outcome.fired, res.outcomes[(res.chosen, r)].fired):
                print(
                    f"tune: warning: re-running setting {res.chosen} on {rec.name} fired other "
                    "pulses than the grid run (non-deterministic pipeline?)",
                    file=sys.stderr,
                )
            sc = score_table([score_outcome(outcome, rec.epochs, res.min_epoch_s)])
            title = (
                f"{rec.name}: {setting} | hit rate {_fmt(sc['hit_rate_fired'])}, precision "
                f"{_fmt(sc['precision_fired'])}, {int(sc['n_pulses_fired'])} pulses"
            )
            png = f"trace_{r}.png"
            plot_trace(
                out_dir / png,
                TracePlot(rec, trace, outcome, cfg.state.enter, cfg.state.leave, title),
            )
            res.plots.append(
                (
                    png,
                    f"score over time on {rec.name} with the recommended setting: "
                    "thresholds, annotated target epochs (green), pulses (black), "
                    "vetoed requests (x), estimated target state (purple strip)",
                )
            )


def write_report(path: Path, res: TuneResult) -> None:
    """report.md: objective, recommendation, scores with and without vetoes, speed, plots."""
    row, speeds = res.row, res.speeds()
    n_data = sum(r.duration_s for r in res.recs)
    grid_desc = ", ".join(f"`{k}` ({len(v)} values)" for k, v in res.grid_values.items())
    lines = [
        "# closedloop tune report",
        "",
        f"- written: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- recordings: {', '.join(r.name for r in res.recs)} ({n_data:.0f} s in all)",
        f"- target label: `{res.target}` ({int(row['epochs'])} scored epochs; epochs that start "
        f"before the interlock armed, or have less than {res.min_epoch_s:g} s in the scored "
        "window, are not scored)",
        f"- grid: {grid_desc or 'none (base config only)'}; {len(res.grid.settings)} settings "
        f"run, {len(res.grid.skipped)} invalid combinations skipped",
        f"- objective: {res.objective.describe()}",
    ]
    if speeds.size:
        lines.append(
            f"- speed: one setting on one recording ran at **{np.median(speeds):.0f}x real time** "
            f"(median of {speeds.size} runs, {speeds.min():.0f}-{speeds.max():.0f}x) with "
            f"{res.jobs} worker process(es); {res.wall_s:.0f} s for the whole tuning"
        )
    if res.executor:
        lines.append(f"- executor: {res.executor}")
    lines += [f"- **re-run**: {n}" for n in res.executor_notes]
    lines += [f"- **warning**: {w}" for w in res.warnings()]
    lines += ["", "## Recommendation", ""]
    setting = _setting_str(res.grid.settings[res.chosen])
    if res.met:
        lines.append(f"**{setting}** meets the objective on the tuning data.")
    else:
        lines.append(
            f"**No setting meets the objective.** Closest: **{setting}** (fewest "
            "constraints missed, then the best objective). Widen the grid or relax the "
            "objective."
        )
    lines += [
        "",
        "Ready config: [`recommended.yaml`](recommended.yaml). All settings: "
        "[`scores.csv`](scores.csv) (per recording: `scores_per_recording.csv`; every pulse: "
        "`pulses.csv`).",
        "",
        "| pulses counted | hit rate | precision | false/min | delay median (s) | delay p90 (s) "
        "| pulses/min | pulses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    metrics_order = (
        "hit_rate",
        "precision",
        "false_per_min",
        "delay_median_s",
        "delay_p90_s",
        "pulses_per_min",
        "n_pulses",
    )
    for name, label in (
        ("fired", "fired (interlock vetoes applied)"),
        ("requested", "requested by the policy"),
    ):
        lines.append(f"| {label} | {_md_scores(row, [f'{m}_{name}' for m in metrics_order])} |")
    vetoes: dict[str, int] = {}
    for (s, _), o in res.outcomes.items():
        if s == res.chosen:
            for reason, n in o.vetoes_by_reason.items():
                vetoes[reason] = vetoes.get(reason, 0) + int(n)
    veto_text = ", ".join(f"{k} {v}" for k, v in sorted(vetoes.items(), key=lambda kv: -kv[1]))
    lines += [
        "",
        f"Requests the interlock vetoed, by reason: {veto_text or 'none'}.",
        "",
        f"Time in the estimated target state: {_fmt(row['time_in_state_s'])} s "
        f"({_fmt(100 * row['time_in_state_frac'])} % of the scored time).",
        "",
    ]
    if _phase_mode(res):
        lines += [
            "Phase of the fired pulses against the acausal reference around each (phase mode): "
            f"bias {_fmt(row['phase_bias_deg'])} deg, circular SD {_fmt(row['phase_sd_deg'])} "
            f"deg, PLV {_fmt(row['phase_plv'])}, within +-45 deg {_fmt(row['phase_within_45'])} "
            f"({int(row['phase_n'])} pulses).",
            "",
        ]
    if any(r.subject is not None for r in res.recs):
        lines += _participants_md(res)
    if res.validation:
        lines += _validation_md(res)
    lines += ["## Plots", ""]
    for png, caption in res.plots:
        lines += [f"![{caption}]({png})", "", f"*{caption}*", ""]
    top_cols = [
        "hit_rate_fired",
        "precision_fired",
        "false_per_min_fired",
        "delay_median_s_fired",
        "hit_rate_requested",
        "precision_requested",
        "pulses_per_min_fired",
    ]
    if _phase_mode(res):
        top_cols += ["phase_sd_deg", "phase_abs_bias_deg", "phase_plv"]
    lines += [
        "## Top settings",
        "",
        "| rank | setting # | values | " + " | ".join(top_cols) + " |",
        "|---|---|---|" + "---|" * len(top_cols),
    ]
    for i, s in enumerate(res.order[:10]):
        lines.append(
            f"| {i + 1} | {s} | {_setting_str(res.grid.settings[s])} | "
            f"{_md_scores(res.rows[s], top_cols)} |"
        )
    if res.grid.skipped:
        lines += ["", "## Skipped combinations", ""]
        lines += [f"- {_setting_str(o)}: {msg}" for o, msg in res.grid.skipped[:20]]
        if len(res.grid.skipped) > 20:
            lines.append(f"- ... and {len(res.grid.skipped) - 20} more")
    lines += ["", "## Definitions", ""]
    lines += [f"- `{k}`: {v}" for k, v in METRICS.items()]
    if _phase_mode(res):
        lines += [f"- `{k}`: {v}" for k, v in PHASE_METRICS.items()]
    lines += [
        "- `_fired`: pulses the interlock let through (what would really have fired); "
        "`_requested`: every pulse request of the policy, fired or vetoed.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def _phase_mode(res: TuneResult) -> bool:
    """Whether any run of the sweep fired phase-mode pulses (the phase columns mean something)."""
    return any(o.phase_errors.size for o in res.outcomes.values())


def _validation_md(res: TuneResult) -> list[str]:
    v = res.validation
    assert v is not None
    unit = v.get("unit", "recording")
    lines = [
        f"## Held-out validation (leave one {unit} out)",
        "",
        f"For each {unit}, the objective picked a setting on the *other* {unit}s' recordings; "
        "that setting was then scored on the held-out one. Held-out figures are what to expect "
        "on new data.",
        "",
        "| held out | chosen on the others | tuned hit rate | tuned precision | held-out hit rate "
        "| held-out precision | held-out false/min | meets objective |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in v["folds"]:
        tr, te = f["train"], f["test"]
        lines.append(
            f"| {f['held_out']} | {_setting_str(f['overrides'])} | {_fmt(tr['hit_rate_fired'])} "
            f"| {_fmt(tr['precision_fired'])} | {_fmt(te['hit_rate_fired'])} "
            f"| {_fmt(te['precision_fired'])} | {_fmt(te['false_per_min_fired'])} "
            f"| {'yes' if f['test_meets'] else 'no'} |"
        )
    p, row = v["pooled"], res.row
    lines += [
        "",
        f"Pooled held out (all folds): hit rate {_fmt(p['hit_rate_fired'])}, precision "
        f"{_fmt(p['precision_fired'])}, false pulses/min {_fmt(p['false_per_min_fired'])}, "
        f"median delay {_fmt(p['delay_median_s_fired'])} s: the objective is "
        f"{'met' if v['pooled_meets'] else '**not met**'} held out. Tuned on all recordings, the "
        f"recommended setting scores hit rate {_fmt(row['hit_rate_fired'])} and precision "
        f"{_fmt(row['precision_fired'])}; the difference is the optimism of scoring a setting on "
        "the data it was chosen on.",
        "",
        f"Spread over the {len(v['folds'])} held-out {unit}s: "
        + _spread_text(spread([f["test"] for f in v["folds"]])),
        "",
    ]
    return lines


def _spread_text(sp: dict[str, dict[str, float]]) -> str:
    names = {"hit_rate_fired": "hit rate", "precision_fired": "precision"}
    names["false_per_min_fired"] = "false pulses/min"
    return "; ".join(
        f"{names[c]} {_fmt(d['mean'])} ± {_fmt(d['sd']) or 'n/a'} (mean ± SD over {d['n']}, "
        f"range {_fmt(d['min'])}-{_fmt(d['max'])})"
        for c, d in sp.items()
    )


def _participants_md(res: TuneResult) -> list[str]:
    """The recommended setting per participant, the pooled figure and the spread between."""
    parts = per_participant(res)
    cols = ["hit_rate_fired", "precision_fired", "false_per_min_fired", "epochs"]
    lines = [
        "## Per participant",
        "",
        "The recommended setting on each participant's recordings (pooled per participant), "
        "then on all of them pooled.",
        "",
        "| participant | recordings | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    n_recs = {}
    for rec in res.recs:
        n_recs[f"sub-{rec.subject}"] = n_recs.get(f"sub-{rec.subject}", 0) + 1
    for name, row in parts:
        lines.append(f"| {name} | {n_recs[name]} | {_md_scores(row, cols)} |")
    lines.append(f"| **pooled** | {len(res.recs)} | {_md_scores(res.row, cols)} |")
    lines += [
        "",
        f"Spread between the {len(parts)} participants: "
        + _spread_text(spread([r for _, r in parts])),
        "",
    ]
    return lines


def write_summary(path: Path, res: TuneResult) -> None:
    """summary.json: the recommendation, its scores, validation and speed, for scripts."""
    from closedloop.recording import write_json

    speeds = res.speeds()
    v = res.validation
    write_json(
        path,
        {
            "recordings": [r.path for r in res.recs],
            "target": res.target,
            "objective": res.objective.describe(),
            "warnings": res.warnings(),
            "grid": res.grid_values,
            "settings": len(res.grid.settings),
            "skipped": len(res.grid.skipped),
            "recommended": {
                "setting": res.chosen,
                "overrides": res.grid.settings[res.chosen],
                "meets_objective": res.met,
                "scores": res.row,
            },
            "participants": None
            if all(r.subject is None for r in res.recs)
            else {
                "scores": dict(per_participant(res)),
                "spread": spread([r for _, r in per_participant(res)]),
            },
            "validation": None
            if v is None
            else {
                "pooled": v["pooled"],
                "pooled_meets_objective": v["pooled_meets"],
                "unit": v["unit"],
                "spread": spread([f["test"] for f in v["folds"]]),
                "folds": [
                    {
                        k: f[k]
                        for k in ("held_out", "setting", "overrides", "train", "test", "test_meets")
                    }
                    for f in v["folds"]
                ],
            },
            "speed": {
                "x_real_time_median": float(np.median(speeds)) if speeds.size else None,
                "x_real_time_min": float(speeds.min()) if speeds.size else None,
                "runs": int(speeds.size),
                "jobs": res.jobs,
                "executor": res.executor,
                "rerun": res.executor_notes,
                "wall_total_s": round(res.wall_s, 3),
            },
        },
    )


# ------------------------------------------------------------------------------ CLI


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


def _load_recordings(
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
    _check_keys(base, list(grid_values))  # key typos before reading any recording
    study = []
    if bids_root is not None:
        from closedloop.tuning.study import find_recordings

        study = find_recordings(bids_root, args.task, args.subjects)
        if args.validate and len({r.subject for r in study}) < 2:
            raise UserError(
                "--validate needs recordings of at least two participants "
                "(it holds one out at a time)"
            )
    recs = _load_recordings(args.recordings, args.target, base.source.chunk_size, study)
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
    print(f"recommended: {_setting_str(res.grid.settings[res.chosen])}")
    print(f"  objective {res.objective.describe()}: {verdict}")
    print(
        f"  tuned     hit rate {_fmt(row['hit_rate_fired'])}  precision "
        f"{_fmt(row['precision_fired'])}  false/min {_fmt(row['false_per_min_fired'])}  "
        f"median delay {_fmt(row['delay_median_s_fired'])} s"
    )
    if res.validation:
        p = res.validation["pooled"]
        meets = "meets" if res.validation["pooled_meets"] else "misses"
        print(
            f"  held out  hit rate {_fmt(p['hit_rate_fired'])}  precision "
            f"{_fmt(p['precision_fired'])}  false/min {_fmt(p['false_per_min_fired'])}  "
            f"({meets} the objective)"
        )
    speeds = res.speeds()
    if speeds.size:
        print(f"  speed     {np.median(speeds):.0f}x real time per run (median of {speeds.size})")
    for w in res.warnings():
        print(f"  warning: {w}")
    print(f"  wrote {out_dir}/ (report.md, scores.csv, recommended.yaml, plots)")

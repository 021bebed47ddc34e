"""What a tuning run writes: scores.csv and its tables, recommended.yaml, the plots, report.md,
summary.json, and the held-out validation (leave one recording or participant out)."""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from closedloop.config import SessionConfig, apply_overrides, dump_config
from closedloop.tuning.grid import Grid, Objective, rank
from closedloop.tuning.plots import TracePlot, plot_trace, plot_tradeoff
from closedloop.tuning.runner import SCORE_COLUMNS, Recording, score_rows, trace_run, write_csv
from closedloop.tuning.scoring import (
    METRICS,
    PHASE_METRICS,
    Counts,
    Outcome,
    score_outcome,
    score_table,
)

if TYPE_CHECKING:
    pass

MAX_TRACE_PLOTS = 4  # score-over-time plots (one re-run each) for the first recordings


def fmt(v: Any) -> str:
    """A table cell: floats to 4 significant digits, NaN / inf as empty."""
    if isinstance(v, float):
        if not math.isfinite(v):
            return ""
        return f"{v:.4g}"
    return str(v)


def setting_str(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(base config)"


def _md_scores(row: dict[str, float], columns: Sequence[str]) -> str:
    return " | ".join(fmt(float(row.get(c, math.nan))) or "n/a" for c in columns)


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
        f"# tuned: {setting_str(res.grid.settings[res.chosen])}",
        f"# tuned scores (fired): hit rate {fmt(row['hit_rate_fired'])}, precision "
        f"{fmt(row['precision_fired'])}, false/min {fmt(row['false_per_min_fired'])}, "
        f"median delay {fmt(row['delay_median_s_fired'])} s",
    ]
    if res.validation:
        p = res.validation["pooled"]
        head.append(
            f"# held out (leave one {res.validation.get('unit', 'recording')} out, pooled): "
            f"hit rate {fmt(p['hit_rate_fired'])}, "
            f"precision {fmt(p['precision_fired'])}, false/min {fmt(p['false_per_min_fired'])}"
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
    setting = setting_str(res.grid.settings[res.chosen])
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
                f"{rec.name}: {setting} | hit rate {fmt(sc['hit_rate_fired'])}, precision "
                f"{fmt(sc['precision_fired'])}, {int(sc['n_pulses_fired'])} pulses"
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
    setting = setting_str(res.grid.settings[res.chosen])
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
        f"Time in the estimated target state: {fmt(row['time_in_state_s'])} s "
        f"({fmt(100 * row['time_in_state_frac'])} % of the scored time).",
        "",
    ]
    if _phase_mode(res):
        lines += [
            "Phase of the fired pulses against the acausal reference around each (phase mode): "
            f"bias {fmt(row['phase_bias_deg'])} deg, circular SD {fmt(row['phase_sd_deg'])} "
            f"deg, PLV {fmt(row['phase_plv'])}, within +-45 deg {fmt(row['phase_within_45'])} "
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
            f"| {i + 1} | {s} | {setting_str(res.grid.settings[s])} | "
            f"{_md_scores(res.rows[s], top_cols)} |"
        )
    if res.grid.skipped:
        lines += ["", "## Skipped combinations", ""]
        lines += [f"- {setting_str(o)}: {msg}" for o, msg in res.grid.skipped[:20]]
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
            f"| {f['held_out']} | {setting_str(f['overrides'])} | {fmt(tr['hit_rate_fired'])} "
            f"| {fmt(tr['precision_fired'])} | {fmt(te['hit_rate_fired'])} "
            f"| {fmt(te['precision_fired'])} | {fmt(te['false_per_min_fired'])} "
            f"| {'yes' if f['test_meets'] else 'no'} |"
        )
    p, row = v["pooled"], res.row
    lines += [
        "",
        f"Pooled held out (all folds): hit rate {fmt(p['hit_rate_fired'])}, precision "
        f"{fmt(p['precision_fired'])}, false pulses/min {fmt(p['false_per_min_fired'])}, "
        f"median delay {fmt(p['delay_median_s_fired'])} s: the objective is "
        f"{'met' if v['pooled_meets'] else '**not met**'} held out. Tuned on all recordings, the "
        f"recommended setting scores hit rate {fmt(row['hit_rate_fired'])} and precision "
        f"{fmt(row['precision_fired'])}; the difference is the optimism of scoring a setting on "
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
        f"{names[c]} {fmt(d['mean'])} ± {fmt(d['sd']) or 'n/a'} (mean ± SD over {d['n']}, "
        f"range {fmt(d['min'])}-{fmt(d['max'])})"
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

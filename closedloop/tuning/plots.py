"""The tuner's pictures: the score over time of one recording (with its target epochs and the
baseline), and the hit-rate / false-pulse trade-off over the grid (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from closedloop.tuning.grid import Objective
from closedloop.tuning.runner import Recording
from closedloop.tuning.scoring import (
    Outcome,
)

if TYPE_CHECKING:
    pass


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

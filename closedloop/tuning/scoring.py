"""Scores of pulse trains against annotated target epochs (pure functions; I/O: `read_outcome`).

Used by `closedloop tune` and usable on any session folder (`read_outcome` + `score_counts`), so a
setting's scores are the same whether the tuner ran it or `closedloop offline` did.

Definitions (all times in stream seconds):

- scored window: from the moment pulses became possible (the interlock armed after calibration,
  else calibration done) to the last sample. Nothing before it is scored: no setting can fire
  while calibrating, so epochs there would be misses shared by every setting.
- target epoch: an annotation whose description equals the target label. An epoch is *scored*
  (counts for the hit rate and delays) when it starts inside the window and at least
  `min_epoch_s` of it lies inside the window; pulses in any target epoch count as inside.
- hit: a scored epoch holding at least one pulse; delay: first pulse time - epoch onset.
- precision: pulses inside target epochs / all pulses in the window (nan with no pulse).
- false pulses per minute: pulses outside every target epoch per minute of window time outside
  target epochs.
- pulses per minute: all pulses in the window per minute of window.

Each metric comes twice: `*_fired` counts what the interlock let through (audit `fired` true),
`*_requested` counts every request of the policy (fired or vetoed).

Phase mode adds, over the fired pulses in the window, their phase error against the acausal
reference around each (the session's PhaseMonitor: zero-phase band-pass + Hilbert, five filters
averaged): `phase_bias_deg` (circular mean), `phase_abs_bias_deg`, `phase_sd_deg` (circular SD),
`phase_plv`, `phase_within_45` (share within +-45 deg) and `phase_n`; nan without phase mode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

PULSE_SETS = ("fired", "requested")
# Metric names per pulse set (columns `<name>_<set>` in the tuner's CSV), with a short meaning.
METRICS: dict[str, str] = {
    "hit_rate": "scored target epochs with at least one pulse / scored target epochs",
    "precision": "pulses inside target epochs / all pulses",
    "false_per_min": "pulses outside target epochs per minute outside them",
    "delay_median_s": "median delay from epoch onset to its first pulse (s)",
    "delay_p90_s": "90th percentile of that delay (s)",
    "pulses_per_min": "pulses per minute of scored time",
    "n_pulses": "pulses in the scored window",
}
# Phase accuracy of the fired pulses (phase mode), pooled over recordings.
PHASE_METRICS: dict[str, str] = {
    "phase_sd_deg": "circular SD of the fired pulses' phase error against the reference (deg)",
    "phase_abs_bias_deg": "|circular mean| of that error (deg)",
    "phase_bias_deg": "circular mean of that error (deg)",
    "phase_plv": "phase-locking value of the fired phases (0-1)",
    "phase_within_45": "share of fired pulses within +-45 deg of the target phase",
    "phase_n": "fired pulses with a reference phase",
}
# Metrics where lower is better (used by the objective's tie-breaks and by the report).
LOWER_IS_BETTER = frozenset(
    {"false_per_min", "delay_median_s", "delay_p90_s", "phase_sd_deg", "phase_abs_bias_deg"}
)


@dataclass(frozen=True, slots=True)
class Counts:
    """Additive counts of one pulse train on one recording (sum them to pool recordings)."""

    n_epochs: int = 0
    n_hit: int = 0
    n_pulses: int = 0
    n_inside: int = 0
    window_s: float = 0.0
    outside_s: float = 0.0
    delays_s: tuple[float, ...] = ()
    phase_errors_deg: tuple[float, ...] = ()  # phase mode: fired pulses' error vs the reference

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.n_epochs + other.n_epochs,
            self.n_hit + other.n_hit,
            self.n_pulses + other.n_pulses,
            self.n_inside + other.n_inside,
            self.window_s + other.window_s,
            self.outside_s + other.outside_s,
            self.delays_s + other.delays_s,
            self.phase_errors_deg + other.phase_errors_deg,
        )


def target_epochs(annotations, label: str) -> np.ndarray:
    """[start, stop) of every annotation named `label`, sorted; array (n_epochs, 2) in seconds.

    annotations: anything with `onset`, `duration`, `description` (an mne.Annotations, e.g.
    `FileSource.annotations`, whose onsets are already in stream time).
    """
    desc = np.asarray(annotations.description, dtype=object)
    keep = desc == label
    onset = np.asarray(annotations.onset, dtype=float)[keep]
    dur = np.asarray(annotations.duration, dtype=float)[keep]
    order = np.argsort(onset, kind="stable")
    return (
        np.column_stack([onset[order], onset[order] + dur[order]])
        if keep.any()
        else np.zeros((0, 2))
    )


def _union_length(epochs: np.ndarray, t0: float, t1: float) -> float:
    """Seconds of [t0, t1) covered by the union of the epochs (n, 2)."""
    total, cur_start, cur_stop = 0.0, None, None
    for start, stop in epochs:
        a, b = max(start, t0), min(stop, t1)
        if b <= a:
            continue
        if cur_stop is None or a > cur_stop:
            if cur_stop is not None:
                total += cur_stop - cur_start
            cur_start, cur_stop = a, b
        else:
            cur_stop = max(cur_stop, b)
    if cur_stop is not None:
        total += cur_stop - cur_start
    return total


def count(
    pulse_times: Sequence[float] | np.ndarray,
    epochs: np.ndarray,
    window: tuple[float, float],
    min_epoch_s: float = 5.0,
) -> Counts:
    """Counts of one pulse train (times in s) against target epochs (n, 2) within `window`."""
    t0, t1 = window
    if not t1 > t0:
        return Counts()
    p = np.sort(np.asarray(pulse_times, dtype=float))
    p = p[(p >= t0) & (p <= t1)]
    epochs = np.asarray(epochs, dtype=float).reshape(-1, 2)
    inside = np.zeros(p.size, dtype=bool)
    for a, b in epochs:
        inside |= (p >= a) & (p < b)
    n_epochs = n_hit = 0
    delays: list[float] = []
    for a, b in epochs:
        if a < t0 or min(b, t1) - a < min_epoch_s:
            continue
        n_epochs += 1
        in_epoch = p[(p >= a) & (p < b)]
        if in_epoch.size:
            n_hit += 1
            delays.append(float(in_epoch[0] - a))
    window_s = t1 - t0
    return Counts(
        n_epochs=n_epochs,
        n_hit=n_hit,
        n_pulses=int(p.size),
        n_inside=int(inside.sum()),
        window_s=window_s,
        outside_s=window_s - _union_length(epochs, t0, t1),
        delays_s=tuple(delays),
    )


def metrics(c: Counts) -> dict[str, float]:
    """The METRICS of (pooled) counts; nan where undefined (no epoch, no pulse, no hit)."""
    nan = math.nan
    delays = np.asarray(c.delays_s, dtype=float)
    return {
        "hit_rate": c.n_hit / c.n_epochs if c.n_epochs else nan,
        "precision": c.n_inside / c.n_pulses if c.n_pulses else nan,
        "false_per_min": (c.n_pulses - c.n_inside) / (c.outside_s / 60.0)
        if c.outside_s > 0
        else nan,
        "delay_median_s": float(np.median(delays)) if delays.size else nan,
        "delay_p90_s": float(np.percentile(delays, 90)) if delays.size else nan,
        "pulses_per_min": c.n_pulses / (c.window_s / 60.0) if c.window_s > 0 else nan,
        "n_pulses": float(c.n_pulses),
    }


def phase_metrics(c: Counts) -> dict[str, float]:
    """The PHASE_METRICS of (pooled) counts: nan without phase errors."""
    from features.phase import phase_error_stats

    st = phase_error_stats(np.radians(np.asarray(c.phase_errors_deg, dtype=float)))
    return {
        "phase_sd_deg": st["circ_sd_deg"],
        "phase_abs_bias_deg": abs(st["bias_deg"]),
        "phase_bias_deg": st["bias_deg"],
        "phase_plv": st["plv"],
        "phase_within_45": st["within_45"],
        "phase_n": float(st["n"]),
    }


@dataclass(slots=True)
class Outcome:
    """What one pipeline run on one recording produced, as needed for scoring and plots.

    fired / requested: pulse times (s, stream time) of fired attempts / of all attempts.
    scored_from: start of the scored window (armed, else calibrated; nan if never).
    t_end: stream time of the last sample processed. target_s: seconds labelled target.
    wall_s: wall-clock seconds of the run; duration_s: seconds of data processed.
    """

    fired: np.ndarray
    requested: np.ndarray
    scored_from: float
    t_end: float
    target_s: float
    wall_s: float
    duration_s: float
    vetoes_by_reason: dict[str, int] = field(default_factory=dict)
    calibration: str = ""  # why the run never calibrated (the session summary's reason)
    # phase mode: (n, 2) fired pulses' (time s, phase error deg vs the reference); (0, 2) if off
    phase_errors: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))

    @property
    def window(self) -> tuple[float, float]:
        return (self.scored_from, self.t_end)

    @property
    def window_s(self) -> float:
        """Seconds scored (0 when the run never armed nor calibrated)."""
        return max(self.t_end - self.scored_from, 0.0) if math.isfinite(self.scored_from) else 0.0


def score_outcome(
    outcome: Outcome, epochs: np.ndarray, min_epoch_s: float = 5.0
) -> dict[str, Counts]:
    """Counts per pulse set ('fired', 'requested') of one run."""
    if not math.isfinite(outcome.scored_from):  # never calibrated: nothing could fire
        return {k: Counts() for k in PULSE_SETS}
    fired = count(outcome.fired, epochs, outcome.window, min_epoch_s)
    t, err = outcome.phase_errors.reshape(-1, 2).T
    in_window = (t >= outcome.scored_from) & (t <= outcome.t_end) & np.isfinite(err)
    return {
        "fired": replace(fired, phase_errors_deg=tuple(float(e) for e in err[in_window])),
        "requested": count(outcome.requested, epochs, outcome.window, min_epoch_s),
    }


def score_table(
    counts: Iterable[dict[str, Counts]], target_s: float = 0.0, window_s: float = 0.0
) -> dict[str, float]:
    """Pooled metrics over recordings: {'hit_rate_fired': .., ..., 'time_in_state_frac': ..}."""
    counts = list(counts)
    out: dict[str, float] = {}
    for name in PULSE_SETS:
        pooled = sum((c[name] for c in counts), Counts())
        out.update({f"{k}_{name}": v for k, v in metrics(pooled).items()})
    fired = sum((c["fired"] for c in counts), Counts())
    out.update(phase_metrics(fired))
    out["epochs"] = float(fired.n_epochs)
    out["time_in_state_s"] = float(target_s)
    out["time_in_state_frac"] = target_s / window_s if window_s > 0 else math.nan
    return out


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for raw_line in path.read_text(encoding="utf-8").splitlines():
            line = raw_line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line
                    continue
    return out


def read_outcome(folder: str | Path) -> Outcome:
    """The Outcome of a session folder written by `Session` (offline or tuner run)."""
    folder = Path(folder)
    records = _read_jsonl(folder / "audit.jsonl")
    audit = [a for a in records if a.get("event", "attempt") == "attempt" and "fired" in a]
    events = _read_jsonl(folder / "events.jsonl")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    started = next(
        (e for e in events if e.get("kind") == "session" and e.get("phase") == "started"), {}
    )
    sfreq = float(started.get("sfreq") or math.nan)
    t0 = float(started.get("t0_stream") or 0.0)

    def first_t(items, pred) -> float:
        for e in items:
            if pred(e) and e.get("t_stream") is not None:
                return float(e["t_stream"])
        return math.nan

    # the audit log stamps arming with the exact stream time; the event log only to the status
    # period (0.5 s), so it is the fallback
    armed = first_t(records, lambda e: e.get("event") == "interlock" and e.get("new") == "armed")
    if not math.isfinite(armed):
        armed = first_t(
            events, lambda e: e.get("kind") == "interlock" and e.get("state") == "armed"
        )
    calibrated = first_t(
        events, lambda e: e.get("kind") == "calibration" and e.get("phase") == "done"
    )
    scored_from = armed if math.isfinite(armed) else calibrated
    samples = int(summary.get("samples") or 0)
    duration_s = samples / sfreq if sfreq > 0 else math.nan
    times = [
        (float(a["t_stream"]), bool(a["fired"])) for a in audit if a.get("t_stream") is not None
    ]
    time_in = summary.get("time_in_state_s") or {}
    phase = [
        (float(p["t_pulse"]), float(p["error_deg"]) if p.get("error_deg") is not None else math.nan)
        for p in (summary.get("phase") or {}).get("pulses") or []
        if p.get("t_pulse") is not None
    ]
    return Outcome(
        fired=np.array([t for t, f in times if f], dtype=float),
        requested=np.array([t for t, _ in times], dtype=float),
        scored_from=scored_from,
        t_end=t0 + duration_s - (1.0 / sfreq if sfreq > 0 else 0.0),
        target_s=float(time_in.get("target") or 0.0),
        wall_s=float(summary.get("wall_time_s") or math.nan),
        duration_s=duration_s,
        vetoes_by_reason=dict(summary.get("vetoes_by_reason") or {}),
        calibration=_calibration_reason(summary),
        phase_errors=np.array(phase, dtype=float).reshape(-1, 2),
    )


def _calibration_reason(summary: dict) -> str:
    """'' when the run calibrated, else the summary's reason (or its status)."""
    cal = summary.get("calibration") or {}
    if cal.get("status") == "done":
        return ""
    return str(cal.get("reason") or f"calibration {cal.get('status', 'did not finish')}")

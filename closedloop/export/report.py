"""`closedloop report SESSION`: one self-contained HTML page of what a session did and proves.

Built from the session folder alone (live or offline, any age): the audit log is the record of
every attempt, the event log of calibration, health and thresholds, the EEG record (session.xdf
live, eeg_raw.fif offline) of the signal, and config.yaml of the settings.

The score trace is recomputed from the recorded EEG with the config as run: the feature chain is
deterministic and chunk-size independent (features/chain.py), calibration starts on the first
sample as in the session, and threshold changes are applied at their logged times (to the 2 s
block). Offline this reproduces the session's states exactly; live it is the EEG as LabRecorder
received it, so the attempts (from the audit log, what really happened) are the reference.

Figures are PNGs written beside the page and embedded in it (base64), so the page alone is the
whole report. The page also carries its numbers as JSON (`<script id="report-data">`).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from closedloop.load import SessionRecord, load_session
from closedloop.timing import code_version, sha256_file, timing_from_audit
from triggers.settings import HARD_MAX_PER_MINUTE, HARD_MIN_INTERVAL_S, HARD_SESSION_CAP

DISCLAIMER = (
    "This report describes what this software did in this session. It is not a medical-device "
    "qualification, certification or validation of any kind."
)
TIMING_ROWS = {
    "decision_latency_ms": "decision latency (ms): deciding chunk's arrival (offline: the "
    "request) to the last output returning",
    "sample_age_ms": "sample age at firing (ms): local clock at firing minus the deciding "
    "sample's stream time",
    "phase_error_deg": "phase error at firing (degrees)",
    "trigger_delay_ms": "whole delay (ms): decision to the trigger visible in the EEG",
}
VETO_COLOURS = ["tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
VETO_MARKERS = ["x", "v", "s", "D", "^", "P"]


@dataclass
class Trace:
    """The state after every decision, recomputed from the EEG: t (s since the first sample),
    score, label per decision; calibration artifact share."""

    t: np.ndarray
    score: np.ndarray
    label: np.ndarray  # str labels
    note: str = ""
    calibration_flagged: float = math.nan  # share of calibration decisions with an artifact flag


@dataclass
class ReportData:
    """Every number the report shows (also written into the page as JSON)."""

    folder: str
    live: bool
    t0: float  # stream time of the EEG's first sample (plots count from it)
    pulses: int
    attempts: int
    vetoes_by_reason: dict[str, int]
    timing: dict[str, dict[str, Any]]
    limits: dict[str, Any]
    calibration: dict[str, Any]
    health: dict[str, Any]
    hashes: dict[str, Any]
    config_diff: list[tuple[str, Any, Any]]
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ numbers


def pulse_limits(times_s: np.ndarray, config: dict[str, Any]) -> dict[str, Any]:
    """Fired pulse times (s) against the interlock limits: intervals, rolling-minute peak, cap."""
    safety = config.get("safety") or {}
    t = np.sort(np.asarray(times_s, dtype=float))
    intervals = np.diff(t)
    # peak count in any window [t_i, t_i + 60 s): the interlock's rolling minute
    ends = np.searchsorted(t, t + 60.0, side="left")
    peak = int((ends - np.arange(t.size)).max()) if t.size else 0
    return {
        "n": int(t.size),
        "intervals_s": intervals.tolist(),
        "min_interval_s": float(intervals.min()) if intervals.size else math.nan,
        "per_minute_peak": peak,
        "config_min_interval_s": safety.get("min_interval_s"),
        "config_max_per_minute": safety.get("max_per_minute"),
        "config_session_cap": safety.get("session_cap"),
        "hard_min_interval_s": HARD_MIN_INTERVAL_S,
        "hard_max_per_minute": HARD_MAX_PER_MINUTE,
        "hard_session_cap": HARD_SESSION_CAP,
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_diff(config: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, default, as run) for every key whose value differs from the defaults."""
    from closedloop.config import SessionConfig

    default = _flatten(SessionConfig().model_dump(mode="json"))
    ran = _flatten(config)
    keys = sorted(set(default) | set(ran))
    return [(k, default.get(k), ran.get(k)) for k in keys if default.get(k) != ran.get(k)]


def recompute_trace(rec: SessionRecord) -> Trace | None:
    """The States of the session recomputed from its EEG with its config (see module doc)."""
    from acquisition.file_source import FileSource
    from closedloop.config import parse_config
    from features.chain import FeatureChain

    if rec.raw is None:
        return None
    cfg = parse_config(rec.config or {}, "config.yaml")
    chunk = cfg.source.chunk_size
    # start where the session started: live, LabRecorder subscribes before the session, so the
    # XDF may hold samples the session never processed (and its calibration began after them)
    first = next((e for e in rec.events if e.get("kind") == "first_sample"), {})
    sfreq = float(rec.raw.info["sfreq"])
    k0 = max(0, round(((first.get("t_stream") or rec.t0_stream) - rec.t0_stream) * sfreq))
    raw = rec.raw if k0 == 0 else rec.raw.copy().crop(tmin=k0 / sfreq)
    src = FileSource(raw, chunk_size=chunk, t0=k0 / sfreq, counter_channel=None)
    src.connect()
    chain = FeatureChain.from_settings(cfg, ch_names=list(src.ch_names), sfreq=src.sfreq)
    chain.start_calibration()  # as Session.run: calibration from the first sample
    changes = sorted(
        (e["t_stream"] - rec.t0_stream, e["enter"], e["leave"])
        for e in rec.events
        if e.get("kind") == "thresholds" and e.get("t_stream") is not None
    )
    per_block = max(1, round(cfg.source.offline_block_s * src.sfreq / chunk))
    t, score, label, cal_art = [], [], [], []
    while (block := src.pull_chunks(per_block)) is not None:
        while changes and changes[0][0] <= block.timestamps[0]:
            _, enter, leave = changes.pop(0)
            chain.set_thresholds(enter, leave)
        for s in chain.step_every(block, chunk):
            t.append(s.t_stream)
            score.append(s.score)
            label.append(s.label.value)
            if s.label.value == "calibrating":
                cal_art.append(bool(s.artifacts))
    note = (
        "recomputed from eeg_raw.fif with the config as run (the session's own states)"
        if rec.eeg_source == "fif"
        else "recomputed from the EEG as LabRecorder received it (attempts: the audit log)"
    )
    return Trace(
        np.asarray(t),
        np.asarray(score, dtype=float),
        np.asarray(label),
        note,
        float(np.mean(cal_art)) if cal_art else math.nan,
    )


def calibration_info(rec: SessionRecord, trace: Trace | None) -> dict[str, Any]:
    cal = [e for e in rec.events if e.get("kind") == "calibration"]
    done = [e for e in cal if e.get("phase") == "done"]
    out: dict[str, Any] = {"runs": len([e for e in cal if e.get("phase") == "started"])}
    if done:
        last = done[-1]
        starts = [
            e
            for e in cal
            if e.get("phase") == "started" and (e.get("t_local") or 0) <= last["t_local"]
        ]
        t_start = starts[-1].get("t_stream") if starts else None
        if t_start is None:  # started before the first sample: from the session's first one
            first = next((e for e in rec.events if e.get("kind") == "first_sample"), {})
            t_start = first.get("t_stream") or rec.t0_stream
        out["duration_s"] = float(last["t_stream"] - t_start)
        out["done_at_s"] = float(last["t_stream"] - rec.t0_stream)
        out["baseline"] = last.get("baseline") or {}
        out["bad_channels"] = last.get("bad_channels")
    out["flagged_share"] = trace.calibration_flagged if trace is not None else math.nan
    return out


def health_info(rec: SessionRecord) -> dict[str, Any]:
    hs = [e for e in rec.events if e.get("kind") == "health"]
    faults = [
        (e.get("t_stream"), e.get("health"), e.get("detail", ""))
        for e in rec.events
        if e.get("kind") == "health_event"
    ]

    def col(key: str) -> list[float]:
        return [math.nan if e.get(key) is None else float(e[key]) for e in hs]

    return {
        "t": [math.nan if e.get("t_stream") is None else e["t_stream"] - rec.t0_stream for e in hs],
        "rate": col("effective_sfreq"),
        "nominal": col("nominal_sfreq"),
        "age_s": col("stream_age_s"),
        "gaps": col("gaps"),
        "p50": col("latency_p50_ms"),
        "p99": col("latency_p99_ms"),
        "dropped": col("dropped"),
        "events": [(None if t is None else t - rec.t0_stream, k, d) for t, k, d in faults],
    }


def hashes(rec: SessionRecord) -> dict[str, Any]:
    folder = rec.folder
    out: dict[str, Any] = {}
    for name in ("config.yaml", "audit.jsonl", "session.xdf", "eeg_raw.fif"):
        if (folder / name).exists():
            out[name] = sha256_file(folder / name)
    code = rec.summary.get("code")
    if code:
        out["code"] = dict(code, recorded="by the session (summary.json)")
    else:
        out["code"] = dict(code_version(), recorded="at report time: the session did not record it")
    return out


def collect(folder: str | Path) -> tuple[ReportData, SessionRecord, Trace | None]:
    """Read a session folder and compute every number of its report."""
    rec = load_session(folder)
    started = next(
        (e for e in rec.events if e.get("kind") == "session" and e.get("phase") == "started"), {}
    )
    live = bool(rec.summary.get("live", started.get("live", rec.eeg_source == "xdf")))
    if not math.isfinite(rec.t0_stream):
        first = next((e for e in rec.events if e.get("kind") == "first_sample"), {})
        rec.t0_stream = float(first.get("t_stream") or 0.0)
    attempts = [a for a in rec.audit if a.get("event") == "attempt"]
    fired = [a for a in attempts if a.get("fired")]
    vetoes = Counter(a["reason"] for a in attempts if not a.get("fired"))
    notes = list(rec.notes)
    try:
        trace = recompute_trace(rec)
    except Exception as exc:  # a report without the trace beats no report
        trace = None
        notes.append(f"score trace not recomputed: {type(exc).__name__}: {exc}")
    data = ReportData(
        folder=str(rec.folder),
        live=live,
        t0=rec.t0_stream,
        pulses=len(fired),
        attempts=len(attempts),
        vetoes_by_reason=dict(vetoes),
        timing=timing_from_audit(rec.audit, live=live),
        limits=pulse_limits(np.array([a["t_stream"] for a in fired], dtype=float), rec.config),
        calibration=calibration_info(rec, trace),
        health=health_info(rec),
        hashes=hashes(rec),
        config_diff=config_diff(rec.config),
        summary=rec.summary,
        notes=notes,
    )
    if live and data.pulses and "sample_age_ms" not in data.timing:
        notes.append(
            "sample age at firing not shown: the stream's timestamps run ahead of the local clock "
            "(a replay faster than real time, or an amplifier clock that LSL does not correct)"
        )
    if "pulses" in rec.summary and rec.summary["pulses"] != data.pulses:
        notes.append(
            f"summary.json says {rec.summary['pulses']} pulses, the audit log {data.pulses}"
        )
    return data, rec, trace


# ------------------------------------------------------------------------------ figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window (and no display on lab servers)
    import matplotlib.pyplot as plt

    return plt


def plot_trace(path: Path, data: ReportData, rec: SessionRecord, trace: Trace | None) -> None:
    """Score with thresholds, labels and interlock as strips, every attempt (fired red, vetoed
    by reason), annotated target epochs of the recording shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.6), dpi=100)
    state = (rec.config or {}).get("state") or {}
    enter, leave = float(state.get("enter", 1.0)), float(state.get("leave", 0.0))
    attempts = [a for a in rec.audit if a.get("event") == "attempt"]
    t_att = [a["t_stream"] - data.t0 for a in attempts]
    t_end = max([float(trace.t[-1]) if trace is not None and trace.t.size else 0.0, *t_att, 1.0])
    target = state.get("target_name", "meditation")
    if rec.raw is not None:
        ann = rec.raw.annotations
        first = True
        for on, dur, desc in zip(ann.onset, ann.duration, ann.description, strict=True):
            if desc == target and dur > 0:
                on0 = on - (rec.raw.first_time if ann.orig_time is not None else 0.0)
                ax.axvspan(
                    on0,
                    on0 + dur,
                    color="tab:green",
                    alpha=0.13,
                    lw=0,
                    label=f"annotated '{target}'" if first else None,
                )
                first = False
    if trace is not None and trace.t.size:
        score = trace.score
        finite = score[np.isfinite(score)]
        top = float(np.percentile(finite, 99.5)) if finite.size else enter + 1
        bottom = float(np.percentile(finite, 0.5)) if finite.size else leave - 1
    else:
        top, bottom = enter + 1, leave - 1
    top, bottom = max(top, enter) + 0.8, min(bottom, leave) - 1.2
    strip = 0.045 * (top - bottom)  # label and interlock strips: the same height at any scale
    bottom -= 2 * strip
    cal = data.calibration.get("done_at_s")
    if cal is not None:
        ax.axvspan(0, cal, color="0.85", alpha=0.5, lw=0, label="calibration")
    logged = sorted(
        (e["t_stream"] - data.t0, e["enter"], e["leave"])
        for e in rec.events
        if e.get("kind") == "thresholds" and e.get("t_stream") is not None
    )
    changes = [(0.0, enter, leave), *logged]
    steps = np.array([*changes, (t_end, changes[-1][1], changes[-1][2])])
    ax.step(steps[:, 0], steps[:, 1], where="post", color="tab:red", ls="--", lw=1, label="enter")
    ax.step(steps[:, 0], steps[:, 2], where="post", color="tab:orange", ls=":", lw=1, label="leave")
    if trace is not None and trace.t.size:
        ax.plot(trace.t, trace.score, color="tab:blue", lw=0.7, label="score")
        for lab, colour, name in (
            ("target", "tab:purple", "state: target"),
            ("artifact", "0.45", "state: artifact"),
        ):
            ax.fill_between(
                trace.t,
                bottom,
                bottom + strip,
                where=trace.label == lab,
                color=colour,
                step="post",
                lw=0,
                label=name,
            )
    # interlock armed spans (from the audit's interlock lines) as a strip above the labels
    armed_from = None
    spans = []
    for r in rec.audit:
        if r.get("event") != "interlock" or r.get("t_stream") is None:
            continue
        t = r["t_stream"] - data.t0
        if r.get("new") in ("armed", "refractory") and armed_from is None:
            armed_from = t
        elif r.get("new") not in ("armed", "refractory") and armed_from is not None:
            spans.append((armed_from, t))
            armed_from = None
    if armed_from is not None:
        spans.append((armed_from, t_end))
    for i, (a, b) in enumerate(spans):
        ax.fill_between(
            [a, b],
            bottom + 1.1 * strip,
            bottom + 2 * strip,
            color="tab:red",
            alpha=0.35,
            lw=0,
            label="interlock armed" if i == 0 else None,
        )
    fired = [a["t_stream"] - data.t0 for a in attempts if a.get("fired")]
    if fired:
        ax.vlines(fired, bottom, top, color="red", lw=1.2, label=f"pulse fired ({len(fired)})")
    reasons = sorted({a["reason"] for a in attempts if not a.get("fired")})
    for i, reason in enumerate(reasons):
        ts = [
            a["t_stream"] - data.t0
            for a in attempts
            if not a.get("fired") and a["reason"] == reason
        ]
        ax.plot(
            ts,
            np.full(len(ts), top - strip),
            VETO_MARKERS[i % 6],
            color=VETO_COLOURS[i % 6],
            ms=8,
            ls="",
            label=f"vetoed: {reason} ({len(ts)})",
        )
    ax.set_ylim(bottom, top)
    ax.set_xlim(0, t_end)
    ax.set_xlabel("time since the first sample (s)")
    ax.set_ylabel("state score (z)")
    ax.set_title(f"{Path(data.folder).name}: score, states and every attempt", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=7, ncol=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_health(path: Path, data: ReportData) -> None:
    """Effective rate, stream age, gaps and decision latency from the 1 s health events."""
    plt = _pyplot()
    h = data.health
    fig, axes = plt.subplots(4, 1, figsize=(12, 6.4), dpi=100, sharex=True)
    t = np.asarray(h["t"], dtype=float)
    panels = [
        ("rate (Hz)", [("effective", h["rate"], "tab:blue"), ("nominal", h["nominal"], "0.5")]),
        ("stream age (ms)", [("age", 1000 * np.asarray(h["age_s"], dtype=float), "tab:green")]),
        ("gaps, dropped", [("gaps", h["gaps"], "tab:red"), ("dropped events", h["dropped"], "k")]),
        ("latency (ms)", [("p50", h["p50"], "tab:blue"), ("p99", h["p99"], "tab:orange")]),
    ]
    for ax, (ylabel, series) in zip(axes, panels, strict=True):
        for name, values, colour in series:
            y = np.asarray(values, dtype=float)
            if y.size and np.isfinite(y).any():
                ax.plot(t, y, color=colour, lw=0.9, label=name)
            else:
                ax.plot([], [], color=colour, label=f"{name}: not recorded")
        for tt, kind, _detail in h["events"]:
            if tt is not None and kind not in ("connected", "end"):
                ax.axvline(tt, color="red", lw=0.8, alpha=0.6)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend(loc="upper right", fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time since the first sample (s); red lines: stream faults")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_limits(path: Path, data: ReportData, fired_t: np.ndarray) -> None:
    """Inter-pulse intervals against the floors; pulses in the rolling minute against the caps."""
    plt = _pyplot()
    lim = data.limits
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.4), dpi=100)
    iv = np.asarray(lim["intervals_s"], dtype=float)
    if iv.size:
        a1.hist(iv, bins=min(40, max(5, iv.size)), color="tab:blue", alpha=0.8)
    a1.axvline(lim["hard_min_interval_s"], color="red", lw=1.5, label="hard floor 1.0 s")
    if lim["config_min_interval_s"] is not None:
        a1.axvline(
            lim["config_min_interval_s"],
            color="tab:orange",
            ls="--",
            label=f"config min {lim['config_min_interval_s']:g} s",
        )
    a1.set_xlim(left=0)
    a1.set_xlabel("interval between fired pulses (s)")
    a1.set_ylabel("count")
    a1.legend(fontsize=8)
    t = np.sort(np.asarray(fired_t, dtype=float))
    if t.size:
        counts = np.searchsorted(t, t, side="right") - np.searchsorted(t, t - 60.0, side="right")
        a2.step(t, counts, where="post", color="tab:blue", label="pulses in the last 60 s")
    a2.axhline(lim["hard_max_per_minute"], color="red", lw=1.5, label="hard ceiling 60 / min")
    if lim["config_max_per_minute"] is not None:
        a2.axhline(
            lim["config_max_per_minute"],
            color="tab:orange",
            ls="--",
            label=f"config {lim['config_max_per_minute']} / min",
        )
    a2.set_ylim(0, lim["hard_max_per_minute"] * 1.1)
    a2.set_xlabel("time since the first sample (s)")
    a2.set_title(
        f"{lim['n']} pulses of a cap of {lim['config_session_cap']} "
        f"(hard ceiling {lim['hard_session_cap']})",
        fontsize=9,
    )
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------ HTML


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def timing_html(timing: dict[str, dict[str, Any]]) -> str:
    """The percentile table: n, median, p95, p99 (each with its 95 % bootstrap interval), max."""
    head = (
        "<tr><th>quantity</th><th>n</th><th>median [95 % CI]</th><th>p95 [95 % CI]</th>"
        "<th>p99 [95 % CI]</th><th>max</th></tr>"
    )
    rows = []
    for key, t in timing.items():
        name = TIMING_ROWS.get(key) or (
            f"output latency (ms): {key.split(':', 1)[1]} fire()"
            if key.startswith("output_ms:")
            else key
        )
        cells = [f"<td>{html.escape(name)}</td>", f"<td>{t['n']}</td>"]
        for q in ("median", "p95", "p99"):
            lo, hi = t[f"{q}_ci"]
            cells.append(f"<td>{_f(t[q])} [{_f(lo)}, {_f(hi)}]</td>")
        cells.append(f"<td>{_f(t['max'])}</td>")
        rows.append(f"<tr data-row='{html.escape(key)}'>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _img(path: Path, alt: str) -> str:
    b64 = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _kv(rows: list[tuple[str, Any]]) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
        + "</table>"
    )


CSS = """
body{font-family:system-ui,sans-serif;max-width:1250px;margin:1em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:13px}th{background:#f3f3f3}img{max-width:100%}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:30em}
.note{background:#fff4d6;padding:6px 10px;border-left:4px solid #e0a800}
.disclaimer{background:#fde8e8;padding:8px 10px;border-left:4px solid #c00;font-weight:600}
"""


def render_html(
    data: ReportData, rec: SessionRecord, trace: Trace | None, figures: dict[str, Path]
) -> str:
    s = data.summary
    cal = data.calibration
    lim = data.limits
    name = Path(data.folder).name
    in_state = s.get("time_in_state_s") or {}
    lat = s.get("latency_ms") or {}
    overview = _kv(
        [
            ("folder", html.escape(data.folder)),
            ("mode", "live" if data.live else "offline"),
            ("EEG record", html.escape(rec.eeg_source or "none")),
            ("stop reason", _f(s.get("stop_reason"))),
            ("pulses fired", f"<span id='pulses'>{data.pulses}</span>"),
            ("attempts", data.attempts),
            (
                "vetoed, by reason",
                html.escape(
                    ", ".join(f"{k}: {v}" for k, v in sorted(data.vetoes_by_reason.items()))
                )
                or "none",
            ),
            (
                "time in each state (s)",
                html.escape(", ".join(f"{k} {v:.1f}" for k, v in in_state.items())),
            ),
            ("faults", html.escape("; ".join(s.get("faults") or []) or "none")),
            ("final interlock", _f(s.get("final_interlock"))),
            ("warnings", html.escape("; ".join(s.get("warnings") or []) or "none")),
        ]
    )
    baseline = cal.get("baseline") or {}
    base_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_f(v.get('median'), 4)}</td>"
        f"<td>{_f(v.get('mad'), 4)}</td></tr>"
        for k, v in baseline.items()
    )
    bad = cal.get("bad_channels")
    cal_html = _kv(
        [
            ("calibration runs started", cal.get("runs")),
            ("duration (s, start to baseline)", _f(cal.get("duration_s"), 2)),
            ("baseline ready at (s)", _f(cal.get("done_at_s"), 2)),
            ("share of calibration decisions flagged as artifact", _f(cal.get("flagged_share"), 3)),
            (
                "bad channels",
                html.escape(", ".join(bad))
                if bad
                else ("none" if bad is not None else "not recorded by this version"),
            ),
        ]
    ) + (
        "<table><tr><th>feature</th><th>median</th><th>MAD</th></tr>" + base_rows + "</table>"
        if base_rows
        else "<p>no baseline was finished</p>"
    )
    ev = data.health["events"]
    faults_html = (
        "<table><tr><th>t (s)</th><th>event</th><th>detail</th></tr>"
        + "".join(
            f"<tr><td>{_f(t, 3)}</td><td>{html.escape(str(k))}</td><td>{html.escape(str(d))}</td>"
            "</tr>"
            for t, k, d in ev
        )
        + "</table>"
    )
    lim_html = _kv(
        [
            (
                "pulses / config cap / hard ceiling",
                f"{lim['n']} / {lim['config_session_cap']} / {lim['hard_session_cap']}",
            ),
            (
                "shortest interval (s) / config min / hard floor",
                f"{_f(lim['min_interval_s'])} / {lim['config_min_interval_s']} / "
                f"{lim['hard_min_interval_s']}",
            ),
            (
                "peak pulses in a rolling minute / config / hard ceiling",
                f"{lim['per_minute_peak']} / {lim['config_max_per_minute']} / "
                f"{lim['hard_max_per_minute']}",
            ),
        ]
    )
    diff_html = (
        "<table><tr><th>key</th><th>default</th><th>as run</th></tr>"
        + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(d))}</td>"
            f"<td>{html.escape(json.dumps(r))}</td></tr>"
            for k, d, r in data.config_diff
        )
        + "</table>"
        if data.config_diff
        else "<p>the config as run equals the defaults</p>"
    )
    code = data.hashes.get("code", {})
    hash_html = _kv(
        [(k, f"<code>{v}</code>") for k, v in data.hashes.items() if k != "code"]
        + [
            ("code: git describe", _f(code.get("git_describe"))),
            ("code: package version", _f(code.get("package_version"))),
            ("code: sha256 of the sources", f"<code>{_f(code.get('source_sha256'))}</code>"),
            ("code version recorded", _f(code.get("recorded"))),
        ]
    )
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in data.notes)
    trace_note = f"<p>Score trace {html.escape(trace.note)}.</p>" if trace is not None else ""
    data_json = json.dumps(_jsonable(asdict_report(data)), allow_nan=False)
    cfg_file = rec.folder / "config.yaml"
    config_text = cfg_file.read_text(encoding="utf-8") if cfg_file.exists() else "(none)"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>closedloop session report: {html.escape(name)}</title>
<style>{CSS}</style></head><body>
<h1>Session report: {html.escape(name)}</h1>
<p class="disclaimer">{html.escape(DISCLAIMER)}</p>
{notes}
<h2>Overview</h2>{overview}
<h2>Score, states and attempts</h2>{trace_note}
{_img(figures["trace"], "score trace")}
<h2>Timing</h2>
<p>Over the fired pulses, from the audit log; 95 % percentile-bootstrap intervals
({_bootstrap_note()}). The maximum has no interval: a bootstrap never exceeds the
largest value seen. Whole-session decision latency over every chunk (summary.json):
p50 {_f(lat.get("p50"))} ms, p99 {_f(lat.get("p99"))} ms, max {_f(lat.get("max"))} ms.</p>
{timing_html(data.timing)}
<h2>Pulses against the limits</h2>{lim_html}
{_img(figures["limits"], "pulse limits")}
<h2>Calibration</h2>{cal_html}
<h2>Stream health</h2>
{_img(figures["health"], "stream health")}
{faults_html}
<h2>Config</h2><h3>What differs from the defaults</h3>{diff_html}
<h3>As run (config.yaml)</h3><pre>{html.escape(config_text)}</pre>
<h2>Provenance</h2>{hash_html}
<p class="disclaimer">{html.escape(DISCLAIMER)}</p>
<script type="application/json" id="report-data">{data_json}</script>
</body></html>
"""


def _bootstrap_note() -> str:
    from closedloop.timing import BOOTSTRAP_RESAMPLES

    return f"{BOOTSTRAP_RESAMPLES} resamples, seed 0"


def asdict_report(data: ReportData) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(data)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write `report.html` (default: in the session folder) and its PNGs beside it."""
    data, rec, trace = collect(folder)
    out = Path(out) if out is not None else rec.folder / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    figures = {k: Path(f"{stem}_{k}.png") for k in ("trace", "health", "limits")}
    plot_trace(figures["trace"], data, rec, trace)
    plot_health(figures["health"], data)
    fired_t = np.array([a["t_stream"] - data.t0 for a in rec.pulses], dtype=float)
    plot_limits(figures["limits"], data, fired_t)
    out.write_text(render_html(data, rec, trace, figures), encoding="utf-8")
    return out


def read_report_data(path: str | Path) -> dict[str, Any]:
    """The numbers embedded in a written report page (tests, tools)."""
    text = Path(path).read_text(encoding="utf-8")
    start = text.index('<script type="application/json" id="report-data">')
    start = text.index(">", start) + 1
    end = text.index("</script>", start)
    return json.loads(text[start:end])


__all__ = ["DISCLAIMER", "collect", "read_report_data", "write_report"]

"""Calibration seen from the session: which channels are EEG, what the baseline must skip, and
progress / failure reported loudly (events, status line, summary), never a silent stall.

Kept apart from `session.py` so the session only calls a few hooks; nothing here runs per chunk
except `CalibrationWatch.after_step`'s attribute checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from closedloop.errors import ConfigError

# Channel types (stream description or file) that are EEG. Empty: the stream said nothing, the
# names decide. Everything else (ecg, eog, emg, misc, stim, trigger, resp, accel, ...) is not.
EEG_TYPES = frozenset({"eeg", ""})


def eeg_mask(
    ch_names: Sequence[str], ch_types: Sequence[str] | None, exclude: Sequence[str]
) -> list[bool]:
    """Which channels are EEG: a type that says EEG (or none) and a name not in `exclude`."""
    excl = {e.lower() for e in exclude}
    types = list(ch_types) if ch_types is not None else [""] * len(ch_names)
    if len(types) != len(ch_names):
        types = [""] * len(ch_names)
    return [
        str(t).strip().lower() in EEG_TYPES and c.lower() not in excl
        for c, t in zip(ch_names, types, strict=True)
    ]


def target_intervals(annotations: Any, target_name: str) -> list[tuple[float, float]]:
    """(start, end) stream times of annotations named like the target (case-insensitive)."""
    if annotations is None or not len(annotations):
        return []
    want = target_name.strip().lower()
    return [
        (float(on), float(on + dur))
        for on, dur, desc in zip(
            annotations.onset, annotations.duration, annotations.description, strict=True
        )
        if str(desc).strip().lower() == want and dur > 0
    ]


def check_length(chain: Any, duration_s: float, where: str) -> None:
    """A recording shorter than warm-up + learning + settle + calibration_s cannot calibrate."""
    need = chain.min_duration_s
    if duration_s < need:
        raise ConfigError(
            where,
            [
                f"state.calibration_s: the recording lasts {duration_s:.1f} s, under the "
                f"{need:.1f} s a baseline needs (warm-up + artifact learning + settle + "
                f"calibration_s); lower state.calibration_s or artifacts.learn_s"
            ],
        )


def status_note(report: dict[str, Any]) -> str:
    """One short text for the status line: what holds the calibration back, or why it failed."""
    if report["phase"] == "failed":
        return f" CALIBRATION FAILED: {report['failure']}"
    if report["phase"] in ("warmup", "learning"):
        return f" ({report['phase']})"
    if report["phase"] != "collecting":
        return ""
    top = ", ".join(f"{r} {v:.0%}" for r, v in report["top"][:3])
    note = (
        f" clean {report['clean_s']:.0f}/{report['target_s']:g} s, "
        f"{report['recent_flagged']:.0%} of last {report['recent_s']} s held back"
    )
    if top:
        note += f" ({top})"
    if report["recent_target"] > 0:
        note += f", {report['recent_target']:.0%} annotated target"
    return note


class CalibrationWatch:
    """Turns the chain's calibration into events: progress (with what holds it back) every
    `progress_period_s` of stream time, done (with bad channels, limits and the baseline's own
    score spread) and failed (reason and what to change)."""

    def __init__(self, bus: Any, progress_period_s: float = 5.0) -> None:
        self.bus = bus
        self.period = progress_period_s
        self._next = float("-inf")
        self.failed_reported = False

    def after_step(self, chain: Any, t: float) -> None:
        """Call after each step while the session calibrates (cheap unless an event is due)."""
        if chain.calibration_failure is not None and not self.failed_reported:
            self.failed_reported = True
            report = chain.calibration_report()
            self.bus.emit(
                "calibration", t, phase="failed", reason=report["failure"], **_brief(report)
            )
            return
        if chain.calibrating and t >= self._next:
            self._next = t + self.period
            self.bus.emit("calibration", t, phase="progress", **_brief(chain.calibration_report()))


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in report.items() if k not in ("phase", "eeg", "failure")}
    out["calibration_phase"] = report["phase"]
    return _finite(out)


def _finite(obj: Any) -> Any:
    """nan -> None, for JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def summary(chain: Any) -> dict[str, Any]:
    """The calibration part of the session summary."""
    r = chain.calibration_report()
    return _finite(
        {
            "status": r["phase"],
            "reason": r["failure"],
            "advice": r["advice"],
            "calibrated_at_s": r["calibrated_at"],  # stream time (LSL clock, live)
            # from the first sample the chain saw: what an operator reads as "when"
            "calibrated_after_s": r["calibrated_at"] - r["t_first"],
            "clean_s": r["clean_s"],
            "target_s": r["target_s"],
            "recent_flagged": r["recent_flagged"],
            "top": r["top"],
            "bad_channels": r["bad_channels"],
            "eeg_channels": r["eeg"],
            "watched_channels": r["watched"],
            "hold_channels": r["hold"],
            "limits": r["limits"],
            "note": r["note"],
            "baseline_score": r["baseline_score"],
        }
    )


def check_recording(config: Any, path: str) -> dict[str, Any]:
    """Run the feature chain of `config` on a recording until calibration ends (check-config
    --recording): whether and when it completes, the share flagged (and, of it, held: flags
    that reach the score and keep samples out of the baseline), bad channels, limits."""
    from acquisition.file_source import FileSource
    from features.chain import FeatureChain

    src = FileSource(path, chunk_size=config.source.chunk_size)
    mask = eeg_mask(src.ch_names, src.ch_types, config.preprocess.exclude)
    chain = FeatureChain.from_settings(
        config, ch_names=src.ch_names, sfreq=src.sfreq, eeg_mask=mask
    )
    check_length(chain, src.duration_s, f"{path}")
    if config.state.exclude_target_annotations:
        name = config.state.target_name
        chain.exclude_from_calibration(target_intervals(src.annotations, name), name)
    src.connect()
    every = src.chunk_size
    per_block = max(1, round(config.source.offline_block_s * src.sfreq / every))
    flagged = held = decisions = 0
    while chain.calibrating:
        chunk = src.pull_chunks(per_block)
        if chunk is None:
            break
        for st in chain.step_every(chunk, every):
            decisions += 1
            flagged += bool(st.artifacts)
            held += st.held
    out = summary(chain)
    out["flagged_share"] = flagged / decisions if decisions else float("nan")
    # of those, the ones whose flags reach the score: they hold the baseline back
    out["held_share"] = held / decisions if decisions else float("nan")
    out["duration_s"] = src.duration_s
    out["min_duration_s"] = chain.min_duration_s
    if out["status"] not in ("done", "failed"):
        out["status"] = "not completed"
        r = chain.calibration_report()
        out["reason"] = (
            f"the recording ended after {src.duration_s:.1f} s with {r['clean_s']:.1f} of "
            f"{r['target_s']:g} s clean"
        )
        out["advice"] = r["advice"] or "lower state.calibration_s"
    return _finite(out)

"""Load a session folder back: EEG as `mne.io.Raw` with pulses as annotations, plus the logs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mne
import numpy as np
import yaml

from closedloop.errors import UserError
from triggers.audit import read_audit

log = logging.getLogger(__name__)

PULSE = "pulse"
OUTCOME_UNKNOWN = "fired, outcome unknown"


@dataclass
class SessionRecord:
    """Everything a session folder holds. `raw` has one 'pulse' annotation per fired pulse.

    `pulses`: the fired attempts, plus every `intent` line with no outcome line (the process
    ended between the two, e.g. killed right after the TTL): counted as fired, conservatively,
    with `outcome` "fired, outcome unknown" (also in `notes`).
    """

    folder: Path
    raw: mne.io.BaseRaw | None
    config: dict[str, Any]
    summary: dict[str, Any]
    audit: list[dict[str, Any]]
    events: list[dict[str, Any]]
    eeg_source: str = ""  # 'xdf' or 'fif'
    t0_stream: float = float("nan")  # stream time of the raw's first sample
    notes: list[str] = field(default_factory=list)
    # Fired pulses (audit records) whose time lies outside the EEG in `raw`: not annotated
    # (MNE would drop them with only a warning), listed here and counted in `notes`.
    pulses_outside: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pulses(self) -> list[dict[str, Any]]:
        fired = [a for a in self.audit if a.get("event") == "attempt" and a.get("fired")]
        return sorted([*fired, *self.unresolved_intents], key=lambda a: a.get("attempt") or 0)

    def pulse_phases(self) -> dict[str, Any]:
        """Phase mode: each fired pulse's phase against the acausal reference of the whole
        recording, and their stats (closedloop.phase_report)."""
        from closedloop.phase_report import pulse_phases

        return pulse_phases(self)

    @property
    def unresolved_intents(self) -> list[dict[str, Any]]:
        """Intent lines without an outcome, as attempt-like records (fired, outcome unknown)."""
        return unresolved_intents(self.audit)


def unresolved_intents(audit: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pair write-ahead `intent` lines with their `attempt` outcome (same attempt number); an
    intent left alone may have reached the stimulator: reported as fired, outcome unknown."""
    done = {a.get("attempt") for a in audit if a.get("event") == "attempt"}
    return [
        {
            **i,
            "event": "attempt",
            "fired": True,
            "reason": OUTCOME_UNKNOWN,
            "outcome": OUTCOME_UNKNOWN,
        }
        for i in audit
        if i.get("event") == "intent" and i.get("attempt") not in done
    ]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines log ([] if absent); a torn last line (killed mid-write) is skipped,
    a corrupt line elsewhere is an error (triggers.audit.read_audit)."""
    path = Path(path)
    return read_audit(path) if path.exists() else []


def _eeg_from_xdf(path: Path, eeg_source_id: str | None) -> tuple[mne.io.BaseRaw, float]:
    """The raw EEG stream as received, and the stream time of its first sample."""
    import pyxdf

    streams, _ = pyxdf.load_xdf(str(path), verbose=False)
    eeg = [s for s in streams if s["info"]["type"][0].lower() == "eeg" and len(s["time_stamps"])]
    if eeg_source_id:
        eeg = [s for s in eeg if s["info"]["source_id"][0] == eeg_source_id] or eeg
    if not eeg:
        raise UserError(f"{path}: no EEG stream with samples in the session XDF")
    from acquisition.readers import load_recording

    raw = load_recording(path, strict=False)
    return raw, float(eeg[0]["time_stamps"][0])


def load_session(folder: str | Path) -> SessionRecord:
    """Read a session folder written by `closedloop run/offline/demo`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a session folder")
    config = (
        yaml.safe_load((folder / "config.yaml").read_text())
        if (folder / "config.yaml").exists()
        else {}
    )
    summary = (
        json.loads((folder / "summary.json").read_text())
        if (folder / "summary.json").exists()
        else {}
    )
    audit = read_jsonl(folder / "audit.jsonl")
    events = read_jsonl(folder / "events.jsonl")
    rec = SessionRecord(folder, None, config or {}, summary, audit, events)
    for u in rec.unresolved_intents:
        rec.notes.append(
            f"attempt {u.get('attempt')} (pulse {u.get('pulse_number')}, t_stream "
            f"{u.get('t_stream')}): {OUTCOME_UNKNOWN} (intent written, no outcome line: the "
            "session ended between them)"
        )
    started = next(
        (e for e in events if e.get("kind") == "session" and e.get("phase") == "started"), {}
    )
    if (folder / "session.xdf").exists():
        rec.raw, rec.t0_stream = _eeg_from_xdf(folder / "session.xdf", started.get("source_id"))
        rec.eeg_source = "xdf"
    elif (folder / "eeg_raw.fif").exists():
        rec.raw = mne.io.read_raw_fif(folder / "eeg_raw.fif", preload=True, verbose="error")
        rec.t0_stream = float(started.get("t0_stream", 0.0))
        rec.eeg_source = "fif"
    else:
        rec.notes.append("no EEG in this folder (LabRecorder did not run)")
    if rec.raw is not None:
        _annotate_pulses(rec)
    return rec


def _annotate_pulses(rec: SessionRecord) -> None:
    """Replace marker-payload annotations by one clean 'pulse' annotation per fired attempt.

    A pulse is inside the data when its onset (s from the first sample) is within half a sample
    of [0, last sample]; the others (and pulses without a finite time) go to
    `rec.pulses_outside` with a note, never silently dropped.
    """
    raw = rec.raw
    assert raw is not None
    keep = [i for i, d in enumerate(raw.annotations.description) if not _is_pulse_marker(d)]
    ann = raw.annotations[keep] if len(keep) != len(raw.annotations) else raw.annotations.copy()
    pulses = rec.pulses
    onsets = np.array(
        [_float(p.get("t_stream")) - rec.t0_stream for p in pulses], dtype=float
    ).reshape(-1)
    half = 0.5 / raw.info["sfreq"]
    inside = (onsets >= -half) & (onsets <= raw.times[-1] + half)  # False for nan
    rec.pulses_outside = [p for p, ok in zip(pulses, inside, strict=True) if not ok]
    if rec.pulses_outside:
        times = ", ".join(f"{_float(p.get('t_stream')):.3f}" for p in rec.pulses_outside[:5])
        rec.notes.append(
            f"{len(rec.pulses_outside)} of {len(pulses)} fired pulse(s) lie outside the EEG "
            f"(stream time {rec.t0_stream:.3f} s + {raw.times[-1]:.3f} s): not annotated; "
            f"see pulses_outside (t_stream {times})"
        )
        log.warning("%s: %s", rec.folder, rec.notes[-1])
    onsets = np.clip(onsets[inside], 0.0, raw.times[-1])  # within half a sample: on the data
    if onsets.size:
        ann.append(onsets, np.zeros_like(onsets), [PULSE] * onsets.size)
    # a marker stamped after the last EEG sample (the replayer's next loop, a pulse in the last
    # chunk) cannot be placed: say so in the notes instead of mne's warning
    end = raw.times[-1] + (raw.first_time if ann.orig_time is not None else 0.0)
    outside = int(np.count_nonzero(np.asarray(ann.onset) > end + 1.0 / raw.info["sfreq"]))
    if outside:
        rec.notes.append(f"{outside} annotation(s) after the last EEG sample left out")
    raw.set_annotations(ann, emit_warning=False)


def _float(value: Any) -> float:
    """A JSON number as float; None (a NaN written as null) or anything else: nan."""
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else np.nan
    )


def _is_pulse_marker(description: str) -> bool:
    if not description.startswith("{"):
        return False
    try:
        payload = json.loads(description)
    except json.JSONDecodeError:
        return False
    return isinstance(payload, dict) and "pulse" in payload

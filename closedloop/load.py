"""Load a session folder back: EEG as `mne.io.Raw` with pulses as annotations, plus the logs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mne
import numpy as np
import yaml

from closedloop.errors import UserError
from triggers.audit import read_audit

PULSE = "pulse"


@dataclass
class SessionRecord:
    """Everything a session folder holds. `raw` has one 'pulse' annotation per fired pulse."""

    folder: Path
    raw: mne.io.BaseRaw | None
    config: dict[str, Any]
    summary: dict[str, Any]
    audit: list[dict[str, Any]]
    events: list[dict[str, Any]]
    eeg_source: str = ""  # 'xdf' or 'fif'
    t0_stream: float = float("nan")  # stream time of the raw's first sample
    notes: list[str] = field(default_factory=list)

    @property
    def pulses(self) -> list[dict[str, Any]]:
        return [a for a in self.audit if a.get("fired")]


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
    """Replace marker-payload annotations by one clean 'pulse' annotation per fired attempt."""
    raw = rec.raw
    assert raw is not None
    keep = [i for i, d in enumerate(raw.annotations.description) if not _is_pulse_marker(d)]
    ann = raw.annotations[keep] if len(keep) != len(raw.annotations) else raw.annotations.copy()
    onsets = np.array([p["t_stream"] - rec.t0_stream for p in rec.pulses], dtype=float)
    if onsets.size:
        ann.append(onsets, np.zeros_like(onsets), [PULSE] * onsets.size)
    # a marker stamped after the last EEG sample (the replayer's next loop, a pulse in the last
    # chunk) cannot be placed: say so in the notes instead of mne's warning
    end = raw.times[-1] + (raw.first_time if ann.orig_time is not None else 0.0)
    outside = int(np.count_nonzero(np.asarray(ann.onset) > end + 1.0 / raw.info["sfreq"]))
    if outside:
        rec.notes.append(f"{outside} annotation(s) after the last EEG sample left out")
    raw.set_annotations(ann, emit_warning=False)


def _is_pulse_marker(description: str) -> bool:
    if not description.startswith("{"):
        return False
    try:
        payload = json.loads(description)
    except json.JSONDecodeError:
        return False
    return isinstance(payload, dict) and "pulse" in payload

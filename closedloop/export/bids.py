"""`closedloop export-bids`: a session folder as a BIDS EEG dataset (mne-bids), pulses as events.

What goes where (BIDS 1.10 EEG, plus the brain-stimulation extension proposal BEP037 draft):

- `sub-S/[ses-X/]eeg/..._eeg.edf` (+ `_eeg.json`, `_channels.tsv`): the session's EEG record
  (session.xdf live, eeg_raw.fif offline), written by mne-bids as EDF (edfio; per-channel
  physical range so the 16-bit samples keep the resolution of each channel).
- `..._events.tsv`: one row per fired pulse (`trial_type` 'pulse') and, with `--include-vetoed`,
  one per vetoed attempt (`trial_type` 'vetoed/<reason>'), at the sample of the deciding EEG
  sample, with the extra columns of EXTRA_COLUMNS, described in `..._events.json`. The
  recording's own annotations (e.g. 'meditation' epochs) are kept as their own rows.
- `sub-S/[ses-X/]nibs/..._stimsys-tms_..._nibs.json`: the stimulation protocol (outputs, trigger
  policy, safety limits, target state). BEP037 is a draft: its `nibs/` datatype is not part of
  BIDS yet, so the folder is listed in `.bidsignore` and may move when the proposal is merged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from closedloop.errors import UserError
from closedloop.load import load_session

EXTRA_COLUMNS = {
    "attempt": "Attempt number in the session's audit log (audit.jsonl), 1-based.",
    "pulse_number": "Session pulse count of a fired pulse (n/a when vetoed).",
    "fired": "True when every stimulating output fired without error.",
    "reason": "'fired', or why the safety interlock vetoed the attempt (e.g. refractory, "
    "rate_limit, artifact, stale_data).",
    "score": "State score (weighted robust z of band power) of the deciding EEG sample.",
    "label": "Estimated state of the deciding sample (target, non_target, artifact, ...).",
    "latency_ms": "Decision latency (ms): live, the arrival of the deciding chunk to the last "
    "output returning; offline, the request to the last output returning.",
    "sample_age_ms": "Live only: age (ms) of the deciding EEG sample when the pulse was fired "
    "(local clock at firing minus the sample's stream time); n/a offline.",
    "phase_error_deg": "Phase-targeted pulses only: phase at firing minus the target phase "
    "(degrees).",
}


def _sample(t_stream: float, t0: float, sfreq: float) -> int:
    return round((t_stream - t0) * sfreq)


def _attempt_rows(
    rec, include_vetoed: bool, sfreq: float, live: bool
) -> list[tuple[int, str, dict[str, Any]]]:
    """(sample from the EEG's first, trial_type, extra columns) of each exported attempt."""
    out = []
    for a in rec.audit:
        if a.get("event") != "attempt" or not (a.get("fired") or include_vetoed):
            continue
        s = _sample(a["t_stream"], rec.t0_stream, sfreq)
        if not 0 <= s < rec.raw.n_times:
            continue  # an attempt outside the recorded EEG (recorder started late)
        kind = "pulse" if a.get("fired") else f"vetoed/{a['reason']}"
        cols = {
            "attempt": a.get("attempt"),
            "pulse_number": a.get("pulse_number"),
            "fired": bool(a.get("fired")),
            "reason": a.get("reason"),
            "score": a.get("score"),
            "label": a.get("label"),
            "latency_ms": a.get("latency_ms"),
            "sample_age_ms": 1000.0 * (a["t_local"] - a["t_stream"]) if live else None,
            "phase_error_deg": a.get("phase_error_deg"),
        }
        out.append((s, kind, cols))
    return out


def _tsv_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _add_columns(events_tsv: Path, rows: list[tuple[int, str, dict[str, Any]]]) -> list[str]:
    """Append the extra columns to mne-bids' events.tsv, matching rows by (sample, trial_type);
    other rows (the recording's own annotations) get n/a. Returns the columns added."""
    used = [c for c in EXTRA_COLUMNS if any(r[2][c] is not None for r in rows)]
    lines = events_tsv.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    i_sample, i_type = header.index("sample"), header.index("trial_type")
    by_key = {(s, kind): cols for s, kind, cols in rows}
    out = ["\t".join([*header, *used])]
    for line in lines[1:]:
        cells = line.split("\t")
        cols = by_key.get((int(cells[i_sample]), cells[i_type]), {})
        out.append("\t".join([*cells, *(_tsv_value(cols.get(c)) for c in used)]))
    events_tsv.write_text("\n".join(out) + "\n", encoding="utf-8")
    return used


def stimulation_sidecar(rec) -> dict[str, Any]:
    """The BEP037-draft `_nibs.json`: the closed-loop protocol as run (from config.yaml)."""
    cfg = rec.config or {}
    safety, trigger, state = cfg.get("safety", {}), cfg.get("trigger", {}), cfg.get("state", {})
    outputs = (cfg.get("outputs") or {}).get("outputs") or []
    return {
        "StimulationSystemType": "tms",
        "Description": "Brain-state-dependent TMS triggering by closedloop: a pulse is requested "
        "when the estimated EEG state holds, and fired only if the safety interlock allows it.",
        "TriggerOutputs": outputs,
        "TriggerPolicy": trigger,
        "TargetState": {
            k: state.get(k) for k in ("target_name", "features", "enter", "leave", "dwell_s")
        },
        "SafetyLimits": safety,
        "PulsesDelivered": len(rec.pulses),
        "ExtensionProposal": "BEP037 (non-invasive brain stimulation), draft: this file's place "
        "and keys follow the draft and may change when it is merged into BIDS.",
    }


def export_bids(
    folder: str | Path,
    bids_root: str | Path,
    subject: str,
    *,
    session: str | None = None,
    task: str = "closedloop",
    run: int | None = None,
    include_vetoed: bool = False,
    overwrite: bool = False,
):
    """Write one session as a BIDS EEG recording; returns the mne_bids.BIDSPath of the EEG."""
    import mne_bids

    rec = load_session(folder)
    if rec.raw is None:
        raise UserError(f"{folder}: no EEG record in this session folder ({'; '.join(rec.notes)})")
    raw = rec.raw.copy()
    # pulses go in as events with their columns; the loader's plain 'pulse' annotations would
    # duplicate them
    keep = [i for i, d in enumerate(raw.annotations.description) if d != "pulse"]
    raw.set_annotations(raw.annotations[keep])
    notch = ((rec.config or {}).get("preprocess") or {}).get("notch_hz")
    raw.info["line_freq"] = float(notch) if notch else None
    live = bool(rec.summary.get("live", rec.eeg_source == "xdf"))
    sfreq = float(raw.info["sfreq"])
    rows = _attempt_rows(rec, include_vetoed, sfreq, live)
    kinds = ["pulse", *sorted({k for _, k, _ in rows} - {"pulse"})]
    event_id = {k: i + 1 for i, k in enumerate(kinds)}
    events = np.array(
        [(s + raw.first_samp, 0, event_id[k]) for s, k, _ in rows], dtype=int
    ).reshape(-1, 3)
    event_id = {k: v for k, v in event_id.items() if (events[:, 2] == v).any()}
    for desc in sorted(set(raw.annotations.description) - set(event_id)):
        event_id[desc] = 100 + len(event_id)  # the recording's own annotations keep their rows
    try:
        path = mne_bids.BIDSPath(
            subject=subject,
            session=session,
            task=task,
            run=run,
            datatype="eeg",
            root=Path(bids_root),
        )
    except ValueError as exc:
        raise UserError(f"BIDS entities: {exc}") from None
    mne_bids.write_raw_bids(
        raw,
        path,
        events=events if len(events) else None,
        event_id=event_id or None,
        format="EDF",
        physical_range="channelwise",
        allow_preload=True,
        overwrite=overwrite,
        verbose="error",
    )
    events_path = path.copy().update(suffix="events", extension=".tsv")
    if Path(events_path.fpath).exists():
        used = _add_columns(Path(events_path.fpath), rows)
        sidecar = Path(events_path.copy().update(extension=".json").fpath)
        doc = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        doc.update({c: {"Description": EXTRA_COLUMNS[c]} for c in used})
        doc.setdefault("trial_type", {}).setdefault("Levels", {}).update(
            {"pulse": "a TMS trigger pulse fired by closedloop (at the deciding EEG sample)"}
            | {k: f"an attempt vetoed by the safety interlock ({k[7:]})" for k in kinds[1:]}
        )
        sidecar.write_text(json.dumps(_finite(doc), indent=2) + "\n", encoding="utf-8")
    entities = [f"sub-{subject}", f"ses-{session}" if session else "", f"task-{task}",
                "stimsys-tms", f"run-{path.run}" if path.run else ""]  # fmt: skip
    folder_nibs = Path(bids_root) / f"sub-{subject}" / (f"ses-{session}" if session else "")
    nibs_file = folder_nibs / "nibs" / ("_".join(e for e in entities if e) + "_nibs.json")
    nibs_file.parent.mkdir(parents=True, exist_ok=True)
    nibs_file.write_text(json.dumps(_finite(stimulation_sidecar(rec)), indent=2) + "\n")
    ignore = Path(bids_root) / ".bidsignore"
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    if "**/nibs/" not in lines:
        ignore.write_text("\n".join([*lines, "**/nibs/"]) + "\n")
    return path


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x

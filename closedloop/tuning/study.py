"""A BIDS study as tuner input: every EEG recording of a task, with its participant.

`closedloop tune --bids-root DIR --task T [--subjects 01 02 ...]` finds the recordings with
mne-bids (`find_matching_paths`, datatype eeg) and reads each with `read_raw_bids`, so the
channel types come from `channels.tsv` and the annotations from `events.tsv` (`trial_type` is
the annotation label, which `--target` names). Validation then holds out one participant at a
time (all of that participant's sessions and runs together), since recordings of the same
person are not independent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from closedloop.errors import UserError

# the raw data formats BIDS allows for EEG (and FIF, which mne-bids writes for MEG-style data)
EEG_EXTENSIONS = (".edf", ".bdf", ".vhdr", ".set", ".fif")


@dataclass(frozen=True)
class StudyRecording:
    path: str  # the data file (.edf, .vhdr, ...) inside the BIDS tree
    subject: str  # participant label without 'sub-'
    session: str | None
    run: str | None


def find_recordings(
    root: str | Path, task: str, subjects: list[str] | None = None
) -> list[StudyRecording]:
    """Every EEG recording of `task` under `root` (of `subjects` only when given), sorted."""
    from mne_bids import find_matching_paths, get_entity_vals

    root = Path(root)
    if not (root / "dataset_description.json").is_file():
        raise UserError(f"--bids-root {root}: not a BIDS dataset (no dataset_description.json)")
    subs = [s.removeprefix("sub-") for s in subjects] if subjects else None
    if subs:
        known = set(get_entity_vals(root, "subject"))
        missing = [s for s in subs if s not in known]
        if missing:
            raise UserError(
                f"--subjects: no participant {', '.join(missing)} in {root} "
                f"(there: {', '.join(sorted(known)) or 'none'})"
            )
    paths = find_matching_paths(
        root,
        subjects=subs,
        tasks=task,
        datatypes="eeg",
        suffixes="eeg",
        extensions=list(EEG_EXTENSIONS),
    )
    out = [
        StudyRecording(str(p.fpath), p.subject, p.session, p.run)
        for p in paths
        if p.fpath.is_file()
    ]
    if not out:
        tasks = ", ".join(get_entity_vals(root, "task")) or "none"
        raise UserError(f"--bids-root {root}: no EEG recording of task '{task}' (tasks: {tasks})")
    return sorted(out, key=lambda r: (r.subject, r.session or "", r.run or "", r.path))


def read_bids_raw(path: str | Path):
    """One BIDS recording, preloaded (mne Raw; annotations from events.tsv, types from
    channels.tsv). Raises UserError with the file named when mne-bids cannot read it."""
    import warnings

    from mne_bids import get_bids_path_from_fname, read_raw_bids

    try:
        bids_path = get_bids_path_from_fname(path)
        with warnings.catch_warnings():
            # mne-bids warns about optional sidecar fields it does not find; not ours to fix
            warnings.simplefilter("ignore")
            raw = read_raw_bids(bids_path, verbose="error")
            raw.load_data(verbose="error")
    except Exception as exc:
        raise UserError(f"{path}: cannot read as BIDS: {type(exc).__name__}: {exc}") from exc
    return raw

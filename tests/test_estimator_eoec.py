"""Issue 20, item 6: configs/eyes_closed_alpha.yaml on real 64-channel EEG it was not made on.

The eyes-open (R01) and eyes-closed (R02) resting minutes of PhysioNet eegmmidb subjects 1-5
(tests/data/eegmmidb, byte for byte PhysioNet's), joined into one recording: eyes open 0-61 s,
closed from 61.0 s. The subject had closed the eyes before R02 began, so the delay counts from
the join: what the pipeline adds (power smoothing, state and trigger dwell, vetoes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import mne
import numpy as np
import pytest

from acquisition.readers import load_recording
from closedloop.config import load_config

DATA = Path(__file__).resolve().parent / "data" / "eegmmidb"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "eyes_closed_alpha.yaml"
# Montage edits a lab might make; the 8 names and 60 Hz mains of the shipped file are already
# right for these recordings, so "unedited" is one of them. "occipital_only" is what issue 20
# reports trying: O1/Oz/O2 for the score and the checks (then one pulse per subject: with no
# blink flags in the eyes-closed minute the state is entered once and held).
EDITS = {
    "unedited": {},
    "with_oz": {
        "bandpower.groups": {"occipital": ["O1", "Oz", "O2"], "frontal": ["Fp1", "Fp2"]},
        "artifacts.channels": ["Fp1", "Fp2", "C3", "C4", "P7", "P8", "O1", "Oz", "O2"],
    },
    "occipital_only": {
        "bandpower.groups": {"occipital": ["O1", "Oz", "O2"], "frontal": ["Fp1", "Fp2"]},
        "artifacts.channels": ["O1", "Oz", "O2"],
    },
}


def eyes_open_then_closed(subject: int) -> tuple[mne.io.BaseRaw, float]:
    """R01 then R02 of one subject as one Raw (64 EEG channels, 160 Hz, volts) and the time (s)
    the eyes-closed run starts."""
    runs = [load_recording(DATA / f"S{subject:03d}R0{run}.edf") for run in (1, 2)]
    closed_at = runs[0].n_times / runs[0].info["sfreq"]
    raw = mne.concatenate_raws(runs, verbose="error")
    raw.set_annotations(None)  # the runs' 'T0' and the join's 'BAD boundary': no target names
    return raw, closed_at


def test_the_recordings_are_physionets_own():
    """Every file's sha256 is the one in MNE's list of the dataset (mne.datasets.eegbci)."""
    listed = Path(mne.__file__).parent / "data" / "eegbci_checksums.txt"
    known = dict(line.split()[:2] for line in listed.read_text().splitlines() if line.strip())
    files = sorted(DATA.glob("*.edf"))
    assert len(files) == 10
    for f in files:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        assert known[f"{f.name[:4]}/{f.name}"] == digest, f.name


# subject -> (bad channels found while learning, first pulse within this many s of the join)
EXPECTED = {
    1: (set(), 2.0),  # measured 0.93 s
    2: (set(), 2.0),  # 1.81 s
    3: ({"C4", "CP6"}, 2.0),  # 1.06 s; C4 and CP6 are bad in this subject's other runs too
    4: ({"FT8"}, 2.0),  # 1.87 s
    # alpha hardly rises with the eyes closed (median score 1.6 against 4-16 for the others):
    # the first pulse came 14.7 s in; no threshold separates its eyes open from closed
    5: (set(), None),
}


@pytest.mark.parametrize("edits", sorted(EDITS))
@pytest.mark.parametrize("subject", sorted(EXPECTED))
def test_eyes_closed_alpha_on_real_eyes_open_then_closed_eeg(offline_session, subject, edits):
    """Measured (unedited): calibrated 16.0-18.0 s after collection began (16 s asked; subject
    3's blinks reach O1/O2 at 120-170 µV and hold it), no pulse with the eyes open on any
    subject (3-7 pulses each, all with the eyes closed). With the edits: the same calibration to
    0.35 s, first pulses the same or earlier (subject 4: 0.87 s, checking O1/Oz/O2 only)."""
    raw, closed_at = eyes_open_then_closed(subject)
    cfg = load_config(CONFIG)
    run = offline_session(raw, cfg, **{"recording.xdf": False, **EDITS[edits]})
    cal = run.summary["calibration"]
    bad, first_within_s = EXPECTED[subject]
    assert set(cal["bad_channels"]) == bad
    assert not bad & set(cal["watched_channels"])  # a bad channel is watched no more
    assert len(cal["eeg_channels"]) == 64
    # collection starts after the warm-up, the limit learning and the settle time
    settle = cfg.state.settle_s if cfg.state.settle_s is not None else 3 * cfg.bandpower.smoothing_s
    start = cfg.state.warmup_s + cfg.artifacts.learn_s + settle
    assert cal["calibrated_at_s"] - start <= 1.2 * cfg.state.calibration_s
    assert cal["calibrated_at_s"] < closed_at  # the baseline is eyes-open data
    fired = run.fired
    assert len(fired) >= 1
    assert np.mean(fired >= closed_at) >= 0.95  # measured 1.0 on every subject
    if first_within_s is not None:
        assert fired.min() - closed_at <= first_within_s

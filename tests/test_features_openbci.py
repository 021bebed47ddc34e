"""The eyes_closed_alpha config on a real OpenBCI Cyton recording (blinks, jaw clenches, eyes
closed with posterior alpha at roughly 29-75 s). Skips where ../shared/data is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from acquisition.chunk import Chunk
from acquisition.readers import load_recording
from closedloop.config import apply_overrides, load_config
from features.chain import FeatureChain
from features.types import Label

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OPENBCI = DATA / "openbci-cyton-blinks-jaw-alpha.txt"
CONFIG = ROOT / "configs" / "eyes_closed_alpha.yaml"

pytestmark = pytest.mark.skipif(not OPENBCI.exists(), reason=f"{OPENBCI} not present")


@pytest.fixture(scope="module")
def raw():
    return load_recording(OPENBCI)


def _run(chain: FeatureChain, raw, size: int = 25):
    data = np.ascontiguousarray(raw.get_data().T)
    names, fs, times = tuple(raw.ch_names), raw.info["sfreq"], raw.times
    states, changes = [], []
    for i in range(0, len(times), size):
        states.append(chain.step(Chunk(data[i : i + size], times[i : i + size], names, fs)))
        changes.extend(chain.last_transitions)
    return states, changes


def _labels(changes, times, sfreq, first: Label) -> np.ndarray:
    out = np.full(len(times), first.value, dtype=object)
    for t, lab in changes:
        out[round(t * sfreq) :] = lab.value
    return out


def _reasons_between(states, t0: float, t1: float) -> set[str]:
    return {r.split(":")[0] for s in states if t0 <= s.t_stream <= t1 for r in s.artifacts}


def test_eyes_closed_alpha_with_auto_calibration(raw):
    """As a session would run it: the config calibrates on the clean eyes-open data (blinks and
    jaw clenches are left out), then labels. Measured: first entry 31.3 s, no target before
    29 s or after 80 s."""
    # an 8 s baseline: this file has ~15 s of clean eyes-open EEG before 29 s, too little for
    # the shipped 16 s (chosen on 64-channel eegmmidb; tests/test_estimator_eoec.py)
    cfg = apply_overrides(load_config(CONFIG), {"state.calibration_s": 8.0})
    pre, bp, art, st = cfg.preprocess, cfg.bandpower, cfg.artifacts, cfg.state
    chain = FeatureChain(pre, bp, art, st, raw.ch_names, raw.info["sfreq"])
    states, changes = _run(chain, raw)
    t, fs = raw.times, raw.info["sfreq"]
    labels = _labels(changes, t, fs, Label.UNCALIBRATED)
    assert chain.calibrated
    entries = [tc for tc, lab in changes if lab is Label.TARGET]
    assert 29.0 <= entries[0] <= 32.0, entries
    eyes_closed = (t > 31) & (t < 74) & (labels != Label.ARTIFACT.value)
    # 0.56 (0.68 with the 1.0 s hold-off for held flags once made for this file: its baseline
    # then came from 20-28 s, with 0.25 s from 16.5-24.5 s, where alpha is higher; 0.74 with
    # enter 2.5, which fired with the eyes open on eegmmidb subject 2 and simulated 64-ch
    # recordings; 0.85 with enter 1.5, dwell 0.25 and resume, which also let an eyes-open alpha
    # burst in at 6.5 s and resumed the target as the eyes opened)
    assert np.mean(labels[eyes_closed] == Label.TARGET.value) > 0.5
    assert not np.any(labels[t < 29.0] == Label.TARGET.value)
    assert not np.any(labels[t > 80.0] == Label.TARGET.value)
    # blinks (first seconds) and jaw clenches (~8-17 s, and again from ~80 s) are flagged
    assert {"amplitude"} <= _reasons_between(states, 0.0, 7.5)
    assert {"muscle"} <= _reasons_between(states, 8.0, 17.0)
    assert np.mean(labels[t > 80.0] == Label.ARTIFACT.value) > 0.8


def test_blinks_and_jaw_raise_flags_not_the_state(raw):
    """Baseline from a separate stretch (17-29 s, eyes open), then the whole file: the blink and
    jaw-clench stretch at the start is labelled ARTIFACT (measured: 95 % of 0-17 s), never the
    target; 91 % of the clean eyes-closed time is target."""
    cfg = load_config(CONFIG)
    pre, bp, art, st = cfg.preprocess, cfg.bandpower, cfg.artifacts, cfg.state
    chain = FeatureChain(
        pre,
        bp,
        art,
        st.model_copy(update={"auto_calibrate": False}),
        raw.ch_names,
        raw.info["sfreq"],
    )
    chain.calibrate_on(raw.copy().crop(17.0, 29.0))
    states, changes = _run(chain, raw)
    t, fs = raw.times, raw.info["sfreq"]
    labels = _labels(changes, t, fs, Label.NON_TARGET)
    early = t < 17.0
    assert not np.any(labels[early] == Label.TARGET.value)
    # 72 % since the amplitude check looks below 5 Hz: the gaps between blinks are no longer
    # flagged for their alpha (95 % before, part of it alpha called 'amplitude')
    assert np.mean(labels[early] == Label.ARTIFACT.value) > 0.65
    flagged = [s for s in states if s.t_stream < 17.0 and s.label is Label.ARTIFACT]
    assert all(s.artifacts for s in flagged)
    assert any(r.startswith("amplitude:Fp") for s in flagged for r in s.artifacts)
    assert any(r.startswith("muscle:") for s in flagged for r in s.artifacts)
    eyes_closed = (t > 31) & (t < 74) & (labels != Label.ARTIFACT.value)
    assert np.mean(labels[eyes_closed] == Label.TARGET.value) > 0.7  # 0.74 with enter 2.5

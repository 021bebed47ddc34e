"""FeatureChain.step_every: large blocks, the States of the live chunk grid, exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mne
import numpy as np
import pytest

from acquisition.chunk import Chunk
from features.chain import FeatureChain
from features.settings import ArtifactSettings, BandPowerSettings, PreprocessSettings, StateSettings
from features.types import Label

SIM32 = Path(__file__).resolve().parents[1] / "replay_data" / "sim_32ch_500hz.fif"
EVERY = 10


@pytest.fixture(scope="module")
def recording():
    """60 s of the bundled 32-channel recording (blinks and target blocks) with a burst of NaN
    in one channel and a railing stretch in another."""
    if not SIM32.exists():
        pytest.skip("replay_data/sim_32ch_500hz.fif not generated")
    raw = mne.io.read_raw_fif(SIM32, preload=True, verbose="error").crop(0, 60)
    data = np.ascontiguousarray(raw.get_data().T)
    data[9_003:9_011, 3] = np.nan
    data[14_000:14_050, 5] = 0.2  # 200 mV: the rail check
    return data, raw.times.copy(), tuple(raw.ch_names), raw.info["sfreq"]


def _chain(names, sfreq, bandpower, state) -> FeatureChain:
    return FeatureChain(PreprocessSettings(), bandpower, ArtifactSettings(), state, names, sfreq)


def _blocks(rec, size):
    data, t, names, sfreq = rec
    for i in range(0, len(t), size):
        yield Chunk(data[i : i + size], t[i : i + size], names, sfreq)


def _fields(state) -> tuple:
    return dataclasses.astuple(state)


@pytest.mark.parametrize(
    ("bandpower", "block"),
    [
        (BandPowerSettings(), 500),
        (BandPowerSettings(), 2_000),
        (BandPowerSettings(individual_alpha=True, output="relative"), 1_000),
        (BandPowerSettings(method="welch"), 730),
    ],
    ids=["iir-500", "iir-2000", "iir-individual-alpha-relative", "welch-730"],
)
def test_states_equal_those_of_live_sized_chunks(recording, bandpower, block):
    """Every State (label, score, times, dwell, features, z, artifact reasons) after each
    10-sample boundary is bit-identical, through calibration finishing inside a block, NaN,
    railing, blinks and target entries; and so are the baseline and the label changes."""
    _, _, names, sfreq = recording
    state = StateSettings(calibration_s=12.0, warmup_s=1.0, dwell_s=0.5, enter=1.0, leave=0.2)
    ref_chain = _chain(names, sfreq, bandpower, state)
    ref, ref_changes = [], []
    for chunk in _blocks(recording, EVERY):
        ref.append(ref_chain.step(chunk))
        ref_changes += ref_chain.last_transitions

    chain = _chain(names, sfreq, bandpower, state)
    got, changes = [], []
    block -= block % EVERY  # blocks start on the grid
    for chunk in _blocks(recording, block):
        got += chain.step_every(chunk, EVERY)
        changes += chain.last_transitions

    labels = {s.label for s in ref}
    assert {Label.CALIBRATING, Label.ARTIFACT, Label.NON_TARGET, Label.TARGET} <= labels
    assert any(a.startswith("rail:") for s in ref for a in s.artifacts)
    assert any(a.startswith("nonfinite:") for s in ref for a in s.artifacts)
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_equal(_fields(a), _fields(b), err_msg=f"at t={b.t_stream}")
    assert changes == ref_changes
    assert chain.baseline == ref_chain.baseline
    assert chain.time_in_label == pytest.approx(ref_chain.time_in_label, abs=1e-9)
    np.testing.assert_equal(chain.latest_band_powers, ref_chain.latest_band_powers)


def test_step_every_on_a_short_last_block_and_chunk_sized_blocks(recording):
    """A block of exactly `every` samples gives one State, the same as `step`; a last block
    shorter than `every` ends with the State after its last sample."""
    data, t, names, sfreq = recording
    a = _chain(names, sfreq, BandPowerSettings(), StateSettings())
    b = _chain(names, sfreq, BandPowerSettings(), StateSettings())
    for i in range(0, 1_000, EVERY):
        chunk = Chunk(data[i : i + EVERY], t[i : i + EVERY], names, sfreq)
        (s,) = a.step_every(chunk, EVERY)
        np.testing.assert_equal(_fields(s), _fields(b.step(chunk)))
    tail = Chunk(data[1_000:1_013], t[1_000:1_013], names, sfreq)
    states = a.step_every(tail, EVERY)
    assert [s.t_stream for s in states] == [t[1_009], t[1_012]]
    assert a.step_every(Chunk(data[:0], t[:0], names, sfreq), EVERY) == []

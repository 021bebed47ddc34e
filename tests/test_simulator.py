"""Simulator: reproducible, labelled, and the states differ the way the estimator expects."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import mne
import numpy as np
import pytest
from scipy.signal import welch

from acquisition.simulator import (
    BAD_CHANNEL,
    BLINK,
    BUNDLED_PRESETS,
    COUNTER_CHANNEL,
    EMG,
    PRESETS,
    STATE_MEDITATION,
    STATE_MIND_WANDERING,
    main,
    replay_data_dir,
    simulate,
    write_simulated,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("preset", BUNDLED_PRESETS)
def test_committed_replay_data_regenerates_byte_for_byte(tmp_path, preset):
    committed = replay_data_dir() / f"{preset}.fif"
    assert committed.exists(), (
        f"{committed} missing: run python -m acquisition.simulator --regenerate"
    )
    fresh = write_simulated(tmp_path / f"{preset}.fif", preset)
    assert _sha(fresh) == _sha(committed)
    assert committed.stat().st_size < 10_000_000


def test_same_seed_same_data_other_seed_differs():
    a = simulate(20.0, 250.0, "consumer_4", seed=7).get_data()
    b = simulate(20.0, 250.0, "consumer_4", seed=7).get_data()
    c = simulate(20.0, 250.0, "consumer_4", seed=8).get_data()
    assert np.array_equal(a, b)
    assert not np.allclose(a[:-1], c[:-1])  # the counter row is identical by design


def test_closedloop_simulate_makes_the_64_channel_eyes_open_closed_recording(tmp_path):
    """The recording the eyes_closed_alpha figures come from, from the command line: 64 EEG
    channels with PhysioNet names, an ECG channel typed ecg, a dead O2, the eyes closing at
    60 s; never a bundled file."""
    from closedloop.app.cli import main as cli_main

    out = tmp_path / "eoec.fif"
    argv = ["simulate", str(out), "--preset", "eoec_64ch_250hz", "--seed", "12"]
    assert cli_main([*argv, "--duration", "70"]) == 0
    raw = mne.io.read_raw_fif(out, preload=True, verbose="error")
    assert raw.info["sfreq"] == 250.0
    assert raw.get_channel_types(picks="ECG") == ["ecg"]
    assert len(mne.pick_types(raw.info, eeg=True)) == 64
    assert np.std(raw.get_data(picks="O2")) < 5e-6  # a dead electrode: mains and ECG only
    closed = [a["onset"] for a in raw.annotations if a["description"] == "meditation"]
    assert closed == [60.0]
    assert "eoec_64ch_250hz" in PRESETS
    assert "eoec_64ch_250hz" not in BUNDLED_PRESETS


def test_cli_regenerate_writes_files(tmp_path):
    assert main(["--regenerate", "--out", str(tmp_path), "--preset", "sim_4ch_256hz"]) == 0
    assert (tmp_path / "sim_4ch_256hz.fif").exists()


@pytest.fixture(scope="module")
def raw32() -> mne.io.BaseRaw:
    return mne.io.read_raw_fif(
        replay_data_dir() / "sim_32ch_500hz.fif", preload=True, verbose="error"
    )


def test_shape_types_annotations(raw32):
    assert raw32.info["sfreq"] == 500.0
    assert len(raw32.ch_names) == 33
    assert raw32.ch_names[-1] == COUNTER_CHANNEL
    assert raw32.get_channel_types()[-1] == "misc"
    for name in ("Fz", "FCz", "Cz", "Pz", "O1", "Oz", "O2", "P3", "P4", "Fp1", "Fp2", "T7", "T8"):
        assert name in raw32.ch_names
    descs = set(raw32.annotations.description)
    assert {STATE_MEDITATION, STATE_MIND_WANDERING, BLINK, EMG, BAD_CHANNEL} <= descs
    bad = [a for a in raw32.annotations if a["description"] == BAD_CHANNEL]
    assert len(bad) == 1
    assert len(bad[0]["ch_names"]) == 1
    assert bad[0]["ch_names"][0] in raw32.ch_names


def test_state_blocks_tile_the_recording(raw32):
    blocks = sorted(
        (a["onset"], a["duration"], a["description"])
        for a in raw32.annotations
        if a["description"] in (STATE_MEDITATION, STATE_MIND_WANDERING)
    )
    assert blocks[0][0] == 0.0
    for (o1, d1, l1), (o2, _, l2) in itertools.pairwise(blocks):
        assert o1 + d1 == pytest.approx(o2, abs=1e-3)
        assert l1 != l2
    assert blocks[-1][0] + blocks[-1][1] == pytest.approx(raw32.times[-1] + 1 / 500, abs=1e-3)
    # the first block is the preset's clean baseline (baseline_s 65 s), the others 20-40 s
    assert blocks[0][1] == pytest.approx(65.0)
    assert all(d <= 40.0 + 1e-6 for _, d, _ in blocks[1:])


def test_counter_exact(raw32):
    c = raw32.get_data(picks=COUNTER_CHANNEL)[0]
    assert np.array_equal(c, np.arange(raw32.n_times, dtype=float))


def test_amplitudes_realistic(raw32):
    # Background per channel, excluding artifacts: median RMS over clean 1-s windows.
    eeg = raw32.get_data(picks="eeg")
    rms_uv = np.sqrt((eeg[:, : 500 * 15] ** 2).mean(axis=1)) * 1e6  # first 15 s: no artifacts
    assert np.all(rms_uv > 8), rms_uv
    assert np.all(rms_uv < 25), rms_uv


def _band_power(raw, label, picks, band, exclude_bad=True):
    sf = raw.info["sfreq"]
    bad = [a for a in raw.annotations if a["description"] == BAD_CHANNEL]
    out = []
    for a in raw.annotations:
        if a["description"] != label:
            continue
        t0, t1 = a["onset"] + 2.0, a["onset"] + a["duration"]  # skip the ramp
        if exclude_bad and any(b["onset"] < t1 and b["onset"] + b["duration"] > t0 for b in bad):
            continue
        seg = raw.get_data(picks=picks, start=round(t0 * sf), stop=round(t1 * sf))
        f, p = welch(seg, sf, nperseg=round(2 * sf))
        sel = (f >= band[0]) & (f <= band[1])
        out.append(p[:, sel].mean(axis=1))
    assert out, f"no clean {label} block"
    return np.mean(out, axis=0)


@pytest.mark.parametrize(
    ("preset", "alpha_chs", "theta_chs"),
    [
        ("sim_32ch_500hz", ["Pz", "O1", "Oz", "O2"], ["Fz", "FCz"]),
        ("sim_4ch_256hz", ["TP9", "TP10"], ["AF7", "AF8"]),
    ],
)
def test_meditation_has_more_alpha_and_theta(preset, alpha_chs, theta_chs):
    raw = mne.io.read_raw_fif(replay_data_dir() / f"{preset}.fif", preload=True, verbose="error")
    for chs, band in ((alpha_chs, (8.0, 12.0)), (theta_chs, (4.0, 7.0))):
        med = _band_power(raw, STATE_MEDITATION, chs, band)
        mw = _band_power(raw, STATE_MIND_WANDERING, chs, band)
        assert np.all(med > 2.0 * mw), (chs, band, med / mw)


def test_alpha_topography_posterior(raw32):
    alpha = _band_power(raw32, STATE_MEDITATION, ["Oz", "Fp1"], (8.0, 12.0))
    theta = _band_power(raw32, STATE_MEDITATION, ["Fz", "Oz"], (5.0, 7.0))
    assert alpha[0] > 5 * alpha[1]
    assert theta[0] > 3 * theta[1]


def test_blinks_are_frontal_and_large(raw32):
    sf = raw32.info["sfreq"]
    blinks = [a for a in raw32.annotations if a["description"] == BLINK]
    assert 2 <= len(blinks) <= 30
    peaks = []
    for b in blinks:
        seg = raw32.get_data(
            picks=["Fp1", "Oz"],
            start=round(b["onset"] * sf),
            stop=round((b["onset"] + b["duration"]) * sf),
        )
        peaks.append(np.ptp(seg, axis=1))
    peaks = np.array(peaks) * 1e6
    assert np.median(peaks[:, 0]) > 80
    assert np.median(peaks[:, 1]) < 80


def test_list_montage_and_errors():
    raw = simulate(10.0, 200.0, ["fz", "CZ", "pz"], seed=1, counter=False)
    assert raw.ch_names == ["Fz", "Cz", "Pz"]
    with pytest.raises(ValueError, match="not a"):
        simulate(10.0, 200.0, ["Fz", "nonsense"])
    with pytest.raises(ValueError, match="unknown montage"):
        simulate(10.0, 200.0, "standard_64")
    low = simulate(5.0, 40.0, ["Fz", "T7"], seed=1).get_data()  # EMG band empty at 40 Hz
    assert np.isfinite(low).all()
    with pytest.raises(ValueError, match="sfreq >= 20"):
        simulate(10.0, 10.0, "consumer_4")
    with pytest.raises(ValueError, match="unknown preset"):
        write_simulated("x.fif", "nope")


def test_write_simulated_overrides_and_other_formats(tmp_path):
    from acquisition.readers import load_recording

    path = write_simulated(tmp_path / "short.edf", "sim_4ch_256hz", seed=11, duration_s=12.0)
    raw = load_recording(path)
    assert raw.n_times == 12 * 256
    assert raw.ch_names == ["TP9", "AF7", "AF8", "TP10", "counter"]
    ref = simulate(12.0, 256.0, "consumer_4", seed=11)
    err = np.abs(raw.get_data(picks="eeg") - ref.get_data(picks="eeg")).max()
    assert err < 0.5e-6  # EDF 16-bit quantisation over the channel's range

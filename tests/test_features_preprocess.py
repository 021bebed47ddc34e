"""Causal preprocessing: chunking invariance, notch, high-pass, re-reference, non-finite fill."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from features.bandpower import band_power
from features.preprocess import Preprocessor, design_preprocess_sos, fill_nonfinite
from features.settings import PreprocessSettings
from tests.reference_filters import StatefulEma, StatefulSos, _public_sosfilt, _sosfilt_inplace

SFREQ = 500.0
NAMES = ("Fz", "Cz", "Pz", "Oz", "M1", "M2")


def _signal(n: int = 5000, seed: int = 0) -> np.ndarray:
    """(n, 6) volts: noise, a 50 Hz and 100 Hz line, 10 Hz, and large per-channel DC offsets."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SFREQ
    x = rng.standard_normal((n, len(NAMES))) * 10e-6
    x += 20e-6 * np.sin(2 * np.pi * 50 * t)[:, None] + 5e-6 * np.sin(2 * np.pi * 100 * t)[:, None]
    x += 8e-6 * np.sin(2 * np.pi * 10 * t)[:, None]
    x += np.array([60e-3, -20e-3, 5e-3, 0.0, 1e-3, -7e-3])  # OpenBCI-like offsets
    return x


def _chunked(fn, x: np.ndarray, sizes) -> np.ndarray:
    out, i, k = [], 0, 0
    while i < x.shape[0]:
        step = sizes[k % len(sizes)]
        out.append(fn(x[i : i + step]))
        i += step
        k += 1
    return np.concatenate(out)


def test_kernel_matches_public_sosfilt():
    sos = signal.butter(4, [4, 8], "bandpass", fs=SFREQ, output="sos")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 200))
    zi = rng.standard_normal((5, len(sos), 2))
    a, za, b, zb = x.copy(), zi.copy(), x.copy(), zi.copy()
    _sosfilt_inplace(sos, a, za)
    _public_sosfilt(sos, b, zb)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(za, zb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("sizes", [[1], [7], [10], [64], [333], [1, 50, 3, 999, 17]])
def test_any_chunking_equals_one_pass(sizes):
    x = _signal()
    settings = PreprocessSettings(reference="average", notch_hz=50, notch_harmonics=3)
    sos = design_preprocess_sos(settings, SFREQ)
    # the reference: one scipy pass over the whole signal, state = steady state for x[0]
    zi = signal.sosfilt_zi(sos)[:, :, None] * x[0][None, None, :]
    expected = signal.sosfilt(sos, x, axis=0, zi=zi)[0]
    expected = expected - expected.mean(axis=1, keepdims=True)
    pre = Preprocessor(settings, NAMES, SFREQ)
    got = _chunked(pre, x, sizes)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    pre.reset()  # after a reset the same input gives the same output again
    np.testing.assert_allclose(pre(x), expected, rtol=0, atol=1e-15)


def test_notch_and_highpass_do_their_job():
    x = _signal(20_000)
    pre = Preprocessor(PreprocessSettings(reference="none"), NAMES, SFREQ)
    y = pre(x)[5000:]  # after the filters settled
    for band, max_ratio in [((49.9, 50.1), 0.01), ((99.9, 100.1), 0.01)]:  # the 0.5 Hz line bins
        before = band_power(x[5000:] - x[5000:].mean(axis=0), SFREQ, band, segment_s=2.0)
        after = band_power(y, SFREQ, band, segment_s=2.0)
        assert np.all(after < max_ratio * before), (band, after / before)
    # 10 Hz passes (within 2 %) and the DC offsets (up to 60 mV) are gone
    keep = band_power(y, SFREQ, (9, 11), segment_s=2.0)
    ref = band_power(x[5000:] - x[5000:].mean(axis=0), SFREQ, (9, 11), segment_s=2.0)
    np.testing.assert_allclose(keep, ref, rtol=0.02)
    assert np.all(np.abs(y.mean(axis=0)) < 1e-6)
    # no start-up transient from the DC offset: the first second stays at EEG amplitude
    assert np.abs(pre.__class__(PreprocessSettings(), NAMES, SFREQ)(x)[:500]).max() < 200e-6


def test_60hz_harmonics_skip_nyquist():
    s = PreprocessSettings(notch_hz=60, notch_harmonics=3)
    assert s.notch_freqs(250.0) == [60.0, 120.0]
    assert s.notch_freqs(1000.0) == [60.0, 120.0, 180.0]
    assert PreprocessSettings(notch_hz=None, highpass_hz=None).notch_freqs(250.0) == []
    assert design_preprocess_sos(
        PreprocessSettings(notch_hz=None, highpass_hz=None), 250.0
    ).shape == (0, 6)


def test_named_reference():
    x = _signal(2000)
    pre = Preprocessor(PreprocessSettings(reference=["M1", "M2"]), NAMES, SFREQ)
    filt = Preprocessor(PreprocessSettings(reference="none"), NAMES, SFREQ)(x)
    got = pre(x)
    np.testing.assert_allclose(got, filt - filt[:, [4, 5]].mean(axis=1, keepdims=True), atol=1e-18)
    # the mean of the reference channels is zero after re-referencing
    np.testing.assert_allclose(got[:, [4, 5]].mean(axis=1), 0.0, atol=1e-18)


def test_named_reference_must_be_eeg():
    with pytest.raises(ValueError, match="M3"):
        Preprocessor(PreprocessSettings(reference=["M3"]), NAMES, SFREQ)


def test_fill_nonfinite_holds_last_value():
    x = np.array([[1.0, np.nan], [np.nan, 2.0], [np.inf, np.nan], [4.0, 5.0]])
    last = np.array([9.0, 8.0])
    fill_nonfinite(x, np.isfinite(x), last)
    np.testing.assert_array_equal(x, [[1.0, 8.0], [1.0, 2.0], [1.0, 2.0], [4.0, 5.0]])
    np.testing.assert_array_equal(last, [4.0, 5.0])


def test_ema_chunking_and_hold():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 4)) ** 2
    hold = np.zeros(3000, dtype=bool)
    hold[1000:1500] = True
    whole = StatefulEma(0.5, SFREQ, 4, init=2.0)(x, hold)
    ema = StatefulEma(0.5, SFREQ, 4, init=2.0)
    parts = []
    for i in range(0, 3000, 37):
        parts.append(ema(x[i : i + 37], hold[i : i + 37]))
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-13)
    # held samples repeat the value before the hold
    np.testing.assert_array_equal(whole[1000:1500], np.broadcast_to(whole[999], (500, 4)))
    # without hold it is the textbook recursion
    a = 1 - np.exp(-1 / (0.5 * SFREQ))
    ref = signal.lfilter([a], [1, a - 1], x, axis=0, zi=np.full((1, 4), (1 - a) * 2.0))[0]
    np.testing.assert_allclose(StatefulEma(0.5, SFREQ, 4, init=2.0)(x), ref, rtol=1e-12)


def test_stateful_sos_zero_init():
    sos = signal.butter(2, [8, 13], "bandpass", fs=SFREQ, output="sos")
    x = _signal(1000)
    f = StatefulSos(sos, x.shape[1], init="zero")
    np.testing.assert_allclose(_chunked(f, x, [13]), signal.sosfilt(sos, x, axis=0), atol=1e-15)

"""What the first seconds of a calibration teach: bad channels and per-channel artifact limits.

Robust statistics as in PREP / pyprep (Bigdely-Shamlo et al. 2015, Front. Neuroinform. 9:16)
and autoreject: a channel is bad when it is flat, when its robust amplitude deviates from the
others' by more than `bad_deviation_z` robust SDs (log scale), or when its largest correlation
with any other channel stays under `bad_correlation` in most 1 s windows. Limits: median + k x
MAD (scaled to an SD) of each watched channel's band-limited calibration signal, clipped to the
configured values (the outer bounds). Pure functions, run once per calibration (not per chunk).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import signal

from features.settings import ArtifactSettings

UV = 1e-6
MAD_TO_SD = 1.4826
# Learnt statistics skip this much of the learning data: the fresh filters' start-up transient.
LEARN_SKIP_S = 0.5
# Correlation needs neighbours: with fewer EEG channels (a 4-channel headband) distant electrodes
# legitimately share little, so only flat and deviation are checked.
MIN_CHANNELS_CORRELATION = 8
# Deviation needs a population: with fewer channels the median / MAD of the others is not robust.
MIN_CHANNELS_DEVIATION = 6
# The robust SD of the log amplitudes is never taken below this (channels of one cap differ by
# ~10-30 % in amplitude; a tighter spread would call ordinary channels deviant).
MIN_LOG_SPREAD = 0.15


def _robust(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Median and MAD x MAD_TO_SD along axis."""
    med = np.median(x, axis=axis)
    mad = np.median(np.abs(x - np.expand_dims(med, axis)), axis=axis) * MAD_TO_SD
    return med, mad


def find_bad_channels(
    x: np.ndarray, names: Sequence[str], sfreq: float, settings: ArtifactSettings
) -> dict[str, str]:
    """x (n_samples, n_channels) V, notched and high-passed, not re-referenced.

    Returns channel -> reason ('flat', 'deviation z=7.1', 'correlation 0.21 in 80 % of 1 s')."""
    n = x.shape[0]
    bad: dict[str, str] = {}
    _, sd = _robust(x)
    flat_v = (settings.flat_uv or 0.5) * UV
    for j in np.flatnonzero(sd < flat_v):
        bad[names[j]] = f"flat (robust SD {sd[j] / UV:.2f} µV)"
    live = np.flatnonzero(sd >= flat_v)
    if len(live) >= MIN_CHANNELS_DEVIATION:
        logsd = np.log(sd[live])
        med, spread = _robust(logsd)
        z = (logsd - med) / max(float(spread), MIN_LOG_SPREAD)
        for j, zj in zip(live, z, strict=True):
            if abs(zj) > settings.bad_deviation_z:
                bad[names[j]] = f"deviation (z {zj:+.1f}, robust SD {sd[j] / UV:.1f} µV)"
    good = [j for j in live if names[j] not in bad]
    win = round(sfreq)
    n_win = n // win
    if len(good) >= MIN_CHANNELS_CORRELATION and n_win >= 3:
        xs = x[: n_win * win, good].reshape(n_win, win, len(good))
        xs = xs - xs.mean(axis=1, keepdims=True)
        norm = np.sqrt((xs * xs).sum(axis=1))  # (n_win, g)
        norm[norm == 0] = np.inf
        low = np.zeros(len(good))
        for w in range(n_win):
            corr = np.abs((xs[w].T @ xs[w]) / np.outer(norm[w], norm[w]))
            np.fill_diagonal(corr, 0.0)
            low += corr.max(axis=1) < settings.bad_correlation
        frac = low / n_win
        for k, j in enumerate(good):
            if frac[k] > 0.5:
                bad[names[j]] = (
                    f"correlation (max |r| under {settings.bad_correlation:g} in "
                    f"{frac[k]:.0%} of 1 s windows)"
                )
    return bad


def learn_limits(
    ref: np.ndarray, sfreq: float, settings: ArtifactSettings
) -> tuple[np.ndarray, np.ndarray]:
    """ref (n_samples, n_channels) V, what the checks see (referenced). Returns the amplitude
    limits (V) and muscle-ratio limits, (n_channels,) each, nan where a check is off."""
    s = settings
    skip = min(round(LEARN_SKIP_S * sfreq), ref.shape[0] // 2)
    c = ref.shape[1]
    amp = np.full(c, np.nan)
    if s.amplitude_uv is not None:
        lp = ref
        if s.amplitude_lowpass_hz is not None:
            sos = signal.butter(4, s.amplitude_lowpass_hz, "lowpass", fs=sfreq, output="sos")
            lp = signal.sosfilt(sos, ref, axis=0)
        a = np.abs(lp[skip:])
        med, sd = _robust(a)
        amp = np.clip(med + s.adaptive_k * sd, s.amplitude_min_uv * UV, s.amplitude_uv * UV)
    mus = np.full(c, np.nan)
    if s.muscle_ratio is not None:
        powers = []
        alpha = 1.0 - np.exp(-1.0 / (s.muscle_smoothing_s * sfreq))
        for band in (s.muscle_band_hz, s.broadband_hz):
            sos = signal.butter(2, band, "bandpass", fs=sfreq, output="sos")
            y = signal.sosfilt(sos, ref, axis=0)
            powers.append(signal.lfilter([alpha], [1.0, alpha - 1.0], y * y, axis=0))
        ratio = powers[0] / np.maximum(powers[1], 1e-30)
        med, sd = _robust(ratio[skip:])
        mus = np.clip(med + s.adaptive_k * sd, s.muscle_ratio_min, s.muscle_ratio)
    return amp, mus

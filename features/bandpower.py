"""Band power per (band, channel group): a low-latency IIR path and a sliding-Welch reference.

Both estimators share one interface: `process(x (n_samples, n_channels)) -> (n_samples, n_bands,
n_groups)` absolute band power in V² for every input sample (a group's power is the mean over its
channels), with state kept between calls so any chunking gives the same numbers. `to_output`
turns that into log10 power or relative power.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
from scipy import signal

from features import kernels
from features.settings import BandPowerSettings

# Floor (V²) before log10 so that a zero power (filter state still empty) gives a finite number.
POWER_FLOOR_V2 = 1e-30


# ----------------------------------------------------------------------------- pure functions
def welch_psd(
    data: np.ndarray,
    sfreq: float,
    n_per_seg: int,
    n_overlap: int,
    window: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Welch PSD with a periodic Hann window, constant detrend per segment, mean over segments.

    data (n_samples, n_channels) -> freqs (n_freqs,), psd (n_channels, n_freqs) in V²/Hz (one-sided,
    density scaling; the same as `mne.time_frequency.psd_array_welch(..., window='hann')`).
    window: the Hann window of n_per_seg samples, if precomputed.
    """
    step = n_per_seg - n_overlap
    win = signal.get_window("hann", n_per_seg) if window is None else window
    scale = 1.0 / (sfreq * float(np.sum(win**2)))
    segs = np.lib.stride_tricks.sliding_window_view(data, n_per_seg, axis=0)[::step]
    # segs: (n_segs, n_channels, n_per_seg)
    segs = segs - segs.mean(axis=-1, keepdims=True)
    spec = np.fft.rfft(segs * win, axis=-1)
    psd = (spec.real**2 + spec.imag**2).mean(axis=0) * scale
    psd[:, 1 : (n_per_seg + 1) // 2] *= 2.0  # one-sided: double all but DC (and Nyquist if even)
    freqs = np.fft.rfftfreq(n_per_seg, 1.0 / sfreq)
    return freqs, psd


def band_mask(freqs: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Bins of a half-open band [lo, hi) -> bool (n_freqs,)."""
    lo, hi = band
    return (freqs >= lo) & (freqs < hi)


def band_power(
    data: np.ndarray,
    sfreq: float,
    band: tuple[float, float],
    *,
    segment_s: float | None = None,
    overlap: float = 0.5,
) -> np.ndarray:
    """Absolute power (V²) in `band` (Hz, [lo, hi)) of each channel by Welch integration.

    data (n_samples, n_channels) volts -> (n_channels,). segment_s: Welch segment (default: the
    whole window, one periodogram).
    """
    n = data.shape[0]
    n_per_seg = n if segment_s is None else min(n, round(segment_s * sfreq))
    freqs, psd = welch_psd(data, sfreq, n_per_seg, round(n_per_seg * overlap))
    df = freqs[1] - freqs[0]
    return psd[:, band_mask(freqs, band)].sum(axis=1) * df


def individual_alpha_peak(
    data: np.ndarray, sfreq: float, search_hz: tuple[float, float], segment_s: float = 2.0
) -> float:
    """Individual alpha peak frequency (Hz) of data (n_samples, n_channels), channel mean PSD.

    The PSD is multiplied by f to flatten the 1/f background before taking the maximum.
    """
    n_per_seg = min(data.shape[0], round(segment_s * sfreq))
    freqs, psd = welch_psd(data, sfreq, n_per_seg, n_per_seg // 2)
    mask = band_mask(freqs, search_hz)
    spec = psd.mean(axis=0)[mask] * freqs[mask]
    return float(freqs[mask][int(np.argmax(spec))])


def to_output(power: np.ndarray, output: str) -> np.ndarray:
    """power (..., n_bands, n_groups) V² -> log10 power, or power / sum over bands (relative)."""
    if output == "log":
        return np.log10(np.maximum(power, POWER_FLOOR_V2))
    total = power.sum(axis=-2, keepdims=True)
    return power / np.maximum(total, POWER_FLOOR_V2)


def group_matrix(groups: Mapping[str, Sequence[str]], ch_names: Sequence[str]) -> np.ndarray:
    """(n_channels, n_groups) matrix that averages channel powers into group powers."""
    m = np.zeros((len(ch_names), len(groups)))
    for g, chans in enumerate(groups.values()):
        for c in chans:
            m[list(ch_names).index(c), g] = 1.0 / len(chans)
    return m


# ----------------------------------------------------------------------------- estimators
class BandPowerEstimator(Protocol):
    band_names: tuple[str, ...]
    group_names: tuple[str, ...]

    def process(self, x: np.ndarray, hold: np.ndarray | None = None) -> np.ndarray:
        """x (n_samples, n_channels) -> power (n_samples, n_bands, n_groups) V².

        hold (n_samples,) bool marks samples (artifacts) that must not move the estimate.
        """
        ...

    def reset(self) -> None: ...


class IirBandPower:
    """Butterworth band-pass per band, squared, exponential smoothing (time constant smoothing_s).

    All bands, channels and samples of a block go through one compiled call
    (`kernels.iir_bandpower`: the same arithmetic as `StatefulSos` + `StatefulEma`).
    """

    def __init__(
        self,
        bands: Mapping[str, tuple[float, float]],
        groups: Mapping[str, Sequence[str]],
        ch_names: Sequence[str],
        sfreq: float,
        *,
        smoothing_s: float = 0.5,
        order: int = 2,
    ) -> None:
        self.band_names = tuple(bands)
        self.group_names = tuple(groups)
        self.bands = {k: tuple(v) for k, v in bands.items()}
        n_ch = len(ch_names)
        self._sos = np.ascontiguousarray(
            np.stack(
                [
                    signal.butter(order, list(b), btype="bandpass", fs=sfreq, output="sos")
                    for b in bands.values()
                ]
            )
        )  # (n_bands, n_sections, 6)
        self._zi = np.zeros((len(bands), self._sos.shape[1], 2, n_ch))
        self._a = float(1.0 - np.exp(-1.0 / (smoothing_s * sfreq)))
        self._ema_zi = np.zeros((len(bands), 2, n_ch))
        self._gm = np.ascontiguousarray(group_matrix(groups, ch_names))
        self._cols = np.arange(n_ch, dtype=np.int64)
        self._no_hold = np.zeros(0, dtype=bool)
        self._n_ch = n_ch

    def reset(self) -> None:
        self._zi[...] = 0.0
        self._ema_zi[...] = 0.0

    def process(
        self, x: np.ndarray, hold: np.ndarray | None = None, cols: np.ndarray | None = None
    ) -> np.ndarray:
        """x (n_samples, n_channels) -> power (n_samples, n_bands, n_groups) V².

        The band-pass filters see every sample; the smoothing skips `hold` samples, so an
        artifact leaves the estimate where it was instead of inflating it for several time
        constants (a 200 µV blink is ~400x the power of 10 µV theta: e^-2 after 2 tau is still
        50x). cols (int64): this estimator's channels as columns of a wider x (default: all of x).
        """
        x = np.ascontiguousarray(x, dtype=np.float64)
        out = np.empty((x.shape[0], len(self.band_names), len(self.group_names)))
        kernels.iir_bandpower(
            x,
            self._cols if cols is None else cols,
            self._sos,
            self._zi,
            self._a,
            self._ema_zi,
            self._no_hold if hold is None else hold,
            self._gm,
            out,
        )
        return out


class WelchBandPower:
    """Sliding window (window_s) recomputed every hop_s with Welch (Hann, segment_s, overlap).

    Samples go into a ring buffer; the PSD is computed only when the running sample count reaches a
    multiple of hop (so the same hops are computed whatever the chunking). Each output sample holds
    the latest estimate (nan before the first full window).
    """

    def __init__(
        self,
        bands: Mapping[str, tuple[float, float]],
        groups: Mapping[str, Sequence[str]],
        ch_names: Sequence[str],
        sfreq: float,
        *,
        window_s: float = 2.0,
        hop_s: float = 0.1,
        segment_s: float = 1.0,
        overlap: float = 0.5,
    ) -> None:
        self.band_names = tuple(bands)
        self.group_names = tuple(groups)
        self.bands = {k: tuple(v) for k, v in bands.items()}
        self.sfreq = float(sfreq)
        self.window_n = round(window_s * sfreq)
        self.hop_n = max(1, round(hop_s * sfreq))
        self.seg_n = min(self.window_n, round(segment_s * sfreq))
        self.overlap_n = round(self.seg_n * overlap)
        n_ch = len(ch_names)
        self._n_ch = n_ch
        freqs = np.fft.rfftfreq(self.seg_n, 1.0 / sfreq)
        self._hann = signal.get_window("hann", self.seg_n)
        df = freqs[1] - freqs[0]
        # (n_freqs, n_bands): integrate PSD over each band
        self._band_mat = np.stack([band_mask(freqs, b) for b in bands.values()], axis=1) * df
        self._gm = group_matrix(groups, ch_names)
        # Doubled ring buffer: each sample is written at i and i + window_n, so the latest window
        # is always the contiguous slice [pos, pos + window_n).
        self._ring = np.zeros((2 * self.window_n, n_ch))
        self._pos = 0
        self._count = 0
        self._last_hold = -self.window_n  # running count of the latest held sample
        self._latest = np.full((len(bands), len(groups)), np.nan)

    def reset(self) -> None:
        self._ring[:] = 0.0
        self._pos = 0
        self._count = 0
        self._last_hold = -self.window_n
        self._latest[:] = np.nan

    def _write(self, x: np.ndarray) -> None:
        w = self.window_n
        i = 0
        n = x.shape[0]
        while i < n:
            k = min(n - i, w - self._pos)
            self._ring[self._pos : self._pos + k] = x[i : i + k]
            self._ring[self._pos + w : self._pos + w + k] = x[i : i + k]
            self._pos = (self._pos + k) % w
            i += k

    def _compute(self) -> None:
        window = self._ring[self._pos : self._pos + self.window_n]
        _, psd = welch_psd(window, self.sfreq, self.seg_n, self.overlap_n, self._hann)
        self._latest = (psd @ self._band_mat).T @ self._gm  # (n_bands, n_groups)

    def process(self, x: np.ndarray, hold: np.ndarray | None = None) -> np.ndarray:
        """x (n_samples, n_channels) -> power (n_samples, n_bands, n_groups) V².

        A hop whose window contains a `hold` sample is skipped (the estimate stays).
        """
        n = x.shape[0]
        out = np.empty((n, len(self.band_names), len(self.group_names)))
        i = 0
        while i < n:
            # samples until the next hop boundary (count multiple of hop_n, once a window is full)
            to_hop = self.hop_n - (self._count % self.hop_n)
            k = min(n - i, to_hop)
            self._write(x[i : i + k])
            if hold is not None:
                held = np.flatnonzero(hold[i : i + k])
                if held.size:
                    self._last_hold = self._count + int(held[-1]) + 1
            self._count += k
            out[i : i + k - 1] = self._latest
            if (
                self._count % self.hop_n == 0
                and self._count >= self.window_n
                and self._last_hold <= self._count - self.window_n
            ):
                self._compute()
            out[i + k - 1] = self._latest
            i += k
        return out


def make_estimator(
    settings: BandPowerSettings,
    bands: Mapping[str, tuple[float, float]],
    groups: Mapping[str, Sequence[str]],
    ch_names: Sequence[str],
    sfreq: float,
) -> IirBandPower | WelchBandPower:
    """The estimator named by settings.method over `ch_names` (the channels fed to process)."""
    if settings.method == "iir":
        return IirBandPower(
            bands,
            groups,
            ch_names,
            sfreq,
            smoothing_s=settings.smoothing_s,
            order=settings.iir_order,
        )
    return WelchBandPower(
        bands,
        groups,
        ch_names,
        sfreq,
        window_s=settings.window_s,
        hop_s=settings.hop_s,
        segment_s=settings.segment_s,
        overlap=settings.segment_overlap,
    )

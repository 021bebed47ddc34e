"""Causal, stateful preprocessing: notch + high-pass per channel, then re-reference.

Filtering and re-referencing are both linear and the filters act per channel, so filtering first and
re-referencing after gives the same signal as the other order; filtering first lets the flat check
see each channel on its own (an average reference would hide a flat channel).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import signal

from features import kernels, names
from features.settings import PreprocessSettings


def design_preprocess_sos(settings: PreprocessSettings, sfreq: float) -> np.ndarray:
    """SOS (n_sections, 6) of the notches (iirnotch at each multiple) and the Butterworth high-pass.

    Returns an empty (0, 6) array when neither is configured.
    """
    parts: list[np.ndarray] = []
    for f0 in settings.notch_freqs(sfreq):
        b, a = signal.iirnotch(f0, settings.notch_q, fs=sfreq)
        parts.append(signal.tf2sos(b, a))
    if settings.highpass_hz is not None:
        parts.append(
            signal.butter(
                settings.highpass_order,
                settings.highpass_hz,
                btype="highpass",
                fs=sfreq,
                output="sos",
            )
        )
    if not parts:
        return np.zeros((0, 6))
    return np.concatenate(parts, axis=0)


def fill_nonfinite(x: np.ndarray, finite: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Replace non-finite samples by the previous finite one of the same channel (in place).

    x, finite (n_samples, n_channels); last (n_channels,) value before this block, updated in place.
    """
    n = x.shape[0]
    idx = np.where(finite, np.arange(n)[:, None], -1)
    np.maximum.accumulate(idx, axis=0, out=idx)
    prev = np.take_along_axis(x, np.maximum(idx, 0), axis=0)
    filled = np.where(idx >= 0, prev, last[None, :])
    x[...] = filled
    last[...] = x[-1]
    return x


class Preprocessor:
    """Notch + high-pass per EEG channel (state kept), then re-reference.

    `process(raw, last)` (the chain's hot path: one compiled call) -> (filtered, referenced);
    `filter(raw)` (n, n_eeg) volts -> filtered (unreferenced); `reference(filtered)` ->
    referenced. The filter starts in the steady state of a constant input equal to the first
    sample (no transient from DC offsets), like the reference filter in the tests
    (tests/reference_filters.py, `StatefulSos(init='first')`).
    """

    def __init__(
        self, settings: PreprocessSettings, eeg_names: Sequence[str], sfreq: float
    ) -> None:
        self.settings = settings
        self.eeg_names = tuple(eeg_names)
        self.sfreq = float(sfreq)
        self.sos = np.ascontiguousarray(design_preprocess_sos(settings, sfreq))
        n = len(self.eeg_names)
        self._zi = np.zeros((len(self.sos), 2, n))  # the kernels' layout: channels innermost
        self._zi0 = signal.sosfilt_zi(self.sos) if len(self.sos) else np.zeros((0, 2))
        self._fresh = True
        ref = settings.reference
        if ref == "average":
            self._ref_idx: np.ndarray | None = np.arange(len(self.eeg_names))
        elif ref == "none":
            self._ref_idx = None
        else:
            ref = [names.resolve(r, self.eeg_names) or r for r in ref]
            missing = [r for r in ref if r not in self.eeg_names]
            if missing:
                raise ValueError(
                    f"preprocess.reference: {missing} are not EEG channels of this "
                    f"stream (EEG: {', '.join(self.eeg_names)})"
                )
            self._ref_idx = np.array([self.eeg_names.index(r) for r in ref])
        self._all_ref = ref == "average"
        self._ref_cols = (
            np.zeros(0, dtype=np.int64) if self._ref_idx is None else self._ref_idx.astype(np.int64)
        )

    def reset(self) -> None:
        self._zi[...] = 0.0
        self._fresh = True

    @property
    def reference_indices(self) -> np.ndarray:
        """EEG channel indices the reference averages (empty: no re-reference)."""
        return np.zeros(0, dtype=int) if self._ref_idx is None else self._ref_idx

    def set_bad(self, bad: Sequence[int]) -> None:
        """Leave these EEG channel indices out of an average reference (found bad); [] puts
        every channel back. A reference to named channels is kept as configured."""
        if self.settings.reference != "average":
            return
        good = np.setdiff1d(np.arange(len(self.eeg_names)), np.asarray(bad, dtype=int))
        self._ref_idx = good
        self._all_ref = len(good) == len(self.eeg_names)
        self._ref_cols = good.astype(np.int64)

    def _start(self, x0: np.ndarray) -> None:
        if self._fresh:
            self._zi[...] = self._zi0[:, :, None] * x0[None, None, :]
            self._fresh = False

    def process(self, raw: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """raw (n, n_eeg) volts -> (filtered, referenced), both (n, n_eeg) new arrays; last
        (n_eeg,) gets raw's last row. None, and nothing changes, when raw holds a non-finite
        value (fill it first)."""
        raw = np.ascontiguousarray(raw, dtype=np.float64)
        if self._fresh:
            if not np.isfinite(raw[0]).all():
                return None
            self._start(raw[0])
        filt = np.empty(raw.shape)
        ref = np.empty(raw.shape)
        if not kernels.preprocess(raw, self.sos, self._zi, self._ref_cols, last, filt, ref):
            return None
        return filt, ref

    def filter(self, raw: np.ndarray) -> np.ndarray:
        """raw (n_samples, n_eeg) -> notched and high-passed (n_samples, n_eeg), a new array."""
        x = np.array(raw, dtype=np.float64, order="C")
        self._start(x[0])
        kernels.sos_inplace(self.sos, x, self._zi)
        return x

    def reference(self, x: np.ndarray) -> np.ndarray:
        """x (n_samples, n_eeg) -> re-referenced copy."""
        if self._ref_idx is None:
            return x
        if self._all_ref:
            return x - x.mean(axis=1, keepdims=True)
        return x - x[:, self._ref_idx].mean(axis=1, keepdims=True)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return self.reference(self.filter(raw))

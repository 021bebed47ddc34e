"""Per-sample artifact checks with a hold-off, reported per chunk with reasons.

Checks (each per channel and sample, so any chunking flags the same samples):
- nonfinite: NaN / inf in the raw sample;
- rail: |raw| >= rail_uv (amplifier saturation; raw, before any filter);
- amplitude: |preprocessed| > amplitude_uv (blinks, movement);
- flat: RMS of the filtered, unreferenced channel (exponential, flat_window_s) < flat_uv;
- muscle: smoothed power in muscle_band_hz / power in broadband_hz > muscle_ratio.
A sample is "active" while within holdoff_s of the last offending sample of any check.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import signal

from features.preprocess import StatefulEma, StatefulSos
from features.settings import ArtifactSettings

UV = 1e-6  # volts per microvolt
MUSCLE_FILTER_ORDER = 2  # Butterworth order per edge of the muscle / broadband band-passes
KINDS = ("nonfinite", "rail", "amplitude", "flat", "muscle")
_NEVER = -(2**62)  # "last bad sample" before any was seen


class ArtifactDetector:
    """Artifact flags over the EEG channels `eeg_names`; checks run on the subset `check_names`."""

    def __init__(
        self,
        settings: ArtifactSettings,
        eeg_names: Sequence[str],
        sfreq: float,
        check_names: Sequence[str] | None = None,
    ) -> None:
        self.settings = settings
        self.sfreq = float(sfreq)
        eeg_names = tuple(eeg_names)
        names = tuple(check_names) if check_names is not None else eeg_names
        self.check_names = names
        self._idx = np.array([eeg_names.index(c) for c in names], dtype=int)
        self._all = len(names) == len(eeg_names) and bool(
            np.array_equal(self._idx, np.arange(len(eeg_names)))
        )
        n = len(names)
        self.holdoff_n = round(settings.holdoff_s * sfreq)
        s = settings
        # Flat: start the mean square at 4x the threshold so a channel flat from the start is
        # flagged after tau * ln(4) (0.28 s with the 0.2 s default), a live one never.
        self._flat = (
            StatefulEma(s.flat_window_s, sfreq, n, init=(2.0 * s.flat_uv * UV) ** 2)
            if s.flat_uv is not None
            else None
        )
        if s.muscle_ratio is not None:
            self._mus_hf = StatefulSos(
                signal.butter(
                    MUSCLE_FILTER_ORDER, s.muscle_band_hz, "bandpass", fs=sfreq, output="sos"
                ),
                n,
                init="zero",
            )
            self._mus_bb = StatefulSos(
                signal.butter(
                    MUSCLE_FILTER_ORDER, s.broadband_hz, "bandpass", fs=sfreq, output="sos"
                ),
                n,
                init="zero",
            )
            self._mus_ema = StatefulEma(s.muscle_smoothing_s, sfreq, 2 * n)
        self._reason_names = np.array(
            [[f"{k}:{c}" for c in names] for k in KINDS], dtype=object
        )  # (n_kinds, n_channels)
        self._last_bad = np.full((len(KINDS), n), _NEVER, dtype=np.int64)
        self._last_bad_any = _NEVER
        self._count = 0
        self._active_mask = np.zeros((len(KINDS), n), dtype=bool)
        self._reasons: tuple[str, ...] = ()
        self.latest_muscle_ratio = np.zeros(n)

    def reset(self) -> None:
        if self._flat is not None:
            self._flat.reset()
        if self.settings.muscle_ratio is not None:
            self._mus_hf.reset()
            self._mus_bb.reset()
            self._mus_ema.reset()
        self._last_bad[:] = _NEVER
        self._last_bad_any = _NEVER
        self._count = 0
        self._active_mask[:] = False
        self._reasons = ()
        self.latest_muscle_ratio[:] = 0.0

    @property
    def reasons(self) -> tuple[str, ...]:
        """Active flags after the latest block, e.g. ('amplitude:Fp1', 'muscle:T7')."""
        return self._reasons

    @property
    def active(self) -> bool:
        return bool(self._reasons)

    def process(
        self,
        raw: np.ndarray,
        filtered: np.ndarray,
        referenced: np.ndarray,
        nonfinite: np.ndarray | None = None,
    ) -> np.ndarray:
        """Check one block; all arrays (n_samples, n_eeg). Returns active (n_samples,) bool.

        raw: volts as received (non-finite allowed); filtered: notched and high-passed, not
        re-referenced; referenced: what the band powers see; nonfinite: mask of raw, or None.
        """
        n = raw.shape[0]
        s = self.settings
        if not s.enabled:
            self._count += n
            return np.zeros(n, dtype=bool)
        if not self._all:
            raw = raw[:, self._idx]
            filtered = filtered[:, self._idx]
            referenced = referenced[:, self._idx]
            if nonfinite is not None:
                nonfinite = nonfinite[:, self._idx]
        bad = np.zeros((n, len(KINDS), raw.shape[1]), dtype=bool)
        if nonfinite is not None:
            bad[:, 0] = nonfinite
        if s.rail_uv is not None:
            np.greater_equal(np.abs(raw), s.rail_uv * UV, out=bad[:, 1])
            if nonfinite is not None:
                bad[:, 1] &= ~nonfinite
        if s.amplitude_uv is not None:
            np.greater(np.abs(referenced), s.amplitude_uv * UV, out=bad[:, 2])
        if self._flat is not None:
            ms = self._flat(filtered * filtered)
            np.less(ms, (s.flat_uv * UV) ** 2, out=bad[:, 3])
        if s.muscle_ratio is not None:
            k = referenced.shape[1]
            # both band-passes and their smoothing in one (2 * n_ch, n) channel-major buffer
            sq = np.empty((2 * k, n))
            sq[:k] = referenced.T
            sq[k:] = referenced.T
            self._mus_hf.filter_t(sq[:k])
            self._mus_bb.filter_t(sq[k:])
            np.multiply(sq, sq, out=sq)
            p = self._mus_ema.smooth_t(sq)
            ratio = p[:k] / np.maximum(p[k:], 1e-30)  # (n_ch, n)
            np.greater(ratio.T, s.muscle_ratio, out=bad[:, 4])
            self.latest_muscle_ratio[:] = ratio[:, -1]
        bad_t = bad.reshape(n, -1).any(axis=1)
        any_now = bool(bad_t.any())
        if any_now:
            idx = self._count + np.arange(n, dtype=np.int64)
            # last offending sample per (kind, channel)
            any_bad = bad.any(axis=0)
            last_in_block = n - 1 - np.argmax(bad[::-1], axis=0)
            self._last_bad = np.where(any_bad, self._count + last_in_block, self._last_bad)
            # per-sample hold-off
            run = np.where(bad_t, idx, _NEVER)
            np.maximum.accumulate(run, out=run)
            np.maximum(run, self._last_bad_any, out=run)
            self._last_bad_any = int(run[-1])
            active = (idx - run) <= self.holdoff_n
        else:
            since = self._count - self._last_bad_any
            active = np.arange(since, since + n, dtype=np.int64) <= self.holdoff_n
        self._count += n
        if any_now or self._reasons:  # flags can only appear or expire in these cases
            mask = (self._count - 1 - self._last_bad) <= self.holdoff_n
            if not np.array_equal(mask, self._active_mask):
                self._active_mask = mask
                self._reasons = tuple(self._reason_names[mask].tolist())
        return active

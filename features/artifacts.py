"""Per-sample artifact checks with a hold-off, reported per chunk with reasons.

Checks (each per channel and sample, so any chunking flags the same samples):
- nonfinite: NaN / inf in the raw sample;
- rail: |raw| >= rail_uv (amplifier saturation; raw, before any filter);
- amplitude: |preprocessed| > amplitude_uv (blinks, movement);
- flat: RMS of the filtered, unreferenced channel (exponential, flat_window_s) < flat_uv;
- muscle: smoothed power in muscle_band_hz / power in broadband_hz > muscle_ratio.
A sample is "active" while within holdoff_s of the last offending sample of any check.
`enabled: false` turns off amplitude, flat and muscle only: non-finite and railing input are
input faults (the pipeline disarms on them), not artifact settings, and are always checked, on
every EEG channel (also those outside a `channels` subset).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import signal

from features import kernels
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
        *,
        input_faults_everywhere: bool = True,
    ) -> None:
        """input_faults_everywhere: also check the EEG channels outside `check_names` for rail
        and non-finite input (False only for that inner check itself)."""
        self.settings = settings
        self.sfreq = float(sfreq)
        eeg_names = tuple(eeg_names)
        names = tuple(check_names) if check_names is not None else eeg_names
        self.check_names = names
        self._idx = np.array([eeg_names.index(c) for c in names], dtype=int)
        self._all = len(names) == len(eeg_names) and bool(
            np.array_equal(self._idx, np.arange(len(eeg_names)))
        )
        # Input faults (rail, non-finite) hold on every EEG channel, not only on the checked
        # subset: a railing channel outside it still corrupts a common reference.
        rest = [c for c in eeg_names if c not in names]
        self._inputs = (
            ArtifactDetector(
                settings.model_copy(update={"enabled": False}),
                eeg_names,
                sfreq,
                rest,
                input_faults_everywhere=False,
            )
            if rest and input_faults_everywhere
            else None
        )
        n = len(names)
        self.holdoff_n = round(settings.holdoff_s * sfreq)
        s = settings
        # Flat: start the mean square at 4x the threshold so a channel flat from the start is
        # flagged after tau * ln(4) (0.28 s with the 0.2 s default), a live one never.
        # All checks of a block run in one compiled call (`kernels.artifacts`); a check that is
        # off has a nan threshold there.
        nan = float("nan")
        on = s.enabled  # off: only the input faults (non-finite, rail) are checked
        self._thr = np.array(
            [
                s.rail_uv * UV if s.rail_uv is not None else nan,
                s.amplitude_uv * UV if on and s.amplitude_uv is not None else nan,
                (s.flat_uv * UV) ** 2 if on and s.flat_uv is not None else nan,
                s.muscle_ratio if on and s.muscle_ratio is not None else nan,
            ]
        )
        self._mus_sos = np.ascontiguousarray(
            np.stack(
                [
                    signal.butter(MUSCLE_FILTER_ORDER, band, "bandpass", fs=sfreq, output="sos")
                    for band in (s.muscle_band_hz, s.broadband_hz)
                ]
            )
        )  # (2, n_sections, 6): muscle band, broadband
        self._mus_zi = np.zeros((2, self._mus_sos.shape[1], 2, n))
        self._ema_a = np.array(
            [
                1.0 - np.exp(-1.0 / (tau * sfreq))
                for tau in (s.muscle_smoothing_s, s.muscle_smoothing_s, s.flat_window_s)
            ]
        )  # smoothing constants: muscle band, broadband, flat
        self._flat_init = (2.0 * s.flat_uv * UV) ** 2 if s.flat_uv is not None else 0.0
        self._ema_zi = np.zeros((3, 2, n))
        self._no_mask = np.zeros((0, 0), dtype=bool)
        self._reason_names = np.array(
            [[f"{k}:{c}" for c in names] for k in KINDS], dtype=object
        )  # (n_kinds, n_channels)
        self._last_bad = np.full((len(KINDS), n), _NEVER, dtype=np.int64)
        self._last_bad_any = _NEVER
        self._count = 0
        self._mask = np.zeros((len(KINDS), n), dtype=bool)  # memo of _reasons_for
        self._mask_reasons: tuple[str, ...] = ()
        self._reasons: tuple[str, ...] = ()
        self._last_rows: dict[int, np.ndarray] = {}
        self._inputs_ran = False  # the input-fault check of the other channels ran this block
        self._no_grid = np.zeros(0, dtype=np.int64)
        self._bad_at = np.empty((0, len(KINDS), n), dtype=np.int64)  # last_bad at grid samples
        self._grid = np.zeros(0, dtype=np.int64)
        self._active = np.zeros(0, dtype=bool)
        self._grid_active: np.ndarray | None = None
        self._block_start = 0
        self.latest_muscle_ratio = np.zeros(n)
        self.reset()

    def reset(self) -> None:
        self._inputs_ran = False
        if self._inputs is not None:
            self._inputs.reset()
        self._mus_zi[...] = 0.0
        self._ema_zi[...] = 0.0
        # direct form II transposed: z[0] = (1 - a) * y[-1]
        self._ema_zi[2, 0] = (1.0 - self._ema_a[2]) * self._flat_init
        self._last_bad[:] = _NEVER
        self._last_bad_any = _NEVER
        self._count = 0
        self._mask = np.zeros_like(self._mask)
        self._mask_reasons = ()
        self._reasons = ()
        self._grid = np.zeros(0, dtype=np.int64)
        self._active = np.zeros(0, dtype=bool)
        self._grid_active = None
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
        grid: np.ndarray | None = None,
    ) -> np.ndarray:
        """Check one block; all arrays (n_samples, n_eeg). Returns active (n_samples,) bool.

        raw: volts as received (non-finite allowed); filtered: notched and high-passed, not
        re-referenced; referenced: what the band powers see; nonfinite: mask of raw, or None.
        grid: ascending int64 sample indices of this block (default: its last sample) whose
        flags `reasons_at` can report afterwards, as a chunk ending there would have.
        """
        n = raw.shape[0]
        if grid is None:
            grid = self._last_row(n)
        self._grid = grid
        self._block_start = self._count
        extra = None
        if self._inputs is not None:  # the other channels' input faults
            extra = self._input_faults(raw, nonfinite, grid)
        if not self._all:
            raw = raw[:, self._idx]
            if self.settings.enabled:
                filtered = filtered[:, self._idx]
                referenced = referenced[:, self._idx]
            if nonfinite is not None:
                nonfinite = nonfinite[:, self._idx]
        if not self.settings.enabled:  # rail and non-finite only: they read raw alone
            filtered = referenced = raw
        active = np.empty(n, dtype=bool)
        # flags after each grid sample; a grid of the last sample alone is `reasons` (live:
        # no snapshot, which touched 2.5 KB more per chunk at 64 channels)
        snap = grid if len(grid) > 1 else self._no_grid
        if self._bad_at.shape[0] != len(snap):
            self._bad_at = np.empty((len(snap), len(KINDS), len(self.check_names)), np.int64)
        any_now, self._last_bad_any = kernels.artifacts(
            np.ascontiguousarray(raw, dtype=np.float64),
            np.ascontiguousarray(filtered, dtype=np.float64),
            np.ascontiguousarray(referenced, dtype=np.float64),
            self._no_mask if nonfinite is None else np.ascontiguousarray(nonfinite),
            self._thr,
            self._mus_sos,
            self._mus_zi,
            self._ema_a,
            self._ema_zi,
            self._count,
            self._last_bad,
            self._last_bad_any,
            self.holdoff_n,
            self.latest_muscle_ratio,
            active,
            snap,
            self._bad_at,
        )
        self._active = active
        self._grid_active = None  # gathered on demand (live asks only for `reasons`)
        self._count += n
        if any_now or self._reasons:  # flags can only appear or expire in these cases
            self._reasons = self._reasons_for(self._count - 1 - self._last_bad)
        if extra is not None:
            np.logical_or(active, extra, out=active)
            if self._inputs._reasons:
                self._reasons = self._reasons + self._inputs._reasons
        return active

    @property
    def grid_active(self) -> np.ndarray:
        """(k,) bool: flags active after each grid sample of the latest block."""
        if self._grid_active is None:
            self._grid_active = self._active[self._grid]
        return self._grid_active

    def reasons_at(self, g: int) -> tuple[str, ...]:
        """Active flags after grid sample g of the latest block (see `process`)."""
        if not self.grid_active[g]:
            return ()
        if len(self._grid) == 1:  # the block's last sample
            return self._reasons
        own = self._reasons_for(self._block_start + self._grid[g] - self._bad_at[g])
        return own + self._inputs.reasons_at(g) if self._inputs_ran else own

    def _input_faults(
        self, raw: np.ndarray, nonfinite: np.ndarray | None, grid: np.ndarray
    ) -> np.ndarray | None:
        """Rail / non-finite flags (n,) of the channels outside the checked subset, or None
        when there are none. The full check (a second kernel call, 13 µs for 32 channels here)
        runs only on a block with a railing or non-finite sample or a flag still held; otherwise
        one numpy look at the block and the hold-off clock advances."""
        sub = self._inputs
        assert sub is not None
        # whole block, all channels (3.8 µs; a slice of the others first made it 7.6 µs):
        # a rail anywhere, or any non-finite sample, runs the full check (rare)
        calm = (
            not sub._reasons
            and nonfinite is None
            and not np.abs(raw).max() >= sub._thr[0]  # nan threshold (rail_uv null): calm
        )
        self._inputs_ran = not calm
        if calm:
            sub._count += raw.shape[0]
            return None
        return sub.process(raw, raw, raw, nonfinite, grid)

    def _reasons_for(self, since_bad: np.ndarray) -> tuple[str, ...]:
        """Reasons from the samples since each check's last offence (n_kinds, n_channels)."""
        mask = since_bad <= self.holdoff_n
        if not np.array_equal(mask, self._mask):  # the same flags give the same tuple
            self._mask = mask
            self._mask_reasons = tuple(self._reason_names[mask].tolist())
        return self._mask_reasons

    def _last_row(self, n: int) -> np.ndarray:
        """[n - 1] as int64, cached per block length."""
        row = self._last_rows.get(n)
        if row is None:
            row = self._last_rows[n] = np.array([n - 1], dtype=np.int64)
        return row

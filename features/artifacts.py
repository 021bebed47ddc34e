"""Per-sample artifact checks with a hold-off, reported per chunk with reasons.

Checks (each per channel and sample, so any chunking flags the same samples):
- nonfinite: NaN / inf in the raw sample;
- rail: |raw| >= rail_uv (amplifier saturation; raw, before any filter);
- amplitude: |preprocessed, low-passed at amplitude_lowpass_hz| > the channel's limit (blinks,
  movement; alpha is filtered out first, so eyes-closed alpha is never an artifact);
- flat: RMS of the filtered, unreferenced channel (exponential, flat_window_s) < flat_uv;
- muscle: smoothed power in muscle_band_hz / power in broadband_hz > muscle_ratio.
A sample is "active" while within holdoff_s of the last offending sample of any check.

"Held" is the part of that which can reach the score (`set_contamination`): the band powers
skip held samples and the baseline leaves them out. Every flag of the score's channels holds,
and of channels that make up 1/16 or more of their reference; another channel's flag holds only
when it is non-finite, railing, or so large that its share of the reference would exceed the
score channels' own amplitude limit. A blink at Fp1 reaches O1 through a 62-channel average
reference at 1/62 of its size: it vetoes the pulse, but the occipital alpha goes on being
measured through it and counts for the baseline (with 8 channels, 1/8: it holds as before).
A held flag lets go after held_holdoff_s (default holdoff_s), which may be shorter: the powers
were frozen through the artifact, so only the band-pass ringing follows it, while a flag that
vetoes without holding leaves its leak in the smoothed powers for a smoothing time or two.

Limits are per channel: the configured values, or ones learnt from calibration data
(`set_limits`, with the configured values as outer bounds); nonfinite and rail run on every
checked channel (every EEG channel in a session), amplitude / flat / muscle only on the watched
ones, and `exclude` turns every check off for a channel found bad (it is out of the reference
and the score too). `enabled: false` turns off amplitude, flat and muscle only: non-finite and
railing input are input faults (the pipeline disarms on them), not artifact settings.
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
        watch_names: Sequence[str] | None = None,
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
        held_s = settings.held_holdoff_s
        self.held_holdoff_n = self.holdoff_n if held_s is None else round(held_s * sfreq)
        s = settings
        # Flat: start the mean square at 4x the threshold so a channel flat from the start is
        # flagged after tau * ln(4) (0.28 s with the 0.2 s default), a live one never.
        # All checks of a block run in one compiled call (`kernels.artifacts`); a check that is
        # off has a nan threshold there.
        nan = float("nan")
        watch = set(names if watch_names is None else watch_names)
        self.watch_names = tuple(c for c in names if c in watch)
        self._watch = np.array([c in watch for c in names], dtype=bool)
        on = s.enabled  # off: only the input faults (non-finite, rail) are checked
        self._thr_cfg = np.array(
            [
                1.0,
                s.rail_uv * UV if s.rail_uv is not None else nan,
                s.amplitude_uv * UV if on and s.amplitude_uv is not None else nan,
                (s.flat_uv * UV) ** 2 if on and s.flat_uv is not None else nan,
                s.muscle_ratio if on and s.muscle_ratio is not None else nan,
            ]
        )
        self._thr = np.empty((len(KINDS), n))  # (kind, channel): nan = off
        self._excluded = np.zeros(n, dtype=bool)
        self._amp_sos = (
            np.ascontiguousarray(
                signal.butter(4, s.amplitude_lowpass_hz, "lowpass", fs=sfreq, output="sos")
            )
            if s.amplitude_lowpass_hz is not None
            else np.zeros((0, 6))
        )
        self._amp_zi = np.zeros((self._amp_sos.shape[0], 2, n))
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
        self._last_bad_hold = _NEVER
        self._hold_mask = np.ones(n, dtype=bool)  # every flag holds until told otherwise
        self._leak = np.zeros(n)
        self._hold_amp = np.full(n, np.inf)
        self.held = np.zeros(0, dtype=bool)
        self._count = 0
        self._mask = np.zeros((len(KINDS), n), dtype=bool)  # memo of _reasons_for
        self._mask_reasons: tuple[str, ...] = ()
        self._reasons: tuple[str, ...] = ()
        self._last_rows: dict[int, np.ndarray] = {}
        self._no_grid = np.zeros(0, dtype=np.int64)
        self._bad_at = np.empty((0, len(KINDS), n), dtype=np.int64)  # last_bad at grid samples
        self._grid = np.zeros(0, dtype=np.int64)
        self._active = np.zeros(0, dtype=bool)
        self._grid_active: np.ndarray | None = None
        self._block_start = 0
        self.latest_muscle_ratio = np.zeros(n)
        self.reset()

    def reset(self) -> None:
        """Forget filter states and flags; limits back to the configured ones, none excluded."""
        self.reset_limits()
        self._amp_zi[...] = 0.0
        self._mus_zi[...] = 0.0
        self._ema_zi[...] = 0.0
        # direct form II transposed: z[0] = (1 - a) * y[-1]
        self._ema_zi[2, 0] = (1.0 - self._ema_a[2]) * self._flat_init
        self._last_bad[:] = _NEVER
        self._last_bad_any = _NEVER
        self._last_bad_hold = _NEVER
        self._count = 0
        self._mask = np.zeros_like(self._mask)
        self._mask_reasons = ()
        self._reasons = ()
        self._grid = np.zeros(0, dtype=np.int64)
        self._active = np.zeros(0, dtype=bool)
        self._grid_active = None
        self.latest_muscle_ratio[:] = 0.0

    def reset_limits(self) -> None:
        """The configured limits on every channel (amplitude / flat / muscle on watched ones)."""
        self._thr[:] = self._thr_cfg[:, None]
        self._thr[2:, ~self._watch] = np.nan
        self._excluded[:] = False
        self._update_hold_amp()

    def set_limits(self, amplitude_v: np.ndarray, muscle: np.ndarray) -> None:
        """Per-channel limits (n_checked,): amplitude in V, muscle ratio; nan keeps the channel's
        current limit. A check that is off in the settings stays off."""
        for row, new in ((2, amplitude_v), (4, muscle)):
            cur = self._thr[row]
            use = np.isfinite(new) & np.isfinite(cur)
            cur[use] = new[use]
        self._update_hold_amp()

    def exclude(self, names: Sequence[str]) -> None:
        """Every check off for these channels (found bad): they flag nothing from now on."""
        for c in names:
            j = self.check_names.index(c)
            self._thr[:, j] = np.nan
            self._excluded[j] = True
            self._last_bad[:, j] = _NEVER
        self._update_hold_amp()

    def set_contamination(self, hold_names: Sequence[str], leak: np.ndarray) -> None:
        """Which flags can reach the score (see the module docstring). hold_names: checked
        channels whose every flag holds; leak (n_checked,): each channel's weight in the score
        channels' reference (1/N in an average of N, 0 outside it)."""
        hold = set(hold_names)
        self._hold_mask = np.array([c in hold for c in self.check_names], dtype=bool)
        self._leak = np.asarray(leak, dtype=np.float64).copy()
        self._update_hold_amp()

    def _update_hold_amp(self) -> None:
        """hold_amp (n_checked,) V: the amplitude at which a channel outside hold_names reaches
        the score channels above their smallest amplitude limit (inf: never)."""
        lim = self._thr[2, self._hold_mask]
        lim = lim[np.isfinite(lim)]
        floor = float(lim.min()) if lim.size else self._thr_cfg[2]
        with np.errstate(divide="ignore"):
            self._hold_amp = np.where(self._leak > 0, floor / self._leak, np.inf)
        if not np.isfinite(floor):  # no amplitude check at all: a channel's share never holds
            self._hold_amp[:] = np.inf

    @property
    def hold_mask(self) -> np.ndarray:
        """(n_checked,) bool: the channels whose every flag holds the band powers."""
        return self._hold_mask

    @property
    def limits(self) -> dict[str, dict[str, float]]:
        """Channel -> {'amplitude_uv', 'muscle_ratio'} of the watched, not excluded channels."""
        out = {}
        for j, c in enumerate(self.check_names):
            if self._watch[j] and not self._excluded[j]:
                out[c] = {
                    "amplitude_uv": float(self._thr[2, j] / UV),
                    "muscle_ratio": float(self._thr[4, j]),
                }
        return out

    def flag_counts(self) -> tuple[np.ndarray, int]:
        """(n_kinds, n_checked) int: at how many grid samples of the latest block each (kind,
        channel) was flagged (hold-off included), and the number of grid samples."""
        if len(self._grid) == 1:  # live: the block's last sample
            since = self._count - 1 - self._last_bad[None]
        else:
            since = (self._block_start + self._grid)[:, None, None] - self._bad_at
        return np.count_nonzero(since <= self.holdoff_n, axis=0), len(self._grid)

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
        s = self.settings
        if grid is None:
            grid = self._last_row(n)
        self._grid = grid
        self._block_start = self._count
        if not self._all:
            raw = raw[:, self._idx]
            if s.enabled:
                filtered = filtered[:, self._idx]
                referenced = referenced[:, self._idx]
            if nonfinite is not None:
                nonfinite = nonfinite[:, self._idx]
        if not s.enabled:  # rail and non-finite only (input faults): they read raw alone
            filtered = referenced = raw
        active = np.empty(n, dtype=bool)
        held = np.empty(n, dtype=bool)
        # flags after each grid sample; a grid of the last sample alone is `reasons` (live:
        # no snapshot, which touched 2.5 KB more per chunk at 64 channels)
        snap = grid if len(grid) > 1 else self._no_grid
        if self._bad_at.shape[0] != len(snap):
            self._bad_at = np.empty((len(snap), len(KINDS), len(self.check_names)), np.int64)
        any_now, self._last_bad_any, self._last_bad_hold = kernels.artifacts(
            np.ascontiguousarray(raw, dtype=np.float64),
            np.ascontiguousarray(filtered, dtype=np.float64),
            np.ascontiguousarray(referenced, dtype=np.float64),
            self._no_mask if nonfinite is None else np.ascontiguousarray(nonfinite),
            self._thr,
            self._amp_sos,
            self._amp_zi,
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
            self._hold_mask,
            self._hold_amp,
            self._last_bad_hold,
            held,
            self.held_holdoff_n,
        )
        self._active = active
        self.held = held
        self._grid_active = None  # gathered on demand (live asks only for `reasons`)
        self._count += n
        if any_now or self._reasons:  # flags can only appear or expire in these cases
            self._reasons = self._reasons_for(self._count - 1 - self._last_bad)
        return active

    @property
    def held_now(self) -> bool:
        """Whether the latest block's last sample is held (plain ints: no numpy call)."""
        return self._count - 1 - self._last_bad_hold <= self.held_holdoff_n

    @property
    def grid_held(self) -> list[bool]:
        """Held after each grid sample of the latest block."""
        return self.held[self._grid].tolist()

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
        return self._reasons_for(self._block_start + self._grid[g] - self._bad_at[g])

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

"""Robust baseline statistics and the per-sample label machine (hysteresis, dwell, veto)."""

from __future__ import annotations

import numpy as np

from features.types import Label

# MAD of a normal distribution times this is its standard deviation.
MAD_TO_SD = 1.4826


def robust_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values (n_samples, n_features) -> median (n_features,), MAD (n_features,) (unscaled)."""
    med = np.median(values, axis=0)
    mad = np.median(np.abs(values - med), axis=0)
    return med, mad


class LabelMachine:
    """Turns a per-sample score and artifact flag into labels, one sample at a time.

    NON_TARGET -> TARGET after the score stays above `enter` for dwell_n samples;
    TARGET -> NON_TARGET after it stays below `leave` for leave_dwell_n samples (1 = at once);
    any artifact sample -> ARTIFACT (dwell restarts); the first clean sample after it ->
    NON_TARGET, or straight back to TARGET when `resume` is on, the label before the artifact was
    TARGET and the score is still at or above `leave` (the band powers are frozen during an
    artifact, so the score continues where it was). Stepping per sample makes the label times
    independent of the chunking.
    """

    def __init__(
        self, enter: float, leave: float, dwell_n: int, leave_dwell_n: int, resume: bool = True
    ) -> None:
        self.resume = resume
        self.before_artifact = Label.NON_TARGET
        self.enter = float(enter)
        self.leave = float(leave)
        self.dwell_n = max(1, int(dwell_n))
        self.leave_dwell_n = max(1, int(leave_dwell_n))
        self.label = Label.UNCALIBRATED
        self.t_changed = float("nan")
        self.above_n = 0
        self.below_n = 0
        # (t_stream, label) of every change in the latest block; cleared by each `run`
        self.transitions: list[tuple[float, Label]] = []

    def set(self, label: Label, t: float) -> None:
        """Force a label (calibration start / end) at stream time t."""
        if label is not self.label:
            self.label = label
            self.t_changed = t
            self.transitions.append((t, label))
        self.before_artifact = Label.NON_TARGET
        self.above_n = 0
        self.below_n = 0

    @property
    def dwell_progress(self) -> float:
        if self.label is Label.TARGET:
            return 1.0
        return min(1.0, self.above_n / self.dwell_n)

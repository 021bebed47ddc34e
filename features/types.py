"""Result types that leave `features/` (consumed by triggers, the GUI, the audit log)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Label(str, Enum):
    UNCALIBRATED = "uncalibrated"  # no baseline yet: never a target
    CALIBRATING = "calibrating"  # baseline being collected: never a target
    ARTIFACT = "artifact"  # artifact flag active (incl. hold-off): vetoes state entry
    NON_TARGET = "non_target"
    TARGET = "target"  # the meditation / target state (score crossed enter, held dwell)


@dataclass(frozen=True, slots=True)
class State:
    """The estimator's output after one chunk.

    t_stream: stream time (s) of the newest sample that produced this state.
    score: weighted sum of robust z scores (nan before calibration).
    time_in_state_s: stream seconds since `label` last changed.
    dwell_progress: 0..1, fraction of the state dwell time the score has been above `enter`
        while not yet TARGET (1.0 once TARGET).
    features: feature name (e.g. 'theta@frontal_midline') -> log10 band power (V²) or
        relative power.
    z: feature name -> robust z score (empty before calibration).
    artifacts: reasons of active artifact flags, e.g. ('amplitude:Fp1', 'muscle:T7').
    held: an active flag can reach the score (its channels, or a large share of their
        reference): the band powers kept their value and the sample is no baseline data.
    """

    t_stream: float
    label: Label
    score: float
    time_in_state_s: float
    dwell_progress: float = 0.0
    features: dict[str, float] = field(default_factory=dict)
    z: dict[str, float] = field(default_factory=dict)
    artifacts: tuple[str, ...] = ()
    held: bool = False

    @property
    def is_target(self) -> bool:
        return self.label is Label.TARGET

"""Decider plugins: a lab's own state rule, run in the hot path after the features.

A decider is a class with this contract (see README, "Extending and testing"):

    class MyDecider:
        Settings = MySettings            # a pydantic model: `state.decider_settings` in the config
        wants_chunk = False              # True: `decide` also gets the raw Chunk

        def __init__(self, settings: MySettings, context: DeciderContext) -> None: ...
        def calibrate(self, baseline: Baseline) -> None: ...   # once, when the baseline is done
        def decide(self, state: State, chunk: Chunk | None) -> Decision: ...

It is named in the config by `state.decider: "package.module:ClassName"` or by the name of a
`closedloop.deciders` entry point. Decisions fall every `source.chunk_size` samples of the
session, live as offline, whatever chunks the stream delivers (`Pipeline._decision_grid`), and
the baseline rows and the hysteresis count samples: a live session and an offline run on the
same samples decide exactly alike. `decide` runs once per decision on the chain's calibrated
State (features: log band powers; z: robust z against the baseline; artifacts) and returns a
`Decision`: a score and, optionally, a label. Without a label, the score goes through the same
hysteresis as the built-in rule (`enter` / `leave`, `dwell_s` / `leave_dwell_s`, counted in
decisions). The label then goes to the trigger policy and the safety interlock like the built-in
one: a decider can only ask for a pulse; it never fires one, and every limit stays with the
interlock. Artifacts, calibration and stream faults keep their labels whatever the decider says.
An exception or a non-finite score is a fault: the pipeline disarms with the reason.

`WeightedZ` below is the built-in rule written against this contract (`state.decider:
weighted_z`); without a decider the chain runs the same rule fused into its compiled kernel.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from features.state import MAD_TO_SD
from features.types import Label, State

ENTRY_POINT_GROUP = "closedloop.deciders"
BASELINE_ROW_S = 0.1  # baseline rows handed to calibrate(): one per 100 ms of samples
COST_RING = 8192  # decide() durations kept for p50 / p99 (as the decision latency ring)
PASSED_THROUGH = frozenset({Label.UNCALIBRATED, Label.CALIBRATING, Label.ARTIFACT})


class DeciderError(ValueError):
    """A decider that cannot be found, built or used as configured (a clear one-line reason)."""


@dataclass(frozen=True)
class DeciderContext:
    """What a decider knows of the stream when it is built."""

    ch_names: tuple[str, ...]
    sfreq: float  # Hz
    feature_names: tuple[str, ...]  # 'band@group' keys of State.features / State.z
    target_name: str
    feature_weights: tuple[float, ...] = ()  # state.features' weights, in feature_names order


@dataclass(frozen=True)
class Baseline:
    """The calibration data, one row per 100 ms (BASELINE_ROW_S) of baseline the chain used (no
    flag that can reach the score: `State.held` false).

    features: (n, n_features) log band powers (State.features, in `feature_names` order).
    z: (n, n_features) their robust z against the finished baseline.
    """

    feature_names: tuple[str, ...]
    features: np.ndarray
    z: np.ndarray


@dataclass(frozen=True, slots=True)
class Decision:
    """A decider's answer: score (finite), and a label (TARGET / NON_TARGET) or None to let the
    configured hysteresis label the score."""

    score: float
    label: Label | None = None


class Decider(Protocol):
    Settings: ClassVar[type[BaseModel]]
    wants_chunk: ClassVar[bool]

    def __init__(self, settings: Any, context: DeciderContext) -> None: ...

    def calibrate(self, baseline: Baseline) -> None: ...

    def decide(self, state: State, chunk: Any) -> Decision: ...


class WeightedZSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, float] | None = Field(
        None,
        description="weight of each feature ('band@group'); null: the weights of state.features",
    )


class WeightedZ:
    """The built-in rule written against this contract: score = sum of weight x z over the
    configured features, labelled by the configured hysteresis.

    `state.decider: weighted_z` runs it as a plugin. Without a decider the chain runs the same
    rule fused into its compiled kernel (`features/kernels.py`), where the hysteresis counts
    single samples rather than decisions and 64 channels at 1 kHz stay within budget;
    tests/test_decider.py checks that both give the same score at every decision and the same
    pulses to within one decision step.
    """

    Settings = WeightedZSettings
    wants_chunk = False

    def __init__(self, settings: WeightedZSettings, context: DeciderContext) -> None:
        weights = settings.weights
        if weights is None:
            weights = dict(zip(context.feature_names, context.feature_weights, strict=True))
        unknown = sorted(set(weights) - set(context.feature_names))
        if unknown:
            raise DeciderError(
                f"weights for {', '.join(unknown)}: not features of this config (have: "
                f"{', '.join(context.feature_names)})"
            )
        self.terms = tuple((name, w) for name, w in weights.items() if w != 0.0)

    def calibrate(self, baseline: Baseline) -> None:
        """Nothing to learn: z is already against the baseline."""

    def decide(self, state: State, chunk: Any) -> Decision:
        z = state.z
        return Decision(math.fsum(w * z.get(name, math.nan) for name, w in self.terms))


def load_decider_class(spec: str) -> type:
    """'package.module:ClassName' or the name of a `closedloop.deciders` entry point."""
    if ":" not in spec:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
        if not found:
            names = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
            raise DeciderError(
                f"{spec!r}: no '{ENTRY_POINT_GROUP}' entry point of that name (installed: "
                f"{', '.join(names) or 'none'}); or write 'package.module:ClassName'"
            )
        spec = found[0].value
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error on import is theirs to see
        raise DeciderError(f"{spec!r}: cannot import {module_name}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise DeciderError(f"{spec!r}: {module_name} has no class {class_name!r}")
    missing = [
        name for name in ("Settings", "calibrate", "decide") if not hasattr(cls, name)
    ]  # the contract, checked before any data flows
    if missing or not (isinstance(cls.Settings, type) and issubclass(cls.Settings, BaseModel)):
        raise DeciderError(
            f"{spec!r}: not a decider (needs a pydantic `Settings` class, `calibrate` and "
            f"`decide`; missing or wrong: {', '.join(missing) or 'Settings'})"
        )
    return cls


def validate_decider_settings(spec: str, settings: dict[str, Any]) -> BaseModel:
    """The decider's own settings, validated by its `Settings` model (pydantic errors name the
    key inside `state.decider_settings`)."""
    return load_decider_class(spec).Settings.model_validate(settings)


class DecisionHysteresis:
    """The built-in enter / leave rule with dwell, counted per decision (t: seconds of samples)."""

    def __init__(
        self,
        enter: float,
        leave: float,
        dwell_s: float,
        leave_dwell_s: float,
        resume_after_artifact: bool = True,
    ) -> None:
        self.enter, self.leave = enter, leave
        self.dwell_s, self.leave_dwell_s = dwell_s, leave_dwell_s
        self.resume = resume_after_artifact
        self.label = Label.NON_TARGET
        self._since = math.nan  # stream time the score first crossed toward the other label
        self._interrupted = False

    def interrupt(self) -> None:
        """An artifact (the chain's rule, `features.state.LabelMachine`): the dwell restarts,
        and at the first clean decision the label is TARGET again only if it was TARGET before,
        `resume` is on and the score is still at or above `leave`; else NON_TARGET."""
        self._since = math.nan
        self._interrupted = True

    def step(self, t: float, score: float) -> Label:
        if self._interrupted:
            self._interrupted = False
            back = self.resume and self.label is Label.TARGET and score >= self.leave
            self.label = Label.TARGET if back else Label.NON_TARGET
        if self.label is Label.TARGET:
            crossing, hold = score < self.leave, self.leave_dwell_s
            other = Label.NON_TARGET
        else:
            crossing, hold = score > self.enter, self.dwell_s
            other = Label.TARGET
        if not crossing:
            self._since = math.nan
        elif math.isnan(self._since):
            self._since = t
        if crossing and t - self._since >= hold - 1e-9:
            self.label, self._since = other, math.nan
        return self.label

    def reset(self) -> None:
        self.label, self._since, self._interrupted = Label.NON_TARGET, math.nan, False


class DeciderStage:
    """Runs a decider on each State: collects its baseline, times it, applies the hysteresis.

    `apply(state, chunk) -> State` returns the State with the decider's score and label (and
    `dwell_progress` of the hysteresis); raises DeciderError for a non-finite score or a label
    that is not TARGET / NON_TARGET (the pipeline turns any exception into a fault).
    """

    def __init__(
        self,
        decider: Any,
        context: DeciderContext,
        hysteresis: DecisionHysteresis,
        baseline_of: Callable[[], dict[str, tuple[float, float]]],
        mad_floor: float,
        thresholds_of: Callable[[], tuple[float, float]] | None = None,
    ) -> None:
        self.decider = decider
        self.thresholds_of = thresholds_of  # live threshold changes (FeatureChain.thresholds)
        self.baseline_of = baseline_of  # FeatureChain.baseline: feature -> (median, MAD)
        self.mad_floor = mad_floor
        self.context = context
        self.hysteresis = hysteresis
        self.wants_chunk = bool(getattr(decider, "wants_chunk", False))
        self._rows: list[list[float]] = []  # baseline feature rows, one per BASELINE_ROW_S
        self._last_tick = -1
        self._row_n = max(1, round(BASELINE_ROW_S * context.sfreq))  # samples per baseline row
        self._calibrated = False
        self._cost_us = np.full(COST_RING, np.nan)
        self._n = 0
        self._last_label: Label | None = None
        self._t_changed = math.nan

    @classmethod
    def build(
        cls,
        spec: str,
        settings: dict[str, Any],
        context: DeciderContext,
        hysteresis: DecisionHysteresis,
        baseline_of: Callable[[], dict[str, tuple[float, float]]],
        mad_floor: float,
        thresholds_of: Callable[[], tuple[float, float]] | None = None,
    ) -> DeciderStage:
        decider_cls = load_decider_class(spec)
        parsed = decider_cls.Settings.model_validate(settings)
        try:
            decider = decider_cls(parsed, context)
        except Exception as exc:
            raise DeciderError(f"{spec}: could not be built: {type(exc).__name__}: {exc}") from exc
        return cls(decider, context, hysteresis, baseline_of, mad_floor, thresholds_of)

    def apply(self, state: State, chunk: Any, sample_end: int) -> State:
        """The decider's State for the samples up to `sample_end` (exclusive, counted from the
        session's first sample): the baseline rows and the hysteresis count samples, not
        stream seconds, so a live session and an offline run of the same samples decide
        alike (live stamps are an estimate of the device clock; the sample count is exact)."""
        names = self.context.feature_names
        if state.label is Label.CALIBRATING:
            if self._calibrated:  # a new baseline (operator restart): collect it afresh
                self._calibrated = False
                self._rows.clear()
                self.hysteresis.reset()
            # one row per BASELINE_ROW_S of samples, whatever the chunking: live chunks
            # arrive in bursts under load, and the fit must not depend on how many decisions
            # a stretch of baseline happened to get
            tick = sample_end // self._row_n
            if state.features and not state.held and tick != self._last_tick:
                self._last_tick = tick
                self._rows.append([state.features.get(n, math.nan) for n in names])
            return state
        if state.label is Label.UNCALIBRATED:
            return state
        if not self._calibrated:
            self._finish_calibration(state)
        if state.label in PASSED_THROUGH:  # an artifact: the next clean label is a new one
            self.hysteresis.interrupt()
            self._last_label = state.label
            return state
        t0 = time.perf_counter()
        decision = self.decider.decide(state, chunk if self.wants_chunk else None)
        self._cost_us[self._n % COST_RING] = (time.perf_counter() - t0) * 1e6
        self._n += 1
        score = float(decision.score)
        if not math.isfinite(score):
            raise DeciderError(f"decider returned a non-finite score ({score})")
        label = decision.label
        if label is None:
            if self.thresholds_of is not None:
                self.hysteresis.enter, self.hysteresis.leave = self.thresholds_of()
            label = self.hysteresis.step(sample_end / self.context.sfreq, score)
        elif label not in (Label.TARGET, Label.NON_TARGET):
            raise DeciderError(f"decider returned label {label!r} (TARGET or NON_TARGET only)")
        else:
            self.hysteresis.label = label
        if label is not self._last_label:
            self._last_label, self._t_changed = label, state.t_stream
        progress = 1.0 if label is Label.TARGET else 0.0
        return State(
            state.t_stream,
            label,
            score,
            state.t_stream - self._t_changed,
            progress,
            state.features,
            state.z,
            state.artifacts,
        )

    def _finish_calibration(self, state: State) -> None:
        """The baseline rows with their z against the finished baseline (the chain's median and
        MAD, as the chain computes z)."""
        names = self.context.feature_names
        feats = np.array(self._rows, dtype=float).reshape(-1, len(names))
        stats = self.baseline_of()
        median = np.array([stats.get(n, (math.nan, math.nan))[0] for n in names])
        mad = np.array([stats.get(n, (math.nan, math.nan))[1] for n in names])
        scale = np.maximum(mad * MAD_TO_SD, self.mad_floor)
        self.decider.calibrate(Baseline(names, feats, (feats - median) / scale))
        self._calibrated = True

    def cost_us(self) -> dict[str, float]:
        """decide() duration per decision (µs): p50, p99, max, n."""
        v = self._cost_us[: min(self._n, COST_RING)]
        v = v[np.isfinite(v)]
        if v.size == 0:
            return {"p50": math.nan, "p99": math.nan, "max": math.nan, "n": 0}
        p50, p99 = np.percentile(v, [50, 99])
        return {"p50": float(p50), "p99": float(p99), "max": float(v.max()), "n": int(self._n)}

"""LogRegDecider: logistic regression over the band z-scores, fitted at calibration."""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from features.decider import Baseline, DeciderContext, DeciderError, Decision
from features.types import State

__all__ = ["LogRegDecider", "LogRegSettings", "fit_logistic"]


class LogRegSettings(BaseModel):
    """`state.decider_settings` for `state.decider: logreg`."""

    model_config = ConfigDict(extra="forbid")

    target_shift_z: dict[str, float] = Field(
        default_factory=lambda: {"theta@frontal_midline": 1.0, "alpha@posterior": 1.5},
        description="feature 'band@group' -> its expected rise in the target state, in baseline "
        "SDs; the features named here are the model's inputs",
    )
    l2: float = Field(1.0, gt=0, le=1e6, description="ridge penalty on the weights")
    iterations: int = Field(25, ge=1, le=200, description="Newton steps of the fit")


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int) -> np.ndarray:
    """Ridge logistic regression by Newton's method. x (n, k), y (n,) in {0, 1} -> (k + 1,)
    weights, the intercept last."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    penalty = np.full(xb.shape[1], l2)
    penalty[-1] = 0.0  # the intercept is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -30, 30)))
        grad = xb.T @ (p - y) + penalty * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


class LogRegDecider:
    """score = log-odds of the target state given the chosen features' z-scores."""

    Settings = LogRegSettings
    wants_chunk = False

    def __init__(self, settings: LogRegSettings, context: DeciderContext) -> None:
        missing = [f for f in settings.target_shift_z if f not in context.feature_names]
        if missing:
            raise DeciderError(
                f"target_shift_z names {missing}, not features of this config "
                f"(have: {', '.join(context.feature_names)})"
            )
        self.settings = settings
        self.names = list(settings.target_shift_z)
        self.weights: np.ndarray | None = None

    def calibrate(self, baseline: Baseline) -> None:
        cols = [baseline.feature_names.index(n) for n in self.names]
        rest = baseline.z[:, cols]
        rest = rest[np.all(np.isfinite(rest), axis=1)]
        if len(rest) < 10:
            raise DeciderError(f"only {len(rest)} usable baseline rows (need 10)")
        shift = np.array([self.settings.target_shift_z[n] for n in self.names])
        x = np.vstack([rest, rest + shift])
        y = np.r_[np.zeros(len(rest)), np.ones(len(rest))]
        self.weights = fit_logistic(x, y, self.settings.l2, self.settings.iterations)

    def decide(self, state: State, chunk: object = None) -> Decision:
        if self.weights is None:
            raise DeciderError("decide() before calibrate()")
        z = np.array([state.z.get(n, math.nan) for n in self.names])
        return Decision(float(z @ self.weights[:-1] + self.weights[-1]))

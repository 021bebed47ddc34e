"""TriggerPolicy: dwell, one request per entry, repeat with jitter; pure and deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from features.types import Label, State
from triggers.policy import TriggerPolicy
from triggers.settings import PolicySettings


def states(labels: list[Label], dt: float = 0.1, t0: float = 100.0) -> list[State]:
    """States with the given labels every `dt` s; time_in_state_s as the estimator keeps it."""
    out: list[State] = []
    t_change = t0
    prev = None
    for i, label in enumerate(labels):
        t = t0 + i * dt
        if label is not prev:
            t_change, prev = t, label
        out.append(State(t_stream=t, label=label, score=1.0, time_in_state_s=t - t_change))
    return out


def run(policy: TriggerPolicy, stream: list[State]) -> list[float]:
    return [r.t_stream for s in stream if (r := policy.update(s)) is not None]


T, N = Label.TARGET, Label.NON_TARGET


def test_dwell_once_requests_once_per_entry_after_the_dwell():
    p = TriggerPolicy(PolicySettings(mode="dwell_once", dwell_s=0.5))
    labels = [N] * 5 + [T] * 30 + [N] * 3 + [T] * 4 + [Label.ARTIFACT] + [T] * 10
    got = run(p, states(labels))
    # entries at indices 5, 38 (too short: 4 x 0.1 s < 0.5 s), 43
    assert got == pytest.approx([100.0 + 1.0, 100.0 + 4.8])


def test_repeat_with_interval_while_the_state_holds():
    p = TriggerPolicy(PolicySettings(mode="repeat", dwell_s=1.0, repeat_interval_s=2.0))
    got = run(p, states([T] * 80))  # 8 s of target from t=100
    assert got == pytest.approx([101.0, 103.0, 105.0, 107.0])


def test_repeat_jitter_is_bounded_and_seeded():
    cfg = PolicySettings(mode="repeat", dwell_s=0.0, repeat_interval_s=2.0, jitter_s=0.5, seed=7)
    stream = states([T] * 2000, dt=0.01)
    a = run(TriggerPolicy(cfg), stream)
    p = TriggerPolicy(cfg)
    assert run(p, stream) == a
    p.reset()
    assert run(p, stream) == a  # reset restarts the jitter sequence
    gaps = np.diff(a)
    assert np.all(gaps >= 2.0 - 0.011)
    assert np.all(gaps <= 2.5 + 0.011)
    assert gaps.std() > 0.05  # jitter is really there
    other = run(TriggerPolicy(cfg.model_copy(update={"seed": 8})), stream)
    assert other != a


def test_a_live_clock_fit_a_few_ppm_short_does_not_slip_the_dwell_by_a_decision():
    """Live stamps are a grid at the fitted rate: 1 s of 500 Hz samples measured 0.99998 s in a
    CI run (20 ppm). The request still falls on the 50th 20 ms decision, as offline; without
    the sample rate (float tolerance only) it slips to the 51st."""
    dt = 0.02 * (1.0 - 20e-6)
    stream = states([T] * 60, dt=dt)
    cfg = PolicySettings(mode="dwell_once", dwell_s=1.0)
    assert run(TriggerPolicy(cfg, sfreq=500.0), stream) == [stream[50].t_stream]
    assert run(TriggerPolicy(cfg), stream) == [stream[51].t_stream]
    # a whole sample short is still short: the quarter-sample tolerance counts no extra sample
    early = states([T] * 60, dt=0.02 - 0.002 / 50)  # entry + 50 steps = 1 s - 1 sample
    assert run(TriggerPolicy(cfg, sfreq=500.0), early) == [early[51].t_stream]


def test_no_request_for_non_target_labels():
    p = TriggerPolicy(PolicySettings(dwell_s=0.0))
    labels = [Label.UNCALIBRATED, Label.CALIBRATING, Label.ARTIFACT, N] * 20
    assert run(p, states(labels)) == []


def test_non_finite_time_is_ignored():
    p = TriggerPolicy(PolicySettings(dwell_s=0.0))
    assert p.update(State(math.nan, T, 1.0, 0.0)) is None


def test_long_gap_does_not_release_a_burst():
    p = TriggerPolicy(PolicySettings(mode="repeat", dwell_s=0.0, repeat_interval_s=2.0))
    s1 = State(100.0, T, 1.0, 0.0)
    s2 = State(130.0, T, 1.0, 30.0)
    s3 = State(130.1, T, 1.0, 30.1)
    assert p.update(s1) is not None
    assert p.update(s2) is not None
    assert p.update(s3) is None


def test_repeat_interval_below_hard_floor_is_an_error():
    with pytest.raises(ValidationError, match="repeat_interval_s"):
        PolicySettings(mode="repeat", repeat_interval_s=0.5)


@settings(max_examples=150, deadline=None)
@given(
    labels=st.lists(st.sampled_from([T, T, T, N, Label.ARTIFACT]), min_size=1, max_size=300),
    dwell=st.sampled_from([0.0, 0.25, 1.0]),
    repeat=st.booleans(),
)
def test_requests_match_a_model_of_target_runs(labels, dwell, repeat):
    """Each run of TARGET states gets its first request at the first state >= entry + dwell;
    'dwell_once' never asks twice per run, 'repeat' asks every interval (2 s) afterwards."""
    cfg = PolicySettings(
        mode="repeat" if repeat else "dwell_once", dwell_s=dwell, repeat_interval_s=2.0
    )
    stream = states(labels)
    got = run(TriggerPolicy(cfg), stream)
    expected: list[float] = []
    t_entry = t_next = None
    for s in stream:
        if s.label is not T:
            t_entry = None
            continue
        if t_entry is None:
            t_entry, t_next = s.t_stream, s.t_stream + dwell
        if s.t_stream >= t_next - 1e-9:
            expected.append(s.t_stream)
            t_next = t_next + 2.0 if repeat else math.inf
    assert got == pytest.approx(expected)

"""Phase mode's gate: when the target phase comes, and the quality vetoes (generated signals with
a known phase; the trigger integration is tested with sessions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from benchmarks.phase_signals import known_phase_signal, pink_noise
from features.phase import phase_error_stats
from triggers.phase_gate import PhaseGate, PhaseSettings

FS = 500.0


def _gate(sig, **kw) -> PhaseGate:
    s = PhaseSettings(enabled=True, channels=["Oz"], spatial="channel", **kw)
    gate = PhaseGate(s, ["Fz", "Oz"], FS)
    data = np.column_stack([np.zeros_like(sig.x), sig.x])
    gate.fit(data[: round(20 * FS)])
    return gate, data


@pytest.fixture(scope="module")
def alpha():
    return known_phase_signal(60.0, FS, 10.0, snr_db=12.0, seed=5)


@pytest.mark.parametrize("target_deg", [180.0, 0.0, 90.0])
def test_live_plans_land_on_the_target_phase(alpha, target_deg):
    """The planned instant (newest sample + age + delay + output latency) falls on the target
    phase of the true rhythm: the pulse leaves there."""
    gate, data = _gate(
        alpha, target_deg=target_deg, output_latency_ms=4.0, min_snr_db=-20.0, max_lead_ms=500.0
    )
    errors, age_s = [], 0.003
    for i in range(round(20 * FS), data.shape[0] - 200, 10):
        gate.push(data[i : i + 10])
        if (i // 10) % 7:  # a plan every 140 ms
            continue
        plan = gate.plan_live(age_s)
        if plan.veto is None:
            k = i + 9 + round((age_s + plan.delay_s + 0.004) * FS)
            errors.append(alpha.phase[k] - math.radians(target_deg))
            assert 0.0 <= plan.delay_s <= 1 / 8.0  # within one cycle of the slowest band edge
    st = phase_error_stats(np.asarray(errors))
    assert st["n"] > 30
    assert abs(st["bias_deg"]) < 15.0, st
    assert st["circ_sd_deg"] < 40.0, st


def test_offline_fires_only_within_the_tolerance(alpha):
    gate, data = _gate(alpha, target_deg=180.0, tolerance_deg=20.0, min_snr_db=-20.0)
    fired, waits = [], 0
    for i in range(round(20 * FS), data.shape[0], 10):
        gate.push(data[i : i + 10])
        plan = gate.plan_offline()
        if plan.veto is None:
            fired.append(alpha.phase[i + 9] - math.pi)
            assert abs(math.remainder(plan.predicted - math.pi, 2 * math.pi)) <= math.radians(20)
        elif plan.veto == "phase_wait":
            waits += 1
    st = phase_error_stats(np.asarray(fired))
    assert waits > len(fired) > 100  # most chunks are outside a +-20 deg window
    assert abs(st["bias_deg"]) < 15.0, st


def test_quality_vetoes_on_noise_and_before_calibration():
    rng = np.random.default_rng(1)
    noise = pink_noise(round(30 * FS), rng)
    s = PhaseSettings(enabled=True, channels=["Oz"], spatial="channel", min_snr_db=6.0)
    gate = PhaseGate(s, ["Oz"], FS)
    gate.push(noise[:1000, None])
    assert gate.plan_live(0.0).veto == "phase_not_ready"  # not fitted
    gate.fit(noise[:, None])
    vetoes = set()
    for i in range(0, noise.size - 10, 250):
        gate.push(noise[i : i + 10, None])
        vetoes.add(gate.plan_live(0.0).veto)
    assert vetoes <= {"phase_snr", "phase_amplitude", "phase_hold", None}
    assert "phase_snr" in vetoes


def test_phase_settings_validation():
    with pytest.raises(ValidationError, match="exactly one channel"):
        PhaseSettings(channels=["C3", "C4"], spatial="hjorth")
    with pytest.raises(ValidationError, match="band"):
        PhaseSettings(band=(12.0, 8.0))
    with pytest.raises(ValueError, match="Nyquist"):
        PhaseGate(PhaseSettings(band=(60.0, 90.0), channels=["Oz"]), ["Oz"], 160.0)


def test_ar_settings_reach_the_estimator_and_are_checked_against_the_window():
    """phase.ar_* are the estimator's own (Zrenner 2018: FIR length, edge, AR order): the gate's
    estimate equals `ar_phase` called with them, and an edge eating the window is refused."""
    from features.phase import ar_phase

    sfreq = 1000.0
    t = np.arange(int(2 * sfreq)) / sfreq
    x = np.sin(2 * np.pi * 10.0 * t + 0.3) + 0.1 * np.random.default_rng(0).standard_normal(t.size)
    s = PhaseSettings(
        enabled=True, estimator="ar", channels=["Oz"], spatial="channel", recentre=False,
        ar_filter_ms=100.0, ar_edge_ms=40.0, ar_order=12,
    )  # fmt: skip
    gate = PhaseGate(s, ["Oz"], sfreq)
    gate.tracker.push(x[:, None])
    got = gate.tracker._raw_estimate(gate.tracker.window())
    want = ar_phase(x[-500:], sfreq, s.band, 0.0, filter_s=0.1, edge_s=0.04, ar_order=12)
    assert got.phase == pytest.approx(want.phase)
    default = ar_phase(x[-500:], sfreq, s.band, 0.0)
    assert got.phase != pytest.approx(default.phase, abs=1e-9)  # the settings made a difference
    with pytest.raises(ValueError, match="ar_edge_ms"):
        PhaseSettings(estimator="ar", window_s=0.3, ar_edge_ms=100.0)

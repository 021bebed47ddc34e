"""Phase estimators: causal, chunk-invariant, accurate on signals whose phase is known, and
scored against an acausal reference whose own uncertainty is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.phase_signals import known_phase_signal
from features import phase as ph

BAND = (8.0, 12.0)


@pytest.fixture(scope="module")
def strong_alpha():
    return known_phase_signal(40.0, 1000.0, 10.0, snr_db=12.0, seed=3)


def _errors(tracker: ph.PhaseTracker, sig, step: int = 97) -> np.ndarray:
    h = round(tracker.horizon_s * sig.sfreq)
    ends = np.arange(20_000, sig.x.size - h, step)
    ends = ends[sig.envelope[ends] > np.median(sig.envelope)]
    out = []
    for e in ends:
        tracker._push_signal(sig.x[e - tracker.n : e])
        out.append(tracker.estimate().phase - sig.phase[e - 1 + h])
    return np.asarray(out)


def test_phase_error_stats_on_known_distributions():
    rng = np.random.default_rng(0)
    e = rng.normal(math.radians(10), math.radians(20), 20_000)
    st = ph.phase_error_stats(e)
    assert st["bias_deg"] == pytest.approx(10.0, abs=0.5)
    assert st["circ_sd_deg"] == pytest.approx(20.0, abs=0.5)  # equals the SD for a narrow normal
    assert st["within_30"] == pytest.approx(0.8186, abs=0.01)  # Phi(1) - Phi(-2) for N(10, 20)
    uniform = ph.phase_error_stats(rng.uniform(-math.pi, math.pi, 20_000))
    assert uniform["plv"] < 0.03
    assert ph.phase_error_stats(np.array([np.nan]))["n"] == 0


def test_reference_phase_matches_the_true_phase_and_reports_its_spread(strong_alpha):
    s = strong_alpha
    ref, _amp, spread = ph.reference_phase(s.x, s.sfreq, BAND)
    inside = slice(2000, -2000)
    strong = s.envelope[inside] > np.median(s.envelope)
    st = ph.phase_error_stats((ref - s.phase)[inside][strong])
    assert abs(st["bias_deg"]) < 3.0
    assert st["circ_sd_deg"] < 15.0
    assert np.median(np.degrees(spread[inside][strong])) < 5.0  # the five filters agree


@pytest.mark.parametrize("estimator", ph.ESTIMATORS)
def test_each_estimator_forecasts_the_phase_past_the_horizon(strong_alpha, estimator):
    """At 12 dB every estimator tracks the true phase 10 ms ahead (a random guess gives a
    circular SD of ~ 120 deg, a 10 ms error at 10 Hz alone 36 deg of bias)."""
    tr = ph.PhaseTracker(np.ones(1), strong_alpha.sfreq, BAND, estimator, 0.5, horizon_s=0.010)
    tr.fit(strong_alpha.x[:20_000])
    st = ph.phase_error_stats(_errors(tr, strong_alpha))
    assert st["n"] > 50
    assert abs(st["bias_deg"]) < 12.0, st
    assert st["circ_sd_deg"] < 35.0, st


def test_echt_of_a_pure_sinusoid_is_its_phase():
    fs = 500.0
    t = np.arange(250) / fs
    for phi0 in (0.0, 1.0, -2.5):
        est = ph.echt_phase(np.cos(2 * math.pi * 10 * t + phi0), fs, BAND)
        true = math.remainder(2 * math.pi * 10 * t[-1] + phi0, 2 * math.pi)
        assert abs(math.remainder(est.phase - true, 2 * math.pi)) < math.radians(12)


@pytest.mark.parametrize("estimator", ph.ESTIMATORS)
def test_the_tracker_is_chunk_invariant(strong_alpha, estimator):
    """The same samples in chunks of 1, 7, 10 and 1250 give the same estimate, bit for bit."""
    data = np.column_stack([strong_alpha.x[:6000], np.zeros(6000)])
    w = np.array([1.0, 0.0])
    results = []
    for size in (1, 7, 10, 1250):
        tr = ph.PhaseTracker(w, 1000.0, BAND, estimator, 0.5, horizon_s=0.005)
        tr.fit(strong_alpha.x[6000:16000])
        for i in range(0, 6000, size):
            tr.push(data[i : i + size])
        results.append(tr.estimate())
    assert all(r == results[0] for r in results), results


def test_tracker_is_not_ready_before_a_full_window_and_etp_needs_fitting():
    tr = ph.PhaseTracker(np.ones(1), 250.0, BAND, "etp", 0.5)
    tr._push_signal(np.zeros(200))
    assert not tr.ready
    assert math.isnan(tr.estimate().phase)
    with pytest.raises(ValueError, match="estimator must be"):
        ph.PhaseTracker(np.ones(1), 250.0, BAND, "bogus")
    with pytest.raises(ValueError, match="at least"):
        tr.fit(np.zeros(100))


def test_spatial_weights():
    names = ["Fz", "FC1", "FC5", "C3", "CP1", "CP5", "Cz", "O1"]
    w = ph.spatial_weights(names, "C3", "hjorth")
    assert w[names.index("C3")] == 1.0
    assert set(np.flatnonzero(w < 0)) == {names.index(n) for n in ("FC1", "FC5", "CP1", "CP5")}
    assert w.sum() == pytest.approx(0.0)
    assert ph.spatial_weights(["c3.", "O1"], "C3").tolist() == [1.0, 0.0]
    assert ph.spatial_weights(names, ["Cz", "Fz"], "mean").sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in the stream"):
        ph.spatial_weights(names, "Pz")


def test_identical_errors_give_a_zero_circular_sd_not_an_error():
    """Five identical errors: R rounds to 1.0000000000000002 (measured), whose log is > 0; the
    console's phase panel computes this on every tick, so it must not raise."""
    errors = np.full(5, -2.991)
    assert abs(np.mean(np.exp(1j * errors))) > 1.0  # the rounding this guards against
    st = ph.phase_error_stats(errors)
    assert st["circ_sd_deg"] == 0.0
    assert st["plv"] == pytest.approx(1.0)

"""FeatureChain end to end: labels on the generated recordings, determinism across chunkings,
calibration life cycle, artifact veto, non-finite input."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import mne
import numpy as np
import pytest

from acquisition.chunk import Chunk
from acquisition.simulator import simulate
from features.chain import FeatureChain
from features.settings import (
    ArtifactSettings,
    BandPowerSettings,
    PreprocessSettings,
    StateSettings,
)
from features.types import Label

ROOT = Path(__file__).resolve().parents[1]
SIM32 = ROOT / "replay_data" / "sim_32ch_500hz.fif"
SIM4 = ROOT / "replay_data" / "sim_4ch_256hz.fif"
CONSUMER_GROUPS = {"frontal": ["AF7", "AF8"], "temporal": ["TP9", "TP10"]}
CONSUMER_FEATURES = [{"group": "frontal", "band": "theta"}, {"group": "temporal", "band": "alpha"}]


def _chunks(raw: mne.io.BaseRaw, size: int):
    """Chunks of `size` samples straight from a Raw (timestamps = raw.times)."""
    data = np.ascontiguousarray(raw.get_data().T)
    times = raw.times
    names = tuple(raw.ch_names)
    fs = raw.info["sfreq"]
    for i in range(0, data.shape[0], size):
        yield Chunk(data[i : i + size], times[i : i + size], names, fs)


def _run(chain: FeatureChain, raw: mne.io.BaseRaw, size: int):
    """Feed the whole recording; returns the states and every label change (t, label)."""
    states, changes = [], []
    for chunk in _chunks(raw, size):
        states.append(chain.step(chunk))
        changes.extend(chain.last_transitions)
    return states, changes


def _labels_per_sample(changes, n: int, sfreq: float, first=Label.NON_TARGET) -> np.ndarray:
    labels = np.full(n, first.value, dtype=object)
    for t, label in changes:
        labels[round(t * sfreq) :] = label.value
    return labels


def _score_meditation(raw: mne.io.BaseRaw, changes, t_from: float):
    """Balanced accuracy of TARGET vs the `meditation` annotation over samples after t_from that
    are not labelled ARTIFACT, and the delay from each meditation onset to the first TARGET."""
    fs = raw.info["sfreq"]
    n = len(raw.times)
    labels = _labels_per_sample(changes, n, fs)
    med = np.zeros(n, dtype=bool)
    for a in raw.annotations:
        if a["description"] == "meditation":
            med[round(a["onset"] * fs) : round((a["onset"] + a["duration"]) * fs)] = True
    ev = (raw.times >= t_from) & (labels != Label.ARTIFACT.value)
    pred = labels == Label.TARGET.value
    tpr = np.sum(pred & med & ev) / np.sum(med & ev)
    tnr = np.sum(~pred & ~med & ev) / np.sum(~med & ev)
    delays = []
    for a in raw.annotations:
        if a["description"] == "meditation" and a["onset"] >= t_from:
            i0, i1 = round(a["onset"] * fs), round((a["onset"] + a["duration"]) * fs)
            hit = np.flatnonzero(labels[i0:i1] == Label.TARGET.value)
            delays.append(hit[0] / fs if hit.size else np.inf)
    return (tpr + tnr) / 2, float(np.median(delays)), delays


def _chain(raw, *, bandpower=None, state=None, artifacts=None) -> FeatureChain:
    return FeatureChain(
        PreprocessSettings(),
        bandpower or BandPowerSettings(),
        artifacts or ArtifactSettings(),
        state or StateSettings(auto_calibrate=False),
        raw.ch_names,
        raw.info["sfreq"],
    )


@pytest.fixture(scope="module")
def sim32():
    if not SIM32.exists():
        pytest.skip("replay_data/sim_32ch_500hz.fif not generated")
    return mne.io.read_raw_fif(SIM32, preload=True, verbose="error")


@pytest.fixture(scope="module")
def sim4():
    if not SIM4.exists():
        pytest.skip("replay_data/sim_4ch_256hz.fif not generated")
    return mne.io.read_raw_fif(SIM4, preload=True, verbose="error")


# ---------------------------------------------------------------- accuracy on generated data
@pytest.mark.slow
@pytest.mark.parametrize(("method", "min_ba"), [("iir", 0.88), ("welch", 0.85)])
def test_meditation_labels_on_sim32(sim32, method, min_ba):
    """Calibrate on the first minute, label the rest (default settings). Measured since the
    file's first minute is free of the target (issue 20; enter 2.5 / leave 1.0): iir balanced
    accuracy 0.896, onsets 1.73 s and 1.20 s (before, with ~40 % of the target inside the
    baseline and enter 1.0: 0.918, 2.95 s)."""
    chain = _chain(sim32, bandpower=BandPowerSettings(method=method))
    chain.calibrate_on(sim32.copy().crop(0, 60))
    assert chain.calibrated
    assert chain.calibration_progress == 1.0
    _, changes = _run(chain, sim32, 10)
    ba, delay, delays = _score_meditation(sim32, changes, 60.0)
    assert ba >= min_ba, (method, ba, delays)
    assert delay < 4.0, (method, delays)


@pytest.mark.slow
def test_meditation_labels_on_sim4_consumer_montage(sim4):
    """The Muse-like montage with its own groups. Measured with the clean baseline (issue 20):
    balanced accuracy 0.886, onsets 1.24 s and 0.82 s (before: 0.904, 1.44 s)."""
    chain = _chain(
        sim4,
        bandpower=BandPowerSettings(groups=CONSUMER_GROUPS),
        state=StateSettings(auto_calibrate=False, features=CONSUMER_FEATURES),
    )
    chain.calibrate_on(sim4.copy().crop(0, 60))
    _, changes = _run(chain, sim4, 8)
    ba, delay, delays = _score_meditation(sim4, changes, 60.0)
    assert ba >= 0.87, (ba, delays)
    assert delay < 4.0, delays


@pytest.mark.slow
def test_meditation_labels_longer_simulations():
    """Three fresh 8-minute simulations (seeds 1-3), default settings, calibration on the
    first minute, which is free of the target since issue 20. Measured: seed 2 balanced
    accuracy 0.877 (seeds 1 and 3 above 0.9); before, with the target in the baseline and enter
    1.0: 0.916 / 0.935 / 0.920."""
    for seed in (1, 2, 3):
        # the first 65 s are mind wandering: a baseline free of the target (issue 20)
        raw = simulate(480.0, 500.0, "standard_32", seed, baseline_s=65.0)
        chain = _chain(raw)  # calibrate_on the first minute (auto-calibration is tested below)
        chain.calibrate_on(raw.copy().crop(0, 60))
        _, changes = _run(chain, raw, 25)
        ba, _, delays = _score_meditation(raw, changes, 60.0)
        assert ba >= 0.86, (seed, ba, delays)


# ---------------------------------------------------------------- determinism
def _fingerprint(changes, sfreq: float, tolerance_samples: int = 0) -> list[tuple[int, str]]:
    return [(round(t * sfreq) // max(1, tolerance_samples), lab.value) for t, lab in changes]


@pytest.mark.slow
def test_decisions_do_not_depend_on_chunking(sim32):
    # 16 channels, 55 s: the one-sample chunks take ~10 s
    keep = [
        "Fp1",
        "Fp2",
        "F3",
        "Fz",
        "F4",
        "FCz",
        "T7",
        "C3",
        "C4",
        "T8",
        "P3",
        "Pz",
        "P4",
        "O1",
        "Oz",
        "O2",
        "counter",
    ]
    raw = sim32.copy().pick(keep).crop(0, 55)
    fs = raw.info["sfreq"]
    state = StateSettings(calibration_s=15.0)  # auto-calibrates from the first samples
    runs = {}
    for size in (1, 10, 37, 256):
        chain = _chain(raw, state=state)
        states, changes = _run(chain, raw, size)
        runs[size] = (changes, states[-1], chain.baseline)
    ref_changes, ref_last, ref_base = runs[10]
    labels = [lab for _, lab in ref_changes]
    assert Label.TARGET in labels
    assert Label.ARTIFACT in labels
    assert len(labels) > 5
    ref_idx = [round(t * fs) for t, _ in ref_changes]
    for size, (changes, last, base) in runs.items():
        assert [lab for _, lab in changes] == labels, size
        idx = [round(t * fs) for t, _ in changes]
        assert max(abs(a - b) for a, b in zip(idx, ref_idx, strict=True)) <= 1, size
        assert last.label is ref_last.label
        assert last.score == pytest.approx(ref_last.score, rel=1e-9, abs=1e-9)
        for k, (m, d) in ref_base.items():
            assert base[k] == pytest.approx((m, d), rel=1e-6)
    digest = hashlib.sha256(repr(_fingerprint(ref_changes, fs)).encode()).hexdigest()
    assert digest == hashlib.sha256(repr(_fingerprint(runs[1][0], fs)).encode()).hexdigest()


def test_same_chunks_twice_give_identical_states(sim32):
    raw = sim32.copy().crop(0, 30)
    state = StateSettings(calibration_s=10.0, warmup_s=1.0)
    a, ca = _run(_chain(raw, state=state), raw, 10)
    chain = _chain(raw, state=state)
    b1, _ = _run(chain, raw, 10)
    chain.reset()
    b2, cb = _run(chain, raw, 10)
    assert ca == cb
    for x, y, z in zip(a, b1, b2, strict=True):
        assert x.label is y.label is z.label
        assert x.t_stream == y.t_stream == z.t_stream
        np.testing.assert_equal([x.score, x.time_in_state_s], [z.score, z.time_in_state_s])
        assert x.features == z.features
        assert x.z == z.z
        assert x.artifacts == z.artifacts


# ---------------------------------------------------------------- life cycle and API
def _synthetic(
    seconds: float,
    sfreq: float = 250.0,
    *,
    alpha_from: float | None = None,
    blink_at: float | None = None,
    seed: int = 0,
):
    """Simple 4-channel stream: 1/f noise, posterior alpha that rises after alpha_from."""
    rng = np.random.default_rng(seed)
    names = ("Fz", "Pz", "O1", "O2")
    n = round(seconds * sfreq)
    spec = np.fft.rfft(rng.standard_normal((n, 4)), axis=0)
    spec /= np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / sfreq), 1.0))[:, None]
    x = np.fft.irfft(spec, n, axis=0)
    x *= 10e-6 / x.std(axis=0)
    t = np.arange(n) / sfreq
    gain = np.ones(n) if alpha_from is None else np.where(t < alpha_from, 1.0, 4.0)
    x[:, 1:] += (5e-6 * gain * np.sin(2 * np.pi * 10 * t))[:, None]
    if blink_at is not None:
        x[:, 0] += 300e-6 * np.exp(-0.5 * ((t - blink_at) / 0.1) ** 2)
    return x, t, names


def _feed(chain, x, t, names, *, sfreq=250.0, size=25):
    states = []
    for i in range(0, len(x), size):
        states.append(chain.step(Chunk(x[i : i + size], t[i : i + size], names, sfreq)))
    return states


def _alpha_chain(names, **state_kw):
    # enter 2.5: stationary noise gives |z| > 0.5 a third of the time, alpha x4 gives z ~ 5
    kw = {
        "features": [{"group": "posterior", "band": "alpha"}],
        "calibration_s": 10.0,
        "warmup_s": 1.0,
        "enter": 2.5,
        "leave": 1.0,
        **state_kw,
    }
    return FeatureChain(
        PreprocessSettings(),
        BandPowerSettings(),
        # fixed limits: these tests time the calibration; learning is tested in
        # tests/test_features_learn.py
        ArtifactSettings(adaptive=False),
        StateSettings(**kw),
        names,
        250.0,
    )


def test_auto_calibration_then_target():
    x, t, names = _synthetic(40, alpha_from=25.0)
    chain = _alpha_chain(names)
    assert chain.state.label is Label.UNCALIBRATED
    assert chain.calibration_progress == 0.0
    progress = []
    states = []
    for i in range(0, len(x), 25):
        states.append(chain.step(Chunk(x[i : i + 25], t[i : i + 25], names, 250.0)))
        progress.append(chain.calibration_progress)
    assert progress == sorted(progress)
    assert progress[-1] == 1.0
    first_cal = next(i for i, s in enumerate(states) if s.label is not Label.CALIBRATING)
    # 1 s warm-up + 2.25 s settle + 10 s clean data
    assert 13.0 < states[first_cal].t_stream < 13.6
    assert set(chain.baseline) == {
        f"{b}@{g}" for b in chain.band_names for g in ("frontal_midline", "posterior")
    }
    assert all(s.label is not Label.TARGET for s in states if s.t_stream < 25.0)
    target = [s for s in states if s.label is Label.TARGET]
    assert target
    assert 25.0 < target[0].t_stream < 27.0
    last = states[-1]
    assert last.is_target
    assert last.dwell_progress == 1.0
    assert last.score > 2.5
    assert set(last.features) == {"alpha@posterior"}
    assert last.z["alpha@posterior"] > 2.5
    k = max(i for i, st in enumerate(states) if st.label is not Label.TARGET) + 1
    t_change = last.t_stream - last.time_in_state_s  # the sample where TARGET began
    assert states[k - 1].t_stream < t_change <= states[k].t_stream
    assert chain.time_in_label["target"] > 10.0
    assert set(chain.latest_band_powers) == set(chain.baseline)


def test_empty_chunk_returns_previous_state():
    x, t, names = _synthetic(5)
    chain = _alpha_chain(names)
    s1 = chain.step(Chunk(x[:100], t[:100], names, 250.0))
    s2 = chain.step(Chunk(np.zeros((0, 4)), np.zeros(0), names, 250.0))
    assert s2 is s1


def test_blink_vetoes_target_entry():
    x, t, names = _synthetic(50, alpha_from=25.0, blink_at=30.0)
    chain = _alpha_chain(names)
    states = _feed(chain, x, t, names)
    # the blink's flag: its supra-threshold part plus the 0.25 s hold-off (holdoff_s default)
    around = [s for s in states if 30.1 <= s.t_stream <= 30.4]
    assert around
    assert all(s.label is Label.ARTIFACT for s in around)
    assert any("amplitude:Fz" in s.artifacts for s in around)
    assert all(np.isfinite(s.score) for s in around)
    assert states[-1].is_target  # back after the hold-off


def test_nonfinite_samples_flag_and_do_not_poison():
    x, t, names = _synthetic(40, alpha_from=25.0)
    x[(30 * 250) : (30 * 250) + 5, 2] = np.nan
    chain = _alpha_chain(names)
    states = _feed(chain, x, t, names)
    hit = [s for s in states if "nonfinite:O1" in s.artifacts]
    assert hit
    assert all(s.label is Label.ARTIFACT for s in hit)
    assert np.isfinite(states[-1].score)
    assert states[-1].is_target
    assert all(np.isfinite(v) for v in chain.latest_band_powers.values())


def test_manual_calibration_and_thresholds():
    x, t, names = _synthetic(30)
    chain = _alpha_chain(names, auto_calibrate=False)
    _feed(chain, x[:500], t[:500], names)
    assert chain.state.label is Label.UNCALIBRATED
    assert not chain.calibrating
    with pytest.raises(ValueError, match="not calibrating"):
        chain.finish_calibration()
    chain.start_calibration()
    _feed(chain, x[500:1500], t[500:1500], names)
    assert chain.state.label is Label.CALIBRATING
    with pytest.raises(ValueError, match="too little clean calibration data"):
        chain.finish_calibration()  # 4 s of data, 2.25 s of it settling
    _feed(chain, x[1500:3000], t[1500:3000], names)  # 7.75 s clean: under calibration_s
    assert chain.calibrating
    assert 0.7 < chain.calibration_progress < 0.8
    chain.finish_calibration()
    assert chain.calibrated
    s = _feed(chain, x[4000:4100], t[4000:4100], names)[-1]
    assert s.label in (Label.NON_TARGET, Label.TARGET)
    assert np.isfinite(s.score)
    with pytest.raises(ValueError, match=r"enter .* must be above leave"):
        chain.set_thresholds(0.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        chain.set_thresholds(np.nan, 0.0)
    chain.set_thresholds(2.0, 1.0)
    assert chain.thresholds == (2.0, 1.0)
    chain.start_calibration()  # restart drops the baseline
    assert not chain.calibrated
    assert chain.baseline == {}
    chain.reset()
    assert chain.state.label is Label.UNCALIBRATED
    assert chain.latest_band_powers


def test_calibrate_on_separate_recording_with_individual_alpha():
    raw = simulate(
        90.0,
        250.0,
        ["Fz", "FCz", "Pz", "O1", "Oz", "O2"],
        7,
        alpha_hz=11.5,
        blinks_per_min=0.0,
        emg_per_min=0.0,
        bad_channel=False,
    )
    chain = FeatureChain(
        PreprocessSettings(),
        BandPowerSettings(individual_alpha=True),
        ArtifactSettings(),
        StateSettings(auto_calibrate=False),
        raw.ch_names,
        250.0,
    )
    base = chain.calibrate_on(raw.copy().crop(0, 40))
    assert chain.individual_alpha_hz == pytest.approx(11.5, abs=0.5)
    lo, hi = chain.bands["alpha"]
    assert hi - lo == pytest.approx(5.0)
    assert lo == pytest.approx(chain.individual_alpha_hz - 2)
    assert "alpha@posterior" in base
    assert base["alpha@posterior"][1] > 0
    states, _ = _run(chain, raw, 32)
    assert states[-1].label in (Label.NON_TARGET, Label.TARGET, Label.ARTIFACT)
    assert np.isfinite(states[-1].score)
    with pytest.raises(ValueError, match="empty"):
        chain.calibrate_on([])


def test_exclude_non_eeg_and_eeg_mask():
    names = ["Fz", "Pz", "O1", "O2", "counter"]
    chain = _alpha_chain(names)
    assert chain.eeg_names == ("Fz", "Pz", "O1", "O2")
    masked = FeatureChain(
        PreprocessSettings(),
        BandPowerSettings(),
        ArtifactSettings(),
        StateSettings(features=[{"group": "posterior", "band": "alpha"}]),
        names,
        250.0,
        eeg_mask=[True, True, True, False, False],
    )
    assert masked.eeg_names == ("Fz", "Pz", "O1")
    assert masked.groups == {"frontal_midline": ["Fz"], "posterior": ["Pz", "O1"]}
    x, t, _ = _synthetic(4)
    data = np.column_stack([x, np.arange(len(x), dtype=float)])  # counter grows without bound
    states = _feed(chain, data, t, tuple(names))
    assert not any(a.endswith(":counter") for s in states for a in s.artifacts)


def test_no_memory_growth_per_chunk():
    """After calibration, memory does not grow with the number of chunks processed."""
    x, t, names = _synthetic(60, alpha_from=40.0)
    chain = _alpha_chain(names)
    _feed(chain, x[: 25 * 250], t[: 25 * 250], names, size=10)  # calibrated at ~13 s
    assert chain.calibrated
    rest_x, rest_t = x[25 * 250 :], t[25 * 250 :]
    tracemalloc.start()
    try:
        _feed(chain, rest_x[:2500], rest_t[:2500], names, size=25)
        first, _ = tracemalloc.get_traced_memory()
        _feed(chain, rest_x[2500:], rest_t[2500:], names, size=25)
        second, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert second - first < 50_000, (first, second)


def test_live_individual_alpha_is_chunking_invariant():
    """Auto-calibration with individual_alpha: the peak, the new bands and the decisions are
    the same for any chunking (the new estimator takes over at the finishing sample)."""
    raw = simulate(
        50.0,
        250.0,
        ["Fz", "FCz", "Pz", "O1", "Oz", "O2"],
        11,
        alpha_hz=11.5,
        blinks_per_min=0.0,
        emg_per_min=0.0,
        bad_channel=False,
    )
    results = []
    for size in (7, 64):
        chain = FeatureChain(
            PreprocessSettings(),
            BandPowerSettings(individual_alpha=True),
            ArtifactSettings(),
            StateSettings(calibration_s=15.0),
            raw.ch_names,
            250.0,
        )
        states, changes = _run(chain, raw, size)
        assert chain.calibrated
        results.append((chain.individual_alpha_hz, chain.bands, changes, states[-1].score))
    (iaf, bands, changes, score), other = results
    assert iaf == pytest.approx(11.5, abs=0.5)
    assert bands["alpha"] == (iaf - 2.0, iaf + 3.0)
    assert other[:2] == (iaf, bands)
    assert [lab for _, lab in other[2]] == [lab for _, lab in changes]
    assert all(abs(a - b) <= 1.5 / 250 for (a, _), (b, _) in zip(changes, other[2], strict=True))
    assert other[3] == pytest.approx(score, rel=1e-9)


def test_relative_output():
    x, t, names = _synthetic(30, alpha_from=20.0)
    chain = FeatureChain(
        PreprocessSettings(),
        BandPowerSettings(output="relative"),
        ArtifactSettings(),
        StateSettings(
            features=[{"group": "posterior", "band": "alpha"}],
            calibration_s=10.0,
            warmup_s=1.0,
            enter=2.5,
            leave=1.0,
        ),
        names,
        250.0,
    )
    states = _feed(chain, x, t, names)
    powers = chain.latest_band_powers
    total = sum(v for k, v in powers.items() if k.endswith("@posterior"))
    assert total == pytest.approx(1.0)
    assert 0.0 < states[-1].features["alpha@posterior"] < 1.0
    assert states[-1].is_target  # alpha x4 raises its share well above the baseline


def test_welch_baseline_skips_samples_without_an_estimate(sim32):
    """With a short warm-up the Welch window still holds the start-up artifact when the baseline
    begins; those samples have no estimate (nan) and must not enter the median (they made the
    whole baseline nan, so the state never left NON_TARGET)."""
    raw = sim32.copy().crop(0, 30)
    state = StateSettings(calibration_s=10.0, warmup_s=1.0)
    chain = _chain(raw, bandpower=BandPowerSettings(method="welch"), state=state)
    chain.start_calibration()
    states, _ = _run(chain, raw, 10)
    assert chain.calibrated
    assert all(np.isfinite(m) and np.isfinite(d) for m, d in chain.baseline.values())
    assert np.isfinite(states[-1].score)

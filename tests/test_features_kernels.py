"""Compiled kernels (features/kernels.py) against their reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from features import kernels
from features.bandpower import to_output
from features.state import LabelMachine
from features.types import Label
from tests.reference_filters import run_label_machine

LABELS = tuple(Label)


def test_sos_kernel_equals_scipy_bit_for_bit():
    sos = signal.butter(2, [4, 8], "bandpass", fs=500.0, output="sos")
    x = np.random.default_rng(0).standard_normal((300, 5))
    zi = np.zeros((len(sos), 2, 5))
    got = x.copy()
    for i in range(0, 300, 7):  # any chunking
        blk = np.ascontiguousarray(got[i : i + 7])
        kernels.sos_inplace(sos, blk, zi)
        got[i : i + 7] = blk
    np.testing.assert_array_equal(got, signal.sosfilt(sos, x, axis=0))


@pytest.mark.parametrize(("dwell_n", "leave_dwell_n", "resume"), [(1, 1, True), (5, 3, False)])
def test_decide_runs_the_label_machine_rules(dwell_n, leave_dwell_n, resume):
    """kernels.decide steps the same machine as LabelMachine.run, sample for sample."""
    rng = np.random.default_rng(dwell_n)
    n, n_b, n_g = 4000, 3, 2
    # powers whose log score wanders across enter / leave, with artifact bursts and a nan
    power = 10.0 ** (rng.standard_normal((n, n_b, n_g)).cumsum(axis=0) * 0.05 - 11.0)
    art = np.zeros(n, dtype=bool)
    for s in rng.integers(0, n - 50, 12):
        art[s : s + rng.integers(1, 40)] = True
    t = 100.0 + np.arange(n) / 500.0
    bi, gi = np.array([0, 2], dtype=np.int64), np.array([0, 1], dtype=np.int64)
    median, scale, weights = np.array([-11.0, -11.0]), np.array([0.3, 0.4]), np.array([1.0, -0.5])
    enter, leave = 0.8, -0.2

    ref = LabelMachine(enter, leave, dwell_n, leave_dwell_n, resume)
    ref.set(Label.NON_TARGET, t[0])
    fs = to_output(power, "log")[:, bi, gi]
    score = ((fs - median) / scale) @ weights
    ref_changes = []
    st = np.array([3, 0, 0, 3, dwell_n, leave_dwell_n, resume], dtype=np.int64)
    fst = np.array([enter, leave, t[0]])
    got_changes = []
    tr_idx, tr_code = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    latest = np.zeros((n_b, n_g))
    lab, above = np.zeros(37, dtype=np.int64), np.zeros(37, dtype=np.int64)
    changed, sc, feat, z = np.zeros(37), np.zeros(37), np.zeros((37, 2)), np.zeros((37, 2))
    for i in range(0, n, 37):
        sl = slice(i, i + 37)
        ref.transitions.clear()
        run_label_machine(ref, score[sl], art[sl], t[sl])
        ref_changes += ref.transitions
        m = len(t[sl])
        n_tr, last = kernels.decide(
            np.ascontiguousarray(power[sl]), 0, 0, True, bi, gi, median, scale, weights,
            art[sl], t[sl], st, fst, tr_idx, tr_code, latest, lab, above, changed, sc, feat, z,
        )  # fmt: skip
        got_changes += [(t[sl][tr_idx[j]], LABELS[tr_code[j]]) for j in range(n_tr)]
        np.testing.assert_allclose(sc[:m], score[sl], rtol=1e-12)
        assert last == sc[m - 1]
        np.testing.assert_allclose(feat[:m], fs[sl], rtol=1e-14)
        np.testing.assert_allclose(z[:m], (fs[sl] - median) / scale, rtol=1e-14)
        np.testing.assert_allclose(latest, to_output(power[sl][m - 1], "log"), rtol=1e-14)
        assert LABELS[lab[m - 1]] is ref.label
        assert above[m - 1] == ref.above_n
        assert changed[m - 1] == ref.t_changed
        assert LABELS[st[0]] is ref.label
        assert (st[1], st[2]) == (ref.above_n, ref.below_n)
        assert fst[2] == ref.t_changed
    assert len(ref_changes) > 20  # the sequence exercises the machine
    assert {lab for _, lab in ref_changes} >= {Label.TARGET, Label.NON_TARGET, Label.ARTIFACT}
    assert got_changes == ref_changes


def test_decide_relative_output_and_nan_power():
    power = np.array([[[1.0], [3.0]], [[np.nan], [2.0]]])  # (2 samples, 2 bands, 1 group)
    i1 = np.zeros(1, dtype=np.int64)
    i2, f2, f21 = np.zeros(2, dtype=np.int64), np.zeros(2), np.zeros((2, 1))
    latest = np.zeros((2, 1))
    st = np.array([3, 0, 0, 3, 1, 1, 1], dtype=np.int64)
    args = (i1, i1, np.zeros(1), np.ones(1), np.ones(1), np.zeros(2, dtype=bool), np.zeros(2))
    out = (i2, i2, f2, f2, f21, f21)
    kernels.decide(power[:1], 0, 2, False, *args, st, np.zeros(3), i2, i2, latest, *out)
    np.testing.assert_allclose(latest[:, 0], [0.25, 0.75])
    kernels.decide(power, 0, 2, True, *args, st, np.zeros(3), i2, i2, latest, *out)
    np.testing.assert_array_equal(latest, to_output(power[-1], "log"))  # nan stays nan


def test_no_compilation_while_a_session_runs():
    """After the chain's constructor (kernels.warm_up), chunks from a file (read-only views),
    a non-finite sample and artifacts run without compiling anything new."""
    import mne

    from acquisition.file_source import FileSource
    from benchmarks.synth import alternating_blocks, bench_config, synth
    from features.chain import FeatureChain

    sfreq = 250.0
    names, data = synth(8, sfreq, 30.0, alternating_blocks(14.0, 6, 1.0, 1.5), seed=2)
    data[4000:4003, 1] = np.nan  # non-finite input
    data[5000:5100, 0] += 400e-6  # an amplitude artifact
    info = mne.create_info(list(names), sfreq, "eeg")
    src = FileSource(mne.io.RawArray(data.T, info, verbose="error"), chunk_size=10)
    cfg = bench_config()
    chain = FeatureChain(cfg.preprocess, cfg.bandpower, cfg.artifacts, cfg.state, names, sfreq)
    compiled = [kernels.preprocess, kernels.artifacts, kernels.iir_bandpower, kernels.decide]
    before = [len(k.signatures) for k in compiled]
    labels = {chain.step(chunk).label for chunk in src}
    assert chain.calibrated
    assert {Label.TARGET, Label.ARTIFACT} <= labels
    assert [len(k.signatures) for k in compiled] == before

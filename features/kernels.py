"""Compiled per-chunk kernels of the feature chain (numba), one call per stage.

Why compiled: a 10-sample chunk of 64 channels is a few thousand multiply-adds, but as numpy it
was ~60 small array calls (1-5 µs each back to back). Fed in real time (a chunk every 10 ms) every
one of those calls starts cold on this VM: the first numpy call after a 10 ms sleep takes ~45 µs
instead of 2 µs, and the chain step took ~0.8 ms instead of 0.19 ms. A compiled kernel per stage
touches a few KB of code and data instead (measured: docs in benchmarks/README.md, "Hot-path
work").

Arithmetic: every IIR section is the transposed direct form II of scipy's `sosfilt` kernel, in the
same order (the outputs equal `sosfilt`'s bit for bit); sums over channels run in channel order.
Data are sample-major (n_samples, n_channels) float64; filter states are (n_sections, 2,
n_channels) so the inner loop runs over channels. `cache=True` keeps the machine code next to
this file: the first import on a machine compiles (~10 s), later ones load it (~0.1 s).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_OPTS = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}


@njit(**_OPTS)
def sos_inplace(sos, x, zi):  # pragma: no cover - compiled
    """Filter x (n, c) in place through sos (n_sections, 6) with state zi (n_sections, 2, c)."""
    n, c = x.shape
    for t in range(n):
        for s in range(sos.shape[0]):
            b0, b1, b2, a1, a2 = sos[s, 0], sos[s, 1], sos[s, 2], sos[s, 4], sos[s, 5]
            for j in range(c):
                xi = x[t, j]
                y = b0 * xi + zi[s, 0, j]
                zi[s, 0, j] = b1 * xi - a1 * y + zi[s, 1, j]
                zi[s, 1, j] = b2 * xi - a2 * y
                x[t, j] = y


@njit(**_OPTS)
def preprocess(raw, sos, zi, ref_idx, last, filt, ref):  # pragma: no cover - compiled
    """raw (n, c) -> filt (n, c) notched + high-passed, ref (n, c) re-referenced.

    ref_idx: channels whose mean is subtracted (empty: no re-reference). last (c,) gets the last
    row of raw. Returns False, touching nothing, when raw holds a non-finite value.
    """
    n, c = raw.shape
    for t in range(n):
        for j in range(c):
            v = raw[t, j]
            if not np.isfinite(v):
                return False
    for j in range(c):
        last[j] = raw[n - 1, j]
    n_ref = ref_idx.shape[0]
    for t in range(n):
        for j in range(c):
            filt[t, j] = raw[t, j]
        for s in range(sos.shape[0]):
            b0, b1, b2, a1, a2 = sos[s, 0], sos[s, 1], sos[s, 2], sos[s, 4], sos[s, 5]
            for j in range(c):
                xi = filt[t, j]
                y = b0 * xi + zi[s, 0, j]
                zi[s, 0, j] = b1 * xi - a1 * y + zi[s, 1, j]
                zi[s, 1, j] = b2 * xi - a2 * y
                filt[t, j] = y
        mean = 0.0
        if n_ref > 0:
            for i in range(n_ref):
                mean += filt[t, ref_idx[i]]
            mean /= n_ref
        for j in range(c):
            ref[t, j] = filt[t, j] - mean
    return True


@njit(**_OPTS)
def artifacts(  # pragma: no cover - compiled
    raw,
    filt,
    ref,
    nonfinite,
    thr,
    amp_sos,
    amp_zi,
    mus_sos,
    mus_zi,
    ema_a,
    ema_zi,
    count,
    last_bad,
    last_bad_any,
    holdoff_n,
    ratio_out,
    active,
    grid,
    bad_at,
    hold_mask,
    hold_amp,
    last_bad_hold,
    held,
    held_holdoff_n,
):
    """All artifact checks of one block, per sample and channel, in one pass.

    raw, filt, ref (n, c); nonfinite (n, c) bool or (0, 0) when all finite. thr (5, c) per
    channel: nonfinite (any number: on), rail (>=), amplitude (>), flat mean square (<), muscle
    ratio (>); nan turns that check off for that channel (flat and muscle then also skip their
    smoothing). amp_sos (m, 6), amp_zi (m, 2, c): the low-pass the amplitude check looks
    through (m = 0: none). mus_sos (2, n_sections, 6) muscle band and broadband;
    mus_zi (2, n_sections, 2, c); ema_a (3,) smoothing constants (muscle band, broadband, flat);
    ema_zi (3, 2, c). last_bad (5, c) running index of the last offending sample per (kind,
    channel), updated. active (n,) gets the hold-off flag per sample; ratio_out (c,) the latest
    muscle ratio. grid (k,) ascending sample indices: bad_at (k, 5, c) gets a copy of last_bad
    after each of them (the flags a chunk ending there would report). hold_mask (c,) bool:
    channels whose every offence also holds the band powers; the others hold them only when
    non-finite, railing, or above hold_amp (c,) V (an amplitude that reaches the score's
    channels through the reference); held (n,) gets that flag per sample, with its own
    hold-off held_holdoff_n (samples, at most holdoff_n). Returns (any
    sample offended, new last_bad_any, new last_bad_hold).
    """
    n, c = raw.shape
    has_nf = nonfinite.shape[0] > 0
    any_now = False
    ns = mus_sos.shape[1]
    na = amp_sos.shape[0]
    g = 0
    for t in range(n):
        idx = count + t
        bad_t = False
        hold_t = False
        for j in range(c):
            rail, amp, flat, mus = thr[1, j], thr[2, j], thr[3, j], thr[4, j]
            nf = has_nf and nonfinite[t, j] and not np.isnan(thr[0, j])
            if nf:
                last_bad[0, j] = idx
                bad_t = True
                hold_t = True
            if not np.isnan(rail) and not nf and abs(raw[t, j]) >= rail:
                last_bad[1, j] = idx
                bad_t = True
                hold_t = True
            r = ref[t, j]
            if not np.isnan(amp):
                xi = r
                for s in range(na):
                    b0, b1, b2 = amp_sos[s, 0], amp_sos[s, 1], amp_sos[s, 2]
                    a1, a2 = amp_sos[s, 4], amp_sos[s, 5]
                    y = b0 * xi + amp_zi[s, 0, j]
                    amp_zi[s, 0, j] = b1 * xi - a1 * y + amp_zi[s, 1, j]
                    amp_zi[s, 1, j] = b2 * xi - a2 * y
                    xi = y
                if abs(xi) > amp:
                    last_bad[2, j] = idx
                    bad_t = True
                    if hold_mask[j] or abs(xi) > hold_amp[j]:
                        hold_t = True
            if not np.isnan(flat):
                a = ema_a[2]
                xi = filt[t, j] * filt[t, j]
                y = a * xi + ema_zi[2, 0, j]
                ema_zi[2, 0, j] = 0.0 * xi - (a - 1.0) * y + ema_zi[2, 1, j]
                ema_zi[2, 1, j] = 0.0 * xi - 0.0 * y
                if y < flat:
                    last_bad[3, j] = idx
                    bad_t = True
                    if hold_mask[j]:
                        hold_t = True
            if not np.isnan(mus):
                p0 = 0.0
                p1 = 0.0
                for f in range(2):
                    xi = r
                    for s in range(ns):
                        b0, b1, b2 = mus_sos[f, s, 0], mus_sos[f, s, 1], mus_sos[f, s, 2]
                        a1, a2 = mus_sos[f, s, 4], mus_sos[f, s, 5]
                        y = b0 * xi + mus_zi[f, s, 0, j]
                        mus_zi[f, s, 0, j] = b1 * xi - a1 * y + mus_zi[f, s, 1, j]
                        mus_zi[f, s, 1, j] = b2 * xi - a2 * y
                        xi = y
                    a = ema_a[f]
                    sq = xi * xi
                    y = a * sq + ema_zi[f, 0, j]
                    ema_zi[f, 0, j] = 0.0 * sq - (a - 1.0) * y + ema_zi[f, 1, j]
                    ema_zi[f, 1, j] = 0.0 * sq - 0.0 * y
                    if f == 0:
                        p0 = y
                    else:
                        p1 = y
                ratio = p0 / (1e-30 if p1 < 1e-30 else p1)  # np.maximum: nan kept
                if t == n - 1:
                    ratio_out[j] = ratio
                if ratio > mus:
                    last_bad[4, j] = idx
                    bad_t = True
                    if hold_mask[j]:
                        hold_t = True
        if bad_t:
            any_now = True
            last_bad_any = idx
        if hold_t:
            last_bad_hold = idx
        active[t] = idx - last_bad_any <= holdoff_n
        held[t] = idx - last_bad_hold <= held_holdoff_n
        if g < grid.shape[0] and grid[g] == t:
            for k in range(5):
                for j in range(c):
                    bad_at[g, k, j] = last_bad[k, j]
            g += 1
    return any_now, last_bad_any, last_bad_hold


@njit(**_OPTS)
def iir_bandpower(x, cols, sos, zi, a, ema_zi, hold, gm, power):  # pragma: no cover - compiled
    """Band power per sample: band-pass, square, exponential smoothing, group mean.

    x (n, c_all) with the estimator's channels at cols (u,); sos (n_bands, n_sections, 6), zi
    (n_bands, n_sections, 2, u); a: smoothing constant; ema_zi (n_bands, 2, u); hold (n,) bool
    or (0,): held samples keep the smoothed value and state; gm (u, n_groups) group weights;
    power (n, n_bands, n_groups) is written (V²).
    """
    n = x.shape[0]
    n_b, ns = sos.shape[0], sos.shape[1]
    u = cols.shape[0]
    n_g = gm.shape[1]
    has_hold = hold.shape[0] > 0
    p = np.empty(u)
    for t in range(n):
        held = has_hold and hold[t]
        for b in range(n_b):
            for i in range(u):
                xi = x[t, cols[i]]
                for s in range(ns):
                    b0, b1, b2 = sos[b, s, 0], sos[b, s, 1], sos[b, s, 2]
                    a1, a2 = sos[b, s, 4], sos[b, s, 5]
                    y = b0 * xi + zi[b, s, 0, i]
                    zi[b, s, 0, i] = b1 * xi - a1 * y + zi[b, s, 1, i]
                    zi[b, s, 1, i] = b2 * xi - a2 * y
                    xi = y
                if held:
                    p[i] = ema_zi[b, 0, i] / (1.0 - a)
                else:
                    sq = xi * xi
                    y = a * sq + ema_zi[b, 0, i]
                    ema_zi[b, 0, i] = 0.0 * sq - (a - 1.0) * y + ema_zi[b, 1, i]
                    ema_zi[b, 1, i] = 0.0 * sq - 0.0 * y
                    p[i] = y
            for g in range(n_g):
                acc = 0.0
                for i in range(u):
                    acc += p[i] * gm[i, g]
                power[t, b, g] = acc


POWER_FLOOR_V2 = 1e-30  # = features.bandpower.POWER_FLOOR_V2


@njit(**_OPTS)
def _floor(p):  # pragma: no cover - compiled
    """np.maximum(p, POWER_FLOOR_V2), nan kept."""
    return POWER_FLOOR_V2 if p < POWER_FLOOR_V2 else p


# Label codes of `decide` (the order of features.types.Label)
UNCALIBRATED, CALIBRATING, ARTIFACT, NON_TARGET, TARGET = 0, 1, 2, 3, 4


@njit(**_OPTS)
def decide(  # pragma: no cover - compiled
    power,
    start,
    machine_from,
    log_out,
    bi,
    gi,
    median,
    scale,
    weights,
    art,
    t,
    st,
    fst,
    tr_idx,
    tr_code,
    latest,
    lab_out,
    above_out,
    tchg_out,
    score_out,
    feat_out,
    z_out,
):
    """Features, robust z, score and the label machine for samples start.. of one block.

    power (n, n_bands, n_groups) V²; log_out: log10 power, else relative power; bi, gi (n_f,)
    band and group of each score feature; median, scale, weights (n_f,). The label machine
    (`features.state.LabelMachine.run`, the same rules) steps over samples machine_from.. (>=
    start) with art (n,) bool and t (n,) stream s; its state st = [label, above_n, below_n,
    before_artifact, dwell_n, leave_dwell_n, resume] (int64, updated), fst = [enter, leave,
    t_changed] (updated). Label changes go to tr_idx / tr_code (n,). Per sample i >= start:
    lab_out, above_out (n,) int64 label code and samples above enter, tchg_out (n,) stream time
    of the last label change, score_out (n,), feat_out and z_out (n, n_f). latest
    (n_bands, n_groups) gets the last sample's band powers. Returns (number of label changes,
    the last sample's score).
    """
    n, n_b, n_g = power.shape
    n_f = bi.shape[0]
    label, above, below, before = st[0], st[1], st[2], st[3]
    dwell_n, leave_dwell_n, resume = st[4], st[5], st[6]
    enter, leave = fst[0], fst[1]
    n_tr = 0
    score = np.nan
    for i in range(start, n):
        score = 0.0
        for f in range(n_f):
            b, g = bi[f], gi[f]
            p = power[i, b, g]
            if log_out:
                v = np.log10(_floor(p))
            else:
                tot = 0.0
                for bb in range(n_b):
                    tot += power[i, bb, g]
                v = p / _floor(tot)
            z = (v - median[f]) / scale[f]
            score += z * weights[f]
            feat_out[i, f] = v
            z_out[i, f] = z
        score_out[i] = score
        if i >= machine_from:
            prev = label
            if art[i]:
                above = 0
                below = 0
                if label != ARTIFACT:
                    before = label
                    label = ARTIFACT
            elif label == ARTIFACT:
                label = TARGET if resume and before == TARGET and score >= leave else NON_TARGET
            elif label == NON_TARGET:
                if score > enter:
                    above += 1
                    if above >= dwell_n:
                        label = TARGET
                        above = 0
                        below = 0
                else:
                    above = 0
            elif score < leave:
                below += 1
                if below >= leave_dwell_n:
                    label = NON_TARGET
                    above = 0
                    below = 0
            else:
                below = 0
            if label != prev:
                fst[2] = t[i]
                tr_idx[n_tr] = i
                tr_code[n_tr] = label
                n_tr += 1
        lab_out[i] = label
        above_out[i] = above
        tchg_out[i] = fst[2]
    for b in range(n_b):
        for g in range(n_g):
            p = power[n - 1, b, g]
            if log_out:
                latest[b, g] = np.log10(_floor(p))
            else:
                tot = 0.0
                for bb in range(n_b):
                    tot += power[n - 1, bb, g]
                latest[b, g] = p / _floor(tot)
    st[0], st[1], st[2], st[3] = label, above, below, before
    return n_tr, score


_warm: list[bool] = []  # [True] once warm_up ran in this process


def warm_up() -> None:
    """Compile (first run on a machine) or load every kernel for the argument types the chain
    passes, read-only raw data included (FileSource chunks are read-only views), so that no
    chunk ever waits for the compiler. Once per process; the FeatureChain constructor calls it.
    """
    if _warm:
        return
    n, c = 3, 2
    f64 = np.zeros((n, c))
    ro = np.zeros((n, c))
    ro.flags.writeable = False
    sos = np.array([[1.0, 0.0, 0.0, 1.0, -0.5, 0.0]])
    for raw in (f64, ro):
        preprocess(
            raw,
            sos,
            np.zeros((1, 2, c)),
            np.arange(c, dtype=np.int64),
            np.zeros(c),
            np.empty((n, c)),
            np.empty((n, c)),
        )
        for mask in (np.zeros((0, 0), dtype=bool), np.zeros((n, c), dtype=bool)):
            artifacts(
                raw,
                f64,
                f64,
                mask,
                np.full((5, c), np.nan),
                sos,
                np.zeros((1, 2, c)),
                np.stack([sos, sos]),
                np.zeros((2, 1, 2, c)),
                np.full(3, 0.5),
                np.zeros((3, 2, c)),
                0,
                np.zeros((5, c), dtype=np.int64),
                -1,
                1,
                np.zeros(c),
                np.empty(n, dtype=bool),
                np.array([n - 1], dtype=np.int64),
                np.zeros((1, 5, c), dtype=np.int64),
                np.ones(c, dtype=bool),
                np.full(c, np.inf),
                -1,
                np.empty(n, dtype=bool),
                1,
            )
    for hold in (np.zeros(0, dtype=bool), np.zeros(n, dtype=bool)):
        iir_bandpower(
            f64,
            np.arange(c, dtype=np.int64),
            sos[None],
            np.zeros((1, 1, 2, c)),
            0.5,
            np.zeros((1, 2, c)),
            hold,
            np.ones((c, 1)),
            np.empty((n, 1, 1)),
        )
    sos_inplace(sos, f64.copy(), np.zeros((1, 2, c)))
    i1, f1 = np.zeros(1, dtype=np.int64), np.zeros(1)
    t_ro = np.zeros(n)
    t_ro.flags.writeable = False  # FileSource timestamps are read-only views
    for t in (np.zeros(n), t_ro):
        decide(
            np.ones((n, 1, 1)),
            0,
            0,
            True,
            i1,
            i1,
            f1,
            f1 + 1,
            f1,
            np.zeros(n, dtype=bool),
            t,
            np.array([3, 0, 0, 3, 1, 1, 1]),
            np.zeros(3),
            np.zeros(n, dtype=np.int64),
            np.zeros(n, dtype=np.int64),
            np.zeros((1, 1)),
            np.zeros(n, dtype=np.int64),
            np.zeros(n, dtype=np.int64),
            np.zeros(n),
            np.zeros(n),
            np.zeros((n, 1)),
            np.zeros((n, 1)),
        )
    _warm.append(True)

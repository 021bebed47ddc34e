"""Reference implementations the compiled hot-path kernels are tested against (tests only).

`StatefulSos` / `StatefulEma`: scipy's sosfilt with state kept between blocks, the plain way;
`features.kernels` must give the same numbers (tests/test_features_preprocess.py,
tests/test_features_kernels.py). `run_label_machine`: the hysteresis state machine stepped
sample by sample in Python, the reference for `kernels.decide`.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

from features.state import LabelMachine
from features.types import Label


def _public_sosfilt(sos: np.ndarray, x: np.ndarray, zi: np.ndarray) -> None:
    """In-place sosfilt of x (n_signals, n_samples) with zi (n_signals, n_sections, 2)."""
    y, zo = signal.sosfilt(sos, x, axis=-1, zi=np.moveaxis(zi, 0, 1))
    x[...] = y
    zi[...] = np.moveaxis(zo, 1, 0)


try:  # scipy's compiled kernel behind `sosfilt`, called directly: 10 µs instead of 91 µs for
    # a (10 samples x 64 channels) block (timeit, this machine), most of sosfilt's cost is
    # argument checking and axis moves. Private API: checked against the public one at import.
    from scipy.signal._sosfilt import _sosfilt as _kernel

    def _check_kernel() -> bool:
        sos = signal.butter(2, [8, 13], "bandpass", fs=250.0, output="sos")
        x = np.random.default_rng(0).standard_normal((3, 50))
        zi = np.random.default_rng(1).standard_normal((3, len(sos), 2))
        a, za = x.copy(), zi.copy()
        b, zb = x.copy(), zi.copy()
        _kernel(sos, a, za)
        _public_sosfilt(sos, b, zb)
        return bool(np.allclose(a, b) and np.allclose(za, zb))

    _sosfilt_inplace = _kernel if _check_kernel() else _public_sosfilt
except Exception:  # pragma: no cover - other scipy layouts
    _sosfilt_inplace = _public_sosfilt


class StatefulSos:
    """`sosfilt` over (n_samples, n_channels) blocks with the filter state kept between calls.

    init='first': the state starts as the steady state for a constant input equal to the first
    sample (`sosfilt_zi * x0`), so a DC offset (OpenBCI channels sit at tens of mV) causes no
    transient; chunked output equals one `sosfilt(sos, x, axis=0, zi=sosfilt_zi(sos)[..., None] *
    x[0])`. init='zero': zero state. `init_value` (n_channels,) overrides the 'first' value.
    """

    def __init__(self, sos: np.ndarray, n_channels: int, *, init: str = "first") -> None:
        self.sos = np.ascontiguousarray(sos, dtype=np.float64)
        self.n_channels = n_channels
        self._init = init
        self._zi0 = signal.sosfilt_zi(self.sos) if len(self.sos) else np.zeros((0, 2))
        # state in the kernel's layout (n_channels, n_sections, 2)
        self._zi = np.zeros((n_channels, len(self.sos), 2))
        self._fresh = True

    def reset(self) -> None:
        self._zi[...] = 0.0
        self._fresh = True

    def filter_t(self, xt: np.ndarray) -> np.ndarray:
        """Filter xt (n_channels, n_samples), C-contiguous float64, in place; returns it."""
        if self._fresh:
            if self._init == "first":
                self._zi[...] = xt[:, 0, None, None] * self._zi0[None, :, :]
            self._fresh = False
        if len(self.sos):
            _sosfilt_inplace(self.sos, xt, self._zi)
        return xt

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (n_samples, n_channels) -> filtered (n_samples, n_channels) (a transposed view)."""
        return self.filter_t(np.array(x.T, dtype=np.float64, order="C")).T


class StatefulEma:
    """Exponential moving average per column, y[t] = y[t-1] + a (x[t] - y[t-1]), state kept.

    a = 1 - exp(-1 / (tau_s * sfreq)); `init` is the state before the first sample. Runs as a
    first-order section through the same kernel as the filters.
    """

    def __init__(self, tau_s: float, sfreq: float, n_columns: int, init: float = 0.0) -> None:
        a = 1.0 - np.exp(-1.0 / (tau_s * sfreq))
        self._a = a
        self._filt = StatefulSos(
            np.array([[a, 0.0, 0.0, 1.0, a - 1.0, 0.0]]), n_columns, init="zero"
        )
        self._n = n_columns
        self._init = init
        self.reset()

    def reset(self) -> None:
        self._filt.reset()
        # direct form II transposed: z[0] = (1 - a) * y[-1]
        self._filt._zi[:, 0, 0] = (1.0 - self._a) * self._init

    @property
    def value(self) -> np.ndarray:
        """Latest output (n_columns,)."""
        return self._filt._zi[:, 0, 0] / (1.0 - self._a)

    def smooth_t(self, xt: np.ndarray, hold: np.ndarray | None = None) -> np.ndarray:
        """Smooth xt (n_columns, n_samples), C-contiguous float64, in place; returns it.

        Where hold (n_samples,) is True the input is ignored: the output keeps its last value
        and the state does not move.
        """
        if hold is None or not hold.any():
            return self._filt.filter_t(xt)
        edges = np.flatnonzero(hold[1:] != hold[:-1]) + 1
        start = 0
        for stop in [*edges.tolist(), len(hold)]:
            if hold[start]:
                xt[:, start:stop] = self.value[:, None]
            else:
                seg = np.ascontiguousarray(xt[:, start:stop])
                xt[:, start:stop] = self._filt.filter_t(seg)
            start = stop
        return xt

    def __call__(self, x: np.ndarray, hold: np.ndarray | None = None) -> np.ndarray:
        """x (n_samples, n_columns) -> smoothed (n_samples, n_columns); see smooth_t."""
        return self.smooth_t(np.array(x.T, dtype=np.float64, order="C"), hold).T


def run_label_machine(
    m: LabelMachine, score: np.ndarray, artifact: np.ndarray, t: np.ndarray
) -> None:
    """Step `m` through one block, sample by sample: score, artifact (bool), t (stream s), all
    (n_samples,); transitions are appended to `m.transitions`."""
    enter, leave = m.enter, m.leave
    label = m.label
    above, below = m.above_n, m.below_n
    tr = m.transitions
    resume = m.resume
    target, non_target, art_label = Label.TARGET, Label.NON_TARGET, Label.ARTIFACT
    for s, a, ti in zip(score.tolist(), artifact.tolist(), t.tolist(), strict=True):
        if a:
            above = below = 0
            if label is not art_label:
                m.before_artifact = label
                label = art_label
                m.t_changed = ti
                tr.append((ti, label))
            continue
        if label is art_label:
            label = target if resume and m.before_artifact is target and s >= leave else non_target
            m.t_changed = ti
            tr.append((ti, label))
            continue
        if label is non_target:
            if s > enter:
                above += 1
                if above >= m.dwell_n:
                    label = target
                    above = below = 0
                    m.t_changed = ti
                    tr.append((ti, label))
            else:
                above = 0
        elif s < leave:
            below += 1
            if below >= m.leave_dwell_n:
                label = non_target
                above = below = 0
                m.t_changed = ti
                tr.append((ti, label))
        else:
            below = 0
    m.label = label
    m.above_n, m.below_n = above, below

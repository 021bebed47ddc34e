"""Phase mode in the console: the target phase, the rhythm's SNR, and a polar histogram (rose)
of the phases the pulses landed at, by the acausal reference computed on the data around each
pulse as it comes (closedloop.phase_monitor, via `SessionSnapshot.phase_errors_deg`).

Same contract as gui/panels.py: `build()` once (plot items created there), `update(tick)` on
each console tick; the rose is redrawn on slow ticks only, when a pulse was added.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6 import QtWidgets

from closedloop.config import SessionConfig
from features.phase import phase_error_stats

N_BINS = 12  # 30 deg sectors, the +-30 deg accuracy step of the benchmark table
ARC_POINTS = 8  # points per sector arc
ROSE_PX = 150  # the rose's height (px)


def rose_xy(phases_deg: np.ndarray, n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray]:
    """The outline (x, y) of a polar histogram of phases (deg): one closed wedge per sector,
    radius = share of the pulses in it; 0 deg (the peak) points right, 90 up."""
    edges = np.linspace(-180.0, 180.0, n_bins + 1)
    ph = np.asarray(phases_deg, dtype=float)
    ph = ph[np.isfinite(ph)]
    wrapped = (ph + 180.0) % 360.0 - 180.0
    counts, _ = np.histogram(wrapped, edges)
    share = counts / max(1, ph.size)
    xs, ys = [], []
    for r, a, b in zip(share, edges[:-1], edges[1:], strict=True):
        if r <= 0:
            continue
        ang = np.radians(np.linspace(a, b, ARC_POINTS))
        xs += [0.0, *(r * np.cos(ang)), 0.0, np.nan]
        ys += [0.0, *(r * np.sin(ang)), 0.0, np.nan]
    return np.asarray(xs), np.asarray(ys)


class PhasePanel:
    """Target, estimator, SNR, the rose of fired phases (reference) and their accuracy."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self._n_drawn = -1

    def build(self) -> QtWidgets.QGroupBox:
        box = QtWidgets.QGroupBox("phase-locked pulses")
        # text left, rose right: the panel shares the column with the score plots, so it stays
        # ROSE_PX tall (stacked, it squeezed them to ~30 px in a 1600 x 1000 window)
        lay = QtWidgets.QHBoxLayout(box)
        self.label = QtWidgets.QLabel("phase mode: waiting for the session")
        self.label.setMinimumWidth(230)
        lay.addWidget(self.label, 1)
        self.plot = pg.PlotWidget(title="fired phases")
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.setAspectLocked(True)
        self.plot.hideAxis("left")
        self.plot.hideAxis("bottom")
        self.plot.setRange(xRange=(-1.05, 1.05), yRange=(-1.05, 1.05), padding=0.0)
        ang = np.linspace(0.0, 2 * math.pi, 97)
        for r in (0.25, 0.5, 1.0):  # share-of-pulses rings
            self.plot.plot(r * np.cos(ang), r * np.sin(ang), pen=pg.mkPen("#bdbdbd"))
        self.rose = self.plot.plot(
            [], [], pen=pg.mkPen("#1a237e", width=2), connect="finite",
            fillLevel=None,
        )  # fmt: skip
        t = math.radians(self.config.phase.target_deg)
        self.target_line = self.plot.plot(
            [0.0, math.cos(t)], [0.0, math.sin(t)], pen=pg.mkPen("#c62828", width=3)
        )
        self.plot.setFixedSize(ROSE_PX + 20, ROSE_PX)
        lay.addWidget(self.plot)
        # no stretch: the room left goes to the score plots above
        box.setSizePolicy(
            QtWidgets.QSizePolicy.Policy.Preferred, QtWidgets.QSizePolicy.Policy.Maximum
        )
        return box

    def new_session(self) -> None:
        self._n_drawn = -1

    def update(self, tick) -> None:
        snap = tick.snapshot
        if not snap.phase_estimator:
            return
        target = snap.phase_target_deg if snap.phase_target_deg is not None else math.nan
        snr = snap.phase_snr_db
        errors = np.asarray(snap.phase_errors_deg, dtype=float)
        fired = target + errors
        ok = errors[np.isfinite(errors)]
        acc = ""
        if ok.size:
            st = phase_error_stats(np.radians(ok))
            acc = (
                f"\n{st['n']} pulses against the reference:\nbias {st['bias_deg']:+.0f}°, "
                f"circular SD {st['circ_sd_deg']:.0f}°\nPLV {st['plv']:.2f}, "
                f"within ±45° {100 * st['within_45']:.0f}%\n(rose: red = target, 0° = peak)"
            )
        snr_text = f"{snr:.1f} dB" if snr is not None else "—"
        self.label.setText(f"target {target:.0f}° ({snap.phase_estimator})\nSNR {snr_text}{acc}")
        if tick.slow and len(errors) != self._n_drawn:
            self._n_drawn = len(errors)
            x, y = rose_xy(fired)
            self.rose.setData(x, y, connect="finite")
            t = math.radians(target)
            self.target_line.setData([0.0, math.cos(t)], [0.0, math.sin(t)])

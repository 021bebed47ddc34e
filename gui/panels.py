"""The operator console's panels: each builds its widgets once and updates them from a `Tick`.

A panel is a small class: the constructor takes what it needs (the config, callbacks for its
buttons), `build()` makes its widgets (once; plot items too), `update(tick)` refreshes them from
the values of one console tick. Panels never call the session: a button calls the callback the
window gave it, and the window routes the command (gui/window.py). Updates that cost more than a
label (text tables, histograms) run on `tick.slow` ticks only; the history plots on
`tick.history` ticks (STYLE 10: curves created once, `setData` on a QTimer).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtWidgets

from closedloop.config import SessionConfig
from closedloop.session import SessionSnapshot
from features.types import Label
from gui.model import ConsoleModel, effective_rate
from gui.scope import LABELS, Scope

HISTORY_POINTS = 1500  # decisions drawn per history curve (decimated)
HISTORY_S = 60.0  # score / band power / raster window (stream s)
TRACE_SECONDS_DEFAULT = 10.0
TRACE_BINS = 500  # min/max pairs per channel (1000 points ~ the plot's pixel width)
DEFAULT_SCALE_UV = 100.0  # µV per lane (EEG is 10-50 µV: neighbours barely overlap)
MAX_CHANNELS_SHOWN_DEFAULT = 64
STREAM_REFRESH_S = 5.0  # re-list LSL streams this often while no session runs
STREAM_LIST_TIMEOUT_S = 1.0
THRESHOLD_BOUNDS_Z = (-10.0, 10.0)  # drag range of the threshold lines (score is a z sum)
LATENCY_BINS_MS = np.linspace(0.0, 5.0, 26)
ALARM = "#b71c1c"
GOOD = "#1b5e20"

LABEL_COLOURS = {
    Label.UNCALIBRATED: "#757575",
    Label.CALIBRATING: "#f9a825",
    Label.ARTIFACT: "#ef6c00",
    Label.NON_TARGET: "#37474f",
    Label.TARGET: "#2e7d32",
}
INTERLOCK_STYLE = {  # text, background
    "disarmed": ("DISARMED", "#455a64"),
    "armed": ("ARMED", "#c62828"),
    "refractory": ("ARMED · refractory", "#e65100"),
    "estop": ("EMERGENCY STOP · stimulation ended", "#000000"),
}
AUDIO_STYLE = {  # participant audio device state -> (text, colour)
    "open": ("open", GOOD),
    "reopened": ("reopened", GOOD),
    "lost": ("LOST (the session goes on; reopens when the output returns)", ALARM),
    "wav": ("no device: rendered to WAV", "#616161"),
}


@dataclass(slots=True)
class Tick:
    """What one console tick shows: the session's snapshot, the event model, the scope.

    runner: the running session's Runner (None before the first); running: it runs now.
    now: local clock (s). slow / history: this tick also redraws text and histograms / the
    history plots. t0: stream time shown as 0 on the history plots (None before a decision).
    """

    snapshot: SessionSnapshot
    model: ConsoleModel
    runner: Any
    scope: Scope | None
    now: float
    running: bool
    slow: bool
    history: bool
    t0: float | None


def _fixed_plot(plot: pg.PlotWidget) -> pg.PlotWidget:
    """No context menu, no auto-range button, no mouse pan / zoom (the console drives ranges)."""
    plot.setMenuEnabled(False)
    plot.hideButtons()
    plot.setMouseEnabled(x=False, y=False)
    return plot


class LaneCurve(pg.PlotCurveItem):
    """A trace curve whose bounds come with its data (from one vectorised min/max per frame).

    PlotCurveItem recomputes nanmin/nanmax bounds on every boundingRect() call (4x per frame and
    curve): measured 28% of the frame time with 64 curves.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._bounds = QtCore.QRectF()

    def set_lane(self, x: np.ndarray, y: np.ndarray, y_lo: float, y_hi: float) -> None:
        self._bounds = QtCore.QRectF(float(x[0]), y_lo, float(x[-1] - x[0]), y_hi - y_lo)
        self.setData(x, y, skipFiniteCheck=True)  # calls prepareGeometryChange()

    def boundingRect(self) -> QtCore.QRectF:  # noqa: N802 (Qt override)
        return self._bounds

    def dataBounds(self, ax: int, frac: float = 1.0, orthoRange=None):  # noqa: N802
        r = self._bounds
        return (r.left(), r.right()) if ax == 0 else (r.top(), r.bottom())


# ============================================================================ stream picker
class StreamPanel:
    """Stream picker (listed in a worker thread), start / end buttons, connection line."""

    def __init__(
        self,
        config: SessionConfig,
        lister: Callable[[float], list] | None,
        on_start: Callable[[], None],
        on_stop: Callable[[], None],
        message: Callable[..., None],
        on_report: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.lister = lister
        self.on_start, self.on_stop, self.message = on_start, on_stop, message
        self.on_report = on_report
        self.streams: list = []
        self._result: list | None = None
        self._error = ""
        self._thread: threading.Thread | None = None
        self._next_refresh = 0.0

    def build(self) -> QtWidgets.QHBoxLayout:
        row = QtWidgets.QHBoxLayout()
        row.addWidget(QtWidgets.QLabel("Stream:"))
        self.stream_combo = QtWidgets.QComboBox()
        self.stream_combo.setMinimumWidth(420)
        self.stream_combo.addItem(config_source_label(self.config.source), None)
        row.addWidget(self.stream_combo)
        self.refresh_button = QtWidgets.QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        row.addWidget(self.refresh_button)
        self.start_button = QtWidgets.QPushButton("Connect && start session")
        self.start_button.clicked.connect(self.on_start)
        row.addWidget(self.start_button)
        self.stop_button = QtWidgets.QPushButton("End session")
        self.stop_button.clicked.connect(self.on_stop)
        self.stop_button.setEnabled(False)
        row.addWidget(self.stop_button)
        self.report_button = QtWidgets.QPushButton("Session report")
        self.report_button.setToolTip("write the ended session's timing and quality report")
        if self.on_report is not None:
            self.report_button.clicked.connect(self.on_report)
        self.report_button.setEnabled(False)
        row.addWidget(self.report_button)
        self.connection_label = QtWidgets.QLabel("not connected")
        self.connection_label.setStyleSheet("font-weight: bold; padding: 0 8px;")
        row.addWidget(self.connection_label, 1)
        return row

    def session_started(self) -> None:
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(True)

    def refresh(self) -> None:
        """List LSL streams in a worker thread (resolving blocks about a second)."""
        if self.lister is None:
            from acquisition.lsl_source import list_streams

            self.lister = list_streams
        if self._thread is not None and self._thread.is_alive():
            return
        lister = self.lister

        def work() -> None:  # worker thread: no Qt calls here, the tick shows the result
            try:
                self._result = lister(STREAM_LIST_TIMEOUT_S)
            except Exception as exc:  # shown, never fatal
                self._error = f"stream listing failed: {exc}"
                self._result = []

        self.refresh_button.setEnabled(False)
        self._thread = threading.Thread(target=work, name="gui-list-streams", daemon=True)
        self._thread.start()

    def update(self, tick: Tick) -> None:
        self._update_connection(tick)
        if tick.slow:
            self._update_list(tick)

    def _update_connection(self, tick: Tick) -> None:
        runner, m = tick.runner, tick.model
        stale_s = self.config.source.stale_after_s
        if runner is None:
            text = "no session"
        elif runner.error is not None:
            text = f"session failed: {runner.error_text}"
        else:
            scope = tick.scope
            age_s = tick.now - scope.last_arrival if scope is not None else math.nan
            if m.stream_state in ("lost", "stale") and not age_s < stale_s:
                stream = m.stream_state.upper()
            elif age_s < stale_s:
                stream = "receiving"
            elif scope is None:
                stream = "connecting"
            else:
                stream = f"no data for {age_s:.1f} s"
            text = f"{tick.snapshot.phase} · stream {stream}"
            if not runner.running and m.stop_reason:
                text = f"stopped: {m.stop_reason}"
        if runner is not None and not runner.running and runner.started:
            self.start_button.setEnabled(True)
            self.stop_button.setEnabled(False)
        if self.connection_label.text() != text:
            self.connection_label.setText(text)

    def _update_list(self, tick: Tick) -> None:
        if self._result is not None:
            result, self._result = self._result, None
            self.refresh_button.setEnabled(True)
            if self._error:
                self.message(self._error, error=True)
                self._error = ""
            combo = self.stream_combo
            keep_uid = getattr(combo.currentData(), "uid", None)
            combo.blockSignals(True)
            while combo.count() > 1:
                combo.removeItem(1)
            for d in result:
                if d.channel_format == "string":
                    continue
                combo.addItem(
                    f"{d.name} · {d.stype} · {d.n_channels} ch · {d.sfreq:g} Hz · {d.hostname}", d
                )
                if d.uid == keep_uid:
                    combo.setCurrentIndex(combo.count() - 1)
            combo.blockSignals(False)
            self.streams = result
        if not tick.running and tick.now >= self._next_refresh:
            self._next_refresh = tick.now + STREAM_REFRESH_S
            self.refresh()


def config_source_label(src) -> str:
    """The stream picker's first entry: the source the config names (an LSL stream, a board
    read through BrainFlow, or a recording played in real time)."""
    kind = getattr(src, "kind", "lsl")
    if kind == "brainflow":
        params = ", ".join(f"{k}={v}" for k, v in dict(src.board_params).items())
        return f"from config: BrainFlow board {src.board}" + (f" ({params})" if params else "")
    if kind == "file":
        return f"from config: recording {src.path} played in real time"
    return f"from config: name={src.name!r} type={src.stype!r} source_id={src.source_id!r}"


# ============================================================================ arming, e-stop
class ArmingPanel:
    """The interlock indicator, ARM / DISARM and the EMERGENCY STOP button."""

    def __init__(
        self,
        on_arm: Callable[[], None],
        on_disarm: Callable[[], None],
        on_estop: Callable[[], None],
        estop_keys: tuple[str, ...],
    ) -> None:
        self.on_arm, self.on_disarm, self.on_estop = on_arm, on_disarm, on_estop
        self.estop_keys = estop_keys
        self._shown: str | None = None

    def build(self) -> QtWidgets.QHBoxLayout:
        row = QtWidgets.QHBoxLayout()
        self.armed_label = QtWidgets.QLabel()
        self.armed_label.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.armed_label.setMinimumHeight(70)
        row.addWidget(self.armed_label, 3)
        self.arm_button = QtWidgets.QPushButton("ARM…")
        self.disarm_button = QtWidgets.QPushButton("DISARM")
        self.estop_button = QtWidgets.QPushButton(
            f"EMERGENCY STOP\n({' / '.join(self.estop_keys)})"
        )
        for b in (self.arm_button, self.disarm_button):
            b.setMinimumHeight(70)
            b.setMinimumWidth(130)
            b.setStyleSheet("font-size: 18px; font-weight: bold;")
        # Keyboard focus on ARM would let Space/Enter arm by accident: buttons are mouse-only.
        for b in (self.arm_button, self.disarm_button, self.estop_button):
            b.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
        self.estop_button.setMinimumHeight(70)
        self.estop_button.setMinimumWidth(300)
        self.estop_button.setStyleSheet(
            "QPushButton { background: #d50000; color: white; font-size: 22px; font-weight: bold;"
            " border: 4px solid #7f0000; border-radius: 8px; }"
            "QPushButton:pressed { background: #7f0000; }"
        )
        self.arm_button.clicked.connect(self.on_arm)
        self.disarm_button.clicked.connect(self.on_disarm)
        self.estop_button.clicked.connect(self.on_estop)
        row.addWidget(self.arm_button)
        row.addWidget(self.disarm_button)
        row.addWidget(self.estop_button)
        self.show_interlock("disarmed")
        return row

    def update(self, tick: Tick) -> None:
        snap = tick.snapshot
        estopped = snap.locked_out or tick.model.estopped
        self.show_interlock("estop" if estopped else snap.interlock)
        self.arm_button.setEnabled(
            tick.running and snap.calibrated and not estopped and snap.interlock == "disarmed"
        )
        self.disarm_button.setEnabled(tick.running and snap.interlock != "disarmed")

    def show_interlock(self, state: str) -> None:
        if self._shown == state:
            return
        self._shown = state
        text, bg = INTERLOCK_STYLE.get(state, (state.upper(), "#455a64"))
        fg = "#ff1744" if state == "estop" else "white"
        self.armed_label.setText(text)
        self.armed_label.setStyleSheet(
            f"background: {bg}; color: {fg}; font-size: 40px; font-weight: 900;"
            " border-radius: 8px; padding: 4px;"
        )


class BannerPanel:
    """The red alarm banner (interlock disarmed itself, stream lost, e-stop, failure)."""

    def __init__(self, on_acknowledge: Callable[[], None]) -> None:
        self.on_acknowledge = on_acknowledge
        self._shown: tuple | None = None

    def build(self) -> QtWidgets.QFrame:
        self.banner = QtWidgets.QFrame()
        self.banner.setStyleSheet(
            "QFrame { background: #b71c1c; } QLabel { color: white; "
            "font-size: 20px; font-weight: bold; }"
        )
        lay = QtWidgets.QHBoxLayout(self.banner)
        self.banner_label = QtWidgets.QLabel("")
        self.banner_label.setWordWrap(True)
        lay.addWidget(self.banner_label, 1)
        ack = QtWidgets.QPushButton("Acknowledge")
        ack.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
        ack.clicked.connect(self.on_acknowledge)
        lay.addWidget(ack)
        self.banner.setVisible(False)
        return self.banner

    def hide(self) -> None:
        self.banner.setVisible(False)

    def update(self, tick: Tick) -> None:
        b = tick.model.banner
        if b is None:
            if self.banner.isVisible():
                self.banner.setVisible(False)
            return
        if (b, b.text) != self._shown:
            self._shown = (b, b.text)
            self.banner_label.setText(f"{time.strftime('%H:%M:%S')}  {b.text}")
            self.banner.setVisible(True)


# ============================================================================ traces
class TracesPanel:
    """Stacked EEG lanes (min/max per bin), artifact shading, the channel / scale table."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.trace_curves: list[LaneCurve] = []  # one per stream channel, made once per scope
        self.shown_idx = np.zeros(0, dtype=int)
        self._lane_offset = np.zeros(0, dtype=np.float32)
        self._lane_gain = np.zeros(0, dtype=np.float32)
        self._scope: Scope | None = None
        self._seconds_shown: float | None = None

    def build(self) -> QtWidgets.QWidget:
        box = QtWidgets.QWidget()
        lay = QtWidgets.QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        ctl = QtWidgets.QHBoxLayout()
        ctl.addWidget(QtWidgets.QLabel("Seconds shown:"))
        self.seconds_spin = QtWidgets.QDoubleSpinBox()
        self.seconds_spin.setRange(1.0, 30.0)
        self.seconds_spin.setValue(TRACE_SECONDS_DEFAULT)
        self.seconds_spin.setSuffix(" s")
        ctl.addWidget(self.seconds_spin)
        ctl.addWidget(QtWidgets.QLabel("Scale all:"))
        self.scale_all_spin = QtWidgets.QDoubleSpinBox()
        self.scale_all_spin.setRange(1.0, 100_000.0)
        self.scale_all_spin.setValue(DEFAULT_SCALE_UV)
        self.scale_all_spin.setSuffix(" µV")
        self.scale_all_spin.valueChanged.connect(self._scale_all_changed)
        ctl.addWidget(self.scale_all_spin)
        ctl.addStretch(1)
        lay.addLayout(ctl)
        inner = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        self.trace_plot = _fixed_plot(pg.PlotWidget())
        self.trace_plot.setLabel("bottom", "time (s, 0 = newest sample)")
        self.artifact_curve = pg.PlotCurveItem(
            pen=None, brush=pg.mkBrush(255, 152, 0, 70), fillLevel=-0.5, skipFiniteCheck=True
        )
        self.trace_plot.addItem(self.artifact_curve)
        inner.addWidget(self.trace_plot)
        self.channel_table = QtWidgets.QTableWidget(0, 2)
        self.channel_table.setHorizontalHeaderLabels(["channel", "µV/lane"])
        self.channel_table.verticalHeader().setVisible(False)
        self.channel_table.setMaximumWidth(150)
        self.channel_table.horizontalHeader().setStretchLastSection(True)
        self.channel_table.itemChanged.connect(self._channel_table_changed)
        inner.addWidget(self.channel_table)
        inner.setStretchFactor(0, 5)
        inner.setSizes([700, 140])
        lay.addWidget(inner, 1)
        return box

    def new_session(self) -> None:
        self._scope = None
        self._seconds_shown = None

    def update(self, tick: Tick) -> None:
        if tick.scope is not None and tick.scope.n_samples:
            self.draw(tick.scope)

    def _ensure_channels(self, scope: Scope) -> None:
        if self._scope is scope:
            return
        self._scope = scope
        excl = {e.lower() for e in self.config.preprocess.exclude}
        table = self.channel_table
        table.blockSignals(True)
        table.setRowCount(len(scope.ch_names))
        shown = 0
        for i, name in enumerate(scope.ch_names):
            item = QtWidgets.QTableWidgetItem(name)
            item.setFlags(QtCore.Qt.ItemFlag.ItemIsUserCheckable | QtCore.Qt.ItemFlag.ItemIsEnabled)
            on = name.lower() not in excl and shown < MAX_CHANNELS_SHOWN_DEFAULT
            shown += on
            item.setCheckState(
                QtCore.Qt.CheckState.Checked if on else QtCore.Qt.CheckState.Unchecked
            )
            table.setItem(i, 0, item)
            table.setItem(i, 1, QtWidgets.QTableWidgetItem(f"{self.scale_all_spin.value():g}"))
        table.resizeColumnsToContents()
        table.blockSignals(False)
        for curve in self.trace_curves:
            self.trace_plot.removeItem(curve)
        pen = pg.mkPen("#0d2a4a", width=1)
        self.trace_curves = [LaneCurve(pen=pen, skipFiniteCheck=True) for _ in scope.ch_names]
        for curve in self.trace_curves:
            self.trace_plot.addItem(curve)
        self._channel_table_changed()

    def _scale_all_changed(self, value: float) -> None:
        self.channel_table.blockSignals(True)
        for i in range(self.channel_table.rowCount()):
            self.channel_table.item(i, 1).setText(f"{value:g}")
        self.channel_table.blockSignals(False)
        self._channel_table_changed()

    def _channel_table_changed(self, *_: Any) -> None:
        """Selection or scale changed: recompute lanes, ticks and the y range once."""
        rows = []
        for i in range(self.channel_table.rowCount()):
            item = self.channel_table.item(i, 0)
            if item is not None and item.checkState() == QtCore.Qt.CheckState.Checked:
                try:
                    scale = float(self.channel_table.item(i, 1).text())
                except (ValueError, AttributeError):
                    scale = DEFAULT_SCALE_UV
                rows.append((i, scale if scale > 0 else DEFAULT_SCALE_UV))
        self.shown_idx = np.array([r[0] for r in rows], dtype=int)
        n = len(rows)
        # lane k (top first) is centred on n-1-k; a value of `scale` µV spans one lane
        self._lane_offset = (n - 1 - np.arange(n)).astype(np.float32)
        self._lane_gain = np.array([1e6 / r[1] for r in rows], dtype=np.float32)
        names = self._scope.ch_names if self._scope is not None else ()
        ticks = [(float(n - 1 - k), names[i]) for k, i in enumerate(self.shown_idx)]
        shown = set(self.shown_idx.tolist())
        for i, curve in enumerate(self.trace_curves):
            curve.setVisible(i in shown)
        self.trace_plot.getAxis("left").setTicks([ticks, []])
        self.trace_plot.setYRange(-0.7, max(n, 1) - 0.3, padding=0)
        self._seconds_shown = None

    def draw(self, scope: Scope) -> None:
        """The newest `seconds_spin` seconds of `scope`, one lane per shown channel."""
        self._ensure_channels(scope)
        seconds = float(self.seconds_spin.value())
        view = scope.samples(seconds)
        idx = self.shown_idx
        n = view.t.size
        if n < 2 or idx.size == 0:
            return
        ds = max(1, n // TRACE_BINS)
        nb = n // ds
        start = n - nb * ds
        # (nb*ds, k) float32; with all channels shown, skip the fancy-index copy (1.3 ms)
        data = view.data[start:] if idx.size == view.data.shape[1] else view.data[start:, idx]
        t = view.t[start:] - view.t[-1]
        if ds > 1:  # min/max per bin keeps spikes visible (pyqtgraph's 'peak' mode)
            # a loop over the ds samples of a bin: 10x faster than .min(axis=1) on the
            # (nb, ds, k) view (measured 0.9 ms vs 10 ms for 10 s x 64 ch x 1 kHz)
            blocks = data.reshape(nb, ds, idx.size)
            lo = blocks[:, 0].copy()
            hi = lo.copy()
            for j in range(1, ds):
                np.minimum(lo, blocks[:, j], out=lo)
                np.maximum(hi, blocks[:, j], out=hi)
            y = np.empty((idx.size, 2 * nb), dtype=np.float32)
            y[:, 0::2] = lo.T
            y[:, 1::2] = hi.T
            x = np.repeat(t[ds - 1 :: ds], 2)
            art = np.repeat(view.art[start:].reshape(nb, ds).any(axis=1), 2)
        else:
            y, x, art = np.ascontiguousarray(data.T), t, view.art
        np.nan_to_num(y, copy=False)
        y -= y.mean(axis=1, keepdims=True)  # display only: each channel's offset over the window
        y *= self._lane_gain[:, None]
        y += self._lane_offset[:, None]
        if self._seconds_shown != seconds:
            self._seconds_shown = seconds
            self.trace_plot.setXRange(-seconds, 0.0, padding=0)
        lo, hi = y.min(axis=1) - 0.05, y.max(axis=1) + 0.05
        for k, i in enumerate(idx):
            self.trace_curves[i].set_lane(x, y[k], float(lo[k]), float(hi[k]))
        top = np.where(art, idx.size - 0.3, -0.5).astype(np.float32)
        self.artifact_curve.setData(x, top, skipFiniteCheck=True)


# ============================================================================ state, thresholds
class StatePanel:
    """The state box (label, time in state, dwell), band powers, the score with its thresholds.

    The threshold lines are dragged by the operator: `on_thresholds(enter, leave)` is called when
    one is dropped (the window asks the session and calls `snap_thresholds` if it refuses).
    """

    def __init__(
        self, config: SessionConfig, on_thresholds: Callable[[float, float], None]
    ) -> None:
        self.config = config
        self.on_thresholds = on_thresholds
        self.dragging = False
        self.band_curves: list[pg.PlotDataItem] = []
        self._feature_scope: Scope | None = None
        self._label_shown: Label | None = None

    def build(self) -> QtWidgets.QGroupBox:
        """The state box; the plots (`band_plot`, `score_plot`) are laid out by the window."""
        box = QtWidgets.QGroupBox("state")
        lay = QtWidgets.QVBoxLayout(box)
        self.state_label = QtWidgets.QLabel("—")
        self.state_label.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.state_label.setMinimumHeight(56)
        lay.addWidget(self.state_label)
        self.time_in_state_label = QtWidgets.QLabel("")
        lay.addWidget(self.time_in_state_label)
        self.dwell_bar = QtWidgets.QProgressBar()
        self.dwell_bar.setRange(0, 100)
        self.dwell_bar.setFormat("dwell %p%")
        lay.addWidget(self.dwell_bar)
        self.show_state(Label.UNCALIBRATED, 0.0, 0.0, float("nan"))

        self.band_plot = _fixed_plot(pg.PlotWidget(title="band powers of the score features"))
        self.band_plot.addLegend(offset=(5, 5))
        self.band_plot.setLabel("left", "log10 power")
        self.score_plot = _fixed_plot(pg.PlotWidget(title="state score (drag the thresholds)"))
        self.target_fill = pg.PlotCurveItem(
            pen=None, brush=pg.mkBrush(46, 125, 50, 50), fillLevel=0.0
        )
        self.score_plot.addItem(self.target_fill)
        self.score_curve = self.score_plot.plot(pen=pg.mkPen("#1a237e", width=2), connect="finite")
        self.enter_line = pg.InfiniteLine(
            self.config.state.enter,
            angle=0,
            movable=True,
            bounds=THRESHOLD_BOUNDS_Z,
            pen=pg.mkPen("#2e7d32", width=2),
            hoverPen=pg.mkPen("#2e7d32", width=4),
            label="enter {value:.2f}",
            labelOpts={"position": 0.93, "color": "#2e7d32"},
        )
        self.leave_line = pg.InfiniteLine(
            self.config.state.leave,
            angle=0,
            movable=True,
            bounds=THRESHOLD_BOUNDS_Z,
            pen=pg.mkPen("#c62828", width=2, style=QtCore.Qt.PenStyle.DashLine),
            hoverPen=pg.mkPen("#c62828", width=4),
            label="leave {value:.2f}",
            labelOpts={"position": 0.8, "color": "#c62828"},
        )
        for line in (self.enter_line, self.leave_line):
            self.score_plot.addItem(line)
            line.sigPositionChangeFinished.connect(self._dropped)
            line.sigDragged.connect(self._dragging)
        self.time_plot: pg.PlotWidget = self.score_plot  # scrolled here (the window may re-point)
        return box

    def update(self, tick: Tick) -> None:
        scope = tick.scope
        if tick.history and scope is not None and scope.n_samples and tick.t0 is not None:
            self._draw_history(scope, tick.t0)
        self._update_thresholds(tick)

    # ---- thresholds -------------------------------------------------------------------------
    def _dragging(self, *_: Any) -> None:
        self.dragging = True

    def _dropped(self, *_: Any) -> None:
        self.dragging = False
        self.on_thresholds(float(self.enter_line.value()), float(self.leave_line.value()))

    def snap_thresholds(self, values: tuple[float, float]) -> None:
        """Move the lines without emitting a drop (the session's values, or a refusal)."""
        for line, v in zip((self.enter_line, self.leave_line), values, strict=True):
            line.blockSignals(True)
            line.setValue(v)
            line.blockSignals(False)

    def _update_thresholds(self, tick: Tick) -> None:
        if self.dragging:
            return
        m, snap = tick.model, tick.snapshot
        if m.changed_thresholds and m.thresholds is not None:
            m.changed_thresholds = False
            self.snap_thresholds(m.thresholds)
        elif snap.calibrated or snap.phase in ("calibrating", "running"):
            enter, leave = snap.thresholds
            if math.isfinite(enter) and (enter, leave) != (
                self.enter_line.value(),
                self.leave_line.value(),
            ):
                self.snap_thresholds((enter, leave))

    # ---- history ----------------------------------------------------------------------------
    def _draw_history(self, scope: Scope, t0: float) -> None:
        dec = scope.decisions(HISTORY_S)
        if dec.t.size == 0:
            return
        step = max(1, dec.t.size // HISTORY_POINTS)
        if step > 1:  # keep the newest decision, drop in between (1 px is ~60 ms anyway)
            keep = slice((dec.t.size - 1) % step, None, step)
            dec = type(dec)(
                dec.t[keep],
                dec.score[keep],
                dec.label[keep],
                dec.features[keep],
                dec.arrival[keep],
                dec.n_samples[keep],
                dec.n_total,
            )
        x = dec.t - t0
        self.score_curve.setData(x, dec.score, connect="finite")
        target = dec.label == LABELS.index(Label.TARGET)
        score_top = np.nan_to_num(dec.score, nan=0.0)
        self.target_fill.setData(x, np.where(target, score_top, 0.0))
        if self._feature_scope is not scope:  # new session: its features, curves made once
            self._feature_scope = scope
            for curve in self.band_curves:
                self.band_plot.removeItem(curve)
            self.band_curves = []
            colours = ["#6a1b9a", "#00838f", "#ef6c00", "#2e7d32", "#ad1457", "#283593"]
            for k, name in enumerate(scope.feature_names):
                self.band_curves.append(
                    self.band_plot.plot(
                        pen=pg.mkPen(colours[k % len(colours)], width=2),
                        name=name,
                        connect="finite",
                    )
                )
        for k, curve in enumerate(self.band_curves):
            curve.setData(x, dec.features[:, k], connect="finite")
        t_now = float(x[-1])
        # the history plots are x-linked to `time_plot` (gui/window.py)
        self.time_plot.setXRange(max(0.0, t_now - HISTORY_S), max(t_now, 1.0), padding=0)
        st = scope.last_state
        if st is not None:
            self.show_state(st.label, st.time_in_state_s, st.dwell_progress, st.score)

    def show_state(self, label: Label, time_in_state_s: float, dwell: float, score: float) -> None:
        if self._label_shown != label:
            self._label_shown = label
            name = (
                self.config.state.target_name.upper()
                if label is Label.TARGET
                else label.value.replace("_", " ").upper()
            )
            self.state_label.setText(name)
            self.state_label.setStyleSheet(
                f"background: {LABEL_COLOURS[label]}; color: white; font-size: 28px;"
                " font-weight: bold; border-radius: 6px;"
            )
        sc = "" if math.isnan(score) else f" · score {score:+.2f}"
        self.time_in_state_label.setText(f"in state {time_in_state_s:6.1f} s{sc}")
        self.dwell_bar.setValue(round(100 * max(0.0, min(1.0, dwell))))


# ============================================================================ calibration
class CalibrationPanel:
    """Baseline progress, Restart / Finish now, the learnt baseline (median ± MAD)."""

    def __init__(self, on_restart: Callable[[], None], on_finish: Callable[[], None]) -> None:
        self.on_restart, self.on_finish = on_restart, on_finish

    def build(self) -> QtWidgets.QGroupBox:
        box = QtWidgets.QGroupBox("calibration")
        lay = QtWidgets.QVBoxLayout(box)
        self.calibration_bar = QtWidgets.QProgressBar()
        self.calibration_bar.setRange(0, 100)
        self.calibration_bar.setFormat("baseline %p%")
        lay.addWidget(self.calibration_bar)
        # what holds the baseline back / why it failed / bad channels and the baseline's spread
        self.calibration_note = QtWidgets.QLabel("")
        self.calibration_note.setWordWrap(True)
        lay.addWidget(self.calibration_note)
        buttons = QtWidgets.QHBoxLayout()
        self.recalibrate_button = QtWidgets.QPushButton("Restart")
        self.recalibrate_button.clicked.connect(self.on_restart)
        self.finish_calibration_button = QtWidgets.QPushButton("Finish now")
        self.finish_calibration_button.clicked.connect(self.on_finish)
        buttons.addWidget(self.recalibrate_button)
        buttons.addWidget(self.finish_calibration_button)
        lay.addLayout(buttons)
        self.baseline_table = QtWidgets.QTableWidget(0, 2)
        self.baseline_table.setHorizontalHeaderLabels(["feature", "median ± MAD"])
        self.baseline_table.verticalHeader().setVisible(False)
        self.baseline_table.horizontalHeader().setStretchLastSection(True)
        self.baseline_table.setMaximumHeight(110)
        lay.addWidget(self.baseline_table)
        return box

    def update(self, tick: Tick) -> None:
        snap, m = tick.snapshot, tick.model
        self.recalibrate_button.setEnabled(
            tick.running and snap.phase in ("calibrating", "running")
        )
        self.finish_calibration_button.setEnabled(tick.running and snap.calibrating)
        if not tick.slow:
            return
        self.calibration_bar.setValue(round(100 * snap.calibration_progress))
        if self.calibration_note.text() != m.calibration_note:
            self.calibration_note.setText(m.calibration_note)
        if m.changed_baseline:
            m.changed_baseline = False
            self.baseline_table.setRowCount(len(m.baseline))
            for r, (name, (med, mad)) in enumerate(sorted(m.baseline.items())):
                for c, text in enumerate((name, f"{med:.3f} ± {mad:.3f}")):
                    self.baseline_table.setItem(r, c, QtWidgets.QTableWidgetItem(text))
            self.baseline_table.resizeColumnToContents(0)


# ============================================================================ health
class HealthPanel:
    """Stream rate and age, gaps and faults, decision latency (text and histogram), the
    participant audio device (open / lost / reopened), dropped events, the session folder."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config

    def build(self) -> QtWidgets.QGroupBox:
        box = QtWidgets.QGroupBox("health")
        lay = QtWidgets.QHBoxLayout(box)
        self.health_label = QtWidgets.QLabel("")
        self.health_label.setTextFormat(QtCore.Qt.TextFormat.RichText)
        lay.addWidget(self.health_label, 2)
        self.latency_plot = _fixed_plot(pg.PlotWidget())
        self.latency_plot.setMaximumHeight(110)
        self.latency_plot.setLabel("bottom", "latency (ms)")
        centres = 0.5 * (LATENCY_BINS_MS[1:] + LATENCY_BINS_MS[:-1])
        self.latency_bars = pg.BarGraphItem(
            x=centres,
            height=np.zeros(centres.size),
            width=np.diff(LATENCY_BINS_MS) * 0.9,
            brush="#5c6bc0",
        )
        self.latency_plot.addItem(self.latency_bars)
        lay.addWidget(self.latency_plot, 1)
        return box

    def update(self, tick: Tick) -> None:
        if not tick.slow:
            return
        m, scope, runner = tick.model, tick.scope, tick.runner
        rows = []
        if scope is not None and scope.n_decisions:
            dec = scope.decisions(10.0)
            rate = effective_rate(dec.arrival, dec.n_samples, dec.t)
            nominal = scope.sfreq
            bad = math.isfinite(rate) and abs(rate - nominal) > 0.05 * nominal
            colour = ALARM if bad else GOOD
            rows.append(f"rate <b style='color:{colour}'>{rate:7.1f} Hz</b> / {nominal:g} nominal")
            last = scope.last_arrival  # may be newer than `now` by a chunk: clamp at 0
            age_ms = 1e3 * max(0.0, tick.now - last) if math.isfinite(last) else math.nan
            colour = ALARM if age_ms > 1e3 * self.config.source.stale_after_s else GOOD
            rows.append(f"stream age <b style='color:{colour}'>{age_ms:6.0f} ms</b>")
        rows.append(f"gaps {m.n_gaps} · faults {m.n_health_faults}")
        lat = runner.latency_samples() if runner is not None else np.zeros(0)
        if lat.size:
            p50, p99 = np.percentile(lat, [50, 99])
            rows.append(f"decision latency p50 <b>{p50:.2f} ms</b> · p99 <b>{p99:.2f} ms</b>")
            counts, _ = np.histogram(np.clip(lat, 0, LATENCY_BINS_MS[-1] - 1e-9), LATENCY_BINS_MS)
            self.latency_bars.setOpts(height=counts)
        else:
            rows.append("decision latency: no data")
        if tick.snapshot.decider:  # a plugin runs in the hot path: its own cost, per decision
            rows.append(tick.snapshot.decider)
        audio = audio_text(m, tick.snapshot)
        if audio:
            rows.append(audio)
        dropped = int(m.health.get("dropped") or 0)
        dropped += runner.events_dropped if runner is not None else 0
        if dropped:
            rows.append(f"<b style='color:{ALARM}'>events dropped {dropped}</b>")
        if m.session_folder:
            rows.append(f"folder {m.session_folder}")
        self.health_label.setText("<br>".join(rows))


def audio_text(model: ConsoleModel, snap: SessionSnapshot) -> str:
    """The participant audio line of the health panel ('' when the session has no audio)."""
    state = model.audio_state or snap.audio_device
    if not state:
        return ""
    text, colour = AUDIO_STYLE.get(state, (state, "#616161"))
    extra = []
    if model.audio_backend:
        extra.append(model.audio_backend)
    if model.audio_losses:
        extra.append(f"lost {model.audio_losses}x, reopened {model.audio_reopens}x")
    if model.audio_detail and state == "lost":
        extra.append(model.audio_detail)
    tail = f" ({'; '.join(extra)})" if extra else ""
    return f"participant audio <b style='color:{colour}'>{text}</b>{tail}"


# ============================================================================ pulse raster
class RasterPanel:
    """Pulses (red bars) and vetoed attempts (grey crosses, hover for why), and the counts."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config

    def build(self) -> QtWidgets.QWidget:
        """The raster plot; `counts_label` (laid out by the window) goes under it."""
        self.raster_plot = _fixed_plot(
            pg.PlotWidget(title="pulses (red) and vetoed attempts (grey; hover)")
        )
        self.raster_plot.setYRange(-0.7, 1.7)
        self.raster_plot.getAxis("left").setTicks([[(1, "fired"), (0, "vetoed")]])
        self.raster_plot.setLabel("bottom", "session time (s)")
        self.raster = pg.ScatterPlotItem(hoverable=True, tip=_raster_tip, size=18, hoverSize=24)
        self.raster_plot.addItem(self.raster)
        self.counts_label = QtWidgets.QLabel("")
        self.counts_label.setStyleSheet("font-size: 15px;")
        return self.raster_plot

    def update(self, tick: Tick) -> None:
        m = tick.model
        changed = m.changed_attempts
        if changed:
            self._draw(m, tick.t0 if tick.t0 is not None else 0.0)
        if tick.slow or changed:
            m.changed_attempts = False
            self._count(tick)

    def _draw(self, m: ConsoleModel, t0: float) -> None:
        spots = []
        for a in m.attempts:
            spots.append(
                {
                    "pos": (a.t_stream - t0, 1.0 if a.fired else 0.0),
                    "data": a.tip,
                    "symbol": "|" if a.fired else "x",
                    "brush": pg.mkBrush("#d50000" if a.fired else "#9e9e9e"),
                    "pen": pg.mkPen("#d50000" if a.fired else "#616161", width=2),
                }
            )
        self.raster.setData(spots)

    def _count(self, tick: Tick) -> None:
        snap, m, scope = tick.snapshot, tick.model, tick.scope
        st = scope.last_state if scope is not None else None
        t_now = st.t_stream if st is not None else math.nan
        last_min = m.fired_in_window(t_now) if math.isfinite(t_now) else 0
        cap = snap.session_cap or self.config.safety.session_cap
        rate = snap.max_per_minute or self.config.safety.max_per_minute
        self.counts_label.setText(
            f"pulses <b>{max(snap.pulse_count, m.n_fired)}</b> / session cap {cap} · "
            f"last 60 s <b>{last_min}</b> / {rate} per minute · vetoed {m.n_vetoed}"
        )


def _raster_tip(x: float, y: float, data: Any) -> str:
    return f"t = {x:.2f} s\n{data}"

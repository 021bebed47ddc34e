"""The operator console window (PySide6 + pyqtgraph).

Never blocks and never owns data (STYLE 10): the session runs in a child process
(gui/procrunner.py); a QTimer reads the scope ring buffers (shared memory), drains the events
the child forwards and reads its snapshot. Every plot item is created once; a tick only calls
`setData` / `setOpts`. Commands (ARM, DISARM, EMERGENCY STOP, thresholds, calibration) are one
request / reply to the child each, about 1 ms.

Why a process: PySide6 holds the GIL for the whole of each C++ call, so with the loop in a
thread of this process one long QPainter call stalled the acquisition thread for its duration
(offscreen: 64 lanes x 1000 points as one path took 18 ms in a single `drawPath`). With the
thread runner, even after drawing one curve per channel, at most TRACE_BINS min/max pairs each,
history plots at ~8 frames/s and a cap on the GUI thread's CPU share (`_adapt_rate`), decision
latency p99 was 9.5-15 ms with the window drawing vs 1.5-2 ms headless (`python -m gui.bench`,
64 ch x 1 kHz). Those measures stay: on a 2-core machine the window still competes for CPU.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from pylsl import local_clock
from PySide6 import QtCore, QtGui, QtWidgets

from acquisition.lsl_source import list_streams
from closedloop.config import SessionConfig
from closedloop.control import ControlError
from closedloop.scope import LABELS, Scope
from features.types import Label
from gui.model import (
    GUI_REASON_PREFIX,
    ConsoleModel,
    Snapshot,
    effective_rate,
)
from gui.procrunner import ProcessRunner
from gui.qtfix import guard_none_refcount
from gui.runner import SessionRunner, SourceSpec

guard_none_refcount()  # PySide6 6.12 on CPython 3.11 leaks None refs (see gui/qtfix.py)

TICK_MS = 40  # 25 frames/s: smooth scrolling when the machine has room
TICK_MS_MAX = 200  # the slowest the console goes when it has to yield the CPU
# GUI thread CPU share (incl. painting) above which ticks slow down, and below which they speed
# up again. 64 ch x 1 kHz on the 2-core VM (gui.bench, 30 s runs): no cap ~20 frames/s, latency
# p99 13 ms; 0.5/0.3 ~12 frames/s, p99 10.6 ms; 0.3/0.15 ~7 frames/s, p99 9.5 ms.
GUI_DUTY_MAX = 0.5
GUI_DUTY_MIN = 0.3
SLOW_EVERY_TICKS = 12  # text, histogram, baseline: every ~0.5 s
HISTORY_EVERY_TICKS = 3  # score / band power / raster: ~8 frames/s (60 s wide: 1 px ~ 60 ms)
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
ESTOP_KEYS = ("Esc", "F12")

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


class ConsoleWindow(QtWidgets.QMainWindow):
    """One window: stream, traces, features, state, calibration, arming, raster, health.

    config: the session config (source section = default stream). out_root: session folders.
    arm_action: arm automatically after calibration with this action name (demo), else None.
    list_streams: lister for the stream picker (blocking; run in a worker thread).
    runner_class: how sessions run: ProcessRunner (default: a child process, drawing cannot
    delay decisions) or gui.runner.SessionRunner (a thread here; the Session object is reachable).
    """

    def __init__(
        self,
        config: SessionConfig,
        *,
        out_root: Path | None = None,
        arm_action: str | None = None,
        list_streams: Callable[[float], list] | None = None,
        runner_class: type = ProcessRunner,
    ) -> None:
        super().__init__()
        self.config = config
        self.out_root = out_root
        self.arm_action = arm_action
        self.runner_class = runner_class
        self.runner: ProcessRunner | SessionRunner | None = None
        self.model = ConsoleModel()
        self.snapshot = Snapshot()
        self._list_streams = list_streams
        self._streams: list = []
        self._stream_result: list | None = None
        self._stream_error = ""
        self._stream_thread: threading.Thread | None = None
        self._next_stream_refresh = 0.0
        self._tick_count = 0
        self._t0: float | None = None  # stream time shown as 0 on the history plots
        self._trace_key: tuple | None = None
        self._dragging = False
        self._scope_ready: Scope | None = None
        self._banner_shown: tuple | None = None
        self._history_scope: Scope | None = None
        self._failure_shown = False
        self.tick_durations_ms: list[float] = []
        self.tick_interval_ms = TICK_MS
        self._duty_t = (time.perf_counter(), time.thread_time())
        self.gui_duty = 0.0
        self.setWindowTitle("closedloop · operator console")
        self.resize(1600, 1000)
        pg.setConfigOptions(antialias=False, background="w", foreground="k")
        self._build()
        self._install_shortcuts()
        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self.tick)
        self.timer.start()

    # ------------------------------------------------------------------------ layout
    def _build(self) -> None:
        central = QtWidgets.QWidget()
        root = QtWidgets.QVBoxLayout(central)
        root.setContentsMargins(6, 6, 6, 6)
        root.setSpacing(4)
        root.addLayout(self._build_stream_row())
        root.addLayout(self._build_arming_row())
        root.addWidget(self._build_banner())
        split = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        split.addWidget(self._build_traces())
        split.addWidget(self._build_right())
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 1)
        split.setSizes([820, 780])
        root.addWidget(split, 1)
        self.setCentralWidget(central)
        self.status_line = QtWidgets.QLabel("")
        self.statusBar().addWidget(self.status_line, 1)

    def _build_stream_row(self) -> QtWidgets.QHBoxLayout:
        row = QtWidgets.QHBoxLayout()
        row.addWidget(QtWidgets.QLabel("Stream:"))
        self.stream_combo = QtWidgets.QComboBox()
        self.stream_combo.setMinimumWidth(420)
        src = self.config.source
        self.stream_combo.addItem(
            f"from config: name={src.name!r} type={src.stype!r} source_id={src.source_id!r}", None
        )
        row.addWidget(self.stream_combo)
        self.refresh_button = QtWidgets.QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh_streams)
        row.addWidget(self.refresh_button)
        self.start_button = QtWidgets.QPushButton("Connect && start session")
        self.start_button.clicked.connect(self._start_clicked)
        row.addWidget(self.start_button)
        self.stop_button = QtWidgets.QPushButton("End session")
        self.stop_button.clicked.connect(self._stop_clicked)
        self.stop_button.setEnabled(False)
        row.addWidget(self.stop_button)
        self.connection_label = QtWidgets.QLabel("not connected")
        self.connection_label.setStyleSheet("font-weight: bold; padding: 0 8px;")
        row.addWidget(self.connection_label, 1)
        return row

    def _build_arming_row(self) -> QtWidgets.QHBoxLayout:
        row = QtWidgets.QHBoxLayout()
        self.armed_label = QtWidgets.QLabel()
        self.armed_label.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.armed_label.setMinimumHeight(70)
        row.addWidget(self.armed_label, 3)
        self.arm_button = QtWidgets.QPushButton("ARM…")
        self.disarm_button = QtWidgets.QPushButton("DISARM")
        self.estop_button = QtWidgets.QPushButton("EMERGENCY STOP\n(Esc / F12)")
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
        self.arm_button.clicked.connect(self.arm_clicked)
        self.disarm_button.clicked.connect(self.disarm_clicked)
        self.estop_button.clicked.connect(lambda: self.emergency_stop("console button"))
        row.addWidget(self.arm_button)
        row.addWidget(self.disarm_button)
        row.addWidget(self.estop_button)
        self._set_interlock_display("disarmed")
        return row

    def _build_banner(self) -> QtWidgets.QWidget:
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
        ack.clicked.connect(self.acknowledge_banner)
        lay.addWidget(ack)
        self.banner.setVisible(False)
        return self.banner

    def _build_traces(self) -> QtWidgets.QWidget:
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
        self.trace_plot = pg.PlotWidget()
        self.trace_plot.setMenuEnabled(False)
        self.trace_plot.setMouseEnabled(x=False, y=False)
        self.trace_plot.hideButtons()
        self.trace_plot.setLabel("bottom", "time (s, 0 = newest sample)")
        self.artifact_curve = pg.PlotCurveItem(
            pen=None, brush=pg.mkBrush(255, 152, 0, 70), fillLevel=-0.5, skipFiniteCheck=True
        )
        self.trace_plot.addItem(self.artifact_curve)
        self.trace_curves: list[pg.PlotCurveItem] = []  # one per stream channel, made once
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

    def _build_right(self) -> QtWidgets.QWidget:
        box = QtWidgets.QWidget()
        lay = QtWidgets.QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        top = QtWidgets.QHBoxLayout()
        top.addWidget(self._build_state_box(), 1)
        top.addWidget(self._build_calibration_box(), 1)
        lay.addLayout(top)
        self.band_plot = pg.PlotWidget(title="band powers of the score features")
        self.band_plot.addLegend(offset=(5, 5))
        self.band_plot.setLabel("left", "log10 power")
        self.band_curves: list[pg.PlotDataItem] = []
        self.score_plot = pg.PlotWidget(title="state score (drag the thresholds)")
        self.target_fill = pg.PlotCurveItem(
            pen=None, brush=pg.mkBrush(46, 125, 50, 50), fillLevel=0.0
        )
        self.score_plot.addItem(self.target_fill)
        self.score_curve = self.score_plot.plot(pen=pg.mkPen("#1a237e", width=2), connect="finite")
        enter, leave = self.config.state.enter, self.config.state.leave
        self.enter_line = pg.InfiniteLine(
            enter,
            angle=0,
            movable=True,
            bounds=THRESHOLD_BOUNDS_Z,
            pen=pg.mkPen("#2e7d32", width=2),
            hoverPen=pg.mkPen("#2e7d32", width=4),
            label="enter {value:.2f}",
            labelOpts={"position": 0.93, "color": "#2e7d32"},
        )
        self.leave_line = pg.InfiniteLine(
            leave,
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
            line.sigPositionChangeFinished.connect(self._threshold_dragged)
            line.sigDragged.connect(self._threshold_dragging)
        self.raster_plot = pg.PlotWidget(title="pulses (red) and vetoed attempts (grey; hover)")
        self.raster_plot.setYRange(-0.7, 1.7)
        self.raster_plot.getAxis("left").setTicks([[(1, "fired"), (0, "vetoed")]])
        self.raster_plot.setLabel("bottom", "session time (s)")
        self.raster = pg.ScatterPlotItem(
            hoverable=True, tip=self._raster_tip, size=18, hoverSize=24
        )
        self.raster_plot.addItem(self.raster)
        for p in (self.band_plot, self.score_plot, self.raster_plot):
            p.setMenuEnabled(False)
            p.hideButtons()
            p.setMouseEnabled(x=False, y=False)
        self.band_plot.setXLink(self.raster_plot)
        self.score_plot.setXLink(self.raster_plot)
        lay.addWidget(self.band_plot, 2)
        lay.addWidget(self.score_plot, 2)
        lay.addWidget(self.raster_plot, 1)
        self.counts_label = QtWidgets.QLabel("")
        self.counts_label.setStyleSheet("font-size: 15px;")
        lay.addWidget(self.counts_label)
        lay.addWidget(self._build_health_box())
        return box

    def _build_state_box(self) -> QtWidgets.QWidget:
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
        self._set_state_display(Label.UNCALIBRATED, 0.0, 0.0, float("nan"))
        return box

    def _build_calibration_box(self) -> QtWidgets.QWidget:
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
        self.recalibrate_button.clicked.connect(self._recalibrate_clicked)
        self.finish_calibration_button = QtWidgets.QPushButton("Finish now")
        self.finish_calibration_button.clicked.connect(self._finish_calibration_clicked)
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

    def _build_health_box(self) -> QtWidgets.QWidget:
        box = QtWidgets.QGroupBox("health")
        lay = QtWidgets.QHBoxLayout(box)
        self.health_label = QtWidgets.QLabel("")
        self.health_label.setTextFormat(QtCore.Qt.TextFormat.RichText)
        lay.addWidget(self.health_label, 2)
        self.latency_plot = pg.PlotWidget()
        self.latency_plot.setMaximumHeight(110)
        self.latency_plot.setMenuEnabled(False)
        self.latency_plot.hideButtons()
        self.latency_plot.setMouseEnabled(x=False, y=False)
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

    def _install_shortcuts(self) -> None:
        self.estop_shortcuts = []
        for key in ESTOP_KEYS:
            sc = QtGui.QShortcut(QtGui.QKeySequence(key), self)
            sc.setContext(QtCore.Qt.ShortcutContext.ApplicationShortcut)
            sc.activated.connect(lambda key=key: self.emergency_stop(f"keyboard {key}"))
            self.estop_shortcuts.append(sc)

    # ------------------------------------------------------------------------ session life
    @property
    def session(self):
        return self.runner.session if self.runner is not None else None

    def start_session(self, source: Any | None = None, stream=None):
        """Start a session on the picked `stream` (a StreamDescription), else the config's.

        source: a source object instead (runs in a thread of this process: SessionRunner).
        Returns the runner.
        """
        if self.runner is not None and self.runner.running:
            raise RuntimeError("a session is already running")
        runner_class = self.runner_class
        if source is None:
            source = SourceSpec.of(stream)  # the child resolves the stream itself
        elif not isinstance(source, SourceSpec):
            runner_class = SessionRunner
        self.model = ConsoleModel()
        self._t0 = None
        self._scope_ready = None
        self._trace_key = None
        self._failure_shown = False
        self.runner = runner_class(
            self.config, source, out_root=self.out_root, arm_action=self.arm_action
        ).start()
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        return self.runner

    def stop_session(self, reason: str, timeout_s: float = 20.0) -> bool:
        """Disarm, end the session and wait for its folder to be complete."""
        if self.runner is None:
            return True
        self.status_line.setText(f"ending session: {reason} …")
        QtWidgets.QApplication.processEvents()
        done = self.runner.stop(f"{GUI_REASON_PREFIX}: {reason}", timeout_s)
        self.tick()
        return done

    def _start_clicked(self) -> None:
        stream = self.stream_combo.currentData()
        try:
            self.start_session(stream=stream)
        except Exception as exc:
            self._message(f"cannot start: {exc}", error=True)

    def _stop_clicked(self) -> None:
        self.stop_session("operator ended the session")

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:  # noqa: N802 (Qt override)
        """Closing disarms and ends the session; the folder is complete before the window goes."""
        self.timer.stop()
        if self.runner is not None and self.runner.running:
            self.stop_session("console closed")
        super().closeEvent(event)

    # ------------------------------------------------------------------------ operator actions
    def confirm_arm(self) -> bool:
        """Ask the operator to confirm arming (tests replace this)."""
        answer = QtWidgets.QMessageBox.warning(
            self,
            "Arm the stimulator?",
            "ARM: pulses will fire whenever the target state holds, within the safety limits.\n\n"
            "Is the coil placed and the participant ready?",
            QtWidgets.QMessageBox.StandardButton.Yes | QtWidgets.QMessageBox.StandardButton.No,
            QtWidgets.QMessageBox.StandardButton.No,
        )
        return answer == QtWidgets.QMessageBox.StandardButton.Yes

    def arm_clicked(self) -> None:
        if self.session is None:
            return
        if not self.confirm_arm():
            self._message("arming cancelled")
            return
        try:
            self.session.arm("gui_button", operator="console")
        except ControlError as exc:
            self._message(str(exc), error=True)
            return
        self._message("armed by the operator")
        self.tick()

    def disarm_clicked(self) -> None:
        if self.session is not None:
            try:
                self.session.disarm(f"{GUI_REASON_PREFIX}: DISARM button")
            except ControlError as exc:
                self._message(f"DISARM failed: {exc}", error=True)
                return
            self._message("disarmed by the operator")
            self.tick()

    def emergency_stop(self, source: str) -> None:
        """Disarm at once and end stimulation for this session (button and Esc / F12).

        Returns once the child confirmed the interlock disarmed (about 1 ms); a child that does
        not confirm within procrunner.ESTOP_TIMEOUT_S is killed.
        """
        self.model.estopped = True
        text = f"EMERGENCY STOP ({source})"
        if self.session is not None:
            try:
                self.session.emergency_stop(f"console: {source}")
            except ControlError as exc:
                text = f"{text}: {exc}"
                self.model.raise_banner(f"EMERGENCY STOP: {exc}", local_clock())
        self._message(text, error=True)
        self.tick()

    def acknowledge_banner(self) -> None:
        self.model.acknowledge()
        self.banner.setVisible(False)

    def _recalibrate_clicked(self) -> None:
        if self.session is None:
            return
        try:
            self.session.start_calibration("console")
        except ControlError as exc:
            self._message(str(exc), error=True)

    def _finish_calibration_clicked(self) -> None:
        if self.session is None:
            return
        try:
            self.session.stop_calibration("console")
        except ControlError as exc:
            self._message(str(exc), error=True)

    def _threshold_dragging(self, *_: Any) -> None:
        self._dragging = True

    def _threshold_dragged(self, *_: Any) -> None:
        """A threshold line was dropped: validate through the session, snap back if refused."""
        self._dragging = False
        enter, leave = float(self.enter_line.value()), float(self.leave_line.value())
        if self.session is None or not self.runner.ready:
            self._snap_thresholds((self.config.state.enter, self.config.state.leave))
            self._message("thresholds change only while a session runs", error=True)
            return
        try:
            self.session.set_thresholds(enter, leave, source="console drag")
        except ControlError as exc:
            try:
                self._snap_thresholds(self.session.thresholds())
            except ControlError:
                self._snap_thresholds((self.config.state.enter, self.config.state.leave))
            self._message(f"thresholds refused: {exc}", error=True)
            return
        self._message(f"thresholds set: enter {enter:.2f}, leave {leave:.2f}")

    def _snap_thresholds(self, values: tuple[float, float]) -> None:
        enter, leave = values
        for line, v in ((self.enter_line, enter), (self.leave_line, leave)):
            line.blockSignals(True)
            line.setValue(v)
            line.blockSignals(False)

    def _message(self, text: str, error: bool = False) -> None:
        self.status_line.setText(text)
        self.status_line.setStyleSheet("color: #b71c1c; font-weight: bold;" if error else "")

    # ------------------------------------------------------------------------ streams
    def refresh_streams(self) -> None:
        """List LSL streams in a worker thread (resolving blocks about a second)."""
        if self._list_streams is None:
            self._list_streams = list_streams
        if self._stream_thread is not None and self._stream_thread.is_alive():
            return
        lister = self._list_streams

        def work() -> None:  # worker thread: no Qt calls here, the tick shows the result
            try:
                self._stream_result = lister(STREAM_LIST_TIMEOUT_S)
            except Exception as exc:  # shown, never fatal
                self._stream_error = f"stream listing failed: {exc}"
                self._stream_result = []

        self.refresh_button.setEnabled(False)
        self._stream_thread = threading.Thread(target=work, name="gui-list-streams", daemon=True)
        self._stream_thread.start()

    def _update_stream_list(self, now: float) -> None:
        if self._stream_result is not None:
            result, self._stream_result = self._stream_result, None
            self.refresh_button.setEnabled(True)
            if self._stream_error:
                self._message(self._stream_error, error=True)
                self._stream_error = ""
            current = self.stream_combo.currentData()
            keep_uid = getattr(current, "uid", None)
            self.stream_combo.blockSignals(True)
            while self.stream_combo.count() > 1:
                self.stream_combo.removeItem(1)
            for d in result:
                if d.channel_format == "string":
                    continue
                self.stream_combo.addItem(
                    f"{d.name} · {d.stype} · {d.n_channels} ch · {d.sfreq:g} Hz · {d.hostname}", d
                )
                if d.uid == keep_uid:
                    self.stream_combo.setCurrentIndex(self.stream_combo.count() - 1)
            self.stream_combo.blockSignals(False)
            self._streams = result
        idle = self.runner is None or not self.runner.running
        if idle and now >= self._next_stream_refresh:
            self._next_stream_refresh = now + STREAM_REFRESH_S
            self.refresh_streams()

    # ------------------------------------------------------------------------ the tick
    def tick(self) -> None:
        """Poll the session: drain events, read a snapshot and the scope, update the widgets."""
        t_start = time.perf_counter()
        self._tick_count += 1
        slow = self._tick_count % SLOW_EVERY_TICKS == 1
        now = local_clock()
        runner = self.runner
        if runner is not None:
            self.model.apply(runner.subscription.drain())
            self.snapshot = runner.snapshot()
        self._update_arming()
        self._update_banner()
        self._update_connection(runner)
        scope = runner.scope if runner is not None else None
        if scope is not None and scope.n_samples:
            self._update_traces(scope)
            if self._tick_count % HISTORY_EVERY_TICKS == 1 or self._t0 is None:
                self._update_history(scope)
        self._update_thresholds()
        if self.model.changed_attempts:
            self._update_raster()
        if slow or self.model.changed_attempts:
            self.model.changed_attempts = False
            self._update_counts(scope)
        if slow:
            self._update_calibration()
            self._update_health(scope, local_clock())
            self._update_stream_list(now)
            self._adapt_rate()
        self.tick_durations_ms.append(1e3 * (time.perf_counter() - t_start))
        if len(self.tick_durations_ms) > 10_000:
            del self.tick_durations_ms[:5000]

    def _adapt_rate(self) -> None:
        """Keep the GUI thread's CPU share (ticks and painting) under GUI_DUTY_MAX.

        Every Python-level GUI step competes with the acquisition thread for the GIL, so on a
        busy machine the console draws less often rather than delaying decisions.
        """
        wall, cpu = time.perf_counter(), time.thread_time()
        w0, c0 = self._duty_t
        self._duty_t = (wall, cpu)
        if wall - w0 <= 0:
            return
        duty = (cpu - c0) / (wall - w0)
        self.gui_duty = duty
        interval = self.tick_interval_ms
        if duty > GUI_DUTY_MAX:
            interval = min(TICK_MS_MAX, round(interval * 1.5))
        elif duty < GUI_DUTY_MIN:
            interval = max(TICK_MS, round(interval / 1.25))
        if interval != self.tick_interval_ms:
            self.tick_interval_ms = interval
            self.timer.setInterval(interval)

    def _update_arming(self) -> None:
        snap, model = self.snapshot, self.model
        estopped = snap.locked_out or model.estopped
        state = "estop" if estopped else snap.interlock
        self._set_interlock_display(state)
        running = self.runner is not None and self.runner.running
        self.arm_button.setEnabled(
            running and snap.calibrated and not estopped and snap.interlock == "disarmed"
        )
        self.disarm_button.setEnabled(running and snap.interlock != "disarmed")
        self.recalibrate_button.setEnabled(running and snap.phase in ("calibrating", "running"))
        self.finish_calibration_button.setEnabled(running and snap.calibrating)

    def _set_interlock_display(self, state: str) -> None:
        if getattr(self, "_interlock_shown", None) == state:
            return
        self._interlock_shown = state
        text, bg = INTERLOCK_STYLE.get(state, (state.upper(), "#455a64"))
        fg = "#ff1744" if state == "estop" else "white"
        self.armed_label.setText(text)
        self.armed_label.setStyleSheet(
            f"background: {bg}; color: {fg}; font-size: 40px; font-weight: 900;"
            " border-radius: 8px; padding: 4px;"
        )

    def _update_banner(self) -> None:
        b = self.model.banner
        if b is None:
            if self.banner.isVisible():
                self.banner.setVisible(False)
            return
        if (b, b.text) != self._banner_shown:
            self._banner_shown = (b, b.text)
            self.banner_label.setText(f"{time.strftime('%H:%M:%S')}  {b.text}")
            self.banner.setVisible(True)

    def _update_connection(self, runner: ProcessRunner | SessionRunner | None) -> None:
        if runner is None:
            text = "no session"
        elif runner.error is not None:
            text = f"session failed: {runner.error_text}"
            if not self._failure_shown:
                self._failure_shown = True
                self.model.raise_banner(f"SESSION FAILED: {runner.error_text}", local_clock())
        else:
            m = self.model
            scope = runner.scope
            age_s = local_clock() - scope.last_arrival if scope is not None else math.nan
            if m.stream_state in ("lost", "stale") and not age_s < self.config.source.stale_after_s:
                stream = m.stream_state.upper()
            elif age_s < self.config.source.stale_after_s:
                stream = "receiving"
            elif scope is None:
                stream = "connecting"
            else:
                stream = f"no data for {age_s:.1f} s"
            text = f"{self.snapshot.phase} · stream {stream}"
            if not runner.running and m.stop_reason:
                text = f"stopped: {m.stop_reason}"
        if runner is not None and not runner.running and runner.started:
            self.start_button.setEnabled(True)
            self.stop_button.setEnabled(False)
        if self.connection_label.text() != text:
            self.connection_label.setText(text)

    # ---- traces ---------------------------------------------------------------------------
    def _ensure_channel_table(self, scope: Scope) -> None:
        if self._scope_ready is scope:
            return
        self._scope_ready = scope
        excl = {e.lower() for e in self.config.preprocess.exclude}
        self.channel_table.blockSignals(True)
        self.channel_table.setRowCount(len(scope.ch_names))
        shown = 0
        for i, name in enumerate(scope.ch_names):
            item = QtWidgets.QTableWidgetItem(name)
            item.setFlags(QtCore.Qt.ItemFlag.ItemIsUserCheckable | QtCore.Qt.ItemFlag.ItemIsEnabled)
            on = name.lower() not in excl and shown < MAX_CHANNELS_SHOWN_DEFAULT
            shown += on
            item.setCheckState(
                QtCore.Qt.CheckState.Checked if on else QtCore.Qt.CheckState.Unchecked
            )
            self.channel_table.setItem(i, 0, item)
            scale = QtWidgets.QTableWidgetItem(f"{self.scale_all_spin.value():g}")
            self.channel_table.setItem(i, 1, scale)
        self.channel_table.resizeColumnsToContents()
        self.channel_table.blockSignals(False)
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
        self._shown_idx = np.array([r[0] for r in rows], dtype=int)
        n = len(rows)
        # lane k (top first) is centred on n-1-k; a value of `scale` µV spans one lane
        self._lane_offset = (n - 1 - np.arange(n)).astype(np.float32)
        self._lane_gain = np.array([1e6 / r[1] for r in rows], dtype=np.float32)
        names = self._scope_ready.ch_names if self._scope_ready is not None else ()
        ticks = [(float(n - 1 - k), names[i]) for k, i in enumerate(self._shown_idx)]
        shown = set(self._shown_idx.tolist())
        for i, curve in enumerate(self.trace_curves):
            curve.setVisible(i in shown)
        self.trace_plot.getAxis("left").setTicks([ticks, []])
        self.trace_plot.setYRange(-0.7, max(n, 1) - 0.3, padding=0)
        self._trace_key = None

    def _update_traces(self, scope: Scope) -> None:
        self._ensure_channel_table(scope)
        seconds = float(self.seconds_spin.value())
        view = scope.samples(seconds)
        idx = self._shown_idx
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
        if self._trace_key != seconds:
            self._trace_key = seconds
            self.trace_plot.setXRange(-seconds, 0.0, padding=0)
        lo, hi = y.min(axis=1) - 0.05, y.max(axis=1) + 0.05
        for k, i in enumerate(idx):
            self.trace_curves[i].set_lane(x, y[k], float(lo[k]), float(hi[k]))
        top = np.where(art, idx.size - 0.3, -0.5).astype(np.float32)
        self.artifact_curve.setData(x, top, skipFiniteCheck=True)

    # ---- score, band powers, state ---------------------------------------------------------
    def _update_history(self, scope: Scope) -> None:
        dec = scope.decisions(HISTORY_S)
        if dec.t.size == 0:
            return
        if self._t0 is None:
            self._t0 = float(dec.t[0])
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
        x = dec.t - self._t0
        self.score_curve.setData(x, dec.score, connect="finite")
        target = dec.label == LABELS.index(Label.TARGET)
        score_top = np.nan_to_num(dec.score, nan=0.0)
        self.target_fill.setData(x, np.where(target, score_top, 0.0))
        if self._history_scope is not scope:  # new session: its features, curves made once
            self._history_scope = scope
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
        self.raster_plot.setXRange(max(0.0, t_now - HISTORY_S), max(t_now, 1.0), padding=0)
        st = scope.last_state
        if st is not None:
            self._set_state_display(st.label, st.time_in_state_s, st.dwell_progress, st.score)

    def _set_state_display(
        self, label: Label, time_in_state_s: float, dwell: float, score: float
    ) -> None:
        key = label
        if getattr(self, "_state_shown", None) != key:
            self._state_shown = key
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

    def _update_thresholds(self) -> None:
        if self._dragging:
            return
        m = self.model
        if m.changed_thresholds and m.thresholds is not None:
            m.changed_thresholds = False
            self._snap_thresholds(m.thresholds)
        elif self.snapshot.calibrated or self.snapshot.phase in ("calibrating", "running"):
            enter, leave = self.snapshot.thresholds
            if math.isfinite(enter) and (enter, leave) != (
                self.enter_line.value(),
                self.leave_line.value(),
            ):
                self._snap_thresholds((enter, leave))

    # ---- raster, counts --------------------------------------------------------------------
    @staticmethod
    def _raster_tip(x: float, y: float, data: Any) -> str:
        return f"t = {x:.2f} s\n{data}"

    def _update_raster(self) -> None:
        t0 = self._t0 if self._t0 is not None else 0.0
        spots = []
        for a in self.model.attempts:
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

    def _update_counts(self, scope: Scope | None) -> None:
        snap, m = self.snapshot, self.model
        t_now = scope.last_state.t_stream if scope is not None and scope.last_state else math.nan
        last_min = m.fired_in_window(t_now) if math.isfinite(t_now) else 0
        cap = snap.session_cap or self.config.safety.session_cap
        rate = snap.max_per_minute or self.config.safety.max_per_minute
        self.counts_label.setText(
            f"pulses <b>{max(snap.pulse_count, m.n_fired)}</b> / session cap {cap} · "
            f"last 60 s <b>{last_min}</b> / {rate} per minute · vetoed {m.n_vetoed}"
        )

    def _update_calibration(self) -> None:
        snap, m = self.snapshot, self.model
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

    def _update_health(self, scope: Scope | None, now: float) -> None:
        h = self.model.health
        rows = []
        if scope is not None and scope.n_decisions:
            dec = scope.decisions(10.0)
            rate = effective_rate(dec.arrival, dec.n_samples, dec.t)
            nominal = scope.sfreq
            bad = math.isfinite(rate) and abs(rate - nominal) > 0.05 * nominal
            colour = "#b71c1c" if bad else "#1b5e20"
            rows.append(f"rate <b style='color:{colour}'>{rate:7.1f} Hz</b> / {nominal:g} nominal")
            last = scope.last_arrival  # may be newer than `now` by a chunk: clamp at 0
            age_ms = 1e3 * max(0.0, now - last) if math.isfinite(last) else math.nan
            colour = "#b71c1c" if age_ms > 1e3 * self.config.source.stale_after_s else "#1b5e20"
            rows.append(f"stream age <b style='color:{colour}'>{age_ms:6.0f} ms</b>")
        rows.append(f"gaps {self.model.n_gaps} · faults {self.model.n_health_faults}")
        lat = self.runner.latency_samples() if self.runner is not None else np.zeros(0)
        if lat.size:
            p50, p99 = np.percentile(lat, [50, 99])
            rows.append(f"decision latency p50 <b>{p50:.2f} ms</b> · p99 <b>{p99:.2f} ms</b>")
            counts, _ = np.histogram(np.clip(lat, 0, LATENCY_BINS_MS[-1] - 1e-9), LATENCY_BINS_MS)
            self.latency_bars.setOpts(height=counts)
        else:
            rows.append("decision latency: no data")
        dropped = int(h.get("dropped") or 0)
        dropped += getattr(self.runner, "events_dropped", 0) if self.runner is not None else 0
        if dropped:
            rows.append(f"<b style='color:#b71c1c'>events dropped {dropped}</b>")
        if self.model.session_folder:
            rows.append(f"folder {self.model.session_folder}")
        self.health_label.setText("<br>".join(rows))

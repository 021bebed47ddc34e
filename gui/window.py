"""The operator console window (PySide6 + pyqtgraph).

Never blocks and never owns data (STYLE 10): the session runs in a child process
(gui/procrunner.py); a QTimer reads the scope ring buffers (shared memory), drains the events
the child forwards and reads its snapshot. The window lays out the panels of gui/panels.py
(stream picker, arming and emergency stop, banner, traces, state and thresholds, calibration,
pulse raster, health), owns the timer and routes the panels' commands to the session; each
panel builds its widgets once and updates them from one `Tick`, so a tick only calls
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

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyqtgraph as pg
from pylsl import local_clock
from PySide6 import QtCore, QtGui, QtWidgets

from closedloop.config import SessionConfig
from closedloop.control import ControlError
from gui.model import GUI_REASON_PREFIX, ConsoleModel, Snapshot
from gui.panels import (
    HISTORY_S,
    ArmingPanel,
    BannerPanel,
    CalibrationPanel,
    HealthPanel,
    RasterPanel,
    StatePanel,
    StreamPanel,
    Tick,
    TracesPanel,
)
from gui.procrunner import ProcessRunner
from gui.qtfix import guard_none_refcount
from gui.runner import Runner, SessionRunner, SourceSpec
from gui.scope import Scope

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
ESTOP_KEYS = ("Esc", "F12")


class ConsoleWindow(QtWidgets.QMainWindow):
    """One window: stream, traces, features, state, calibration, arming, raster, health.

    config: the session config (source section = default stream). out_root: session folders.
    arm_action: arm automatically after calibration with this action name (demo), else None.
    list_streams: lister for the stream picker (blocking; run in a worker thread).
    runner_class: how sessions run: ProcessRunner (default: a child process, drawing cannot
    delay decisions) or gui.runner.SessionRunner (a thread here; the Session object is reachable).
    Both satisfy gui.runner.Runner.
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
        self.runner: Runner | None = None
        self.model = ConsoleModel()
        self.snapshot = Snapshot()
        self._tick_count = 0
        self._t0: float | None = None  # stream time shown as 0 on the history plots
        self._failure_shown = False
        self._report_folder: Path | None = None  # the ended session's folder (report button)
        self._report_job: tuple[threading.Thread, dict] | None = None
        self.report_path: Path | None = None
        self.tick_durations_ms: list[float] = []
        self.tick_interval_ms = TICK_MS
        self._duty_t = (time.perf_counter(), time.thread_time())
        self.gui_duty = 0.0
        self.setWindowTitle("closedloop · operator console")
        self.resize(1600, 1000)
        pg.setConfigOptions(antialias=False, background="w", foreground="k")
        self.stream_panel = StreamPanel(
            config,
            list_streams,
            self._start_clicked,
            self._stop_clicked,
            self._message,
            on_report=self.open_report,
        )
        self.arming = ArmingPanel(
            self.arm_clicked,
            self.disarm_clicked,
            lambda: self.emergency_stop("console button"),
            ESTOP_KEYS,
        )
        self.banner_panel = BannerPanel(self.acknowledge_banner)
        self.traces = TracesPanel(config)
        self.state = StatePanel(config, self._thresholds_dropped)
        self.calibration = CalibrationPanel(
            self._recalibrate_clicked, self._finish_calibration_clicked
        )
        self.raster_panel = RasterPanel(config)
        self.health = HealthPanel(config)
        self.phase_panel = None
        if config.phase.enabled:  # phase-locked pulses: target, SNR, rose of fired phases
            from gui.phase_panel import PhasePanel

            self.phase_panel = PhasePanel(config)
        self.panels = (
            self.stream_panel,
            self.arming,
            self.banner_panel,
            self.traces,
            self.state,
            self.calibration,
            self.raster_panel,
            self.health,
            *([self.phase_panel] if self.phase_panel is not None else []),
        )
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
        root.addLayout(self.stream_panel.build())
        root.addLayout(self.arming.build())
        root.addWidget(self.banner_panel.build())
        split = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        split.addWidget(self.traces.build())
        split.addWidget(self._build_right())
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 1)
        split.setSizes([820, 780])
        root.addWidget(split, 1)
        self.setCentralWidget(central)
        self.status_line = QtWidgets.QLabel("")
        self.statusBar().addWidget(self.status_line, 1)

    def _build_right(self) -> QtWidgets.QWidget:
        box = QtWidgets.QWidget()
        lay = QtWidgets.QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        top = QtWidgets.QHBoxLayout()
        top.addWidget(self.state.build(), 1)
        top.addWidget(self.calibration.build(), 1)
        lay.addLayout(top)
        raster_plot = self.raster_panel.build()
        # one time axis: the state panel scrolls the raster, the score and band plots follow
        self.state.time_plot = raster_plot
        self.state.band_plot.setXLink(raster_plot)
        self.state.score_plot.setXLink(raster_plot)
        lay.addWidget(self.state.band_plot, 2)
        lay.addWidget(self.state.score_plot, 2)
        lay.addWidget(raster_plot, 1)
        lay.addWidget(self.raster_panel.counts_label)
        if self.phase_panel is None:
            lay.addWidget(self.health.build())
        else:  # side by side: stacked, the two squeezed the score plots to ~30 px at 1000 px
            row = QtWidgets.QHBoxLayout()
            row.addWidget(self.health.build(), 1)
            row.addWidget(self.phase_panel.build(), 1)
            lay.addLayout(row)
        return box

    def _install_shortcuts(self) -> None:
        self.estop_shortcuts = []
        for key in ESTOP_KEYS:
            sc = QtGui.QShortcut(QtGui.QKeySequence(key), self)
            sc.setContext(QtCore.Qt.ShortcutContext.ApplicationShortcut)
            sc.activated.connect(lambda key=key: self.emergency_stop(f"keyboard {key}"))
            self.estop_shortcuts.append(sc)

    # ---- the widgets tests and tools reach by their old names (they live in the panels) ----
    stream_combo = property(lambda self: self.stream_panel.stream_combo)
    start_button = property(lambda self: self.stream_panel.start_button)
    stop_button = property(lambda self: self.stream_panel.stop_button)
    refresh_button = property(lambda self: self.stream_panel.refresh_button)
    connection_label = property(lambda self: self.stream_panel.connection_label)
    report_button = property(lambda self: self.stream_panel.report_button)
    armed_label = property(lambda self: self.arming.armed_label)
    arm_button = property(lambda self: self.arming.arm_button)
    disarm_button = property(lambda self: self.arming.disarm_button)
    estop_button = property(lambda self: self.arming.estop_button)
    banner = property(lambda self: self.banner_panel.banner)
    banner_label = property(lambda self: self.banner_panel.banner_label)
    channel_table = property(lambda self: self.traces.channel_table)
    trace_curves = property(lambda self: self.traces.trace_curves)
    _shown_idx = property(lambda self: self.traces.shown_idx)
    enter_line = property(lambda self: self.state.enter_line)
    leave_line = property(lambda self: self.state.leave_line)
    calibration_bar = property(lambda self: self.calibration.calibration_bar)
    calibration_note = property(lambda self: self.calibration.calibration_note)
    baseline_table = property(lambda self: self.calibration.baseline_table)
    raster = property(lambda self: self.raster_panel.raster)
    counts_label = property(lambda self: self.raster_panel.counts_label)
    health_label = property(lambda self: self.health.health_label)

    def _update_traces(self, scope: Scope) -> None:
        self.traces.draw(scope)

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
        self._failure_shown = False
        self.traces.new_session()
        self.runner = runner_class(
            self.config, source, out_root=self.out_root, arm_action=self.arm_action
        ).start()
        self.stream_panel.session_started()
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
        stream = self.stream_panel.stream_combo.currentData()
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
        self.banner_panel.hide()

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

    def _thresholds_dropped(self, enter: float, leave: float) -> None:
        """A threshold line was dropped: validate through the session, snap back if refused."""
        config_values = (self.config.state.enter, self.config.state.leave)
        if self.session is None or not self.runner.ready:
            self.state.snap_thresholds(config_values)
            self._message("thresholds change only while a session runs", error=True)
            return
        try:
            self.session.set_thresholds(enter, leave, source="console drag")
        except ControlError as exc:
            try:
                self.state.snap_thresholds(self.session.thresholds())
            except ControlError:
                self.state.snap_thresholds(config_values)
            self._message(f"thresholds refused: {exc}", error=True)
            return
        self._message(f"thresholds set: enter {enter:.2f}, leave {leave:.2f}")

    def open_report(self) -> None:
        """`closedloop report` of the ended session, written off the GUI thread (3-5 s for 150 s
        of 32 channels), then opened in the browser."""
        folder = self._report_folder
        if folder is None or self._report_job is not None:
            return
        result: dict[str, Any] = {}

        def work() -> None:  # no Qt calls here: the tick shows the result
            from closedloop.export.report import write_report

            try:
                result["path"] = write_report(folder)
            except Exception as exc:  # shown in the status line, never silent
                result["error"] = f"{type(exc).__name__}: {exc}"

        self._report_job = (threading.Thread(target=work, name="report", daemon=True), result)
        self._report_job[0].start()
        self.report_button.setEnabled(False)
        self._message(f"writing the report of {Path(folder).name} …")

    def _note_session_end(self, runner) -> None:
        """Once the runner's session has ended, its folder is the one the report button writes."""
        if runner.running or not runner.started:
            return
        folder = getattr(runner.session, "folder", None)
        if folder is not None and folder != self._report_folder:
            self._report_folder = folder
            self.report_button.setEnabled(self._report_job is None)

    def _poll_report(self) -> None:
        assert self._report_job is not None
        thread, result = self._report_job
        if thread.is_alive():
            return
        self._report_job = None
        self.report_button.setEnabled(self._report_folder is not None)
        if "error" in result:
            self._message(f"report failed: {result['error']}", error=True)
            return
        self.report_path = result["path"]
        self._message(f"report: {self.report_path}")
        self.open_url(self.report_path)

    def open_url(self, path: Path) -> None:
        """Open a file in the desktop's browser (tests replace this)."""
        QtGui.QDesktopServices.openUrl(QtCore.QUrl.fromLocalFile(str(path)))

    def _message(self, text: str, error: bool = False) -> None:
        self.status_line.setText(text)
        self.status_line.setStyleSheet("color: #b71c1c; font-weight: bold;" if error else "")

    def refresh_streams(self) -> None:
        """List LSL streams in a worker thread (resolving blocks about a second)."""
        self.stream_panel.refresh()

    # ------------------------------------------------------------------------ the tick
    def tick(self) -> None:
        """Poll the session: drain events, read a snapshot and the scope, update the panels."""
        t_start = time.perf_counter()
        self._tick_count += 1
        runner = self.runner
        if self._report_job is not None:
            self._poll_report()
        if runner is not None:
            self._note_session_end(runner)
        if runner is not None:
            self.model.apply(runner.subscription.drain())  # ProcessRunner: reads the pipe
            self.snapshot = runner.snapshot()
            if runner.error is not None and not self._failure_shown:
                self._failure_shown = True
                self.model.raise_banner(f"SESSION FAILED: {runner.error_text}", local_clock())
        scope = runner.scope if runner is not None else None
        history = self._tick_count % HISTORY_EVERY_TICKS == 1
        if self._t0 is None and scope is not None and scope.n_samples and scope.n_decisions:
            self._t0 = float(scope.decisions(HISTORY_S).t[0])
            history = True
        slow = self._tick_count % SLOW_EVERY_TICKS == 1
        tick = Tick(
            snapshot=self.snapshot,
            model=self.model,
            runner=runner,
            scope=scope,
            now=local_clock(),
            running=runner is not None and runner.running,
            slow=slow,
            history=history,
            t0=self._t0,
        )
        for panel in self.panels:
            panel.update(tick)
        if slow:
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

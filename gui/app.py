"""`closedloop gui` entry point: the console window, and the documented screenshot run."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

from PySide6 import QtWidgets

from acquisition.replayer_process import start_replayer_process, stop_replayer_process
from closedloop.bundled import BUNDLED, DEMO_START_S, demo_config
from closedloop.config import SessionConfig, apply_overrides
from closedloop.errors import UserError
from gui.display import has_display
from gui.procrunner import yield_cpu_to_sessions
from gui.window import ConsoleWindow

SCREENSHOT_CALIBRATION_S = 10.0  # short baseline; replayed from DEMO_START_S (the bundled file
# is target-free for its first 65 s, issue 20), the first pulse comes ~33 s into the replay
SCREENSHOT_TIMEOUT_S = 120.0  # give up waiting for a pulse after this long (wall clock)
SCREENSHOT_AFTER_PULSE_S = 4.0  # let the raster and traces move on a little after the pulse
SCREENSHOT_SIZE = (1600, 1000)
# GIL switch interval while the console runs (Python's default is 5 ms). Matters only when the
# session runs in a thread of this process (gui.runner.SessionRunner; the console's default
# ProcessRunner keeps the loop in its own process): there, an acquisition thread whose pull
# returns while the GUI thread holds the GIL waits up to this long (plus the GUI's current C++
# call). `python -m gui.bench`, 64 ch at 1 kHz, loaded 2-core machine, thread runner: decision
# latency p99 11.2 ms at 0.5 ms vs 13.4 ms at 5 ms.
GUI_SWITCH_INTERVAL_S = 0.0005


def _app():
    # Qt reads QT_QPA_PLATFORM here, when the first QApplication starts
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])


def run_gui(
    config: SessionConfig,
    screenshot: Path | None = None,
    autostart: bool = False,
    arm_action: str | None = None,
    out_root: Path | None = None,
    screenshot_pulses: int = 1,
) -> int:
    """Open the console and return its exit status when the window is closed.

    autostart: start a session on the config's stream at once (the demo).
    arm_action: arm automatically after calibration with this action name (demo only).
    screenshot: instead, replay the bundled recording offscreen, save a PNG there (after
    `screenshot_pulses` pulses fired), exit.
    """
    if screenshot is not None:
        return take_screenshot(
            config, Path(screenshot), out_root=out_root, pulses=screenshot_pulses
        )
    app = _app()
    if os.environ.get("QT_QPA_PLATFORM") != "offscreen" and not has_display():
        raise UserError(
            "no display for the console window: run on a desktop, or use "
            "`closedloop gui --screenshot PATH` (or QT_QPA_PLATFORM=offscreen)"
        )
    sys.setswitchinterval(GUI_SWITCH_INTERVAL_S)
    yield_cpu_to_sessions()  # drawing yields the CPU to the session process
    win = ConsoleWindow(config, out_root=out_root, arm_action=arm_action)
    win.show()
    if autostart:
        win.start_session()
    # Ctrl-C / SIGTERM close the window, which disarms and ends the session cleanly.
    previous = {
        sig: signal.signal(sig, lambda *_: win.close()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        app.exec()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if win.isVisible():
            win.close()
    runner = win.runner
    return 1 if runner is not None and runner.error is not None else 0


def take_screenshot(
    config: SessionConfig,
    path: Path,
    out_root: Path | None = None,
    timeout_s: float = SCREENSHOT_TIMEOUT_S,
    pulses: int = 1,
) -> int:
    """Replay the bundled 32-ch recording, run the console offscreen until `pulses` pulses
    fired, save.

    Returns 0 when the PNG shows a calibrated, armed session with at least one pulse, else 1
    (the PNG is written either way).
    """
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    tag = uuid.uuid4().hex[:8]
    name = source_id = f"closedloop-screenshot-{tag}"
    cfg = demo_config(config, name, source_id)
    # the replayer process needs a few seconds (python + mne imports) before its outlet exists
    cfg = apply_overrides(
        cfg,
        {
            "state.calibration_s": SCREENSHOT_CALIBRATION_S,
            "recording.xdf": False,
            "source.resolve_timeout_s": 60.0,
        },
    )
    tmp = None
    if out_root is None:
        tmp = tempfile.TemporaryDirectory(prefix="closedloop-screenshot-")
        out_root = Path(tmp.name)
    replayer = start_replayer_process(BUNDLED, name, source_id, speed=1.0, start_s=DEMO_START_S)
    app = _app()
    sys.setswitchinterval(GUI_SWITCH_INTERVAL_S)
    win = ConsoleWindow(cfg, out_root=out_root, arm_action="screenshot_auto_arm")
    win.resize(*SCREENSHOT_SIZE)
    win.show()
    ok = False
    try:
        win.start_session()
        deadline = time.monotonic() + timeout_s
        fired_at = None
        while time.monotonic() < deadline:
            app.processEvents()
            time.sleep(0.01)
            runner = win.runner
            if runner is not None and runner.error is not None:
                break
            if fired_at is None and win.model.n_fired >= pulses:
                fired_at = time.monotonic()
            if fired_at is not None and time.monotonic() - fired_at >= SCREENSHOT_AFTER_PULSE_S:
                ok = True
                break
        win.tick()
        app.processEvents()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not win.grab().save(str(path)):
            print(f"closedloop gui: could not write {path}", file=sys.stderr)
            return 1
        print(f"wrote {path}" + ("" if ok else " (no pulse fired before the timeout)"))
        return 0 if ok else 1
    finally:
        win.close()
        stop_replayer_process(replayer)
        if tmp is not None:
            tmp.cleanup()

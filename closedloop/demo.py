"""The demo: a bundled recording replayed over LSL in its own process, the closed loop on it.

Shows the operator console where a display exists, a live one-line status otherwise, and ends
with the session summary. Needs no arguments and no config.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from closedloop.config import SessionConfig
from closedloop.errors import UserError

BUNDLED = Path(__file__).resolve().parents[1] / "replay_data" / "sim_32ch_500hz.fif"
# The bundled recording opens with 65 s of mind wandering (a clean baseline for the tuner's 45 s
# calibration) before its first meditation block. The demo replays it from DEMO_START_S with a
# DEMO_CALIBRATION_S baseline: warm-up 2 s + artifact learning 10 s + settle 1.5 s + 15 s = 28.5 s
# of the 31 s left before the block, so a newcomer sees the first pulse about 33 s in, not 67 s.
DEMO_CALIBRATION_S = 15.0
DEMO_START_S = 34.0


def has_display() -> bool:
    if os.environ.get("QT_QPA_PLATFORM", "") == "offscreen":
        return False
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in (
        "win32",
        "darwin",
    )


def qt_window_works() -> tuple[bool, str]:
    """Can Qt open a window on this display? Probed in a child process, because Qt aborts the
    whole process (SIGABRT, no exception) when its platform plugin cannot load, e.g. a Linux
    desktop without libxcb-cursor0."""
    probe = "from PySide6.QtWidgets import QApplication; QApplication([])"
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode == 0:
        return True, ""
    lines = [ln for ln in proc.stderr.splitlines() if "qt.qpa" in ln or "plugin" in ln]
    return False, (lines[0] if lines else proc.stderr.strip()[-200:])


def start_replayer(
    recording: Path,
    name: str,
    source_id: str,
    speed: float = 1.0,
    loop: str = "1",
    wait_consumers_s: float = 60.0,
    start_s: float = 0.0,
) -> subprocess.Popen:
    """Run `python -m acquisition.replayer` in its own process (as a lab's amplifier would be).

    It waits for its first consumer (the session's XDF recorder) so nothing is missed.
    """
    cmd = [
        sys.executable,
        "-m",
        "acquisition.replayer",
        str(recording),
        "--name",
        name,
        "--source-id",
        source_id,
        "--speed",
        str(speed),
        "--loop",
        loop,
        "--no-progress",
        "--wait-consumers",
        str(wait_consumers_s),
        "--start",
        str(start_s),
    ]
    # its own process group, as an amplifier app would be: Ctrl-C in the terminal stops the
    # session (which prints its summary), not the stream under it
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)


def demo_config(
    config: SessionConfig, name: str, source_id: str, bundled: bool = True
) -> SessionConfig:
    """The demo streams its own replayer: point the source at it; on the bundled recording, a
    shorter baseline (DEMO_CALIBRATION_S) so that a newcomer sees a pulse within about 30 s."""
    config = config.model_copy(deep=True)
    config.source.kind = "lsl"
    config.source.name = name
    config.source.source_id = source_id
    config.session.name = "demo"
    if bundled:
        config.state.calibration_s = min(config.state.calibration_s, DEMO_CALIBRATION_S)
    return config


def run_demo(
    config: SessionConfig,
    recording: Path | None = None,
    duration_s: float | None = None,
    speed: float = 1.0,
    headless: bool = False,
    out_root: Path | None = None,
) -> int:
    from acquisition.sources import source_from_settings
    from closedloop.cli import (
        _install_signal_handlers,
        _print_status,
        _print_summary,
        status_period_s,
    )
    from closedloop.session import Session

    recording = Path(recording or BUNDLED)
    if not recording.exists():
        raise UserError(
            f"{recording}: recording not found "
            "(regenerate it with the command in replay_data/README.md)"
        )
    tag = uuid.uuid4().hex[:8]
    name, source_id = f"closedloop-demo-{tag}", f"closedloop-demo-{tag}"
    bundled = recording.resolve() == BUNDLED
    config = demo_config(config, name, source_id, bundled=bundled)
    if duration_s is not None:
        config.session.duration_s = duration_s
    replayer = start_replayer(
        recording, name, source_id, speed, start_s=DEMO_START_S if bundled else 0.0
    )
    try:
        gui_ok, why = (False, "") if headless or not has_display() else qt_window_works()
        if why:
            print(
                f"closedloop demo: a display exists but Qt cannot open a window ({why}); "
                "running headless (Qt needs the X libraries that ./dev installs as root, e.g. "
                "libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1)",
                file=sys.stderr,
            )
        if gui_ok:
            from gui.app import run_gui

            return run_gui(config, autostart=True, arm_action="demo_auto_arm", out_root=out_root)
        print(
            f"closedloop demo: headless: replaying {recording.name} as LSL stream "
            f"'{name}', simulated stimulator, auto-armed after a "
            f"{config.state.calibration_s:g} s baseline"
            + (
                f" (shortened for the bundled simulation, replayed from {DEMO_START_S:g} s)"
                if bundled
                else ""
            )
            + ". Ctrl-C stops.",
            file=sys.stderr,
        )
        source = source_from_settings(
            config.source,
            name=name,
            source_id=source_id,
            stype=None,
            resolve_timeout_s=max(30.0, config.source.resolve_timeout_s),  # replayer start-up
        )
        session = Session(
            config,
            source,
            live=True,
            out_root=out_root,
            arm_action="demo_auto_arm",
            on_status=_print_status,
            status_period_s=status_period_s(),
        )
        _install_signal_handlers(session)
        replayer_done = _watch_replayer(replayer, session)
        summary = session.run()
        replayer_done.set()
        _print_summary(summary)
        return 0
    finally:
        if replayer.poll() is None:
            replayer.terminate()
            try:
                replayer.wait(timeout=5)
            except subprocess.TimeoutExpired:
                replayer.kill()


def _watch_replayer(proc: subprocess.Popen, session):
    """End the session shortly after the replayer finishes the recording."""
    import threading

    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            if proc.poll() is not None:
                # give the loop time to drain the last samples before stopping
                if not done.wait(1.0):
                    session.stop("replay finished")
                return

    threading.Thread(target=watch, name="replayer-watch", daemon=True).start()
    return done

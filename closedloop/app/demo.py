"""The demo: a bundled recording replayed over LSL in its own process, the closed loop on it.

Shows the operator console where a display exists, a live one-line status otherwise, and ends
with the session summary. Needs no arguments and no config.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from acquisition.replayer_process import start_replayer_process, stop_replayer_process
from closedloop.bundled import BUNDLED, DEMO_START_S, demo_config
from closedloop.config import SessionConfig
from closedloop.errors import UserError
from gui.display import has_display, qt_window_works


def run_demo(
    config: SessionConfig,
    recording: Path | None = None,
    duration_s: float | None = None,
    speed: float = 1.0,
    headless: bool = False,
    out_root: Path | None = None,
) -> int:
    from acquisition.sources import source_from_settings
    from closedloop.app.status import (
        install_signal_handlers,
        print_status,
        print_summary,
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
    replayer = start_replayer_process(
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
            on_status=print_status,
            status_period_s=status_period_s(),
        )
        install_signal_handlers(session)
        replayer_done = _watch_replayer(replayer, session)
        summary = session.run()
        replayer_done.set()
        print_summary(summary)
        return 0
    finally:
        stop_replayer_process(replayer)


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

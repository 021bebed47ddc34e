"""Is there a screen to show the console on? Asked before any Qt import (Qt aborts the whole
process, with no exception, when its platform plugin cannot load)."""

from __future__ import annotations

import os
import subprocess
import sys


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

"""Run a child Python program and SIGKILL it mid-work (for 'a killed process leaves ...' tests)."""

from __future__ import annotations

import signal
import subprocess
import sys


def sigkill_after(child: str, n_reported: int) -> int:
    """Run `child` (it prints one integer per unit of work); SIGKILL it once it has reported
    `n_reported`. Returns the last integer it printed; asserts it died by SIGKILL."""
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    last = -1
    try:
        for line in proc.stdout:
            last = int(line)
            if last >= n_reported:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return last

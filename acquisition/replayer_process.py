"""A replayer in its own process, started and stopped as a lab's amplifier app would be: used by
`closedloop demo`, the console's demo button and the latency bench."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def start_replayer_process(
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


def stop_replayer_process(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """Terminate the replayer (SIGTERM), then kill it if it has not ended within `timeout_s`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)

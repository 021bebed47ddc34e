"""The README's first command, headless: replayer process, live loop, summary, session folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from closedloop.load import load_session
from gui.display import qt_window_works

pytestmark = [pytest.mark.lsl, pytest.mark.slow]


@pytest.mark.timeout(180)
def test_demo_headless_runs_the_closed_loop_and_ends_with_the_summary(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "closedloop.app.cli", "demo", "--headless", "--speed", "8",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=170, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "session summary" in proc.stdout
    assert "headless" in proc.stderr
    (folder,) = tmp_path.iterdir()
    rec = load_session(folder)
    assert rec.summary["pulses"] >= 1
    assert rec.summary["final_interlock"] == "disarmed"
    assert rec.eeg_source == "xdf"
    assert (rec.raw.annotations.description == "pulse").sum() == rec.summary["pulses"]


@pytest.mark.timeout(60)
def test_qt_probe_reports_a_working_platform():
    ok, why = qt_window_works()  # the tests run offscreen, which always loads
    assert ok, why


@pytest.mark.timeout(120)
def test_ctrl_c_stops_the_demo_cleanly_with_its_summary(tmp_path):
    """SIGINT to the whole foreground process group, as a terminal sends it: before, the
    LabRecorder child died too and the demo ended with 'BrokenPipeError' and exit 1, no summary.
    Also: the bundled recording's shorter baseline gives a pulse within about 30 s of stream, and
    liblsl's INFO / ERR lines stay off the console."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "closedloop.app.cli", "demo", "--headless", "--speed", "2",
         "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True,  # its own group: the test sends the group SIGINT like a terminal
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            folders = list(tmp_path.iterdir())
            audit = folders[0] / "audit.jsonl" if folders else None
            if audit is not None and audit.exists() and '"fired":true' in audit.read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the demo ended before the first pulse"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "session summary" in out
    assert "stop_reason       signal SIGINT" in out
    assert "Broken pipe" not in err
    assert "INFO|" not in err
    assert "ERR|" not in err
    assert "shortened for the bundled simulation" in err
    (folder,) = tmp_path.iterdir()
    rec = load_session(folder)
    assert rec.summary["pulses"] >= 1
    assert rec.eeg_source == "xdf"  # LabRecorder finished the file: it was not killed by SIGINT
    assert not rec.pulses_outside  # the XDF holds the EEG up to the pulse (stopped right after)
    first_pulse = rec.raw.annotations.onset[rec.raw.annotations.description == "pulse"][0]
    assert first_pulse < 35.0  # stream seconds from the first sample

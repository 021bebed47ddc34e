"""The README's first command, headless: replayer process, live loop, summary, session folder."""

from __future__ import annotations

import subprocess
import sys

import pytest

from closedloop.demo import qt_window_works
from closedloop.load import load_session

pytestmark = [pytest.mark.lsl, pytest.mark.slow]


@pytest.mark.timeout(180)
def test_demo_headless_runs_the_closed_loop_and_ends_with_the_summary(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "closedloop.cli", "demo", "--headless", "--speed", "8",
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

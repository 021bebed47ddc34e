"""The console's session process (gui/procrunner.py) against a replayed LSL stream.

Commands round trip to the child (ARM through the confirmation, DISARM, EMERGENCY STOP) and the
child's own interlock and audit log show them; closing the window, or SIGKILL of the console
process, leaves the child disarmed with a complete session folder; a child that fails (a stream
that is not there, or killed) is shown in the window.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from closedloop.control import ControlError
from closedloop.recording import _finite
from gui.procrunner import GUI_NICE, ProcessRunner, SessionProcessError
from gui.window import TICK_MS, ConsoleWindow
from tests.kill_helpers import sigkill_after
from tests.test_gui_console import CALIBRATION_S, CONNECT_TIMEOUT_MS, _config

pytestmark = [pytest.mark.gui, pytest.mark.lsl]

CHILD_END_TIMEOUT_S = 30.0  # an orphaned session process disarms, flushes and exits in this


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, not reaped by a container's init, counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_commands_round_trip_to_the_child_and_close_leaves_a_complete_folder(
    qtbot, tmp_path, unique_name, looping_replayer
):
    win = ConsoleWindow(_config(unique_name), out_root=tmp_path)
    qtbot.addWidget(win)
    win.show()
    runner = win.start_session()
    assert isinstance(runner, ProcessRunner)  # the console's default
    assert runner.pid != os.getpid()
    qtbot.waitUntil(lambda: win.snapshot.calibrated, timeout=CONNECT_TIMEOUT_MS + 15_000)
    qtbot.waitUntil(win.arm_button.isEnabled, timeout=2000)

    # ARM refused at the confirmation: nothing reaches the child
    win.confirm_arm = lambda: False
    win.arm_clicked()
    assert runner.session.probe()["interlock"] == "disarmed"
    assert "cancelled" in win.status_line.text()
    # ARM confirmed: the child's interlock is armed (or already pulsed: thresholds are low)
    win.confirm_arm = lambda: True
    win.arm_clicked()
    probe = runner.session.probe()
    assert probe["interlock"] in ("armed", "refractory")
    assert probe["pid"] == runner.pid
    name, effect_ms, roundtrip_ms = runner.session.last_command_ms
    assert name == "arm"
    assert 0.0 < effect_ms <= roundtrip_ms
    # DISARM button
    qtbot.waitUntil(win.disarm_button.isEnabled, timeout=2 * TICK_MS + 500)
    win.disarm_clicked()
    probe = runner.session.probe()
    assert probe["interlock"] == "disarmed"
    assert "DISARM button" in probe["reason"]
    # EMERGENCY STOP while armed: disarmed in the child when the call returns, latched
    win.arm_clicked()
    assert runner.session.probe()["interlock"] in ("armed", "refractory")
    win.emergency_stop("test button")
    name, effect_ms, _ = runner.session.last_command_ms
    assert name == "emergency_stop"
    assert effect_ms > 0.0
    probe = runner.session.probe()
    assert probe["interlock"] == "disarmed"
    assert probe["locked_out"]
    assert probe["reason"] == "emergency stop (console: test button)"
    with pytest.raises(ControlError, match="emergency stop"):  # refused by the child
        runner.session.arm("gui_button")
    qtbot.wait(TICK_MS + 10)
    assert win.armed_label.text().startswith("EMERGENCY STOP")

    # closing the window: the child ends by itself, the folder is complete
    shm_name = runner._shm.name if runner._shm is not None else None
    win.close()
    assert not runner.running
    assert runner._proc.exitcode == 0
    assert runner.error is None
    folder = Path(runner.session.folder)
    assert folder.parent == tmp_path
    summary = json.loads((folder / "summary.json").read_text())
    # the file is the returned summary as JSON (nan written as null: timing of empty sets)
    assert summary == json.loads(json.dumps(_finite(runner.summary)))
    assert summary["final_interlock"] == "disarmed"
    assert summary["stop_reason"].startswith("operator (console): console closed")
    audit = _jsonl(folder / "audit.jsonl")
    estops = [a for a in audit if a.get("reason") == "emergency stop (console: test button)"]
    assert estops
    assert estops[0]["new"] == "disarmed"
    kinds = {e.get("kind") for e in _jsonl(folder / "events.jsonl")}
    assert "emergency_stop" in kinds
    if shm_name is not None and Path("/dev/shm").is_dir():
        assert not (Path("/dev/shm") / shm_name.lstrip("/")).exists()  # the child unlinked it


KILLED_CONSOLE = """
import sys, time
from pathlib import Path
from closedloop.config import SessionConfig, apply_overrides
from gui.procrunner import ProcessRunner

def main():
    cfg = apply_overrides(SessionConfig(), {overrides!r})
    runner = ProcessRunner(cfg, out_root=Path({out!r}), arm_action="test_auto_arm").start()
    while True:
        time.sleep(0.1)
        runner.poll()
        if runner.error is not None:
            print(-1, flush=True)
            return
        if runner.snapshot().interlock in ("armed", "refractory"):
            print(runner.pid, flush=True)  # armed in the child: now kill this process
            time.sleep(600)

if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_of_the_console_leaves_the_child_disarmed_with_a_complete_folder(
    tmp_path, unique_name, looping_replayer
):
    overrides = {
        "source.name": unique_name,
        "source.source_id": unique_name,
        "source.stype": None,
        "source.resolve_timeout_s": 40.0,
        "state.calibration_s": CALIBRATION_S,
        "artifacts.learn_s": 2.0,  # issue 20's artifact learning (10 s by default), kept short
        "bandpower.groups": {"frontal_midline": ["AF7", "AF8"], "posterior": ["TP9", "TP10"]},
        "recording.xdf": False,
        "session.publish_lsl": False,
    }
    child = KILLED_CONSOLE.format(overrides=overrides, out=str(tmp_path))
    session_pid = sigkill_after(child, 1)  # the console process printed its child's pid
    assert session_pid > 0, "the session process failed before arming"
    deadline = time.monotonic() + CHILD_END_TIMEOUT_S
    while _pid_alive(session_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(session_pid), "the orphaned session process did not end"
    (folder,) = tmp_path.glob("*/summary.json")
    folder = folder.parent
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final_interlock"] == "disarmed"
    assert "console" in summary["stop_reason"]
    audit = _jsonl(folder / "audit.jsonl")
    changes = [a for a in audit if a.get("event") == "interlock"]
    assert any(a["new"] == "armed" for a in changes)  # it was armed when the console died
    assert changes[-1]["new"] == "disarmed"
    assert "console" in changes[-1]["reason"]
    assert _jsonl(folder / "events.jsonl")[-1]  # the event log was flushed and closed


@pytest.mark.timeout(60)
def test_a_session_that_fails_in_the_child_is_shown_in_the_window(qtbot, tmp_path, unique_name):
    cfg = _config(unique_name, **{"source.resolve_timeout_s": 0.5})  # no such stream
    win = ConsoleWindow(cfg, out_root=tmp_path, list_streams=lambda _t: [])
    qtbot.addWidget(win)
    win.show()
    runner = win.start_session()
    qtbot.waitUntil(lambda: runner.error is not None, timeout=CONNECT_TIMEOUT_MS)
    assert isinstance(runner.error, SessionProcessError)
    assert "StreamNotFoundError" in runner.error_text
    assert "StreamNotFoundError" in runner.error_traceback  # the child's traceback
    qtbot.waitUntil(win.banner.isVisible, timeout=2 * TICK_MS + 500)
    assert "SESSION FAILED" in win.banner_label.text()
    assert unique_name in win.banner_label.text()
    qtbot.waitUntil(lambda: not runner.running, timeout=10_000)
    qtbot.waitUntil(win.start_button.isEnabled, timeout=2 * TICK_MS + 500)
    assert win.connection_label.text().startswith("session failed")
    win.close()


@pytest.mark.timeout(90)
def test_a_killed_session_process_is_shown_and_estop_still_answers(
    qtbot, tmp_path, unique_name, looping_replayer
):
    win = ConsoleWindow(_config(unique_name), out_root=tmp_path, list_streams=lambda _t: [])
    qtbot.addWidget(win)
    win.show()
    runner = win.start_session()
    qtbot.waitUntil(lambda: runner.scope is not None, timeout=CONNECT_TIMEOUT_MS)
    os.kill(runner.pid, signal.SIGKILL)
    qtbot.waitUntil(lambda: runner.error is not None, timeout=5000)
    assert "killed by SIGKILL" in runner.error_text
    qtbot.waitUntil(win.banner.isVisible, timeout=2 * TICK_MS + 500)
    assert "SESSION FAILED" in win.banner_label.text()
    win.emergency_stop("after the crash")  # must not raise: shown in the status line
    assert "not running" in win.status_line.text()
    assert win.armed_label.text().startswith("EMERGENCY STOP")
    assert "killed by SIGKILL" in runner.error_text  # the first cause stays shown
    win.close()


@pytest.mark.timeout(90)
def test_a_killed_session_process_leaves_no_shared_memory_while_the_console_stays_open(
    qtbot, tmp_path, unique_name, looping_replayer
):
    """SIGKILL of the child: its scope segment leaves /dev/shm on the console's next polls,
    not when the console exits; the window keeps showing the last data it mapped."""
    win = ConsoleWindow(_config(unique_name), out_root=tmp_path, list_streams=lambda _t: [])
    qtbot.addWidget(win)
    win.show()
    runner = win.start_session()
    qtbot.waitUntil(lambda: runner.scope is not None, timeout=CONNECT_TIMEOUT_MS)
    qtbot.waitUntil(lambda: runner.scope.n_samples > 0, timeout=5000)
    segment = Path("/dev/shm") / runner._shm.name
    if not segment.parent.is_dir():
        pytest.skip("no /dev/shm on this platform")
    assert segment.exists()
    os.kill(runner.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    qtbot.waitUntil(lambda: not segment.exists(), timeout=2000)
    gone_s = time.monotonic() - t_kill
    print(f"segment removed {1e3 * gone_s:.0f} ms after SIGKILL")
    assert win.isVisible()
    assert runner.scope.n_samples > 0  # the console's mapping outlives the name
    qtbot.wait(3 * TICK_MS)  # later polls do not trip over the removed segment
    assert "killed by SIGKILL" in runner.error_text
    win.close()


NICE_CHECK = """
import threading, time
from closedloop.config import SessionConfig, apply_overrides
from gui.procrunner import ProcessRunner, yield_cpu_to_sessions

def nice_of(path):
    return int(open(path).read().rsplit(")", 1)[1].split()[16])

if __name__ == "__main__":
    assert yield_cpu_to_sessions()
    assert not yield_cpu_to_sessions()  # once per process
    cfg = apply_overrides(SessionConfig(), {overrides!r})
    runner = ProcessRunner(cfg).start()
    me = nice_of(f"/proc/self/task/{{threading.get_native_id()}}/stat")
    child = nice_of(f"/proc/{{runner.pid}}/stat")
    runner.stop("test", 20.0)
    print(me, child)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux")
@pytest.mark.timeout(60)
def test_gui_thread_yields_cpu_but_session_processes_keep_their_priority(unique_name):
    overrides = {"source.name": unique_name, "source.resolve_timeout_s": 0.5}
    out = subprocess.run(
        [sys.executable, "-c", NICE_CHECK.format(overrides=overrides)],
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    )
    gui_nice, child_nice = map(int, out.stdout.split()[-2:])
    base = os.nice(0)
    assert gui_nice == base + GUI_NICE
    assert child_nice == base

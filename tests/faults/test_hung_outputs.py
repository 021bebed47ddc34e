"""A hung output (a wedged driver): the watchdog disarms, and e-stop, SIGINT and MQTT e-stop are
answered at once while fire() hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from closedloop.load import read_jsonl
from tests.faults.helpers import (
    REPEAT_EVERY_SECOND,
    SIGINT_CHILD,
    assert_disarmed_with,
    live_session,
    replayer,
    run_with,
    wait_for,
)
from tests.session_helpers import end_process, start_replayer

pytestmark = [pytest.mark.lsl, pytest.mark.slow, pytest.mark.timeout(120)]


def test_hung_output_the_watchdog_disarms(recording, unique_name, out_dir, hang_simulated):
    proc = replayer(recording, unique_name)
    session = live_session(unique_name, **REPEAT_EVERY_SECOND)
    seen: dict = {}

    def hang(s):
        hang_simulated["hang"].set()
        assert hang_simulated["entered"].wait(10.0), "no pulse reached the output"
        t0 = time.monotonic()
        seen["disarmed"] = wait_for(
            lambda: s.pipeline.trigger.interlock.state.value == "disarmed", 5.0
        )
        seen["took_s"] = time.monotonic() - t0
        seen["reason"] = s.pipeline.trigger.interlock.last_reason
        hang_simulated["release"].set()

    try:
        info = run_with(session, hang, stop_after_s=1.0)
    finally:
        hang_simulated["release"].set()
        end_process(proc)
    assert seen["disarmed"], "the watchdog did not disarm while the output hung"
    assert seen["reason"].startswith("watchdog"), seen
    limit_s = session.config.safety.watchdog_ms / 1000.0
    assert seen["took_s"] < 1.5 * limit_s + 0.2, seen  # timeout + one poll period, some slack
    assert_disarmed_with(session, info, "watchdog")
    assert session.summary["watchdog"]["tripped"] == 1


def test_hung_output_emergency_stop_returns_at_once(
    recording, unique_name, out_dir, hang_simulated
):
    proc = replayer(recording, unique_name)
    session = live_session(unique_name, **REPEAT_EVERY_SECOND)
    seen: dict = {}

    def estop(s):
        hang_simulated["hang"].set()
        assert hang_simulated["entered"].wait(10.0), "no pulse reached the output"
        t0 = time.perf_counter()
        s.emergency_stop("test")  # the loop is inside fire(), holding its chunk
        seen["ms"] = 1000.0 * (time.perf_counter() - t0)
        seen["state"] = s.pipeline.trigger.interlock.state.value
        hang_simulated["release"].set()

    try:
        info = run_with(session, estop, stop_after_s=1.0)
    finally:
        hang_simulated["release"].set()
        end_process(proc)
    assert seen["ms"] < 50.0, f"emergency stop took {seen['ms']:.1f} ms while fire() hung"
    assert seen["state"] == "disarmed"
    audit = assert_disarmed_with(session, info, "emergency stop")
    assert any(
        a.get("event") == "interlock" and "emergency stop (test)" in a["reason"] for a in audit
    )
    with pytest.raises(Exception, match="emergency stop"):
        session.arm("gui_button")  # latched (the session is over, but the answer is still no)


def test_sigint_disarms_at_once_while_an_output_hangs(recording, unique_name, out_dir):
    """`closedloop run` (signal handlers in the loop's thread): Ctrl-C while fire() hangs
    disarms within milliseconds, not when the hang ends; the session then ends cleanly."""
    import select

    assert "install_signal_handlers(session)" in SIGINT_CHILD
    master, slave = os.openpty()
    proc = start_replayer(recording, unique_name, speed=1.0)  # real time: hardware outputs stay
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", SIGINT_CHILD, unique_name, os.ttyname(slave), str(out_dir)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready, _, _ = select.select([master], [], [], 90.0)
        if not ready:
            child.kill()
            pytest.fail(f"no TTL byte within 90 s: {child.communicate()[1][-3000:]!r}")
        os.read(master, 1)  # the TTL went out; the simulated device now hangs for 5 s
        t_sigint = time.time()
        child.send_signal(signal.SIGINT)
        folder = next(p for p in out_dir.iterdir() if p.is_dir())

        def disarm_line():
            for a in read_jsonl(folder / "audit.jsonl"):
                if a.get("event") == "interlock" and "SIGINT" in a["reason"]:
                    return a
            return None

        assert wait_for(lambda: disarm_line() is not None, 3.0), "SIGINT did not disarm"
        line = disarm_line()
        assert line["new"] == "disarmed"
        assert line["t_wall"] - t_sigint < 0.2, line["t_wall"] - t_sigint
        assert child.poll() is None, "the check must happen while fire() still hangs"
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        end_process(proc)
        for fd in (master, slave):
            os.close(fd)
    assert child.returncode == 0, err[-3000:]
    summary = yaml.safe_load((folder / "summary.json").read_text())
    assert "SIGINT" in summary["stop_reason"]


@pytest.mark.mqtt
def test_hung_output_mqtt_emergency_stop_is_answered_at_once(
    recording, unique_name, out_dir, hang_simulated, tmp_path
):
    """The console's e-stop over a real Mosquitto while fire() hangs: accepted and disarmed
    within the command's round trip, not when the hang ends (5 s here)."""
    from closedloop.telemetry.client import send_command
    from closedloop.telemetry.settings import MqttSettings
    from tests.mqtt_broker import running_broker

    (tmp_path / "broker").mkdir()
    with running_broker(tmp_path / "broker") as broker:
        mqtt = {
            "mqtt.enabled": True,
            "mqtt.port": broker.port,
            "mqtt.topic_prefix": "cltest",
            "mqtt.session_id": "estop",
        }
        proc = replayer(recording, unique_name)
        session = live_session(unique_name, **REPEAT_EVERY_SECOND, **mqtt)
        seen: dict = {}

        def estop(s):
            hang_simulated["hang"].set()
            assert hang_simulated["entered"].wait(10.0), "no pulse reached the output"
            console = MqttSettings(host=broker.host, port=broker.port, topic_prefix="cltest")
            t0 = time.perf_counter()
            seen["reply"] = send_command(
                console, "estop", "emergency_stop", sender="console", timeout_s=3.0
            )
            seen["s"] = time.perf_counter() - t0
            seen["state"] = s.pipeline.trigger.interlock.state.value
            seen["still_hung"] = not hang_simulated["release"].is_set()
            hang_simulated["release"].set()

        try:
            info = run_with(session, estop, stop_after_s=1.0)
        finally:
            hang_simulated["release"].set()
            end_process(proc)
    assert seen["reply"] is not None, "no reply to the emergency stop within 3 s"
    assert seen["reply"]["ok"], seen["reply"]
    assert seen["still_hung"]
    assert seen["state"] == "disarmed"
    assert seen["s"] < 1.0, f"MQTT emergency stop round trip {seen['s']:.3f} s"
    assert_disarmed_with(session, info, "emergency stop")

"""Threshold changes on a real Session: every change (console or MQTT) is in the audit log and
the events; MQTT changes are bounded and refused while armed (issue 14, item 8)."""

from __future__ import annotations

import threading

import pytest

from acquisition.file_source import FileSource
from closedloop.config import apply_overrides
from closedloop.control import ControlError
from closedloop.load import read_jsonl
from closedloop.session import Session
from closedloop.telemetry.client import send_command
from closedloop.telemetry.settings import MqttSettings
from tests.mqtt_broker import running_broker
from tests.session_helpers import bundled_recording, fast_config

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(120)]

PAUSE_AT_S = 45.0  # stream seconds: calibrated (warm-up, 10 s limit learning, 20 s baseline)


class PausingSource:
    """A FileSource (single chunks) whose pull blocks once at PAUSE_AT_S until released, so
    the test acts on a running, armed session at a known point."""

    def __init__(self, raw) -> None:
        self._src = FileSource(raw, chunk_size=10)
        self.paused = threading.Event()
        self.release = threading.Event()

    chunk_size = None  # no block reads: the session pulls single chunks

    def __getattr__(self, name: str):
        return getattr(self._src, name)

    def pull(self, timeout_s: float = 0.0):
        chunk = self._src.pull(timeout_s)
        if (
            chunk is not None
            and chunk.t_last - self._src.t0 >= PAUSE_AT_S
            and not self.paused.is_set()
        ):
            self.paused.set()
            self.release.wait(60.0)
        return chunk


def test_threshold_changes_are_audited_bounded_and_refused_remotely_while_armed(tmp_path):
    with running_broker(tmp_path) as broker:
        config = apply_overrides(
            fast_config(),
            {
                "mqtt.enabled": True,
                "mqtt.port": broker.port,
                "mqtt.session_id": "thr1",
                "mqtt.max_remote_threshold": 3.0,
                "state.calibration_s": 20.0,
                "state.enter": 1.5,
                "state.leave": 0.0,
            },
        )
        source = PausingSource(bundled_recording())
        session = Session(
            config, source, live=False, out_root=tmp_path / "s", arm_action="offline_run"
        )
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(session.run()), daemon=True)
        runner.start()
        try:
            assert source.paused.wait(60.0)
            console = MqttSettings(host=broker.host, port=broker.port)

            def remote(enter: float, leave: float) -> dict:
                reply = send_command(
                    console,
                    "thr1",
                    "set_thresholds",
                    sender="cli",
                    args={"enter": enter, "leave": leave},
                )
                assert reply is not None
                return reply

            assert session.pipeline.trigger.interlock.state.value != "disarmed"
            session.set_thresholds(2.0, 0.5, "console drag")  # the GUI may, armed or not
            armed = remote(1.5, 0.25)
            assert (armed["ok"], armed["reason"]) == (False, "refused")
            assert "armed" in armed["detail"]
            with pytest.raises(ControlError, match="armed"):
                session.set_thresholds(1.0, 0.0, "x", refuse_if_armed=True)
            session.disarm("test")
            assert remote(1.5, 0.25)["ok"]
            far = remote(1.0, -5.0)
            assert (far["ok"], far["reason"]) == (False, "out_of_range")
            assert session.thresholds() == (1.5, 0.25)
        finally:
            source.release.set()
            runner.join(60.0)
    assert not runner.is_alive()
    audit = [a for a in read_jsonl(session.folder / "audit.jsonl") if a["event"] == "thresholds"]
    assert [(a["reason"], a["enter"], a["leave"], a["previous"]) for a in audit] == [
        ("console drag", 2.0, 0.5, {"enter": 1.5, "leave": 0.0}),
        ("mqtt:cli", 1.5, 0.25, {"enter": 2.0, "leave": 0.5}),
    ]
    assert all(a["t_wall"] and a["t_local"] for a in audit)
    events = [e for e in read_jsonl(session.folder / "events.jsonl") if e["kind"] == "thresholds"]
    assert [(e["source"], e["enter"], e["leave"]) for e in events] == [
        ("console drag", 2.0, 0.5),
        ("mqtt:cli", 1.5, 0.25),
    ]

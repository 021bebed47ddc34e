"""MQTT with a real Session: telemetry of a whole offline run reaches an independent subscriber."""

from __future__ import annotations

import pytest

from acquisition.file_source import FileSource
from closedloop.config import apply_overrides
from closedloop.load import read_jsonl
from closedloop.session import Session
from tests.mqtt_broker import Subscriber, running_broker
from tests.session_helpers import bundled_recording, fast_config

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(120)]


def test_offline_session_publishes_every_attempt_health_and_interlock(tmp_path):
    with running_broker(tmp_path) as broker, Subscriber(broker, "cltest/#") as sub:
        config = apply_overrides(
            fast_config(),
            {
                "mqtt.enabled": True,
                "mqtt.port": broker.port,
                "mqtt.topic_prefix": "cltest",
                "mqtt.session_id": "offline1",
            },
        )
        session = Session(
            config,
            FileSource(bundled_recording()),
            live=False,
            out_root=tmp_path / "s",
            arm_action="offline_run",
        )
        summary = session.run()
        attempts = [
            a for a in read_jsonl(session.folder / "audit.jsonl") if a.get("event") == "attempt"
        ]
        assert summary["pulses"] >= 2
        assert sub.wait_for(
            lambda ms: (
                len([m for m in ms if m.topic == "cltest/offline1/attempt"]) >= len(attempts)
            ),
            15.0,
        )
        received = [m.json() for m in sub.on("cltest/offline1/attempt")]
        # QoS 1 is at least once: a publish cut off by the session's end is sent again with the
        # same seq (docs/mqtt.md), which a consumer drops
        got, seen = [], set()
        for g in received:  # the first of each seq
            if g["seq"] not in seen:
                seen.add(g["seq"])
                got.append(g)
        # every attempt, in order, with its audit fields (schema v1: docs/mqtt.md)
        assert [g["data"]["attempt_number"] for g in got] == [a["attempt"] for a in attempts]
        assert [g["data"]["fired"] for g in got] == [a["fired"] for a in attempts]
        assert all(g["v"] == 1 and g["kind"] == "attempt" for g in got)
        assert sub.wait_for(lambda ms: any(m.topic == "cltest/offline1/health" for m in ms), 10.0)
        interlock = [m.json() for m in sub.on("cltest/offline1/interlock")]
        assert interlock, "no interlock telemetry"

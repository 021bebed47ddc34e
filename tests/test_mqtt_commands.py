"""Remote command validation and settings, without a broker (the broker tests are in
test_mqtt_bridge.py)."""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from closedloop.bus import EventBus
from closedloop.telemetry.bridge import MqttBridge, backoff_delays
from closedloop.telemetry.protocol import (
    MAX_PAYLOAD_BYTES,
    MAX_SENDERS,
    CommandProcessor,
    build_command,
    to_jsonable,
)
from closedloop.telemetry.settings import MqttSettings, MqttTlsSettings, Topics
from features.types import Label, State
from tests.mqtt_broker import FakeControl

NOW = 1_800_000_000.0  # a fixed wall clock (unix s)
USER = "console"  # the MQTT user from the command topic (cmd/<user>), as the broker enforces


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(
    control: FakeControl | None = None,
    *,
    allow_arm: bool = False,
    max_age_s: float = 30.0,
    clock: Clock | None = None,
) -> tuple[CommandProcessor, FakeControl, Clock]:
    control = control or FakeControl()
    clock = clock or Clock()
    proc = CommandProcessor(
        control, allow_remote_arm=allow_arm, command_max_age_s=max_age_s, clock=clock
    )
    return proc, control, clock


def cmd(name: str, seq: int, *, sender: str = "console", raw: bool = False, **fields: Any) -> bytes:
    doc: dict[str, Any] = {"v": 1, "seq": seq, "cmd": name, "sender": sender, "expires": NOW + 10.0}
    doc.update(fields)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("disarm", {}, ("disarm", "mqtt:console")),
        ("disarm", {"reason": "patient moved"}, ("disarm", "mqtt:console: patient moved")),
        ("emergency_stop", {}, ("emergency_stop", "mqtt:console")),
        (
            "set_thresholds",
            {"enter": 1.5, "leave": 0.25},
            ("set_thresholds", 1.5, 0.25, "mqtt:console"),
        ),
        (
            "set_thresholds",
            {"enter": 2, "leave": -1},
            ("set_thresholds", 2.0, -1.0, "mqtt:console"),
        ),
        ("start_calibration", {}, ("start_calibration", "mqtt:console")),
        ("stop_calibration", {}, ("stop_calibration", "mqtt:console")),
    ],
)
def test_each_command_reaches_the_session(name: str, args: dict, expected: tuple) -> None:
    proc, control, _ = make()
    result = proc.handle(cmd(name, 1, args=args), retain=False, identity=USER)
    assert result.ok, result
    assert (result.reason, result.cmd, result.seq) == ("accepted", name, 1)
    assert result.sender == "console"
    assert control.calls == [expected]
    assert proc.accepted == 1
    assert proc.refused == {}


def test_remote_arm_refused_unless_config_allows() -> None:
    proc, control, _ = make()
    result = proc.handle(cmd("arm", 1), retain=False, identity=USER)
    assert (result.ok, result.reason) == (False, "remote_arm_disabled")
    assert control.calls == []

    proc, control, _ = make(allow_arm=True)
    assert proc.handle(cmd("arm", 1, sender="op-7"), retain=False, identity=USER).ok
    assert control.calls == [("arm", "mqtt_remote", "console/op-7")]  # user/sender


def test_duplicates_and_replays_are_refused_per_sender() -> None:
    proc, control, _ = make()
    assert proc.handle(cmd("start_calibration", 5), retain=False, identity=USER).ok
    again = proc.handle(cmd("start_calibration", 5), retain=False, identity=USER)  # QoS 1 again
    older = proc.handle(cmd("start_calibration", 3), retain=False, identity=USER)  # a replay
    assert (again.reason, older.reason) == ("duplicate", "duplicate")
    other = cmd("start_calibration", 5, sender="other")
    assert proc.handle(other, retain=False, identity=USER).ok  # own counter
    assert proc.handle(cmd("start_calibration", 6), retain=False, identity=USER).ok
    assert len(control.calls) == 3
    assert proc.refused == {"duplicate": 2}


def test_a_user_cannot_use_up_another_users_seq() -> None:
    """The attack of issue 14: user 'intruder' writes sender 'console' and seq 10**30. The
    seq state is keyed by the broker-verified user, so console's own commands still work."""
    proc, control, _ = make()
    forged = cmd("start_calibration", 10**30, sender="console")
    assert proc.handle(forged, retain=False, identity="intruder").ok
    assert proc.handle(cmd("start_calibration", 1), retain=False, identity="console").ok
    assert proc.handle(cmd("emergency_stop", 2), retain=False, identity="console").ok
    assert control.calls == [
        ("start_calibration", "mqtt:intruder/console"),  # the log names who really sent it
        ("start_calibration", "mqtt:console"),
        ("emergency_stop", "mqtt:console"),
    ]


def test_the_legacy_topic_takes_only_the_safe_commands() -> None:
    proc, control, _ = make(allow_arm=True)
    for name in ("set_thresholds", "start_calibration", "stop_calibration", "arm"):
        args = {"enter": 1.0, "leave": 0.0} if name == "set_thresholds" else {}
        result = proc.handle(cmd(name, 1, args=args), retain=False, identity=None)
        assert (result.ok, result.reason) == (False, "unauthenticated"), result
        assert "cmd/<your MQTT user name>" in result.detail
    for seq, name in ((10**30, "disarm"), (1, "emergency_stop"), (1, "emergency_stop")):
        result = proc.handle(cmd(name, seq), retain=False, identity=None)
        assert (result.ok, result.warnings) == (True, ())
    assert control.calls == [
        ("disarm", "mqtt:unauthenticated/console"),
        ("emergency_stop", "mqtt:unauthenticated/console"),
        ("emergency_stop", "mqtt:unauthenticated/console"),
    ]


@pytest.mark.parametrize(
    ("payload", "warning"),
    [
        (cmd("emergency_stop", 5), "duplicate: seq 5 <= last accepted 7"),
        (cmd("disarm", 3), "duplicate: seq 3 <= last accepted 7"),
        (cmd("emergency_stop", 8, expires=NOW - 60.0), "expired: expired 60.000 s ago"),
        (cmd("emergency_stop", 10**30, expires=NOW - 1.0), "expired"),
        (cmd("emergency_stop", 8, expires=NOW + 3600.0), "expiry_too_far"),
        (cmd("emergency_stop", 8, v=2), "unsupported_version: v=2"),
        (cmd("emergency_stop", -1), "malformed: seq"),
        (cmd("emergency_stop", 8, expires=None), "malformed"),
        (cmd("emergency_stop", 8, sender="a/b"), "malformed: sender"),
        (cmd("disarm", 8, args={"force": True}), "invalid_args: force"),
        (cmd("disarm", 8, args={"reason": "x" * 201}), "invalid_args: reason"),
        (b'{"cmd": "emergency_stop"}', "unsupported_version"),
    ],
)
def test_disarm_and_emergency_stop_are_never_refused_for_seq_expiry_or_envelope(
    payload: bytes, warning: str
) -> None:
    """They can only make the session safer: acted on, with what was wrong in the reply."""
    proc, control, _ = make()
    assert proc.handle(cmd("start_calibration", 7), retain=False, identity=USER).ok
    result = proc.handle(payload, retain=False, identity=USER)
    assert (result.ok, result.reason) == (True, "accepted"), result
    assert any(w.startswith(warning) for w in result.warnings), result.warnings
    assert control.calls[-1][0] in ("disarm", "emergency_stop")
    assert proc.warned == 1
    assert proc.refused == {}
    # a safe command that failed the expiry or seq check does not move the sequence on
    # (arguments come after the seq check: there, as for every command, the seq is used up)
    assert proc.handle(cmd("start_calibration", 9), retain=False, identity=USER).ok


def test_remote_thresholds_are_bounded_and_refused_while_armed() -> None:
    control = FakeControl()
    proc = CommandProcessor(
        control,
        allow_remote_arm=False,
        command_max_age_s=30.0,
        clock=Clock(),
        max_remote_threshold=3.0,
    )

    def thresholds(seq: int, enter: float, leave: float):
        payload = cmd("set_thresholds", seq, args={"enter": enter, "leave": leave})
        return proc.handle(payload, retain=False, identity=USER)

    assert thresholds(1, 3.0, -3.0).ok  # the bound itself is allowed
    for seq, (enter, leave) in enumerate([(3.01, 0.0), (1.0, -3.5), (-6.0, -7.0)], start=2):
        result = thresholds(seq, enter, leave)
        assert (result.ok, result.reason) == (False, "out_of_range"), result
        assert "max_remote_threshold 3" in result.detail
    control.armed = True
    armed = thresholds(10, 1.5, 0.5)
    assert (armed.ok, armed.reason) == (False, "refused")
    assert "armed" in armed.detail
    assert control.calls == [("set_thresholds", 3.0, -3.0, "mqtt:console")]

    allowed = CommandProcessor(
        control,
        allow_remote_arm=False,
        command_max_age_s=30.0,
        clock=Clock(),
        allow_remote_thresholds_while_armed=True,
    )
    payload = cmd("set_thresholds", 1, args={"enter": 1.5, "leave": 0.5})
    assert allowed.handle(payload, retain=False, identity=USER).ok
    assert control.calls[-1] == ("set_thresholds", 1.5, 0.5, "mqtt:console")


def test_refused_arguments_and_session_refusals_still_use_up_the_seq() -> None:
    proc, control, _ = make()
    bad = proc.handle(
        cmd("set_thresholds", 1, args={"enter": 0.1, "leave": 0.9}), retain=False, identity=USER
    )
    assert (bad.ok, bad.reason) == (False, "invalid_args")
    assert "above leave" in bad.detail
    assert (
        proc.handle(
            cmd("set_thresholds", 1, args={"enter": 2.0, "leave": 1.0}),
            retain=False,
            identity=USER,
        ).reason
        == "duplicate"
    )
    control.calibrated_enough = False
    refused = proc.handle(cmd("stop_calibration", 2), retain=False, identity=USER)
    assert (refused.ok, refused.reason) == (False, "refused")
    assert "too little calibration" in refused.detail
    assert control.calls == []


def test_expiry_on_the_wall_clock() -> None:
    proc, control, clock = make(max_age_s=30.0)
    late = proc.handle(
        cmd("start_calibration", 1, expires=NOW - 0.001), retain=False, identity=USER
    )
    assert late.reason == "expired"
    far = proc.handle(cmd("start_calibration", 2, expires=NOW + 31.0), retain=False, identity=USER)
    assert far.reason == "expiry_too_far"
    # sent + ttl_s instead of expires; the earlier of the two wins when both are given
    ok = proc.handle(
        cmd("start_calibration", 3, expires=None, sent=NOW - 1.0, ttl_s=2.0),
        retain=False,
        identity=USER,
    )
    assert ok.ok
    both = cmd("start_calibration", 4, expires=NOW + 20.0, sent=NOW - 5.0, ttl_s=4.0)
    assert proc.handle(both, retain=False, identity=USER).reason == "expired"
    # an expired command does not use up its seq: a fresh copy is still accepted
    clock.t = NOW + 100.0
    assert proc.handle(
        cmd("start_calibration", 5, expires=NOW + 110.0), retain=False, identity=USER
    ).ok
    assert len(control.calls) == 2


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"disarm", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b"[1, 2]", "malformed"),
        (b"{}", "unsupported_version"),
        (cmd("start_calibration", 1, v=2), "unsupported_version"),
        (cmd("start_calibration", 1, v="1"), "unsupported_version"),
        (cmd("start_calibration", -1), "malformed"),
        (cmd("start_calibration", True), "malformed"),
        (cmd("start_calibration", 1.5), "malformed"),
        (cmd("start_calibration", "7"), "malformed"),
        (cmd("start_calibration", 1, sender=""), "malformed"),
        (cmd("start_calibration", 1, sender="a/b"), "malformed"),
        (cmd("start_calibration", 1, expires=None), "malformed"),
        (cmd("start_calibration", 1, expires="soon"), "malformed"),
        (cmd("start_calibration", 1, extra_field=1), "malformed"),
        (cmd("start_calibration", 1, args=[1]), "malformed"),
        (b'{"v":1,"seq":1,"cmd":"start_calibration","sender":"c","expires":NaN}', "malformed"),
        (cmd("fire", 1), "unknown_command"),
        (cmd("DISARM", 1), "unknown_command"),
        (cmd("start_calibration", 1, args={"force": True}), "invalid_args"),
        (cmd("set_thresholds", 1, args={"enter": "1", "leave": 0.5}), "invalid_args"),
        (cmd("set_thresholds", 1, args={"enter": 1.0}), "invalid_args"),
        (
            b'{"v":1,"seq":1,"cmd":"set_thresholds","sender":"c","expires":1800000005,'
            b'"args":{"enter":Infinity,"leave":0}}',
            "invalid_args",
        ),
        (cmd("start_calibration", 1, args={"reason": "x" * MAX_PAYLOAD_BYTES}), "malformed"),
    ],
)
def test_malformed_and_unknown_commands_do_nothing(payload: bytes, reason: str) -> None:
    proc, control, _ = make()
    result = proc.handle(payload, retain=False, identity=USER)
    assert (result.ok, result.reason) == (False, reason), result.detail
    assert result.detail
    assert control.calls == []
    assert proc.refused == {reason: 1}


def test_unknown_command_does_not_use_up_the_seq() -> None:
    proc, control, _ = make()
    assert proc.handle(cmd("reboot", 1), retain=False, identity=USER).reason == "unknown_command"
    assert proc.handle(cmd("start_calibration", 1), retain=False, identity=USER).ok
    assert control.calls == [("start_calibration", "mqtt:console")]


def test_retained_commands_are_never_acted_on_except_a_fresh_safe_one() -> None:
    proc, control, _ = make(allow_arm=True)
    for name in ("start_calibration", "stop_calibration", "arm"):
        assert proc.handle(cmd(name, 1), retain=True, identity=USER).reason == "retained"
    # a stale retained e-stop (stored by the broker) would stop every session that subscribes
    stale = proc.handle(cmd("emergency_stop", 2, expires=NOW - 1.0), retain=True, identity=USER)
    assert (stale.ok, stale.reason) == (False, "retained")
    assert proc.handle(b'{"cmd": "disarm"}', retain=True, identity=USER).reason == "retained"
    assert control.calls == []
    assert proc.refused == {"retained": 5}
    # a fresh one is a live press from a tool that sets the flag: it only makes things safer
    fresh = proc.handle(cmd("emergency_stop", 3), retain=True, identity=USER)
    assert fresh.ok
    assert fresh.warnings[-1].startswith("retained")
    assert control.calls == [("emergency_stop", "mqtt:console")]


def test_exceptions_inside_the_session_are_reported_not_raised() -> None:
    proc, _, _ = make(FakeControl(fail_with=RuntimeError("output port gone")))
    result = proc.handle(cmd("emergency_stop", 1), retain=False, identity=USER)
    assert (result.ok, result.reason) == (False, "error")
    assert "output port gone" in result.detail
    assert proc.errors == 1


def test_sender_memory_is_bounded_and_forgets_only_expired_senders() -> None:
    proc, _, clock = make(max_age_s=30.0)
    for i in range(MAX_SENDERS):
        assert proc.handle(
            cmd("start_calibration", 1, sender=f"s{i}"), retain=False, identity=USER
        ).ok
    assert (
        proc.handle(cmd("start_calibration", 1, sender="late"), retain=False, identity=USER).reason
        == "too_many_senders"
    )
    clock.t = NOW + 31.0  # every command accepted so far has expired by now
    assert proc.handle(
        cmd("start_calibration", 1, sender="late", expires=clock.t + 5), retain=False, identity=USER
    ).ok
    # a forgotten sender's old command is still refused: it has expired
    assert (
        proc.handle(cmd("start_calibration", 1, sender="s0"), retain=False, identity=USER).reason
        == "expired"
    )


# -- settings ----------------------------------------------------------------------------------


def test_settings_defaults_are_safe() -> None:
    s = MqttSettings()
    assert not s.enabled
    assert not s.allow_remote_arm
    assert s.host == "127.0.0.1"
    assert "hunter2" not in repr(MqttSettings(username="u", password="hunter2"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topic_prefix": "lab/#"}, "topic_prefix"),
        ({"topic_prefix": "/lab"}, "topic_prefix"),
        ({"topic_prefix": "$SYS"}, "topic_prefix"),
        ({"session_id": "a/b"}, "letters"),
        ({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, "reconnect_max_s"),
        ({"password": "x"}, "without username"),
        ({"state_rate_hz": -1}, "greater than or equal"),
        ({"port": 0}, "greater than or equal"),
        ({"unknown_key": 1}, "Extra inputs"),
        ({"tls": {"cert_file": "/etc/hostname"}}, "together"),
        ({"tls": {"enabled": True, "ca_file": "/nonexistent/ca.pem"}}, "not found"),
    ],
)
def test_settings_errors_say_what(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MqttSettings(**kwargs)


def test_tls_settings_accept_existing_files(tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    tls = MqttTlsSettings(enabled=True, ca_file=ca)
    assert tls.ca_file == ca


def test_topics_and_session_id() -> None:
    t = Topics.of("lab/tms", "s-01")
    assert (t.state, t.cmd, t.health) == (
        "lab/tms/s-01/state",
        "lab/tms/s-01/cmd",
        "lab/tms/s-01/health",
    )
    with pytest.raises(ValueError, match="session id"):
        MqttBridge(MqttSettings(), EventBus(), FakeControl(), session_id="")
    bridge = MqttBridge(MqttSettings(session_id="cfg"), EventBus(), FakeControl())
    assert bridge.topics.base == "closedloop/cfg"
    # the session's own id is the default; an explicit mqtt.session_id wins
    assert MqttBridge(MqttSettings(), EventBus(), FakeControl(), "run-3").session_id == "run-3"
    assert (
        MqttBridge(MqttSettings(session_id="cfg"), EventBus(), FakeControl(), "run-3").session_id
        == "cfg"
    )


def test_payloads_become_strict_json() -> None:
    state = State(
        t_stream=1.5,
        label=Label.TARGET,
        score=float("nan"),
        time_in_state_s=2.0,
        features={"theta": np.float32(0.5)},
        z={"theta": float("inf")},
        artifacts=("amplitude:Fp1",),
    )
    doc = to_jsonable({"state": state, "arr": np.arange(3), "i": np.int64(7), "f": math.nan})
    text = json.dumps(doc, allow_nan=False)  # raises if any NaN/inf survived
    back = json.loads(text)
    assert back["state"]["label"] == "target"
    assert back["state"]["score"] is None
    assert back["state"]["z"] == {"theta": None}
    assert back["state"]["features"] == {"theta": 0.5}
    assert back["state"]["artifacts"] == ["amplitude:Fp1"]
    assert back["arr"] == [0, 1, 2]
    assert back["i"] == 7
    assert back["f"] is None


def test_documented_command_example_is_accepted() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "mqtt.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", docs, flags=re.DOTALL)
    example = next(b for b in blocks if '"cmd"' in b and '"kind"' not in b)
    expires = json.loads(example)["expires"]
    proc, control, _ = make(clock=Clock(expires - 5.0))
    assert proc.handle(example.encode(), retain=False, identity=USER).ok
    assert control.calls == [("set_thresholds", 1.5, 0.5, "mqtt:console/console-1")]
    for block in blocks:  # the telemetry examples are strict JSON with the envelope
        doc = json.loads(block)
        assert doc["v"] == 1


def test_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = MqttSettings(username="closedloop", password_env="CLOSEDLOOP_TEST_MQTT_PW")
    monkeypatch.delenv("CLOSEDLOOP_TEST_MQTT_PW", raising=False)
    with pytest.raises(ValueError, match="CLOSEDLOOP_TEST_MQTT_PW is not set"):
        MqttBridge(s, EventBus(), FakeControl(), "s1")
    monkeypatch.setenv("CLOSEDLOOP_TEST_MQTT_PW", "from-env")
    assert s.resolved_password() == "from-env"
    with pytest.raises(ValidationError, match="not both"):
        MqttSettings(username="u", password="p", password_env="X")
    with pytest.raises(ValidationError, match="without username"):
        MqttSettings(password_env="X")


def test_backoff_doubles_to_the_ceiling_with_full_jitter() -> None:
    delays = backoff_delays(0.5, 30.0, random.Random(1))
    sleeps = [next(delays) for _ in range(400)]
    ceilings = [min(0.5 * 2**i, 30.0) for i in range(400)]
    assert all(0.5 <= s <= c for s, c in zip(sleeps, ceilings, strict=True))
    assert sleeps[0] == 0.5  # the first retry comes soon
    late = np.array(sleeps[20:])
    assert late.max() > 25.0  # reaches near the ceiling ...
    assert late.min() < 5.0  # ... but stays spread out (jitter), so clients do not align
    assert 12.0 < late.mean() < 18.5  # uniform in [0.5, 30]


def test_build_command_makes_acceptable_commands() -> None:
    proc, control, _ = make(clock=Clock(time.time()))
    first = build_command("disarm", sender="cli", args={"reason": "test"})
    second = build_command("emergency_stop", sender="cli")
    assert second["seq"] > first["seq"]  # time_ns: increasing across calls and processes
    for doc in (first, second):
        result = proc.handle(json.dumps(doc).encode(), retain=False, identity="cli")
        assert (result.ok, result.warnings) == (True, ())
    assert control.calls == [("disarm", "mqtt:cli: test"), ("emergency_stop", "mqtt:cli")]
    with pytest.raises(ValueError, match="unknown command"):
        build_command("fire", sender="cli")

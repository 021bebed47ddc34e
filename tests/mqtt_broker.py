"""Test helpers: a private Mosquitto broker on a free loopback port, and threaded MQTT clients.

Each test gets its own broker process with its own config in tmp_path (no shared state, no
retained messages leaking between tests). Without the mosquitto binary the tests skip and say
so; they never pass without a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.subscribeoptions import SubscribeOptions

from closedloop.control import ControlError

BROKER_START_TIMEOUT_S = 10.0


class FakeControl:
    """Records calls; validates thresholds and calibration like a session would."""

    def __init__(self, *, fail_with: Exception | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.enter_leave = (1.0, 0.5)
        self.calibrated_enough = True
        self.running = True
        self.armed = False
        self.fail_with = fail_with

    def _record(self, *call: Any) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append(call)

    def arm(self, action: str, operator: str = "") -> None:
        self._record("arm", action, operator)

    def disarm(self, reason: str) -> None:
        self._record("disarm", reason)

    def emergency_stop(self, source: str) -> None:
        self._record("emergency_stop", source)

    def set_thresholds(
        self, enter: float, leave: float, source: str, *, refuse_if_armed: bool = False
    ) -> None:
        if enter <= leave:
            raise ControlError(f"enter {enter} <= leave {leave}")
        if refuse_if_armed and self.armed:
            raise ControlError("refused while the interlock is armed")
        self._record("set_thresholds", enter, leave, source)
        self.enter_leave = (enter, leave)

    def start_calibration(self, source: str) -> None:
        self._record("start_calibration", source)

    def stop_calibration(self, source: str) -> None:
        if not self.calibrated_enough:
            raise ControlError("too little calibration data (12 s < 60 s)")
        self._record("stop_calibration", source)

    def thresholds(self) -> tuple[float, float]:
        if not self.running:  # like a Session before its pipeline exists
            raise ControlError("session not running yet")
        return self.enter_leave


def mosquitto_binary() -> str | None:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_mosquitto() -> str:
    path = mosquitto_binary()
    if path is None:
        pytest.skip(
            "mosquitto broker not installed (apt-get install mosquitto); MQTT tests need a "
            "real broker"
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Broker:
    """A mosquitto process; `kill()` / `start()` again keeps the same port and config."""

    binary: str
    conf: Path
    log: Path
    port: int
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=logf, stderr=subprocess.STDOUT
        )
        logf.close()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a goodbye (like a crash or a power cut)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5.0)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        self.proc = None


def write_config(
    tmp_path: Path,
    port: int,
    *,
    users: dict[str, str] | None = None,
    acl: str | None = None,
    tls: dict[str, Path] | None = None,
) -> Path:
    """A mosquitto.conf: one loopback listener; anonymous unless `users` (with `acl`) given."""
    lines = [
        f"listener {port} 127.0.0.1",
        "persistence false",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        # mosquitto started as root drops privileges to `user` (default 'mosquitto', who
        # cannot read tmp_path); name ourselves so it keeps the test's permissions.
        f"user {pwd.getpwuid(os.getuid()).pw_name}",
    ]
    if users is None:
        lines.append("allow_anonymous true")
    else:
        pw_file = tmp_path / "passwd"
        pw_file.write_text("")
        for user, password in users.items():
            subprocess.run(
                ["mosquitto_passwd", "-b", str(pw_file), user, password],
                check=True,
                capture_output=True,
            )
        lines += ["allow_anonymous false", f"password_file {pw_file}"]
    if acl is not None:
        acl_file = tmp_path / "acl"
        acl_file.write_text(acl)
        lines.append(f"acl_file {acl_file}")
    if tls is not None:
        lines += [
            f"cafile {tls['ca']}",
            f"certfile {tls['cert']}",
            f"keyfile {tls['key']}",
        ]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


@contextlib.contextmanager
def running_broker(tmp_path: Path, **config: Any) -> Iterator[Broker]:
    binary = require_mosquitto()
    if config.get("users") is not None and shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed; needed for the password test")
    port = free_port()
    broker = Broker(binary, write_config(tmp_path, port, **config), tmp_path / "broker.log", port)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# --------------------------------------------------------------------------------------------
# Independent clients (aiomqtt on their own thread, used from synchronous tests)
# --------------------------------------------------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    t: float  # time.monotonic() on arrival

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """Collects every message on `topic_filter` in a background thread; reconnects on loss."""

    def __init__(
        self,
        broker: Broker,
        topic_filter: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: dict[str, Any] | None = None,
    ) -> None:
        self.broker = broker
        self.topic_filter = topic_filter
        self.username = username
        self.password = password
        self.tls = tls
        self.messages: list[Received] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-subscriber", daemon=True)

    def __enter__(self) -> Subscriber:
        self._thread.start()
        if not self.subscribed.wait(10.0):
            raise RuntimeError("test subscriber could not subscribe")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        while not self._stop.is_set():
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    username=self.username,
                    password=self.password,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    keepalive=5,
                    timeout=5,
                    **(self.tls or {}),
                ) as client:
                    await client.subscribe(
                        self.topic_filter,
                        options=SubscribeOptions(qos=1, retainAsPublished=True),
                    )
                    self.subscribed.set()
                    reader = asyncio.create_task(self._read(client))
                    while not self._stop.is_set() and not reader.done():
                        await asyncio.sleep(0.02)
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await reader
                    if self._stop.is_set():
                        return
            except aiomqtt.MqttError:
                pass
            self.subscribed.clear()
            await asyncio.sleep(0.1)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
            with self._lock:
                self.messages.append(
                    Received(msg.topic.value, payload, bool(msg.retain), time.monotonic())
                )

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float = 10.0
    ) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                snapshot = list(self.messages)
            if predicate(snapshot):
                return True
            time.sleep(0.02)
        return False


def publish(
    broker: Broker,
    topic: str,
    payload: bytes | str,
    *,
    retain: bool = False,
    qos: int = 1,
    username: str | None = None,
    password: str | None = None,
    tls: dict[str, Any] | None = None,
) -> None:
    """Publish one message from a fresh client (like an operator's console would).

    tls: extra aiomqtt.Client arguments for a TLS broker, e.g. {"tls_params": ...}."""

    async def _go() -> None:
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            username=username,
            password=password,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=5,
            **(tls or {}),
        ) as client:
            await client.publish(topic, payload, qos=qos, retain=retain)

    asyncio.run(_go())


def command(
    cmd: str, seq: int, *, sender: str = "console", ttl_s: float = 10.0, **extra: Any
) -> str:
    """A valid command document (override any field through `extra`)."""
    doc: dict[str, Any] = {
        "v": 1,
        "seq": seq,
        "cmd": cmd,
        "sender": sender,
        "expires": time.time() + ttl_s,
    }
    doc.update(extra)
    return json.dumps(doc)

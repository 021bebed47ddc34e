"""MQTT telemetry and safe remote control, on its own asyncio loop in its own thread.

The firing path never touches MQTT: it publishes to the `EventBus` (a deque append) and this
bridge drains its bus subscription every `POLL_S` on its own thread. A dead broker therefore
cannot slow a pulse; it only fills the bridge's bounded outbox, whose drops are counted.

Topics (``{prefix}/{session}/...``; payload schema in docs/mqtt.md):

- ``state``       QoS 0, rate-limited to ``state_rate_hz`` (the newest state wins).
- ``attempt``     QoS 1, every trigger attempt with its audit record, in order.
- ``health``      QoS 1, retained; ``{"status": "online", ...}``; the last will (and a graceful
                  stop) publish ``{"status": "offline"}`` there.
- ``thresholds``  QoS 1, retained: the active (enter, leave).
- ``interlock``   QoS 1, retained: every interlock transition (state, reason), in order.
- ``event``       QoS 1: other session events (emergency_stop, calibration, session, error).
- ``cmd/<user>``  subscribed, QoS 1: remote commands from the MQTT user ``<user>``; the broker's
                  ACL lets only that user publish there, so ``<user>`` is the broker-verified
                  identity that replay protection is keyed by (see `CommandProcessor`).
- ``cmd``         subscribed, QoS 1: the unauthenticated legacy topic: only ``disarm`` and
                  ``emergency_stop`` are acted on there.
- ``reply``       QoS 1: one reply per received command, accepted or refused with a reason.

The connection uses MQTT v5 so that the subscription can ask for ``retainAsPublished``: with
v3.1.1 a broker clears the retain flag on live delivery, so a retained command would look like a
fresh one. With v5 every command that was published retained is seen as such and refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from closedloop.bus import Event, EventBus, Subscription
from closedloop.control import ControlError, SessionControl
from closedloop.telemetry.client import tls_params
from closedloop.telemetry.protocol import SCHEMA_VERSION, CommandProcessor, CommandResult, dumps
from closedloop.telemetry.settings import TOPIC_LEVEL_RE, MqttSettings, Topics

log = logging.getLogger(__name__)

POLL_S = 0.02  # bus drain period: 20 ms keeps the added telemetry latency below a state period
# Events buffered between two drains. Live, a 20 ms drain sees ~10; a faster-than-real-time
# replay can overflow them (counted). States have their own small queue, so that a flood of
# states (only the newest of which is sent anyway) never pushes out an attempt.
BUS_QUEUE_LEN = 4096
STATE_QUEUE_LEN = 256
PUBLISH_TIMEOUT_S = 5.0  # a QoS 1 publish with no PUBACK after this means the link is dead
CLIENT_TIMEOUT_S = 5.0  # CONNACK / SUBACK / graceful DISCONNECT wait
THRESHOLDS_RETRY_S = 1.0  # ask a session that is still starting for its thresholds again
RAISE_ENV = "CLOSEDLOOP_RAISE"  # set (as the tests do): bridge bugs end the thread loudly
# Bus event kinds forwarded as they are to the `event` topic (the session publishes them).
EVENT_KINDS = frozenset({"emergency_stop", "calibration", "session", "error"})


# --------------------------------------------------------------------------------------------
# Bridge
# --------------------------------------------------------------------------------------------


def backoff_delays(min_s: float, max_s: float, rng: random.Random | None = None) -> Iterator[float]:
    """Reconnect sleeps (s): a ceiling doubling from min_s to max_s, each sleep uniform in
    [min_s, ceiling] ("full jitter": spreads the reconnects of many clients after a broker
    restart, while the doubling caps the load of a long outage)."""
    rng = rng or random.Random()
    ceiling_s = min_s
    while True:
        yield rng.uniform(min_s, ceiling_s)
        ceiling_s = min(ceiling_s * 2.0, max_s)


@dataclasses.dataclass(slots=True)
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MqttBridge:
    """Publishes bus events as MQTT telemetry and feeds remote commands to a `SessionControl`.

    `start()` returns at once; the bridge connects (and reconnects, with jittered exponential
    backoff) in its own thread, so a missing broker never raises here. Nothing in this class is
    called from the firing path: the pipeline only publishes to the bus.
    """

    def __init__(
        self,
        settings: MqttSettings,
        bus: EventBus,
        control: SessionControl,
        session_id: str | None = None,
    ) -> None:
        session = settings.session_id or session_id  # an explicit mqtt.session_id wins
        if not session or not TOPIC_LEVEL_RE.match(session):
            raise ValueError(f"session id {session!r}: give one (letters, digits, '_', '.', '-')")
        self.settings = settings
        self.session_id = session
        self.topics = Topics.of(settings.topic_prefix, session)
        t = self.topics
        self._fifo_topics = frozenset({t.attempt, t.interlock, t.event, t.reply})
        self.client_id = settings.client_id or f"closedloop-{session}-{uuid.uuid4().hex[:8]}"
        self._password = settings.resolved_password()  # fail here, not in the thread
        self._bus = bus
        self._control = control
        self._commands = CommandProcessor(
            control,
            allow_remote_arm=settings.allow_remote_arm,
            command_max_age_s=settings.command_max_age_s,
            max_remote_threshold=settings.max_remote_threshold,
            allow_remote_thresholds_while_armed=settings.allow_remote_thresholds_while_armed,
            cmd_topic=self.topics.cmd,
        )
        self._state_period_s = 1.0 / settings.state_rate_hz if settings.state_rate_hz else 0.0
        self._sub: Subscription | None = None  # subscribed in start(), not before
        self._state_sub: Subscription | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._connected_evt = threading.Event()
        self._reset()

    def _reset(self) -> None:
        """All per-run state, set in one place."""
        self._outbox: deque[_Outgoing] = deque()
        self._latest: dict[str, _Outgoing] = {}  # conflated topics: newest message wins
        self._pending_state: Event | None = None
        self._next_state_t = 0.0
        self._last_health: dict[str, Any] = {}
        self._seq: dict[str, int] = {}
        self._sent = 0
        self._dropped = 0
        self._superseded = 0
        self._connects = 0
        self._connect_failures = 0
        self._errors = 0
        self._last_error = ""
        self._stop_deadline = math.inf
        self._thresholds_known = False
        self._thresholds_retry_t = 0.0

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the MQTT thread (idempotent); returns immediately."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._reset()
        self._sub = self._bus.subscribe(
            "mqtt",
            maxlen=BUS_QUEUE_LEN,
            kinds={"attempt", "health", "interlock", "thresholds", *EVENT_KINDS},
        )
        self._state_sub = self._bus.subscribe("mqtt-state", maxlen=STATE_QUEUE_LEN, kinds={"state"})
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"mqtt-{self.session_id}", daemon=True
        )
        self._thread.start()
        ready.wait(5.0)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Flush, publish health 'offline' (retained), disconnect, join (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        self._stop_deadline = time.monotonic() + timeout_s
        if loop is not None and self._stop_requested is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed in between
                loop.call_soon_threadsafe(self._stop_requested.set)
        thread.join(timeout_s + 1.0)
        if thread.is_alive():
            log.error("MQTT thread did not stop within %.1f s", timeout_s)
        for sub in (self._sub, self._state_sub):
            if sub is not None:
                self._bus.unsubscribe(sub)
        self._thread = None

    def __enter__(self) -> MqttBridge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connected_evt.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        """Block the caller until connected (True) or `timeout_s` passed (False)."""
        return self._connected_evt.wait(timeout_s)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters (a snapshot; read from any thread)."""
        return {
            "connected": self.connected,
            "sent": self._sent,
            "dropped": self._dropped,  # outbox full: oldest attempt/interlock/event/reply dropped
            # unsent state/health/thresholds replaced by a newer one (incl. states the bus
            # dropped because newer ones came faster than the 20 ms drain)
            "superseded": self._superseded
            + (self._state_sub.dropped if self._state_sub is not None else 0),
            "queued": len(self._outbox),
            "bus_dropped": self._sub.dropped if self._sub is not None else 0,
            "connects": self._connects,
            "reconnects": max(0, self._connects - 1),
            "connect_failures": self._connect_failures,
            "commands_accepted": self._commands.accepted,
            "commands_refused": dict(self._commands.refused),
            "commands_warned": self._commands.warned,
            "errors": self._errors + self._commands.errors,
            "last_error": self._last_error,
        }

    def _note_error(self, exc: BaseException, what: str) -> None:
        self._errors += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        log.exception(what)

    # -- thread and loop ----------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
        except Exception as exc:  # the thread must die loudly, never silently
            self._note_error(exc, "MQTT thread crashed")
            if os.environ.get(RAISE_ENV):
                raise
        finally:
            self._connected_evt.clear()
            ready.set()

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._wake = asyncio.Event()
        ready.set()
        pump = asyncio.create_task(self._pump(), name="mqtt-pump")
        try:
            await self._connection_loop()
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _connection_loop(self) -> None:
        assert self._stop_requested is not None
        s = self.settings
        delays = backoff_delays(s.reconnect_min_s, s.reconnect_max_s)
        while not self._stop_requested.is_set():
            try:
                async with self._make_client() as client:
                    self._on_connected()
                    delays = backoff_delays(s.reconnect_min_s, s.reconnect_max_s)
                    await self._serve(client)
                    await self._goodbye(client)
                    return
            except aiomqtt.MqttError as exc:
                if self._connected_evt.is_set():
                    log.warning("MQTT connection lost: %s", exc)
                else:
                    self._connect_failures += 1
                    log.info("MQTT connect to %s:%d failed: %s", s.host, s.port, exc)
            except Exception as exc:
                self._note_error(exc, "MQTT bridge error; reconnecting")
                if os.environ.get(RAISE_ENV):
                    raise
            finally:
                self._connected_evt.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), timeout=next(delays))

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        return aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=self._password,
            identifier=self.client_id,
            logger=logging.getLogger(f"{__name__}.client"),
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            will=aiomqtt.Will(self.topics.health, self._will_doc(), qos=1, retain=True),
            timeout=CLIENT_TIMEOUT_S,
            keepalive=s.keepalive_s,
            tls_params=tls_params(s),
            tls_insecure=s.tls.insecure if s.tls.enabled else None,
        )

    def _on_connected(self) -> None:
        self._connects += 1
        self._connected_evt.set()
        log.info(
            "MQTT connected to %s:%d as %s (connect #%d)",
            self.settings.host,
            self.settings.port,
            self.client_id,
            self._connects,
        )
        # Retained topics may be gone (broker restarted without persistence, or our will
        # replaced 'online'): publish them again, from the session's current values.
        self._set_latest(self.topics.health, self._health_doc("online"), qos=1, retain=True)
        self._thresholds_known = False
        self._refresh_thresholds(time.monotonic())

    def _refresh_thresholds(self, now: float) -> None:
        """Publish the session's thresholds (retained) once they exist.

        A session that has not built its pipeline yet refuses with ControlError; the pump asks
        again every THRESHOLDS_RETRY_S until it answers (later changes come as bus events).
        """
        self._thresholds_retry_t = now + THRESHOLDS_RETRY_S
        try:
            enter, leave = self._control.thresholds()
        except ControlError:
            return
        except Exception as exc:
            self._note_error(exc, "control.thresholds() failed")
            return
        self._thresholds_known = True
        self._set_latest(
            self.topics.thresholds,
            self._doc("thresholds", {"enter": enter, "leave": leave}),
            qos=1,
            retain=True,
        )

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Run until stop is requested (returns) or the connection breaks (raises)."""
        assert self._stop_requested is not None
        tasks = [
            asyncio.create_task(self._send_loop(client), name="mqtt-send"),
            asyncio.create_task(self._command_loop(client), name="mqtt-commands"),
            asyncio.create_task(self._stop_requested.wait(), name="mqtt-stop"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """Flush what is queued, then say 'offline' (a graceful DISCONNECT sends no will).

        Everything here is bounded by the deadline that `stop(timeout_s)` set, even with a
        stalled broker: 70 % of it for the queue, the rest for 'offline' and the DISCONNECT.
        """
        self._drain_bus(time.monotonic(), final=True)

        def remaining_s(share: float = 1.0) -> float:
            left = min(self._stop_deadline - time.monotonic(), 2 * PUBLISH_TIMEOUT_S)
            return max(0.05, share * left - 0.2)

        with contextlib.suppress(asyncio.TimeoutError, aiomqtt.MqttError):
            await asyncio.wait_for(self._flush(client), timeout=remaining_s(0.7))
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(
                self.topics.health,
                self._health_doc("offline", reason="stopped"),
                qos=1,
                retain=True,
                timeout=remaining_s(),
            )
        client.timeout = remaining_s()  # bounds the DISCONNECT acknowledgement wait in __aexit__

    # -- outgoing -----------------------------------------------------------------------------

    async def _pump(self) -> None:
        """Drain the bus every POLL_S, whether connected or not (so drops are counted here)."""
        while True:
            try:
                self._drain_bus(time.monotonic())
            except Exception as exc:
                self._note_error(exc, "MQTT pump failed on an event")
                if os.environ.get(RAISE_ENV):
                    raise
            await asyncio.sleep(POLL_S)

    def _drain_bus(self, now: float, *, final: bool = False) -> None:
        assert self._sub is not None
        assert self._state_sub is not None
        topics = self.topics
        states = self._state_sub.drain()
        if states:
            self._pending_state = states[-1]  # rate-limited below: only the newest matters
        for event in self._sub.drain():
            kind = event.kind
            if kind == "attempt":
                self._enqueue(_Outgoing(topics.attempt, self._event_doc(event), 1, False))
            elif kind == "health":
                self._last_health = dict(event.payload)
                self._set_latest(topics.health, self._health_doc("online", event=event), 1, True)
            elif kind == "thresholds":
                self._thresholds_known = True
                self._set_latest(topics.thresholds, self._event_doc(event), 1, True)
            elif kind == "interlock":  # every transition, in order; the last one retained
                self._enqueue(_Outgoing(topics.interlock, self._event_doc(event), 1, True))
            elif kind in EVENT_KINDS:
                self._enqueue(_Outgoing(topics.event, self._event_doc(event), 1, False))
        if not self._thresholds_known and self.connected and now >= self._thresholds_retry_t:
            self._refresh_thresholds(now)
        if (
            self._pending_state is not None
            and self._state_period_s > 0.0
            and (final or now >= self._next_state_t)
        ):
            self._set_latest(topics.state, self._event_doc(self._pending_state), 0, False)
            self._pending_state = None
            # Accumulate the target time so the mean rate is exact despite POLL_S granularity.
            self._next_state_t += self._state_period_s
            if self._next_state_t <= now:
                self._next_state_t = now + self._state_period_s

    def _enqueue(self, msg: _Outgoing) -> None:
        if len(self._outbox) >= self.settings.queue_max:
            self._outbox.popleft()
            self._dropped += 1
        self._outbox.append(msg)
        if self._wake is not None:
            self._wake.set()

    def _set_latest(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if topic in self._latest:
            self._superseded += 1
        self._latest[topic] = _Outgoing(topic, payload, qos, retain)
        if self._wake is not None:
            self._wake.set()

    def _next_outgoing(self) -> _Outgoing | None:
        if self._outbox:
            return self._outbox.popleft()
        if self._latest:
            topic = next(iter(self._latest))  # insertion order: oldest update first
            return self._latest.pop(topic)
        return None

    def _requeue(self, msg: _Outgoing) -> None:
        """Put back a message whose publish failed (QoS 1 is at least once anyway)."""
        if msg.topic in self._fifo_topics:
            if len(self._outbox) >= self.settings.queue_max:
                self._dropped += 1
                return
            self._outbox.appendleft(msg)
        elif msg.topic not in self._latest:
            self._latest[msg.topic] = msg

    async def _flush(self, client: aiomqtt.Client) -> None:
        while (msg := self._next_outgoing()) is not None:
            try:
                await client.publish(
                    msg.topic,
                    msg.payload,
                    qos=msg.qos,
                    retain=msg.retain,
                    timeout=PUBLISH_TIMEOUT_S,
                )
            except BaseException:
                self._requeue(msg)
                raise
            self._sent += 1

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush(client)

    # -- incoming -----------------------------------------------------------------------------

    async def _command_loop(self, client: aiomqtt.Client) -> None:
        # Subscribing here (not before the tasks start) lets telemetry flow and a stop
        # interrupt even while the SUBACK is pending.
        options = SubscribeOptions(qos=1, retainAsPublished=True)
        await client.subscribe([(self.topics.cmd, options), (self.topics.cmd_of("+"), options)])
        async for message in client.messages:
            try:
                identity = self.topics.identity(message.topic.value)
            except ValueError:
                continue
            payload = message.payload
            if not isinstance(payload, (bytes, bytearray, str)):
                payload = str(payload)
            result = self._commands.handle(payload, retain=bool(message.retain), identity=identity)
            self._enqueue(_Outgoing(self.topics.reply, self._reply_doc(result), 1, False))

    # -- documents ----------------------------------------------------------------------------

    def _doc(self, kind: str, data: Mapping[str, Any], **extra: Any) -> bytes:
        seq = self._seq.get(kind, 0) + 1
        self._seq[kind] = seq
        return dumps(
            {
                "v": SCHEMA_VERSION,
                "kind": kind,
                "session": self.session_id,
                "seq": seq,
                "t_wall": time.time(),
                **extra,
                "data": data,
            }
        )

    def _event_doc(self, event: Event) -> bytes:
        return self._doc(event.kind, event.payload, t_stream=event.t_stream, t_local=event.t_local)

    def _health_doc(self, status: str, *, reason: str = "", event: Event | None = None) -> bytes:
        extra: dict[str, Any] = {"status": status}
        if reason:
            extra["reason"] = reason
        if event is not None:
            extra.update(t_stream=event.t_stream, t_local=event.t_local)
        data = dict(self._last_health) if status == "online" else {}
        data["mqtt"] = {k: v for k, v in self.stats.items() if k != "last_error"}
        return self._doc("health", data, **extra)

    def _will_doc(self) -> bytes:
        """Sent by the broker if we vanish without a DISCONNECT (crash, kill, lost link)."""
        return dumps(
            {
                "v": SCHEMA_VERSION,
                "kind": "health",
                "session": self.session_id,
                "status": "offline",
                "reason": "connection_lost",
                "data": {},
            }
        )

    def _reply_doc(self, result: CommandResult) -> bytes:
        return self._doc(
            "reply",
            {
                "ok": result.ok,
                "reason": result.reason,
                "detail": result.detail,
                "cmd": result.cmd,
                "cmd_seq": result.seq,
                "sender": result.sender,
                "user": result.identity,
                "warnings": list(result.warnings),
            },
        )

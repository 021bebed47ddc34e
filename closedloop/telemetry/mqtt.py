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
import enum
import json
import logging
import math
import os
import random
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import aiomqtt
import numpy as np
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from closedloop.bus import Event, EventBus, Subscription
from closedloop.control import ControlError, SessionControl
from closedloop.telemetry.settings import TOPIC_LEVEL_RE, MqttSettings, Topics
from features.settings import check_thresholds

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
POLL_S = 0.02  # bus drain period: 20 ms keeps the added telemetry latency below a state period
# Events buffered between two drains. Live, a 20 ms drain sees ~10; a faster-than-real-time
# replay can overflow them (counted). States have their own small queue, so that a flood of
# states (only the newest of which is sent anyway) never pushes out an attempt.
BUS_QUEUE_LEN = 4096
STATE_QUEUE_LEN = 256
PUBLISH_TIMEOUT_S = 5.0  # a QoS 1 publish with no PUBACK after this means the link is dead
CLIENT_TIMEOUT_S = 5.0  # CONNACK / SUBACK / graceful DISCONNECT wait
THRESHOLDS_RETRY_S = 1.0  # ask a session that is still starting for its thresholds again
MAX_SENDERS = 256  # command senders remembered for replay protection
MAX_PAYLOAD_BYTES = 4096  # a command is a few hundred bytes; larger ones are refused unparsed
RAISE_ENV = "CLOSEDLOOP_RAISE"  # set (as the tests do): bridge bugs end the thread loudly

# Bus event kinds forwarded as they are to the `event` topic (the session publishes them).
EVENT_KINDS = frozenset({"emergency_stop", "calibration", "session", "error"})
COMMANDS = frozenset(
    {"disarm", "emergency_stop", "set_thresholds", "start_calibration", "stop_calibration", "arm"}
)
# Commands that can only make the session safer: never refused for their sequence number,
# expiry, duplication or envelope; what was wrong comes back as warnings (and is logged).
SAFE_COMMANDS = frozenset({"disarm", "emergency_stop"})
_SENDER_RE = r"^[A-Za-z0-9_.:@\-]+$"


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:  # noqa: PLR0911 (one return per type)
    """Turn pipeline payloads (numpy, enums, dataclasses, NaN) into strict JSON values.

    Non-finite floats become None (JSON has no NaN); numpy scalars and arrays become Python
    numbers and lists; enums their value; dataclasses dicts; anything else its str().
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset, deque)):
        return [to_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return str(obj)


def _dumps(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(to_jsonable(doc), separators=(",", ":"), allow_nan=False).encode()


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


class _Envelope(BaseModel):
    """A command as received; `args` is checked per command afterwards."""

    model_config = ConfigDict(extra="forbid", strict=True)

    v: int
    seq: int = Field(ge=0)
    cmd: str = Field(max_length=64)
    sender: str = Field(min_length=1, max_length=64, pattern=_SENDER_RE)
    expires: float | None = None
    sent: float | None = None
    ttl_s: float | None = Field(None, gt=0.0)
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_expiry_fields(self) -> _Envelope:
        if self.expires is None and (self.sent is None or self.ttl_s is None):
            raise ValueError("give 'expires' (unix s) or both 'sent' (unix s) and 'ttl_s'")
        for name in ("expires", "sent", "ttl_s"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite")
        return self

    @property
    def expiry(self) -> float:
        """Absolute expiry, unix s: the earlier of `expires` and `sent + ttl_s`."""
        candidates = [self.expires] if self.expires is not None else []
        if self.sent is not None and self.ttl_s is not None:
            candidates.append(self.sent + self.ttl_s)
        return min(candidates)


class _NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _DisarmArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field("", max_length=200)


class _ThresholdArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    enter: float
    leave: float

    @model_validator(mode="after")
    def _check(self) -> _ThresholdArgs:
        check_thresholds(self.enter, self.leave)
        return self


_ARGS: dict[str, type[BaseModel]] = {
    "disarm": _DisarmArgs,
    "emergency_stop": _NoArgs,
    "set_thresholds": _ThresholdArgs,
    "start_calibration": _NoArgs,
    "stop_calibration": _NoArgs,
    "arm": _NoArgs,
}


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """The outcome of one received command; `reason` is 'accepted' when ok."""

    ok: bool
    reason: str
    detail: str = ""
    cmd: str | None = None
    seq: int | None = None
    sender: str | None = None
    identity: str | None = None  # the MQTT user from the command topic; None: legacy topic
    warnings: tuple[str, ...] = ()  # what was wrong with a safe command that was still acted on


def _peek(doc: Any) -> dict[str, Any]:
    """cmd / seq / sender of an unvalidated document, where they have the right type."""
    if not isinstance(doc, dict):
        return {}
    want = {"cmd": str, "seq": int, "sender": str}
    return {
        k: doc[k]
        for k, t in want.items()
        if isinstance(doc.get(k), t) and not isinstance(doc.get(k), bool)
    }


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "payload"
    return f"{where}: {err.get('msg', 'invalid')}"


class CommandProcessor:
    """Validates and executes remote commands; no I/O, so it is tested without a broker.

    `identity` is the MQTT user the command came from, taken from its topic
    (``cmd/<user>``), which the broker's ACL lets only that user publish to; None is the
    unauthenticated legacy ``cmd`` topic, where only the safe commands are acted on.

    Checks, in order (each refusal has the reason in brackets): retained flag [retained];
    payload size, JSON object [malformed]; version [unsupported_version]; envelope fields
    [malformed]; command name [unknown_command]; expiry, on the wall clock, since sender and
    receiver are different machines and only absolute time is comparable [expired], and not
    more than `command_max_age_s` ahead [expiry_too_far]; an authenticated topic
    [unauthenticated]; sequence number strictly above the last one of this (identity,
    sender) [duplicate]; arguments [invalid_args]; remote thresholds within
    +-max_remote_threshold [out_of_range]; remote arming allowed [remote_arm_disabled]; the
    session's own checks, e.g. thresholds while armed [refused]. An exception inside the
    session is [error] (logged with its traceback).

    `disarm` and `emergency_stop` only make the session safer: a failed check from the
    version to the arguments becomes a warning in the reply (and the log), never a refusal.
    A retained one is acted on only when its expiry is valid and not passed (a stale one
    stored by the broker would otherwise stop every session that subscribes).

    Replay protection: a command accepted at wall time t expires by t + command_max_age_s,
    so a sender's last seq is only needed that long; senders idle for longer are forgotten.
    The seq state is per (identity, sender): a user cannot use up another user's seqs, since
    the broker decides the identity. A restart forgets all seqs: a captured command could be
    replayed once within its expiry.
    """

    def __init__(
        self,
        control: SessionControl,
        *,
        allow_remote_arm: bool,
        command_max_age_s: float,
        max_remote_threshold: float = 4.0,
        allow_remote_thresholds_while_armed: bool = False,
        cmd_topic: str = "cmd",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._control = control
        self._allow_remote_arm = allow_remote_arm
        self._max_age_s = command_max_age_s
        self._max_threshold = max_remote_threshold
        self._thresholds_while_armed = allow_remote_thresholds_while_armed
        self._cmd_topic = cmd_topic  # for the hint in an 'unauthenticated' refusal
        self._clock = clock
        # (identity, sender) -> (last accepted seq, wall time)
        self._last_seq: dict[tuple[str, str], tuple[int, float]] = {}
        self.accepted = 0
        self.refused: dict[str, int] = {}
        self.warned = 0  # safe commands acted on despite a failed check
        self.errors = 0

    def handle(
        self, payload: bytes | bytearray | str, *, retain: bool, identity: str | None = None
    ) -> CommandResult:
        result = self._handle(payload, retain=retain, identity=identity)
        where = f"cmd={result.cmd} seq={result.seq} sender={result.sender} user={identity}"
        if result.ok and result.warnings:
            self.accepted += 1
            self.warned += 1
            log.warning(
                "MQTT command %s acted on despite: %s [%s]",
                result.cmd,
                "; ".join(result.warnings),
                where,
            )
        elif result.ok:
            self.accepted += 1
            log.info("MQTT command accepted [%s]", where)
        else:
            self.refused[result.reason] = self.refused.get(result.reason, 0) + 1
            log.warning("MQTT command refused (%s): %s [%s]", result.reason, result.detail, where)
        return result

    def _handle(  # noqa: PLR0911 (one branch per check, in the documented order)
        self, payload: bytes | bytearray | str, *, retain: bool, identity: str | None
    ) -> CommandResult:
        if len(payload) > MAX_PAYLOAD_BYTES:
            return CommandResult(
                False, "malformed", f"payload over {MAX_PAYLOAD_BYTES} bytes", identity=identity
            )
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            doc, error = None, f"not JSON: {exc}"
        else:
            error = "" if isinstance(doc, dict) else "payload is not a JSON object"
        # for the reply and the log only; nothing unchecked is acted on except a safe command
        ctx: dict[str, Any] = {**_peek(doc), "identity": identity}
        safe = isinstance(doc, dict) and doc.get("cmd") in SAFE_COMMANDS
        if retain and not safe:
            return CommandResult(False, "retained", "retained commands are never acted on", **ctx)
        if error or not isinstance(doc, dict):
            return CommandResult(False, "malformed", error, **ctx)
        warnings: list[str] = []
        if doc.get("v") != SCHEMA_VERSION:
            detail = f"v={doc.get('v')!r}, expected {SCHEMA_VERSION}"
            if not safe:
                return CommandResult(False, "unsupported_version", detail, **ctx)
            warnings.append(f"unsupported_version: {detail}")
        env: _Envelope | None
        try:
            env = _Envelope.model_validate(doc)
        except ValidationError as exc:
            if not safe:
                return CommandResult(False, "malformed", _first_error(exc), **ctx)
            warnings.append(f"malformed: {_first_error(exc)}")
            env = None
        else:
            ctx = {"cmd": env.cmd, "seq": env.seq, "sender": env.sender, "identity": identity}
        cmd = env.cmd if env is not None else str(doc["cmd"])
        if cmd not in COMMANDS:
            return CommandResult(False, "unknown_command", f"known: {sorted(COMMANDS)}", **ctx)
        now = self._clock()
        fresh = False
        if env is not None:
            if now > env.expiry:
                detail = f"expired {now - env.expiry:.3f} s ago"
                if not safe:
                    return CommandResult(False, "expired", detail, **ctx)
                warnings.append(f"expired: {detail}")
            elif env.expiry - now > self._max_age_s:
                detail = (
                    f"expires in {env.expiry - now:.1f} s > command_max_age_s {self._max_age_s}"
                )
                if not safe:
                    return CommandResult(False, "expiry_too_far", detail, **ctx)
                warnings.append(f"expiry_too_far: {detail}")
            else:
                fresh = True
        if retain:  # only a safe command gets here
            if not fresh:
                return CommandResult(
                    False,
                    "retained",
                    "a retained command is acted on only if it is a disarm or emergency stop "
                    "whose expiry is valid and not passed",
                    warnings=tuple(warnings),
                    **ctx,
                )
            warnings.append("retained: acted on because it only makes the session safer")
        if identity is None and not safe:
            return CommandResult(
                False,
                "unauthenticated",
                f"publish {cmd} on {self._cmd_topic}/<your MQTT user name> (this topic takes "
                "only disarm and emergency_stop)",
                **ctx,
            )
        if env is not None and identity is not None:
            key = (identity, env.sender)
            last = self._last_seq.get(key)
            if last is not None and env.seq <= last[0]:
                detail = f"seq {env.seq} <= last accepted {last[0]}"
                if not safe:
                    return CommandResult(False, "duplicate", detail, **ctx)
                warnings.append(f"duplicate: {detail}")
            elif last is None and not self._make_room(now):
                if not safe:
                    return CommandResult(False, "too_many_senders", f"over {MAX_SENDERS}", **ctx)
                warnings.append(f"too_many_senders: over {MAX_SENDERS}")
            elif not warnings:  # a flawed safe command does not move the sequence on
                self._last_seq[key] = (env.seq, now)  # the seq is used up from here on
        raw_args = env.args if env is not None else doc.get("args", {})
        try:
            args = _ARGS[cmd].model_validate(raw_args)
        except ValidationError as exc:
            if not safe:
                return CommandResult(False, "invalid_args", _first_error(exc), **ctx)
            warnings.append(f"invalid_args: {_first_error(exc)}")
            args = _ARGS[cmd]()
        if (
            isinstance(args, _ThresholdArgs)
            and max(abs(args.enter), abs(args.leave)) > self._max_threshold
        ):
            return CommandResult(
                False,
                "out_of_range",
                f"|enter| and |leave| must be <= mqtt.max_remote_threshold "
                f"{self._max_threshold:g} (z units)",
                **ctx,
            )
        if cmd == "arm" and not self._allow_remote_arm:
            return CommandResult(
                False, "remote_arm_disabled", "config mqtt.allow_remote_arm is false", **ctx
            )
        sender = ctx.get("sender") or "?"
        try:
            self._execute(cmd, args, identity, sender)
        except ControlError as exc:
            return CommandResult(False, "refused", str(exc), warnings=tuple(warnings), **ctx)
        except Exception as exc:
            self.errors += 1
            log.exception("MQTT command %s from %s failed inside the session", cmd, sender)
            return CommandResult(
                False, "error", f"{type(exc).__name__}: {exc}", warnings=tuple(warnings), **ctx
            )
        return CommandResult(True, "accepted", "", warnings=tuple(warnings), **ctx)

    def _make_room(self, now: float) -> bool:
        if len(self._last_seq) < MAX_SENDERS:
            return True
        for key, (_, t) in list(self._last_seq.items()):
            if now - t > self._max_age_s:  # all its commands have expired: replay is refused
                del self._last_seq[key]
        return len(self._last_seq) < MAX_SENDERS

    def _execute(self, cmd: str, args: BaseModel, identity: str | None, sender: str) -> None:
        who = f"{identity}/{sender}" if identity not in (None, sender) else sender
        source = f"mqtt:{who}" if identity is not None else f"mqtt:unauthenticated/{sender}"
        control = self._control
        if cmd == "disarm":
            assert isinstance(args, _DisarmArgs)
            control.disarm(f"{source}: {args.reason}" if args.reason else source)
        elif cmd == "emergency_stop":
            control.emergency_stop(source)
        elif cmd == "set_thresholds":
            assert isinstance(args, _ThresholdArgs)
            control.set_thresholds(
                args.enter,
                args.leave,
                source,
                refuse_if_armed=not self._thresholds_while_armed,
            )
        elif cmd == "start_calibration":
            control.start_calibration(source)
        elif cmd == "stop_calibration":
            control.stop_calibration(source)
        elif cmd == "arm":
            control.arm("mqtt_remote", operator=who)


# --------------------------------------------------------------------------------------------
# Bridge
# --------------------------------------------------------------------------------------------


def _tls_params(s: MqttSettings) -> aiomqtt.TLSParameters | None:
    if not s.tls.enabled:
        return None
    return aiomqtt.TLSParameters(
        ca_certs=str(s.tls.ca_file) if s.tls.ca_file else None,
        certfile=str(s.tls.cert_file) if s.tls.cert_file else None,
        keyfile=str(s.tls.key_file) if s.tls.key_file else None,
        cert_reqs=ssl.CERT_REQUIRED,
    )


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
            tls_params=_tls_params(s),
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
        return _dumps(
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
        return _dumps(
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


# --------------------------------------------------------------------------------------------
# Control client side
# --------------------------------------------------------------------------------------------


def build_command(
    cmd: str,
    *,
    sender: str,
    seq: int | None = None,
    ttl_s: float = 10.0,
    args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A command document (see docs/mqtt.md). `seq` defaults to time.time_ns(), which keeps
    increasing across invocations of the same sender; expiry is now + ttl_s (wall clock)."""
    if cmd not in COMMANDS:
        raise ValueError(f"unknown command {cmd!r}; known: {sorted(COMMANDS)}")
    return {
        "v": SCHEMA_VERSION,
        "seq": time.time_ns() if seq is None else seq,
        "cmd": cmd,
        "sender": sender,
        "expires": time.time() + ttl_s,
        "args": dict(args or {}),
    }


def send_command(
    settings: MqttSettings,
    session_id: str,
    cmd: str,
    *,
    sender: str,
    args: Mapping[str, Any] | None = None,
    ttl_s: float = 10.0,
    timeout_s: float = 5.0,
) -> dict[str, Any] | None:
    """Publish one command as a control client and wait for its reply's `data` (None when no
    reply came within timeout_s). Blocking; call it from a thread without a running loop.

    The command goes to ``cmd/<user>`` with `settings.username` as the user (the broker's ACL
    must let this user write there); without a user name (an anonymous test broker) the
    sender names the topic level."""
    doc = build_command(cmd, sender=sender, ttl_s=ttl_s, args=args)
    topics = Topics.of(settings.topic_prefix, settings.session_id or session_id)
    s = settings
    cmd_topic = topics.cmd_of(s.username or sender)

    password = s.resolved_password()

    async def _go() -> dict[str, Any] | None:
        async with aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=password,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=timeout_s,
            tls_params=_tls_params(s),
            tls_insecure=s.tls.insecure if s.tls.enabled else None,
        ) as client:
            await client.subscribe(topics.reply, qos=1)
            await client.publish(cmd_topic, json.dumps(doc), qos=1)
            async for message in client.messages:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    data = json.loads(message.payload)["data"]
                    if data["sender"] == sender and data["cmd_seq"] == doc["seq"]:
                        return data
        return None

    try:
        return asyncio.run(asyncio.wait_for(_go(), timeout=timeout_s))
    except asyncio.TimeoutError:
        return None

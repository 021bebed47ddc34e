"""The MQTT wire protocol: strict JSON of pipeline payloads, and the command documents a
session accepts (envelope, arguments, replay protection, `CommandProcessor`), see docs/mqtt.md."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from closedloop.control import ControlError, SessionControl
from features.settings import check_thresholds

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_SENDERS = 256  # command senders remembered for replay protection
MAX_PAYLOAD_BYTES = 4096  # a command is a few hundred bytes; larger ones are refused unparsed
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


def dumps(doc: Mapping[str, Any]) -> bytes:
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

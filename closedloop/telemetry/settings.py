"""The `mqtt:` section of a session config and the topic names it gives: pydantic only, so that
loading a config (`check-config`) never imports the MQTT client (aiomqtt, paho)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

TOPIC_LEVEL_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")  # one topic level: no wildcards, no '/'


class MqttTlsSettings(BaseModel):
    """TLS for the broker connection (off by default: a loopback broker needs none)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Connect with TLS (usually port 8883).")
    ca_file: Path | None = Field(
        None, description="CA certificate (PEM) that signed the broker's; None: system CAs."
    )
    cert_file: Path | None = Field(
        None, description="Client certificate (PEM) for mutual TLS; needs key_file."
    )
    key_file: Path | None = Field(None, description="Client private key (PEM) for cert_file.")
    insecure: bool = Field(
        False,
        description="Skip the broker hostname check (self-signed test certificates only; "
        "the certificate chain is still verified).",
    )

    @model_validator(mode="after")
    def _check_files(self) -> MqttTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file must be given together")
        if self.enabled:
            for name in ("ca_file", "cert_file", "key_file"):
                path = getattr(self, name)
                if path is not None and not Path(path).is_file():
                    raise ValueError(f"tls.{name}: file not found: {path}")
        return self


class MqttSettings(BaseModel):
    """The `mqtt:` section of a session config."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Run the MQTT bridge at all.")
    host: str = Field("127.0.0.1", min_length=1, description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS).")
    username: str | None = Field(None, description="Broker user name; None: anonymous.")
    password: SecretStr | None = Field(None, description="Broker password (needs username).")
    password_env: str | None = Field(
        None,
        description="Name of an environment variable holding the password, to keep it "
        "out of the config file (instead of password).",
    )
    tls: MqttTlsSettings = Field(default_factory=MqttTlsSettings, description="TLS options.")
    topic_prefix: str = Field(
        "closedloop", description="First topic level(s); topics are {prefix}/{session}/..."
    )
    session_id: str = Field(
        "", description="Topic level for this session; empty: the session's own id."
    )
    state_rate_hz: float = Field(
        10.0, ge=0.0, le=100.0, description="State messages per second (0: none)."
    )
    allow_remote_arm: bool = Field(
        False, description="Accept the 'arm' command over MQTT (off: always refused)."
    )
    max_remote_threshold: float = Field(
        4.0,
        gt=0.0,
        le=20.0,
        description="set_thresholds over MQTT is refused unless |enter| and |leave| are at "
        "most this (z units of the calibrated baseline, where the score lives: 0 is the "
        "baseline median, 1 one robust SD).",
    )
    allow_remote_thresholds_while_armed: bool = Field(
        False,
        description="Accept set_thresholds over MQTT while the interlock is armed (off: "
        "disarm first; the GUI can always change them).",
    )
    command_max_age_s: float = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="A command must expire within this many seconds of its arrival (wall "
        "clock); it also bounds how long a captured command could be replayed.",
    )
    queue_max: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Attempt/interlock/event/reply messages held "
        "while the broker is unreachable; beyond it the oldest are dropped and counted.",
    )
    client_id: str = Field("", description="MQTT client id; empty: closedloop-{session}-{random}.")
    keepalive_s: int = Field(
        10,
        ge=1,
        le=3600,
        description="MQTT keepalive; the broker declares us dead (and "
        "publishes the last will) after 1.5x this without traffic.",
    )
    reconnect_min_s: float = Field(0.5, gt=0.0, le=60.0, description="First reconnect delay.")
    reconnect_max_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="Reconnect delay ceiling (doubling, jittered)."
    )

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        levels = value.split("/")
        if not value or not all(TOPIC_LEVEL_RE.match(level) for level in levels):
            raise ValueError(
                f"topic_prefix {value!r}: use '/'-separated levels of letters, digits, "
                "'_', '.', '-' (no wildcards, no empty level, no leading '$')"
            )
        return value

    @field_validator("session_id", "client_id")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value and not TOPIC_LEVEL_RE.match(value):
            raise ValueError(f"{value!r}: use letters, digits, '_', '.', '-' only")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> MqttSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) < reconnect_min_s "
                f"({self.reconnect_min_s})"
            )
        if self.password is not None and self.password_env is not None:
            raise ValueError("give password or password_env, not both")
        if (self.password is not None or self.password_env) and self.username is None:
            raise ValueError("password given without username")
        if self.allow_remote_arm and not (
            self.tls.enabled and self.username and (self.password or self.password_env)
        ):
            # anyone who can reach the broker could arm a stimulator otherwise
            raise ValueError(
                "allow_remote_arm: needs tls.enabled and a login (username and password or "
                "password_env)"
            )
        return self

    def resolved_password(self) -> str | None:
        """The password, from `password` or the `password_env` variable (ValueError if unset)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ValueError(
                    f"mqtt.password_env: environment variable {self.password_env} is not set"
                )
            return value
        return None


@dataclasses.dataclass(frozen=True)
class Topics:
    """All topic names of one session: ``{prefix}/{session}/{name}``."""

    base: str
    state: str
    attempt: str
    health: str
    thresholds: str
    interlock: str
    event: str
    cmd: str
    reply: str

    @classmethod
    def of(cls, prefix: str, session_id: str) -> Topics:
        base = f"{prefix}/{session_id}"
        names = [f.name for f in dataclasses.fields(cls) if f.name != "base"]
        return cls(base=base, **{name: f"{base}/{name}" for name in names})

    def cmd_of(self, user: str) -> str:
        """The command topic of MQTT user `user` (the ACL lets only that user write there)."""
        return f"{self.cmd}/{user}"

    def identity(self, topic: str) -> str | None:
        """The user level of a per-user command topic; None for the legacy `cmd` topic.

        ValueError for a topic that is neither (or a level that is not a plain name).
        """
        if topic == self.cmd:
            return None
        level = topic.removeprefix(self.cmd + "/")
        if level == topic or not TOPIC_LEVEL_RE.match(level):
            raise ValueError(f"not a command topic: {topic}")
        return level

"""Sending a command to a running session over MQTT and waiting for its reply (`send_command`:
what `closedloop`'s own tools and a lab's scripts use; docs/mqtt.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Mapping
from typing import Any

import aiomqtt

from closedloop.telemetry.protocol import build_command
from closedloop.telemetry.settings import MqttSettings, Topics

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Control client side
# --------------------------------------------------------------------------------------------


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
            tls_params=tls_params(s),
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


def tls_params(s: MqttSettings) -> aiomqtt.TLSParameters | None:
    if not s.tls.enabled:
        return None
    return aiomqtt.TLSParameters(
        ca_certs=str(s.tls.ca_file) if s.tls.ca_file else None,
        certfile=str(s.tls.cert_file) if s.tls.cert_file else None,
        keyfile=str(s.tls.key_file) if s.tls.key_file else None,
        cert_reqs=ssl.CERT_REQUIRED,
    )

"""MQTT telemetry and safe remote commands: the `mqtt:` settings (telemetry.settings, pydantic
only) and the bridge, wire protocol and command client (telemetry.mqtt)."""

"""MQTT telemetry and safe remote commands: the `mqtt:` settings (telemetry.settings, pydantic
only), the wire protocol and command checks (telemetry.protocol), the bridge a session runs
(telemetry.bridge) and the command client (telemetry.client)."""

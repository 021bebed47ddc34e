"""What remote and local front ends (GUI, MQTT) may ask of a running session.

The session implements this; front ends depend only on it, so they can be tested against a fake.
Every method is thread-safe and returns quickly (it never waits for the acquisition thread).
"""

from __future__ import annotations

from typing import Protocol


class ControlError(ValueError):
    """A command that was refused (invalid value, not allowed); the message says why."""


class SessionControl(Protocol):
    def arm(self, action: str, operator: str = "") -> None:
        """Arm the interlock; `action` names the operator action ('gui_button', 'mqtt_remote').

        Raises ControlError when refused (uncalibrated, output not ready, remote arming disabled).
        """

    def disarm(self, reason: str) -> None:
        """Disarm now with a reason (always allowed)."""

    def emergency_stop(self, source: str) -> None:
        """Disarm, stop firing and end stimulation for the session; always allowed."""

    def set_thresholds(
        self, enter: float, leave: float, source: str, *, refuse_if_armed: bool = False
    ) -> None:
        """Change the state thresholds live (audited); ControlError if invalid (enter <= leave,
        ...) or, with refuse_if_armed, while the interlock is not disarmed."""

    def start_calibration(self, source: str) -> None:
        """Begin (or restart) the baseline calibration; disarms first."""

    def stop_calibration(self, source: str) -> None:
        """Finish the calibration with the data collected so far (ControlError if too little)."""

    def thresholds(self) -> tuple[float, float]:
        """Current (enter, leave)."""

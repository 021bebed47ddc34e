"""Validated settings of the trigger stage: policy, safety limits, outputs.

The hard limits below are the TMS safety model (DESIGN.md). No setting may exceed them: a value
beyond a limit is a validation error naming the limit, never a silent clamp. The interlock checks
them again at construction (defense in depth against `model_construct`, which skips validation).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from features.strict import FiniteModel, StrictNumbersModel, refuse_bool_for_number

HARD_MIN_INTERVAL_S = 1.0  # no two pulses closer than this, whatever the config says
HARD_MAX_PER_MINUTE = 60  # at most this many pulses in any rolling RATE_WINDOW_S
HARD_SESSION_CAP = 1800  # at most this many pulses per session
RATE_WINDOW_S = 60.0  # length of the rolling window of the rate limit
# The deciding EEG sample may be at most this old (live): beyond 2 s the state is history, not
# the brain state a pulse is meant to meet (states change within 1-2 s: dwell_s is 1 s); a pulse
# later than 1 s after its sample misses any phase- or state-locked window by far.
MAX_STALE_AFTER_S = 2.0
MAX_LATENCY_BUDGET_MS = 1000.0
MAX_PULSE_WIDTH_MS = 100.0  # RTS/DTR pulse width ceiling: the width blocks the acquisition thread
# Watchdog bounds (safety.watchdog_ms). The live loop completes a step at least every 5 ms (the
# pull timeout) plus the step itself (0.66 ms p99): measured here over 40 s of a live 32-channel
# session with load average 9.5 on 2 cores, the time since the last step was p99 6.8 ms, p99.9
# 15 ms, max 30 ms. Below 100 ms such a machine would come close to tripping it with no hang;
# above 5 s a hung output would leave the system armed for 5 hard minimum intervals.
WATCHDOG_MIN_MS = 100.0
WATCHDOG_MAX_MS = 5000.0


class PolicySettings(StrictNumbersModel):
    """When would we like a pulse (the interlock decides whether one may happen)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["dwell_once", "repeat"] = Field(
        "dwell_once",
        description="'dwell_once': one request per entry into the target state, after the dwell; "
        "'repeat': a first request after the dwell, then one every repeat_interval_s (+ jitter) "
        "while the state holds.",
    )
    dwell_s: float = Field(
        1.0,
        ge=0.0,
        le=600.0,
        description="Stream seconds the target state must hold before the first request.",
    )
    repeat_interval_s: float = Field(
        5.0,
        ge=HARD_MIN_INTERVAL_S,
        le=3600.0,
        description="'repeat' mode: stream seconds between requests (the interlock's minimum "
        "interval still applies on top).",
    )
    jitter_s: float = Field(
        0.0,
        ge=0.0,
        le=60.0,
        description="'repeat' mode: uniform random delay in [0, jitter_s] added to each interval.",
    )
    seed: int = Field(0, description="Seed of the jitter generator (deterministic replays).")


class SafetySettings(StrictNumbersModel):
    """Limits of the safety interlock. Defaults are stricter than the hard limits."""

    model_config = ConfigDict(extra="forbid")

    min_interval_s: float = Field(
        3.0,
        description=f"Minimum seconds between two pulses (hard floor {HARD_MIN_INTERVAL_S} s).",
    )
    max_per_minute: int = Field(
        20,
        description=f"Maximum pulses in any rolling {RATE_WINDOW_S:g} s "
        f"(hard ceiling {HARD_MAX_PER_MINUTE}).",
    )
    session_cap: int = Field(
        300, description=f"Maximum pulses per session (hard ceiling {HARD_SESSION_CAP})."
    )
    arm_expiry_min: float | None = Field(
        None, gt=0.0, description="Disarm after this many minutes armed (None: never)."
    )
    latency_budget_ms: float = Field(
        50.0,
        gt=0.0,
        le=MAX_LATENCY_BUDGET_MS,
        description="Live: veto as 'late' when the deciding EEG sample is older than this (ms): "
        "local clock now minus its LSL timestamp corrected to the local clock, so a backlog "
        "pulled just now still counts as old; a sample without a time, or stamped ahead of the "
        f"clock, is late too. At most {MAX_LATENCY_BUDGET_MS:g} ms.",
    )
    stale_after_s: float = Field(
        0.5,
        gt=0.0,
        le=MAX_STALE_AFTER_S,
        description="Veto as 'stale' when the deciding sample is older than this (s): behind "
        "the newest sample seen (stream time) or, live, by its age on the local clock. At most "
        f"{MAX_STALE_AFTER_S:g} s.",
    )
    require_calibration: bool = Field(
        True, description="Refuse to arm, and veto, while the estimator has no baseline."
    )
    watchdog_ms: float = Field(
        500.0,
        ge=WATCHDOG_MIN_MS,
        le=WATCHDOG_MAX_MS,
        description="Live mode: disarm (reason 'watchdog') when the loop completes no step "
        "for this long while armed (a hung output or pull). Default 500 ms: about 10x the "
        "chunk period of amplifiers pushing 20-50 ms chunks, 10x the latency budget, 100x "
        "the loop's 5 ms pull timeout.",
    )

    @field_validator("min_interval_s")
    @classmethod
    def _interval_floor(cls, v: float) -> float:
        if not v >= HARD_MIN_INTERVAL_S:  # also refuses nan
            raise ValueError(
                f"min_interval_s={v} is below the hard limit HARD_MIN_INTERVAL_S="
                f"{HARD_MIN_INTERVAL_S} s"
            )
        return v

    @field_validator("max_per_minute")
    @classmethod
    def _rate_ceiling(cls, v: int) -> int:
        if not 1 <= v <= HARD_MAX_PER_MINUTE:
            raise ValueError(
                f"max_per_minute={v} is outside 1..HARD_MAX_PER_MINUTE={HARD_MAX_PER_MINUTE}"
            )
        return v

    @field_validator("session_cap")
    @classmethod
    def _cap_ceiling(cls, v: int) -> int:
        if not 1 <= v <= HARD_SESSION_CAP:
            raise ValueError(f"session_cap={v} is outside 1..HARD_SESSION_CAP={HARD_SESSION_CAP}")
        return v


class SimulatedOutputSettings(FiniteModel):
    """A stimulator that only records the pulses (the demo's default)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["simulated"] = "simulated"
    name: str = Field("simulated", description="Name in stats and the audit log.")


class SerialOutputSettings(FiniteModel):
    """TTL trigger box on a serial port: write one byte, or pulse the RTS/DTR line."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["serial"] = "serial"
    name: str = Field("serial", description="Name in stats and the audit log.")
    port: str = Field(..., min_length=1, description="Device path, e.g. /dev/ttyUSB0 or COM3.")
    baudrate: int = Field(115_200, gt=0, description="Baud rate of the port.")
    byte: int = Field(1, ge=0, le=255, description="'data' line: the byte value written.")
    line: Literal["data", "rts", "dtr"] = Field(
        "data", description="'data': write `byte`; 'rts'/'dtr': raise the line for width_ms."
    )
    width_ms: float = Field(
        1.0,
        gt=0.0,
        le=MAX_PULSE_WIDTH_MS,
        description="'rts'/'dtr': pulse width in ms (blocks the acquisition thread meanwhile).",
    )
    write_timeout_s: float = Field(
        0.05, gt=0.0, le=5.0, description="A write blocked longer than this is an output error."
    )

    @field_validator("baudrate", "byte", "width_ms", "write_timeout_s", mode="before")
    @classmethod
    def _no_bool(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool_for_number(cls, value, info)


class LslMarkerOutputSettings(FiniteModel):
    """An irregular-rate LSL string marker outlet: the record of each pulse."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["lsl_marker"] = "lsl_marker"
    name: str = Field("lsl_marker", description="Name in stats and the audit log.")
    stream_name: str = Field("closedloop-pulses", min_length=1, description="LSL stream name.")
    source_id: str = Field("closedloop-pulses", min_length=1, description="LSL source_id.")


class BusOutputSettings(FiniteModel):
    """A 'pulse' event on the event bus (GUI, MQTT); never blocks."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["bus"] = "bus"
    name: str = Field("bus", description="Name in stats and the audit log.")


OutputSpec = Annotated[
    SimulatedOutputSettings | SerialOutputSettings | LslMarkerOutputSettings | BusOutputSettings,
    Field(discriminator="kind"),
]


class OutputSettings(StrictNumbersModel):
    """The outputs that fire on each pulse (all of them, in a fixed safe order)."""

    model_config = ConfigDict(extra="forbid")

    outputs: list[OutputSpec] = Field(
        default_factory=lambda: [SimulatedOutputSettings()],
        description="Outputs; fired in the order serial, simulated, lsl_marker, bus.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> OutputSettings:
        names = [o.name for o in self.outputs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"output names must be unique; repeated: {dup}")
        if not self.outputs:
            raise ValueError("at least one output is needed (e.g. {kind: simulated})")
        return self

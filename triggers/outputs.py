"""Pulse outputs behind one small interface: serial TTL, LSL marker, simulated stimulator, bus.

Life cycle: `open()` (idempotent), `check()` at arm time (opens if needed, then verifies the
device answers; raises OutputError), `fire(pulse)` in the acquisition thread (raises OutputError),
`close()` (idempotent). `build_outputs` returns them in the fixed firing order: stimulating
outputs first (serial TTL, then simulated), then the records (LSL marker, then bus), so the marker
is written right after the TTL went out.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import serial
from pylsl import IRREGULAR_RATE, StreamInfo, StreamOutlet, local_clock

from triggers.guard import OutputGuard
from triggers.settings import (
    HARD_SESSION_CAP,
    BusOutputSettings,
    LslMarkerOutputSettings,
    OutputSettings,
    SerialOutputSettings,
    SimulatedOutputSettings,
)

# `time.sleep` on this machine overshoots by 60-100 µs; sleep all but this, then spin
SPIN_BEFORE_DEADLINE_S = 0.001
# Draining the written byte: poll the driver's output queue (TIOCOUTQ, 1-2 µs a call) instead of
# tcdrain, which has no timeout (a UART held off by flow control, or a wedged USB adapter, kept
# `flush()` waiting forever). One byte at 115200 baud leaves in 87 µs: the first polls spin, then
# the wait sleeps this long between polls until the write timeout.
DRAIN_POLL_S = 0.0002
DRAIN_SPIN_S = 0.0005


class OutputError(RuntimeError):
    """An output could not be opened, checked or fired; the message names the output."""


class OutputGuardError(OutputError):
    """The output's own guard refused a fire (a hard limit); nothing was sent."""


@dataclass(frozen=True, slots=True)
class PulseInfo:
    """What every output learns about a pulse.

    pulse_number: 1-based count of pulses this session. t_stream: the deciding sample (stream s).
    t_fire: local_clock() just before the first output fired. t_marker: timestamp for records
    (t_fire live, t_stream offline so that records line up with the replayed EEG).
    t_start: local_clock() when the deciding chunk arrived (decision latency is measured from it).
    """

    pulse_number: int
    t_stream: float
    t_fire: float
    t_marker: float
    t_start: float
    score: float
    label: str
    reason: str


class TriggerOutput:
    """Base class. `stimulates`: drives a stimulator (skipped for a pulse once an earlier output
    of the same pulse failed); records (marker, bus) still run and carry the error.
    `hardware`: reaches a device (never in offline or tuning runs: `simulate_stimulators`)."""

    kind = "base"
    stimulates = False
    hardware = False
    order = 99

    def __init__(self, name: str) -> None:
        self.name = name

    def open(self) -> None:
        """Acquire the device (idempotent)."""

    def check(self) -> None:
        """Open if needed and verify the device answers. Raises OutputError."""
        self.open()

    def fire(self, pulse: PulseInfo) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the device (idempotent)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class SimulatedStimulator(TriggerOutput):
    """Records every pulse in `pulses` (the demo's default stimulator)."""

    kind = "simulated"
    stimulates = True
    order = 1

    def __init__(self, name: str = "simulated") -> None:
        super().__init__(name)
        self.pulses: list[PulseInfo] = []

    def fire(self, pulse: PulseInfo) -> None:
        self.pulses.append(pulse)


class SerialTtlOutput(TriggerOutput):
    """A TTL trigger box on a serial port (pyserial): write one byte, or pulse RTS/DTR.

    `port` is a device path or any pyserial URL (e.g. 'loop://'). Opened and checked at arm time.
    'data': write(byte), then wait until the driver's output queue is empty, at most
    `write_timeout_s` (OutputError after that: the byte may still leave later, and the
    interlock disarms). A write blocked longer than `write_timeout_s` is an OutputError too.
    'rts'/'dtr': raise the line, hold it `width_ms` (sleep, then spin), lower it; this blocks
    the acquisition thread for the width.
    guard: the output's own check of the hard limits (`triggers.guard`; default: on
    time.monotonic with the hard session cap); a refused fire sends nothing and raises
    OutputGuardError.
    """

    kind = "serial"
    stimulates = True
    hardware = True
    order = 0

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 115_200,
        byte: int = 1,
        line: str = "data",
        width_ms: float = 1.0,
        write_timeout_s: float = 0.05,
        name: str = "serial",
        serial_factory: Callable[..., Any] | None = None,
        guard: OutputGuard | None = None,
    ) -> None:
        super().__init__(name)
        self.guard = guard if guard is not None else OutputGuard()
        if line not in ("data", "rts", "dtr"):
            raise ValueError(f"line must be 'data', 'rts' or 'dtr', not {line!r}")
        if not 0 <= byte <= 255:
            raise ValueError(f"byte must be 0..255, not {byte}")
        self.port = port
        self.baudrate = baudrate
        self.line = line
        self._payload = bytes([byte])
        self._width_s = width_ms / 1000.0
        self._write_timeout_s = write_timeout_s
        self._factory = serial_factory
        self._ser: Any = None

    def open(self) -> None:
        if self._ser is not None:
            return
        factory = self._factory or serial.serial_for_url
        try:
            ser = factory(
                self.port, baudrate=self.baudrate, timeout=0, write_timeout=self._write_timeout_s
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise OutputError(f"{self.name}: cannot open serial port {self.port}: {exc}") from exc
        try:
            if self.line != "data":
                setattr(ser, self.line, False)  # idle low; fails at once where unsupported
        except (serial.SerialException, OSError, ValueError) as exc:
            ser.close()
            raise OutputError(
                f"{self.name}: {self.port} does not support the {self.line.upper()} line: {exc}"
            ) from exc
        self._ser = ser

    def check(self) -> None:
        self.open()
        try:
            self._ser.out_waiting  # noqa: B018 -- an ioctl: fails when the device is gone
        except (serial.SerialException, OSError, ValueError) as exc:
            self.close()
            raise OutputError(
                f"{self.name}: serial port {self.port} not responding: {exc}"
            ) from exc

    def fire(self, pulse: PulseInfo) -> None:
        ser = self._ser
        if ser is None:
            raise OutputError(f"{self.name}: serial port {self.port} is not open")
        refused = self.guard.admit()  # 1.3 µs median here; before anything reaches the port
        if refused is not None:
            raise OutputGuardError(f"{self.name}: output_guard refused the fire: {refused}")
        try:
            if self.line == "data":
                t0 = time.perf_counter()
                if ser.write(self._payload) != 1:
                    raise OutputError(f"{self.name}: short write to {self.port}")
                self._drain(ser, t0)
            else:
                setattr(ser, self.line, True)
                deadline = time.perf_counter() + self._width_s  # the line is high from here
                try:
                    rest = deadline - time.perf_counter() - SPIN_BEFORE_DEADLINE_S
                    if rest > 0.0:
                        time.sleep(rest)
                    while time.perf_counter() < deadline:
                        pass
                finally:
                    setattr(ser, self.line, False)
        except OutputError:
            raise
        except Exception as exc:  # SerialException, SerialTimeoutException, OSError (EIO)
            raise OutputError(f"{self.name}: write to {self.port} failed: {exc}") from exc

    def _drain(self, ser: Any, t0: float) -> None:
        """Wait until the byte has left the driver, at most write_timeout_s from t0."""
        deadline = t0 + self._write_timeout_s
        spin_until = t0 + DRAIN_SPIN_S
        while ser.out_waiting:
            now = time.perf_counter()
            if now >= deadline:
                raise OutputError(
                    f"{self.name}: {self.port} did not send the byte within "
                    f"{1000 * self._write_timeout_s:g} ms (output queue not draining)"
                )
            if now >= spin_until:
                time.sleep(DRAIN_POLL_S)

    def close(self) -> None:
        """Release the port; safe from another thread while `fire` is blocked in it: a pending
        write is cancelled, unsent output discarded (a close would otherwise wait for it to
        drain, up to the driver's 30 s closing_wait), the line lowered, then the port closed."""
        ser, self._ser = self._ser, None
        if ser is None:
            return
        try:
            with contextlib.suppress(Exception):  # closing a dead port: nothing left to do
                if hasattr(ser, "cancel_write"):
                    ser.cancel_write()
                ser.reset_output_buffer()
            with contextlib.suppress(Exception):
                if self.line != "data":
                    setattr(ser, self.line, False)
        finally:
            ser.close()


@functools.lru_cache(maxsize=64)
def _json_str(text: str) -> str:
    return json.dumps(str(text))


def _json_number(x: float) -> str:
    """A float as JSON (nan and inf, which JSON lacks, as null)."""
    return repr(float(x)) if math.isfinite(x) else "null"


class LslMarkerOutput(TriggerOutput):
    """An irregular-rate LSL string marker outlet: the record of each pulse.

    Each marker is a JSON object: pulse, score, label, reason, latency_ms (from the arrival of
    the deciding chunk to this push), t_stream; stamped with `pulse.t_marker`.
    """

    kind = "lsl_marker"
    order = 2

    def __init__(
        self,
        stream_name: str = "closedloop-pulses",
        source_id: str = "closedloop-pulses",
        name: str = "lsl_marker",
    ) -> None:
        super().__init__(name)
        self.stream_name = stream_name
        self.source_id = source_id
        self._outlet: StreamOutlet | None = None

    def open(self) -> None:
        if self._outlet is not None:
            return
        try:
            info = StreamInfo(
                self.stream_name, "Markers", 1, IRREGULAR_RATE, "string", self.source_id
            )
            self._outlet = StreamOutlet(info)
        except Exception as exc:
            raise OutputError(f"{self.name}: cannot create LSL outlet: {exc}") from exc

    def fire(self, pulse: PulseInfo) -> None:
        outlet = self._outlet
        if outlet is None:
            raise OutputError(f"{self.name}: LSL outlet is not open")
        # formatted directly, the same text as json.dumps of the dict (finite floats print as
        # JSON numbers; the two strings are encoded once per distinct value): 4 µs instead of
        # 9 µs here, between the decision and the marker
        score = pulse.score
        lat = 1000.0 * (local_clock() - pulse.t_start)
        payload = (
            f'{{"pulse": {int(pulse.pulse_number)}, '
            f'"score": {_json_number(score)}, "label": {_json_str(pulse.label)}, '
            f'"reason": {_json_str(pulse.reason)}, "latency_ms": {_json_number(round(lat, 3))}, '
            f'"t_stream": {_json_number(pulse.t_stream)}}}'
        )
        try:
            outlet.push_sample([payload], pulse.t_marker)
        except Exception as exc:
            raise OutputError(f"{self.name}: push failed: {exc}") from exc

    def close(self) -> None:
        self._outlet = None  # pylsl destroys the outlet when the last reference goes

    @property
    def have_consumers(self) -> bool:
        return self._outlet is not None and self._outlet.have_consumers()


class BusOutput(TriggerOutput):
    """Publishes a 'pulse' event on the event bus (never blocks: bounded subscriber queues)."""

    kind = "bus"
    order = 3

    def __init__(self, bus: Any, name: str = "bus") -> None:
        """bus: anything with `post(kind, payload, t_stream)` (closedloop.bus.EventBus; not
        imported here, so that triggers/ never imports the layer above it)."""
        super().__init__(name)
        self._bus = bus

    def fire(self, pulse: PulseInfo) -> None:
        self._bus.post("pulse", asdict(pulse), pulse.t_stream)


def build_outputs(
    settings: OutputSettings, bus: Any = None, session_cap: int = HARD_SESSION_CAP
) -> list[TriggerOutput]:
    """Outputs from settings, in firing order (serial, simulated, lsl_marker, bus); not opened.

    session_cap: the hardware outputs' guards also hold this cap (never above HARD_SESSION_CAP).
    """
    outs: list[TriggerOutput] = []
    for spec in settings.outputs:
        if isinstance(spec, SerialOutputSettings):
            outs.append(
                SerialTtlOutput(
                    spec.port,
                    baudrate=spec.baudrate,
                    byte=spec.byte,
                    line=spec.line,
                    width_ms=spec.width_ms,
                    write_timeout_s=spec.write_timeout_s,
                    name=spec.name,
                    guard=OutputGuard(session_cap=session_cap),
                )
            )
        elif isinstance(spec, SimulatedOutputSettings):
            outs.append(SimulatedStimulator(spec.name))
        elif isinstance(spec, LslMarkerOutputSettings):
            outs.append(LslMarkerOutput(spec.stream_name, spec.source_id, name=spec.name))
        elif isinstance(spec, BusOutputSettings):
            if bus is None:
                raise ValueError(f"output {spec.name!r} (kind: bus) needs an event bus")
            outs.append(BusOutput(bus, name=spec.name))
        else:  # pragma: no cover -- the discriminated union admits nothing else
            raise ValueError(f"unknown output kind {spec!r}")
    return sort_outputs(outs)


def sort_outputs(outputs: Sequence[TriggerOutput]) -> list[TriggerOutput]:
    """Firing order: stimulating outputs first (serial, simulated), then records (marker, bus)."""
    return sorted(outputs, key=lambda o: o.order)  # stable: config order within a kind


def simulate_stimulators(
    outputs: Sequence[TriggerOutput],
) -> tuple[list[TriggerOutput], list[str]]:
    """Every stimulating output but the simulated stimulator, replaced by a SimulatedStimulator
    of the same name (offline and tuning runs: nothing may reach a stimulator there).

    Returns (outputs in firing order, one sentence per replacement). Records (LSL marker, bus)
    stay. There is no way to keep a hardware output: a stimulating output that is not a
    SimulatedStimulator is replaced whatever its kind.
    """
    kept: list[TriggerOutput] = []
    notes: list[str] = []
    for out in outputs:
        if out.stimulates and not isinstance(out, SimulatedStimulator):
            where = getattr(out, "port", "")
            what = f"{out.kind} output {out.name!r}" + (f" ({where})" if where else "")
            notes.append(f"{what} replaced by the simulated stimulator: not a live session")
            out.close()  # never opened here; closes anything a caller opened
            kept.append(SimulatedStimulator(out.name))
        else:
            kept.append(out)
    return sort_outputs(kept), notes

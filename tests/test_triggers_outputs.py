"""Outputs: serial TTL on a real pseudo-terminal pair, an unplugged port, RTS/DTR width, the LSL
marker received by a separate inlet, the bus event, the simulated stimulator, build order."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import statistics
import time
import uuid

import pytest
from pylsl import StreamInlet, local_clock, resolve_byprop

from closedloop.bus import EventBus
from triggers.guard import OutputGuard
from triggers.outputs import (
    BusOutput,
    LslMarkerOutput,
    OutputError,
    PulseInfo,
    SerialTtlOutput,
    SimulatedStimulator,
    build_outputs,
)
from triggers.settings import HARD_MIN_INTERVAL_S, OutputSettings


def pulse(n: int = 1, t_marker: float = 123.456, t_start: float | None = None) -> PulseInfo:
    now = local_clock()
    return PulseInfo(
        pulse_number=n,
        t_stream=100.0 + n,
        t_fire=now,
        t_marker=t_marker,
        t_start=now if t_start is None else t_start,
        score=1.25,
        label="target",
        reason="dwell",
    )


@pytest.fixture
def pty_pair():
    """(master fd, slave path). pyserial opens the slave path like a real device."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    yield master, path
    for fd in (master, slave):
        with contextlib.suppress(OSError):
            os.close(fd)


def read_exactly(fd: int, n: int, timeout_s: float = 2.0) -> tuple[bytes, float]:
    """Read n bytes from fd; returns (data, perf_counter when the last byte arrived)."""
    data = b""
    deadline = time.perf_counter() + timeout_s
    while len(data) < n:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.perf_counter()))
        if not ready:
            break
        data += os.read(fd, n - len(data))
    return data, time.perf_counter()


@pytest.mark.timeout(30)
def test_serial_byte_arrives_on_the_other_end_of_a_pty(pty_pair):
    master, path = pty_pair
    # back to back: the output's own guard gets a clock that says 1 s passed between fires
    steps = itertools.count(0.0, HARD_MIN_INTERVAL_S)
    guard = OutputGuard(clock=lambda: next(steps))
    out = SerialTtlOutput(path, baudrate=115_200, byte=0xA5, name="ttl", guard=guard)
    out.check()
    fire_us, arrive_us = [], []
    for n in range(1, 51):
        t0 = time.perf_counter()
        out.fire(pulse(n))
        t1 = time.perf_counter()
        data, t2 = read_exactly(master, 1)
        assert data == b"\xa5"
        fire_us.append(1e6 * (t1 - t0))
        arrive_us.append(1e6 * (t2 - t0))
    out.close()
    out.close()  # idempotent
    assert read_exactly(master, 1, timeout_s=0.05)[0] == b""  # nothing extra was written
    # timing is reported, not asserted tightly (shared machine); a byte must not take a second
    print(
        f"serial pty: fire median {statistics.median(fire_us):.0f} µs "
        f"max {max(fire_us):.0f} µs; byte read back median {statistics.median(arrive_us):.0f} µs "
        f"max {max(arrive_us):.0f} µs"
    )
    assert max(arrive_us) < 1e6


def test_unplugged_port_is_a_clear_error():
    missing = f"/dev/ttyUSB-closedloop-{uuid.uuid4().hex[:8]}"
    out = SerialTtlOutput(missing, name="ttl")
    with pytest.raises(OutputError, match=f"ttl: cannot open serial port {missing}"):
        out.check()
    with pytest.raises(OutputError, match="not open"):
        out.fire(pulse())


def test_port_that_goes_away_fails_check_and_fire(pty_pair):
    master, path = pty_pair
    out = SerialTtlOutput(path, name="ttl")
    out.check()
    os.close(master)  # the other end disappears: the port is dead (EIO)
    with pytest.raises(OutputError, match=r"ttl: write to .* failed"):
        out.fire(pulse())
    with pytest.raises(OutputError, match="not responding"):
        out.check()
    out.close()


@pytest.mark.parametrize("line", ["rts", "dtr"])
def test_rts_dtr_unsupported_on_a_pty_is_refused_at_open(pty_pair, line):
    _, path = pty_pair
    out = SerialTtlOutput(path, line=line, name="ttl")
    with pytest.raises(OutputError, match=f"does not support the {line.upper()} line"):
        out.check()


class LineRecorder:
    """A stand-in serial port that records (perf_counter, value) of the RTS/DTR line."""

    def __init__(self, *args, **kwargs) -> None:
        self.events: dict[str, list[tuple[float, bool]]] = {"rts": [], "dtr": []}
        self.closed = False
        self.out_waiting = 0

    def __setattr__(self, name, value):
        if name in ("rts", "dtr"):
            self.events[name].append((time.perf_counter(), value))
        object.__setattr__(self, name, value)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(("line", "width_ms"), [("rts", 0.5), ("dtr", 5.0)])
def test_rts_dtr_pulse_width(line, width_ms):
    made: list[LineRecorder] = []

    def factory(*args, **kwargs):
        made.append(LineRecorder())
        return made[-1]

    out = SerialTtlOutput("fake", line=line, width_ms=width_ms, serial_factory=factory)
    out.check()
    out.fire(pulse())
    ev = made[0].events[line]
    assert [v for _, v in ev] == [False, True, False]  # idle low, high, low
    width_s = ev[2][0] - ev[1][0]
    assert width_s >= width_ms / 1000.0
    assert width_s < width_ms / 1000.0 + 0.05  # tolerant: shared machine
    out.close()
    assert made[0].closed


@pytest.mark.lsl
@pytest.mark.timeout(60)
def test_lsl_marker_received_with_timestamp_and_payload():
    uid = uuid.uuid4().hex
    out = LslMarkerOutput(stream_name=f"pulses-{uid}", source_id=f"src-{uid}")
    out.check()
    try:
        found = resolve_byprop("source_id", f"src-{uid}", timeout=10.0)
        assert len(found) == 1
        assert found[0].type() == "Markers"
        assert found[0].channel_format() == 3  # cf_string
        inlet = StreamInlet(found[0])
        inlet.open_stream(timeout=10.0)
        deadline = time.monotonic() + 10.0
        while not out.have_consumers and time.monotonic() < deadline:
            time.sleep(0.01)
        latencies_ms = []
        for n in range(1, 21):
            t_marker = 5000.0 + n * 0.5
            t_push = local_clock()
            out.fire(pulse(n, t_marker=t_marker, t_start=t_push - 0.002))
            sample, ts = inlet.pull_sample(timeout=5.0)
            latencies_ms.append(1000.0 * (local_clock() - t_push))
            assert ts == pytest.approx(t_marker, abs=1e-9)
            payload = json.loads(sample[0])
            assert payload["pulse"] == n
            assert payload["score"] == 1.25
            assert payload["reason"] == "dwell"
            assert payload["label"] == "target"
            assert payload["t_stream"] == 100.0 + n
            assert 2.0 <= payload["latency_ms"] < 1000.0
        print(
            f"lsl marker push -> inlet: median {statistics.median(latencies_ms):.3f} ms "
            f"max {max(latencies_ms):.3f} ms"
        )
        inlet.close_stream()
    finally:
        out.close()


def test_bus_output_publishes_without_blocking():
    bus = EventBus()
    sub = bus.subscribe("t", maxlen=2)
    out = BusOutput(bus)
    for n in range(1, 6):
        out.fire(pulse(n))  # a full subscriber never blocks the firing thread
    events = sub.drain()
    assert [e.payload["pulse_number"] for e in events] == [4, 5]
    assert sub.dropped == 3
    assert events[0].kind == "pulse"
    assert events[0].t_stream == 104.0


def test_simulated_records_every_pulse():
    sim = SimulatedStimulator()
    sim.check()
    for n in range(1, 4):
        sim.fire(pulse(n))
    assert [p.pulse_number for p in sim.pulses] == [1, 2, 3]


def test_build_outputs_in_firing_order():
    cfg = OutputSettings(
        outputs=[
            {"kind": "bus"},
            {"kind": "lsl_marker", "stream_name": "x", "source_id": "y"},
            {"kind": "simulated"},
            {"kind": "serial", "port": "/dev/null-x", "name": "ttl"},
        ]
    )
    outs = build_outputs(cfg, bus=EventBus())
    assert [o.kind for o in outs] == ["serial", "simulated", "lsl_marker", "bus"]
    with pytest.raises(ValueError, match="needs an event bus"):
        build_outputs(cfg)


def test_output_settings_validation():
    with pytest.raises(ValueError, match="unique"):
        OutputSettings(outputs=[{"kind": "simulated"}, {"kind": "simulated"}])
    with pytest.raises(ValueError, match="width_ms"):
        OutputSettings(outputs=[{"kind": "serial", "port": "x", "line": "rts", "width_ms": 500}])
    with pytest.raises(ValueError, match="byte"):
        OutputSettings(outputs=[{"kind": "serial", "port": "x", "byte": 256}])
    with pytest.raises(ValueError, match="extra"):
        OutputSettings(outputs=[{"kind": "simulated", "porrt": "x"}])
    assert [o.kind for o in OutputSettings().outputs] == ["simulated"]

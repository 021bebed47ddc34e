"""Issue 14 items 4-7 at the trigger unit: write-ahead intent, a disarm latch nothing can block,
the watchdog, a bounded serial drain, and an audit log that fails closed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import threading
import time

import pytest
import serial
from pylsl import local_clock

from closedloop.load import OUTCOME_UNKNOWN, load_session
from tests.test_triggers_unit import make_unit, target
from triggers.audit import AuditError, AuditLog, read_audit
from triggers.interlock import ArmError, InterlockState
from triggers.outputs import OutputError, SerialTtlOutput, SimulatedStimulator, TriggerOutput
from triggers.watchdog import Watchdog

pytestmark = pytest.mark.timeout(30)


class FullDisk:
    """Stands in for the `os` module inside triggers.audit: `write` fails with ENOSPC once
    `full` is set (after writing `short` bytes of the first failing call, as a disk that fills
    mid-line); everything else is the real `os`."""

    def __init__(self, short: int = 0) -> None:
        self.full = False
        self.short = short
        self.calls = 0

    def write(self, fd: int, data) -> int:
        if not self.full:
            return os.write(fd, data)
        self.calls += 1
        if self.short and self.calls == 1:
            return os.write(fd, bytes(data[: self.short]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(os, name)


@pytest.fixture
def disk(monkeypatch) -> FullDisk:
    fake = FullDisk()
    monkeypatch.setattr("triggers.audit.os", fake)
    return fake


class Blocking(TriggerOutput):
    """A stimulating output whose fire() hangs until `release` (a wedged device driver)."""

    kind = "blocking"
    stimulates = True
    order = 0

    def __init__(self, name: str = "hung") -> None:
        super().__init__(name)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed_while_firing = False
        self.firing = False
        self.fired = 0

    def fire(self, pulse) -> None:
        self.firing = True
        self.entered.set()
        self.release.wait(10.0)
        self.firing = False
        self.fired += 1

    def close(self) -> None:
        self.closed_while_firing = self.closed_while_firing or self.firing


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


# ---- item 6: write-ahead audit -----------------------------------------------------------------
def test_the_intent_is_durable_before_any_output_fires_and_the_outcome_follows(tmp_path):
    seen: list[list[dict]] = []

    class Peek(SimulatedStimulator):
        def fire(self, pulse):
            seen.append([r for r in read_audit(unit.audit.path) if r["event"] == "intent"])
            super().fire(pulse)

    unit, _ = make_unit(tmp_path, [Peek()])
    unit.arm("gui_button")
    a = unit.on_state(target(1.0))
    assert a.fired
    assert len(seen) == 1
    assert len(seen[0]) == 1, "no intent line on disk when the output fired"
    intent = seen[0][0]
    assert intent["attempt"] == a.attempt_number
    assert intent["pulse_number"] == 1
    assert intent["t_stream"] == 1.0
    assert intent["outputs"] == ["simulated"]
    log = read_audit(unit.audit.path)
    kinds = [r["event"] for r in log]
    assert kinds.index("intent") < kinds.index("attempt")
    outcome = next(r for r in log if r["event"] == "attempt")
    assert outcome["attempt"] == intent["attempt"]
    assert outcome["stimulated"] == ["simulated"]
    unit.close()


def test_load_session_reports_an_intent_without_outcome_as_fired_outcome_unknown(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    lines = [
        {"event": "intent", "attempt": 1, "pulse_number": 1, "t_stream": 10.0, "outputs": ["a"]},
        {"event": "attempt", "attempt": 1, "pulse_number": 1, "t_stream": 10.0, "fired": True},
        {"event": "attempt", "attempt": 2, "pulse_number": None, "t_stream": 11.0, "fired": False},
        {"event": "intent", "attempt": 3, "pulse_number": 2, "t_stream": 13.0, "outputs": ["a"]},
    ]
    (folder / "audit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rec = load_session(folder)
    assert [p["attempt"] for p in rec.pulses] == [1, 3]
    unknown = rec.pulses[1]
    assert unknown["outcome"] == OUTCOME_UNKNOWN
    assert unknown["pulse_number"] == 2
    assert any("attempt 3" in n and OUTCOME_UNKNOWN in n for n in rec.notes)


# ---- item 7: audit failure fails closed --------------------------------------------------------
def test_an_intent_that_cannot_be_written_means_no_pulse_and_no_more_arming(tmp_path, disk):
    sim = SimulatedStimulator()
    unit, _ = make_unit(tmp_path, [sim])
    unit.arm("gui_button")
    disk.full = True
    with pytest.raises(AuditError):
        unit.on_state(target(1.0))
    assert sim.pulses == [], "a pulse fired that the audit log could not record"
    assert unit.interlock.state is InterlockState.DISARMED
    assert unit.interlock.last_reason.startswith("audit")
    disk.full = False  # space comes back: the log stays failed, no arming this session
    with pytest.raises(ArmError, match="audit log failed"):
        unit.arm("gui_button")
    assert unit.interlock.state is InterlockState.DISARMED
    assert sim.pulses == []
    with pytest.raises(AuditError):
        unit.close()


def test_arming_that_cannot_be_audited_is_refused_and_really_disarmed(tmp_path, disk):
    unit, _ = make_unit(tmp_path)
    disk.full = True
    with pytest.raises(ArmError, match="could not be audited"):
        unit.arm("gui_button")
    assert unit.interlock.state is InterlockState.DISARMED  # the message says the truth
    with pytest.raises(AuditError):
        unit.close()


def test_close_closes_every_output_even_when_the_audit_fails(tmp_path, disk):
    closed = []

    class Closing(SimulatedStimulator):
        def close(self):
            closed.append(self.name)

    unit, _ = make_unit(tmp_path, [Closing("a"), Closing("b")])
    unit.arm("gui_button")
    disk.full = True
    with pytest.raises(AuditError):
        unit.close("session ended")
    assert sorted(set(closed)) == ["a", "b"]
    assert unit.interlock.state is InterlockState.DISARMED
    assert unit.audit.closed


def test_audit_log_failure_latches_and_leaves_only_whole_lines_before_a_torn_tail(
    tmp_path, monkeypatch
):
    disk = FullDisk(short=7)  # the disk fills in the middle of a line
    monkeypatch.setattr("triggers.audit.os", disk)
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.write({"n": 0})
    disk.full = True
    with pytest.raises(AuditError, match="No space left"):
        log.write({"n": 1, "reason": "x" * 50})
    assert log.failed
    disk.full = False
    size = path.stat().st_size
    with pytest.raises(AuditError, match="failed earlier"):
        log.write({"n": 2})
    assert path.stat().st_size == size  # nothing more was written after the failure
    assert read_audit(path) == [{"n": 0}]
    log.close()


# ---- item 5: disarm and emergency stop never wait ----------------------------------------------
@pytest.mark.parametrize("command", ["emergency_stop", "disarm"])
def test_disarm_from_another_thread_returns_at_once_and_stops_the_pulse_in_flight(
    tmp_path, command
):
    hung, sim = Blocking(), SimulatedStimulator()
    unit, _ = make_unit(tmp_path, [hung, sim])
    unit.arm("gui_button")
    result = []
    loop = threading.Thread(target=lambda: result.append(unit.on_state(target(1.0))))
    loop.start()
    assert hung.entered.wait(5.0)
    t0 = time.perf_counter()
    getattr(unit, command)("test")  # the loop holds _io_lock, blocked inside fire()
    took_ms = 1000 * (time.perf_counter() - t0)
    assert took_ms < 50, f"{command} took {took_ms:.1f} ms while an output hung"
    assert unit.interlock.state is InterlockState.DISARMED
    assert hung.closed_while_firing, "the stimulating output was not closed"
    hung.release.set()
    loop.join(5.0)
    a = result[0]
    assert sim.pulses == [], "a stimulating output fired after the disarm returned"
    assert not a.fired
    assert a.reason == "halted"
    assert a.stimulated == ("hung",)
    log = read_audit(unit.audit.path)
    i_disarm = next(
        i for i, r in enumerate(log) if r["event"] == "interlock" and r["new"] == "disarmed"
    )
    assert "test" in log[i_disarm]["reason"] or "emergency stop" in log[i_disarm]["reason"]
    unit.close()


# ---- item 4: watchdog and a bounded serial drain -----------------------------------------------
def test_watchdog_disarms_a_stalled_armed_unit_and_can_only_disarm(tmp_path):
    hung = Blocking()
    unit, _ = make_unit(tmp_path, [hung])
    with pytest.raises(ValueError, match="outside"):
        Watchdog(unit, 0.05)
    wd = Watchdog(unit, 0.1).start()
    try:
        # disarmed: nothing happens however long the loop is silent
        time.sleep(0.3)
        assert wd.n_tripped == 0
        assert unit.interlock.state is InterlockState.DISARMED
        # armed with a live loop (a step every 10 ms): no trip
        unit.arm("gui_button")
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:
            wd.t_progress = local_clock()
            time.sleep(0.01)
        assert unit.interlock.state is InterlockState.ARMED
        assert wd.n_tripped == 0
        # the loop stops stepping: disarmed within timeout + one period, reason 'watchdog'
        t0 = time.monotonic()
        assert wait_for(lambda: unit.interlock.state is InterlockState.DISARMED, 2.0)
        took = time.monotonic() - t0
        assert 0.08 < took < 0.6, took
        assert unit.interlock.last_reason.startswith("watchdog: no loop step completed")
        assert wd.n_tripped == 1
        time.sleep(0.5)  # it never re-arms and never trips again while disarmed
        assert unit.interlock.state is InterlockState.DISARMED
        assert wd.n_tripped == 1
        assert hung.fired == 0
    finally:
        wd.stop()
    log = read_audit(unit.audit.path)
    assert any(
        r["event"] == "interlock" and r["new"] == "disarmed" and r["reason"].startswith("watchdog")
        for r in log
    )
    unit.close()


class StalledUart(serial.Serial):
    """A real pty port whose driver queue never drains: a UART held off by flow control (CTS
    low, XOFF) or a wedged USB adapter. A pty cannot stand in for that by itself: measured
    here, with 16 KB unread on the master its TIOCOUTQ stays 0 and tcdrain returns in 3 µs."""

    @property
    def out_waiting(self) -> int:
        return 1

    def flush(self) -> None:  # tcdrain on such a port: it never returns
        time.sleep(60.0)


@pytest.mark.timeout(10)
def test_serial_fire_is_bounded_when_the_byte_never_drains():
    master, slave = os.openpty()
    try:
        out = SerialTtlOutput(
            os.ttyname(slave),
            write_timeout_s=0.05,
            name="ttl",
            serial_factory=StalledUart,
        )
        out.check()
        from tests.test_triggers_outputs import pulse

        t0 = time.perf_counter()
        with pytest.raises(OutputError, match=r"ttl: .* did not send the byte within 50 ms"):
            out.fire(pulse())
        took = time.perf_counter() - t0
        assert 0.045 < took < 0.5, took
        ready, _, _ = select.select([master], [], [], 1.0)
        assert ready
        assert os.read(master, 1) == b"\x01"  # the byte was written, then timed out
        out.close()
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_a_plain_disarm_keeps_the_ports_open_the_emergency_stop_closes_them(tmp_path):
    closed = []

    class Tracked(SimulatedStimulator):
        def close(self):
            closed.append(self.name)

    unit, _ = make_unit(tmp_path, [Tracked()])
    unit.arm("gui_button")
    unit.disarm("operator")  # nothing in fire(): the latch is enough, no re-open glitch later
    assert closed == []
    unit.arm("gui_button")
    unit.emergency_stop("test")
    assert closed == ["simulated"]
    unit.close()


def test_a_pulse_made_late_by_a_slow_intent_write_does_not_fire(tmp_path):
    """Live: the interlock granted the pulse within the latency budget, but the intent's fsync
    took longer than the budget (a busy disk): the outputs do not fire, the outcome is 'late'."""
    sim = SimulatedStimulator()
    unit, clock = make_unit(tmp_path, [sim], live=True, latency_budget_ms=50.0)
    write_many = unit.audit.write_many

    def slow_intent(records, sync=True):
        if any(r.get("event") == "intent" for r in records):
            clock.t += 0.08  # 80 ms in fsync
        write_many(records, sync)

    unit.audit.write_many = slow_intent
    unit.arm("gui_button")
    a = unit.on_state(target(clock.t), t_arrival=clock.t)  # a fresh sample: granted
    assert sim.pulses == []
    assert not a.fired
    assert a.reason == "late"
    assert "once the intent was durable" in a.detail
    log = read_audit(unit.audit.path)
    assert [r["event"] for r in log if r["event"] in ("intent", "attempt")] == [
        "intent",
        "attempt",
    ]
    unit.close()

"""Faults end to end on a real replayed stream: each ends DISARMED with its reason in the audit
log, no pulse after the fault, and the session folder complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from acquisition.lsl_source import LslSource
from acquisition.simulator import simulate
from closedloop.config import SessionConfig, apply_overrides
from closedloop.errors import ConfigError
from closedloop.load import load_session, read_jsonl
from closedloop.session import Session
from tests.session_helpers import end_process, start_replayer

pytestmark = [pytest.mark.lsl, pytest.mark.slow, pytest.mark.timeout(120)]
SFREQ = 250.0
SPEED = 4.0
CHANNELS = ["Fz", "FCz", "Cz", "C3", "C4", "Pz", "P3", "P4", "O1", "Oz", "O2"]
T_FAULT = 30.0  # stream seconds into the recording (after calibration and arming)


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """45 s, 11 channels at 250 Hz, no bad-channel episode (the faults are injected)."""
    raw = simulate(duration_s=45.0, sfreq=SFREQ, montage=CHANNELS, seed=3, bad_channel=False)
    path = tmp_path_factory.mktemp("rec") / "fault_test.fif"
    raw.save(path, verbose="error")
    return path


def config(name: str, **overrides) -> SessionConfig:
    base = {
        "state.calibration_s": 8.0,
        "artifacts.learn_s": 2.0,  # the default 10 s of limit learning: armed before T_FAULT
        "state.enter": 1.0,
        "state.leave": 0.0,
        "trigger.dwell_s": 0.5,
        "safety.min_interval_s": 1.0,
        "safety.max_per_minute": 60,
        "recording.xdf": True,
        "session.name": name,
    }
    base.update(overrides)
    return apply_overrides(SessionConfig(), base)


def replayer(path: Path, name: str, *extra: str) -> subprocess.Popen:
    return start_replayer(path, name, *extra, speed=SPEED)


def until_disarmed(session: Session) -> bool:
    return wait_for(lambda: session.pipeline.trigger.interlock.state.value == "disarmed", 10.0)


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def run_with(session: Session, action, stop_after_s: float = 3.0) -> dict:
    """Run the session; in a thread: wait until armed past T_FAULT, call action(), stop later."""
    info: dict = {}

    def driver():
        ok = wait_for(
            lambda: (
                session.pipeline is not None
                and session.pipeline.trigger.interlock.state.value != "disarmed"
                and session.pipeline.state is not None
                and session.pipeline.state.t_stream - session.pipeline.first_t >= T_FAULT
            ),
            60,
        )
        info["armed_before_fault"] = ok
        info["t_fault"] = (
            session.pipeline.state.t_stream if session.pipeline and session.pipeline.state else None
        )
        action(session)
        time.sleep(stop_after_s)
        session.stop("test over")

    t = threading.Thread(target=driver, daemon=True)
    t.start()
    session.run()
    t.join(timeout=10)
    return info


def assert_disarmed_with(session: Session, info: dict, *reasons: str) -> list[dict]:
    assert info["armed_before_fault"], "the interlock was never armed before the fault"
    audit = read_jsonl(session.folder / "audit.jsonl")
    disarms = [
        a
        for a in audit
        if a.get("event") == "interlock"
        and a["new"] == "disarmed"
        and a["t_stream"] is not None
        and a["t_stream"] >= info["t_fault"] - 0.5
    ]
    assert any(r in d["reason"] for d in disarms for r in reasons), (reasons, disarms)
    t_fault = min(d["t_stream"] for d in disarms if any(r in d["reason"] for r in reasons))
    after = [
        a for a in audit if a.get("event") == "attempt" and a["fired"] and a["t_stream"] > t_fault
    ]
    assert after == [], f"pulses after the fault: {after}"
    rearmed = [
        a
        for a in audit
        if a.get("event") == "interlock"
        and a["new"] == "armed"
        and a["t_stream"] is not None
        and a["t_stream"] > t_fault
    ]
    assert rearmed == [], "the interlock re-armed itself"
    # the folder is complete and loads back
    assert (session.folder / "summary.json").exists()
    rec = load_session(session.folder)
    assert rec.raw is not None
    assert rec.raw.n_times > 0
    return audit


def live_session(name: str, **overrides) -> Session:
    source = LslSource(
        name=name, source_id=name, stype=None, resolve_timeout_s=20.0, stale_after_s=0.5
    )
    return Session(
        config(name, **overrides),
        source,
        live=True,
        out_root=Path(os.environ.get("CL_TMP", "/tmp")),
        arm_action="test_arm",
    )


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_TMP", str(tmp_path))
    return tmp_path


def test_stream_killed_then_restarted_disarms_and_never_rearms(recording, unique_name, out_dir):
    proc = replayer(recording, unique_name)
    procs = [proc]
    session = live_session(unique_name)

    def kill_then_restart(s):
        proc.send_signal(signal.SIGKILL)
        assert wait_for(lambda: s.pipeline.trigger.interlock.state.value == "disarmed", 5.0)
        procs.append(replayer(recording, unique_name))  # same name and source_id: RESTORED
        wait_for(
            lambda: any(
                e.get("health") == "restored" for e in read_jsonl(s.folder / "events.jsonl")
            ),
            15.0,
        )
        time.sleep(3.0)  # the restored stream flows (and would be in target state) for a while

    try:
        info = run_with(session, kill_then_restart, stop_after_s=0.5)
    finally:
        for p in procs:
            end_process(p)
    assert_disarmed_with(session, info, "stream_lost", "stale_data")
    events = read_jsonl(session.folder / "events.jsonl")
    assert any(e.get("health") == "restored" for e in events), "restart was not reported"


def test_sample_gap_disarms(recording, unique_name, out_dir):
    first = int((T_FAULT + 3.0) * SFREQ)
    proc = replayer(recording, unique_name, "--drop", str(first), "25")
    session = live_session(unique_name)
    try:
        info = run_with(session, until_disarmed)
    finally:
        end_process(proc)
    assert_disarmed_with(session, info, "sample_gap")


@pytest.mark.parametrize("kind", ["nan", "rail"])
def test_nan_and_railing_input_disarm(kind, unique_name, out_dir, tmp_path):
    raw = simulate(duration_s=45.0, sfreq=SFREQ, montage=CHANNELS, seed=3, bad_channel=False)
    i = int((T_FAULT + 3.0) * SFREQ)
    raw._data[2, i : i + 50] = np.nan if kind == "nan" else 0.25  # 250 mV: beyond any amplifier
    path = tmp_path / f"{kind}.fif"
    raw.save(path, verbose="error")
    proc = replayer(path, unique_name)
    session = live_session(unique_name)
    try:
        info = run_with(session, until_disarmed)
    finally:
        end_process(proc)
    assert_disarmed_with(session, info, "bad_input", "nonfinite", "railing")


def test_exception_inside_a_feature_disarms(recording, unique_name, out_dir, monkeypatch):
    from features.chain import FeatureChain

    original = FeatureChain.step
    armed = threading.Event()

    def step(self, chunk):
        if armed.is_set():
            raise ZeroDivisionError("injected failure in a feature")
        return original(self, chunk)

    monkeypatch.setattr(FeatureChain, "step", step)
    proc = replayer(recording, unique_name)
    session = live_session(unique_name)
    try:
        info = run_with(session, lambda s: armed.set())
    finally:
        end_process(proc)
    assert_disarmed_with(session, info, "injected failure in a feature")


def test_serial_port_that_disappears_disarms(recording, unique_name, out_dir):
    master, slave = os.openpty()
    port = os.ttyname(slave)
    # real time: a replay faster than real time is a simulation and never reaches the serial
    # port (its outputs are replaced by the simulated stimulator, issue 14)
    proc = start_replayer(recording, unique_name, speed=1.0)
    # a pulse request every second whatever the state, so one comes right after the unplug
    session = live_session(
        unique_name,
        **{
            "outputs.outputs": [{"kind": "serial", "port": port}, {"kind": "simulated"}],
            "state.enter": -20.0,
            "state.leave": -30.0,
            "trigger.mode": "repeat",
            "trigger.repeat_interval_s": 1.0,
        },
    )

    def unplug(s):
        os.close(master)  # the device end goes away: the next write fails
        os.close(slave)
        wait_for(lambda: s.pipeline.trigger.interlock.state.value == "disarmed", 10.0)

    try:
        info = run_with(session, unplug, stop_after_s=1.0)
    finally:
        end_process(proc)
    audit = assert_disarmed_with(session, info, "output_error")
    errors = [a for a in audit if a.get("event") == "attempt" and a["reason"] == "output_error"]
    assert errors, "no pulse attempt met the vanished port"
    assert "serial" in errors[0]["detail"]


def test_stream_with_other_channels_or_rate_is_refused_before_anything_starts(
    recording, unique_name, out_dir
):
    proc = replayer(recording, unique_name)
    try:
        for overrides, key in (
            ({"source.expected_n_channels": 64}, "source.expected_n_channels"),
            ({"source.expected_sfreq": 500.0}, "source.expected_sfreq"),
        ):
            source = LslSource(
                name=unique_name, source_id=unique_name, stype=None, resolve_timeout_s=20.0
            )
            session = Session(
                config(unique_name, **overrides),
                source,
                live=True,
                out_root=out_dir,
                arm_action="test_arm",
            )
            with pytest.raises(ConfigError, match=key):
                session.run()
            assert session.folder is None  # nothing started, nothing written
    finally:
        end_process(proc)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_disarm_first_and_leave_a_complete_folder(
    sig, recording, unique_name, out_dir
):
    cfg = out_dir / "session.yaml"
    data = config(unique_name).model_dump(mode="json")
    data["source"].update(
        {"name": unique_name, "source_id": unique_name, "stype": None, "resolve_timeout_s": 20.0}
    )
    data["session"]["out_dir"] = str(out_dir / "sessions")
    cfg.write_text(yaml.safe_dump(data), encoding="utf-8")
    proc = replayer(recording, unique_name)
    run = subprocess.Popen(
        [sys.executable, "-m", "closedloop.cli", "run", "--config", str(cfg), "--arm"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def armed() -> bool:
            folders = list((out_dir / "sessions").glob("*/audit.jsonl"))
            return bool(folders) and any(a.get("new") == "armed" for a in read_jsonl(folders[0]))

        if not wait_for(armed, 90.0):
            run.kill()
            out, err = run.communicate()
            pytest.fail(f"never armed; closedloop run said:\n{err[-3000:]}")
        run.send_signal(sig)
        out, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        end_process(proc)
    assert run.returncode == 0, err
    folder = next((out_dir / "sessions").iterdir())
    audit = read_jsonl(folder / "audit.jsonl")
    last = [a for a in audit if a.get("event") == "interlock"][-1]
    assert last["new"] == "disarmed"
    assert sig.name in last["reason"]
    summary = yaml.safe_load((folder / "summary.json").read_text())
    assert sig.name in summary["stop_reason"]
    assert load_session(folder).raw.n_times > 0
    assert "session summary" in out


# ---- issue 14 items 4-7: a hung output, kill -9 after the TTL, a full disk ----------------------
REPEAT_EVERY_SECOND = {  # a pulse request every second whatever the state
    "state.enter": -20.0,
    "state.leave": -30.0,
    "trigger.mode": "repeat",
    "trigger.repeat_interval_s": 1.0,
}


@pytest.fixture
def hang_simulated(monkeypatch):
    """Make SimulatedStimulator.fire hang (a wedged driver) once `hang` is set, until
    `release` (at most 5 s)."""
    from triggers.outputs import SimulatedStimulator

    ctl = {"hang": threading.Event(), "entered": threading.Event(), "release": threading.Event()}
    original = SimulatedStimulator.fire

    def fire(self, pulse):
        if ctl["hang"].is_set():
            ctl["entered"].set()
            ctl["release"].wait(5.0)
        original(self, pulse)

    monkeypatch.setattr(SimulatedStimulator, "fire", fire)
    return ctl


def test_hung_output_the_watchdog_disarms(recording, unique_name, out_dir, hang_simulated):
    proc = replayer(recording, unique_name)
    session = live_session(unique_name, **REPEAT_EVERY_SECOND)
    seen: dict = {}

    def hang(s):
        hang_simulated["hang"].set()
        assert hang_simulated["entered"].wait(10.0), "no pulse reached the output"
        t0 = time.monotonic()
        seen["disarmed"] = wait_for(
            lambda: s.pipeline.trigger.interlock.state.value == "disarmed", 5.0
        )
        seen["took_s"] = time.monotonic() - t0
        seen["reason"] = s.pipeline.trigger.interlock.last_reason
        hang_simulated["release"].set()

    try:
        info = run_with(session, hang, stop_after_s=1.0)
    finally:
        hang_simulated["release"].set()
        end_process(proc)
    assert seen["disarmed"], "the watchdog did not disarm while the output hung"
    assert seen["reason"].startswith("watchdog"), seen
    limit_s = session.config.safety.watchdog_ms / 1000.0
    assert seen["took_s"] < 1.5 * limit_s + 0.2, seen  # timeout + one poll period, some slack
    assert_disarmed_with(session, info, "watchdog")
    assert session.summary["watchdog"]["tripped"] == 1


def test_hung_output_emergency_stop_returns_at_once(
    recording, unique_name, out_dir, hang_simulated
):
    proc = replayer(recording, unique_name)
    session = live_session(unique_name, **REPEAT_EVERY_SECOND)
    seen: dict = {}

    def estop(s):
        hang_simulated["hang"].set()
        assert hang_simulated["entered"].wait(10.0), "no pulse reached the output"
        t0 = time.perf_counter()
        s.emergency_stop("test")  # the loop is inside fire(), holding its chunk
        seen["ms"] = 1000.0 * (time.perf_counter() - t0)
        seen["state"] = s.pipeline.trigger.interlock.state.value
        hang_simulated["release"].set()

    try:
        info = run_with(session, estop, stop_after_s=1.0)
    finally:
        hang_simulated["release"].set()
        end_process(proc)
    assert seen["ms"] < 50.0, f"emergency stop took {seen['ms']:.1f} ms while fire() hung"
    assert seen["state"] == "disarmed"
    audit = assert_disarmed_with(session, info, "emergency stop")
    assert any(
        a.get("event") == "interlock" and "emergency stop (test)" in a["reason"] for a in audit
    )
    with pytest.raises(Exception, match="emergency stop"):
        session.arm("gui_button")  # latched (the session is over, but the answer is still no)


KILL_CHILD = """
import sys, time
from pathlib import Path
from acquisition.lsl_source import LslSource
from closedloop.config import SessionConfig, apply_overrides
from closedloop.session import Session
from triggers.outputs import SimulatedStimulator

def slow_after_the_ttl(self, pulse):  # a slow second device: the kill lands before the outcome
    time.sleep(5.0)

SimulatedStimulator.fire = slow_after_the_ttl
name, port, out = sys.argv[1:4]
cfg = apply_overrides(SessionConfig(), {
    "state.calibration_s": 8.0, "state.enter": -20.0, "state.leave": -30.0,
    "trigger.mode": "repeat", "trigger.repeat_interval_s": 1.0, "trigger.dwell_s": 0.5,
    "safety.min_interval_s": 1.0, "recording.xdf": False, "session.name": name,
    "outputs.outputs": [{"kind": "serial", "port": port}, {"kind": "simulated"}],
})
source = LslSource(name=name, source_id=name, stype=None, resolve_timeout_s=20.0)
Session(cfg, source, live=True, out_root=Path(out), arm_action="test_arm").run()
"""


def test_kill_9_right_after_the_ttl_leaves_the_pulse_as_intent(recording, unique_name, out_dir):
    """The stimulator (a real pty) got the byte, the session was SIGKILLed before its outcome
    line: the audit holds the pulse as an intent and load_session says so."""
    import select

    from closedloop.load import OUTCOME_UNKNOWN

    master, slave = os.openpty()
    proc = start_replayer(recording, unique_name, speed=1.0)  # real time: hardware outputs stay
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, unique_name, os.ttyname(slave), str(out_dir)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready, _, _ = select.select([master], [], [], 90.0)
        if not ready:
            child.kill()
            pytest.fail(f"no TTL byte within 90 s: {child.communicate()[1][-3000:]!r}")
        byte = os.read(master, 1)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
        end_process(proc)
        for fd in (master, slave):
            os.close(fd)
    assert byte == b"\x01"
    assert child.returncode == -signal.SIGKILL
    folder = next(p for p in out_dir.iterdir() if p.is_dir())
    audit = read_jsonl(folder / "audit.jsonl")
    intents = [a for a in audit if a.get("event") == "intent"]
    outcomes = {a["attempt"]: a for a in audit if a.get("event") == "attempt"}
    # the byte read was the first TTL; an earlier intent may have been vetoed 'late' after a
    # slow fsync (then it has its outcome and sent nothing)
    assert not any(o["fired"] for o in outcomes.values()), "an outcome came before the kill"
    pending = [i for i in intents if i["attempt"] not in outcomes]
    assert len(pending) == 1, audit
    assert pending[0] is intents[-1]
    assert pending[0]["outputs"][0] == "serial"
    rec = load_session(folder)
    assert [(p["pulse_number"], p["outcome"]) for p in rec.pulses] == [
        (pending[0]["pulse_number"], OUTCOME_UNKNOWN)
    ]
    assert any(OUTCOME_UNKNOWN in n for n in rec.notes)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs for the session folder (skipped where mounting is not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(path: Path) -> None:
    """Write zeros to `path` until the file system says ENOSPC."""
    import errno

    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)


def test_full_disk_disarms_no_pulse_goes_unrecorded_and_shutdown_says_so(
    recording, unique_name, small_disk, monkeypatch
):
    """The session folder's disk fills while armed: the next audit write fails, the session
    disarms (reason 'audit'), arming is refused and the interlock really stays disarmed, every
    pulse that reached the stimulator has its intent line, and shutdown runs to the end,
    reporting the summary it could not write."""
    from closedloop.control import ControlError
    from triggers.outputs import SimulatedStimulator

    delivered = []
    original = SimulatedStimulator.fire

    def fire(self, pulse):
        delivered.append(pulse.pulse_number)
        original(self, pulse)

    monkeypatch.setattr(SimulatedStimulator, "fire", fire)
    monkeypatch.setenv("CL_TMP", str(small_disk))
    proc = replayer(recording, unique_name)
    session = live_session(unique_name, **REPEAT_EVERY_SECOND, **{"recording.xdf": False})
    seen: dict = {}

    def fill(s):
        fill_disk(small_disk / "filler")
        trigger = s.pipeline.trigger
        seen["disarmed"] = wait_for(lambda: trigger.interlock.last_reason.startswith("audit"), 10)
        try:
            s.arm("gui_button")
            seen["arm"] = "armed"
        except ControlError as exc:
            seen["arm"] = str(exc)
        seen["state_after_arm"] = trigger.interlock.state.value

    try:
        info = run_with(session, fill, stop_after_s=2.0)
    finally:
        end_process(proc)
    assert info["armed_before_fault"]
    assert seen["disarmed"], "a full disk did not disarm"
    assert seen["arm"].startswith("arm refused"), seen
    assert seen["state_after_arm"] == "disarmed", "arming was refused but the interlock armed"
    summary = session.summary
    assert summary["audit_failed"]
    assert summary["final_interlock"] == "disarmed"
    assert "summary_error" in summary, "the summary could not be written: that must be said"
    assert any("audit" in e for e in summary["shutdown_errors"])
    (small_disk / "filler").unlink()
    audit = read_jsonl(session.folder / "audit.jsonl")
    intents = {a["pulse_number"] for a in audit if a.get("event") == "intent"}
    assert delivered, "no pulse before the disk filled"
    assert set(delivered) <= intents, "a pulse reached the stimulator without its intent line"
    arms = [a for a in audit if a.get("event") == "interlock" and a["reason"].startswith("armed")]
    assert len(arms) == 1  # armed once by the session, never again


SIGINT_CHILD = KILL_CHILD.replace(
    'Session(cfg, source, live=True, out_root=Path(out), arm_action="test_arm").run()',
    "from closedloop.cli import _install_signal_handlers\n"
    'session = Session(cfg, source, live=True, out_root=Path(out), arm_action="test_arm")\n'
    "_install_signal_handlers(session)\n"
    "session.run()",
)


def test_sigint_disarms_at_once_while_an_output_hangs(recording, unique_name, out_dir):
    """`closedloop run` (signal handlers in the loop's thread): Ctrl-C while fire() hangs
    disarms within milliseconds, not when the hang ends; the session then ends cleanly."""
    import select

    assert "_install_signal_handlers(session)" in SIGINT_CHILD
    master, slave = os.openpty()
    proc = start_replayer(recording, unique_name, speed=1.0)  # real time: hardware outputs stay
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen(
        [sys.executable, "-c", SIGINT_CHILD, unique_name, os.ttyname(slave), str(out_dir)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready, _, _ = select.select([master], [], [], 90.0)
        if not ready:
            child.kill()
            pytest.fail(f"no TTL byte within 90 s: {child.communicate()[1][-3000:]!r}")
        os.read(master, 1)  # the TTL went out; the simulated device now hangs for 5 s
        t_sigint = time.time()
        child.send_signal(signal.SIGINT)
        folder = next(p for p in out_dir.iterdir() if p.is_dir())

        def disarm_line():
            for a in read_jsonl(folder / "audit.jsonl"):
                if a.get("event") == "interlock" and "SIGINT" in a["reason"]:
                    return a
            return None

        assert wait_for(lambda: disarm_line() is not None, 3.0), "SIGINT did not disarm"
        line = disarm_line()
        assert line["new"] == "disarmed"
        assert line["t_wall"] - t_sigint < 0.2, line["t_wall"] - t_sigint
        assert child.poll() is None, "the check must happen while fire() still hangs"
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        end_process(proc)
        for fd in (master, slave):
            os.close(fd)
    assert child.returncode == 0, err[-3000:]
    summary = yaml.safe_load((folder / "summary.json").read_text())
    assert "SIGINT" in summary["stop_reason"]


@pytest.mark.mqtt
def test_hung_output_mqtt_emergency_stop_is_answered_at_once(
    recording, unique_name, out_dir, hang_simulated, tmp_path
):
    """The console's e-stop over a real Mosquitto while fire() hangs: accepted and disarmed
    within the command's round trip, not when the hang ends (5 s here)."""
    from closedloop.mqtt import MqttSettings, send_command
    from tests.mqtt_broker import running_broker

    (tmp_path / "broker").mkdir()
    with running_broker(tmp_path / "broker") as broker:
        mqtt = {
            "mqtt.enabled": True,
            "mqtt.port": broker.port,
            "mqtt.topic_prefix": "cltest",
            "mqtt.session_id": "estop",
        }
        proc = replayer(recording, unique_name)
        session = live_session(unique_name, **REPEAT_EVERY_SECOND, **mqtt)
        seen: dict = {}

        def estop(s):
            hang_simulated["hang"].set()
            assert hang_simulated["entered"].wait(10.0), "no pulse reached the output"
            console = MqttSettings(host=broker.host, port=broker.port, topic_prefix="cltest")
            t0 = time.perf_counter()
            seen["reply"] = send_command(
                console, "estop", "emergency_stop", sender="console", timeout_s=3.0
            )
            seen["s"] = time.perf_counter() - t0
            seen["state"] = s.pipeline.trigger.interlock.state.value
            seen["still_hung"] = not hang_simulated["release"].is_set()
            hang_simulated["release"].set()

        try:
            info = run_with(session, estop, stop_after_s=1.0)
        finally:
            hang_simulated["release"].set()
            end_process(proc)
    assert seen["reply"] is not None, "no reply to the emergency stop within 3 s"
    assert seen["reply"]["ok"], seen["reply"]
    assert seen["still_hung"]
    assert seen["state"] == "disarmed"
    assert seen["s"] < 1.0, f"MQTT emergency stop round trip {seen['s']:.3f} s"
    assert_disarmed_with(session, info, "emergency stop")

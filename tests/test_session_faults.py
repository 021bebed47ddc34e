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

"""Shutdown by signal, kill -9 right after the TTL, a full disk: disarmed first, nothing that
reached the stimulator goes unrecorded, the folder complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from closedloop.load import load_session, read_jsonl
from tests.faults.helpers import (
    KILL_CHILD,
    REPEAT_EVERY_SECOND,
    config,
    live_session,
    replayer,
    run_with,
    wait_for,
)
from tests.session_helpers import end_process, start_replayer

pytestmark = [pytest.mark.lsl, pytest.mark.slow, pytest.mark.timeout(120)]


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
        [sys.executable, "-m", "closedloop.app.cli", "run", "--config", str(cfg), "--arm"],
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


def test_kill_9_right_after_the_ttl_leaves_the_pulse_as_intent(recording, unique_name, out_dir):
    """The stimulator (a real pty) got the byte, the session was SIGKILLed before its outcome
    line: the audit holds the pulse as an intent and load_session says so."""
    import select

    from closedloop.load import OUTCOME_UNKNOWN

    master, slave = os.openpty()
    proc = start_replayer(recording, unique_name, speed=1.0)  # real time: hardware outputs stay
    root = Path(__file__).resolve().parents[2]
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

"""Issue 14 item 7 for whole sessions: free space is checked at start, and shutdown goes on
through every step whatever one of them raised."""

from __future__ import annotations

import json
import subprocess

import pytest

from acquisition.file_source import FileSource
from closedloop.disk import GIB, check_disk, recording_bytes_per_hour
from closedloop.load import read_jsonl
from closedloop.session import Session
from tests.session_helpers import fast_config, small_recording

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def recording():
    return small_recording(duration_s=40.0)


def run_offline(raw, out_root):
    session = Session(
        fast_config(**{"state.calibration_s": 10.0}),
        FileSource(raw, chunk_size=10),
        live=False,
        out_root=out_root,
        arm_action="offline_run",
    )
    return session, session.run()


def test_recording_rate_figures():
    # 64 channels at 1 kHz, float32 plus a 9-byte stamp per sample: 0.95 GB/h (the module's
    # comment and the README quote this figure)
    assert recording_bytes_per_hour(64, 1000.0) == pytest.approx(0.954e9, rel=1e-3)


def test_plenty_of_space_is_ok(tmp_path):
    d = check_disk(tmp_path, 32, 500.0)
    if d["free_gib"] < 10:
        pytest.skip(f"this machine has only {d['free_gib']} GiB free")
    assert d["level"] == "ok"
    assert d["message"] == ""


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs (skipped where mounting is not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_low_disk_space_is_warned_in_summary_events_and_status(recording, small_disk):
    session, summary = run_offline(recording, small_disk)
    disk = summary["disk"]
    assert disk["level"] == "critical"
    assert disk["free_gib"] < 64 / 1024
    assert 0 < disk["hours_at_stream_rate"] < 1
    assert any(w.startswith("low disk space (critical)") for w in summary["warnings"])
    events = read_jsonl(session.folder / "events.jsonl")
    assert [e["level"] for e in events if e["kind"] == "disk"] == ["critical"]
    assert session.status.extra["disk"] == "critical"
    assert json.loads((session.folder / "summary.json").read_text())["disk"]["level"] == "critical"
    assert summary["pulses"] >= 1  # a warning, not a refusal
    assert GIB == 1024**3


def test_shutdown_goes_on_after_a_step_fails(recording, tmp_path, monkeypatch):
    from triggers.unit import TriggerUnit

    original = TriggerUnit.close

    def close(self, reason="shutdown"):
        original(self, reason)
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(TriggerUnit, "close", close)
    session, _ = run_offline(recording, tmp_path)  # returns: shutdown reported, not raised
    written = json.loads((session.folder / "summary.json").read_text())
    assert written["final_interlock"] == "disarmed"
    assert any("injected" in e for e in written["shutdown_errors"])
    assert any("injected" in w for w in written["warnings"])
    assert session.status.phase == "stopped"
    assert read_jsonl(session.folder / "events.jsonl")[-1]["kind"] == "session"

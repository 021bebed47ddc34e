"""Fixtures of the fault tests: the recording they replay, a folder for sessions, an output
that hangs on demand."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from acquisition.simulator import simulate
from tests.faults.helpers import CHANNELS, SFREQ


@pytest.fixture(scope="session")
def recording(tmp_path_factory) -> Path:
    """45 s, 11 channels at 250 Hz, no bad-channel episode (the faults are injected)."""
    raw = simulate(duration_s=45.0, sfreq=SFREQ, montage=CHANNELS, seed=3, bad_channel=False)
    path = tmp_path_factory.mktemp("rec") / "fault_test.fif"
    raw.save(path, verbose="error")
    return path


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_TMP", str(tmp_path))
    return tmp_path


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

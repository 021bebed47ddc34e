"""Test-wide set-up: offscreen Qt, loud background errors, shared data location."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("CLOSEDLOOP_RAISE", "1")  # background errors re-raise in tests (STYLE 12)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REPLAY_DATA = ROOT / "replay_data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data from the project root; skip where it is absent (as on a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real recordings folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def unique_name(request) -> str:
    """A unique LSL stream name / source id for this test."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name[:40])
    return f"cltest-{safe}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def looping_replayer(unique_name):
    """The bundled 4-channel 256 Hz recording replayed in a loop over LSL as `unique_name`."""
    from acquisition.replayer_process import start_replayer_process, stop_replayer_process

    proc = start_replayer_process(
        REPLAY_DATA / "sim_4ch_256hz.fif", unique_name, unique_name, speed=1.0, loop="forever"
    )
    yield proc
    stop_replayer_process(proc)

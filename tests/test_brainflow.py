"""BrainFlow boards as a source: BrainFlow's synthetic board (no hardware), republished over
LSL and read back, and `closedloop run` on it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pylsl
import pytest

from acquisition.brainflow_source import BrainFlowSource, board_id
from acquisition.chunk import HealthKind
from tests.lsl_helpers import pull_until


def test_board_names_and_ids():
    assert board_id("SYNTHETIC_BOARD") == -1
    assert board_id("synthetic") == -1
    assert board_id("cyton") == 0
    assert board_id(0) == 0
    assert board_id("-1") == -1
    with pytest.raises(ValueError, match="unknown BrainFlow board 'nope'"):
        board_id("nope")
    with pytest.raises(ValueError, match="no input parameter 'serial'"):
        BrainFlowSource("synthetic", {"serial": "/dev/ttyUSB0"})


@pytest.mark.lsl
def test_the_synthetic_board_is_read_through_lsl_with_names_units_counter_and_clock():
    src = BrainFlowSource("synthetic", counter_channel="package").connect()
    try:
        assert src.ch_names[:5] == ("Fz", "C3", "Cz", "C4", "Pz")  # BrainFlow's description
        assert src.ch_names[-1] == "package"
        assert src.sfreq == 250.0
        np.testing.assert_allclose(src.scales[:-1], 1e-6)  # BrainFlow's µV -> volts
        assert src.eeg_mask[-1] is False  # the package number is not EEG
        assert src.warnings == []
        got = pull_until(src, lambda p: sum(c.n_samples for c in p.chunks) >= 600, 15.0)
        now = pylsl.local_clock()
    finally:
        src.disconnect()
    assert got.data.shape[0] >= 600
    assert [e.kind for e in got.events] == [HealthKind.CONNECTED]
    # the package number, unwrapped past 255, steps by one: nothing lost over the wrap
    np.testing.assert_array_equal(np.diff(got.data[:, -1]), 1.0)
    eeg = got.data[:, :-1]
    assert 1e-6 < np.std(eeg) < 1e-3  # volts: the synthetic board's tens of µV
    # BrainFlow's Unix timestamps mapped onto the LSL clock: the newest is a few ms old
    assert 0.0 < now - got.chunks[-1].raw_timestamps[-1] < 0.5
    assert src.bridge_error is None


@pytest.mark.lsl
@pytest.mark.slow
def test_run_on_the_synthetic_board(tmp_path):
    proc = subprocess.run(
        [
            sys.executable, "-m", "closedloop.app.cli", "run",
            "--config", "configs/cyton_brainflow.yaml",
            "--set", "source.board=synthetic",
            "--set", "source.board_params={}",
            "--set", "bandpower.groups={occipital: [Oz, PO7], frontal: [Fz, F3]}",
            "--set", "recording.xdf=false",
            "--set", "session.publish_lsl=false",
            "--duration", "4", "--out", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "duration 4 s reached" in proc.stdout
    (folder,) = tmp_path.iterdir()
    events = (folder / "events.jsonl").read_text()
    assert "brainflow-Synthetic-" in events
    assert '"health": "gap"' not in events

"""The session's XDF recorder (LabRecorderCLI) on real LSL outlets: several streams start
reliably, a missing stream fails fast with the CLI gone, and the file reads back."""

from __future__ import annotations

import time

import numpy as np
import pytest
import pyxdf

from closedloop.recording import XdfRecorder

pylsl = pytest.importorskip("pylsl")
pytestmark = [pytest.mark.lsl, pytest.mark.timeout(90)]


def outlets(name: str, n: int) -> list:
    return [
        pylsl.StreamOutlet(
            pylsl.StreamInfo(f"{name}-{i}", "EEG", 2, 100.0, "float32", f"{name}-{i}")
        )
        for i in range(n)
    ]


def test_four_streams_start_every_time_and_read_back(tmp_path, unique_name):
    # four streams is what a live session records (EEG, its markers, our state and pulses),
    # where the CLI's per-stream start lines interleave; repeat to catch the race
    outs = outlets(unique_name, 4)
    for attempt in range(3):
        path = tmp_path / f"rec{attempt}.xdf"
        rec = XdfRecorder(path, [{"source_id": f"{unique_name}-{i}"} for i in range(4)])
        assert rec.start(timeout_s=20.0), rec.error
        assert rec.running
        for k in range(20):
            for o in outs:
                o.push_sample([float(k), -float(k)])
            time.sleep(0.01)
        time.sleep(0.5)
        rec.stop()
        assert rec.error is None
        assert not rec.running
        streams, _ = pyxdf.load_xdf(str(path))
        assert sorted(s["info"]["source_id"][0] for s in streams) == [
            f"{unique_name}-{i}" for i in range(4)
        ]
        for s in streams:
            assert np.asarray(s["time_series"]).shape[1] == 2
            assert len(s["time_series"]) > 0


def test_missing_stream_fails_with_a_reason_and_leaves_no_process(tmp_path, unique_name):
    rec = XdfRecorder(tmp_path / "x.xdf", [{"source_id": f"{unique_name}-absent"}])
    t = time.monotonic()
    assert not rec.start(timeout_s=15.0)
    assert time.monotonic() - t < 15.0
    assert "not found" in (rec.error or "") or "exited" in (rec.error or ""), rec.error
    assert not rec.running
    rec.stop()  # harmless after a failed start

"""The session's XDF recorder (LabRecorderCLI) on real LSL outlets: several streams start
reliably, a missing stream fails fast with the CLI gone, and the file reads back."""

from __future__ import annotations

import math
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


def _record_then_stop(path, name: str, outlet, **stop_kwargs) -> tuple[float, float, float]:
    """Record 1 s of a 100 Hz stream pushed in real time, stop right after the last push.

    Returns (last pushed timestamp, last recorded timestamp) in local_clock() s, and how long
    stop() took (s).
    """
    rec = XdfRecorder(path, [{"source_id": name}])
    assert rec.start(timeout_s=20.0), rec.error
    t_last = math.nan
    for i in range(100):
        t_last = pylsl.local_clock()
        outlet.push_sample([float(i), 0.0], t_last)
        time.sleep(0.01)
    t0 = time.monotonic()
    rec.stop(**stop_kwargs)
    stop_s = time.monotonic() - t0
    assert rec.error is None, rec.error
    (stream,) = pyxdf.load_xdf(str(path), dejitter_timestamps=False)[0]
    return t_last, float(stream["time_stamps"][-1]), stop_s


def test_cause_labrecorder_loses_the_tail_when_stopped_at_once(tmp_path, unique_name):
    """The cause of the pulse outside the XDF: LabRecorderCLI pulls every 500 ms and does not
    pull again when stopped (cover_local=-inf: stop at once, as before the fix), so samples
    that arrived after its last pull are lost. A pull between the last push and the stop (a
    ~1 ms window out of 500) would hide it, so three recordings: all three keeping their tail
    would mean the cause is gone."""
    outlet = outlets(unique_name, 1)[0]
    lost_ms = []
    for k in range(3):
        t_pushed, t_recorded, _ = _record_then_stop(
            tmp_path / f"r{k}.xdf", f"{unique_name}-0", outlet, cover_local=-math.inf
        )
        lost_ms.append(1000.0 * (t_pushed - t_recorded))
    assert max(lost_ms) > 5.0, lost_ms  # at least one sample (10 ms) missing at the end
    assert max(lost_ms) < 1000.0 * (XdfRecorder.PULL_INTERVAL_S + XdfRecorder.PULL_SLACK_S)


def test_stop_waits_until_the_file_holds_everything_pushed_before_it(tmp_path, unique_name):
    """stop() (cover_local: now) keeps every sample that arrived before it was called, in
    each of three recordings (before the fix 215-227 ms were missing in 5 of 5 runs)."""
    outlet = outlets(unique_name, 1)[0]
    for k in range(3):
        t_pushed, t_recorded, stop_s = _record_then_stop(
            tmp_path / f"r{k}.xdf", f"{unique_name}-0", outlet
        )
        assert t_recorded == pytest.approx(t_pushed, abs=1e-3)  # clock offset: µs here
        # the bounded wait (0.75 s), then the CLI's own exit: its clock-offset thread sleeps
        # 5 s between queries and is joined at stop (measured 3.6-6.4 s with or without it)
        assert stop_s < 0.75 + 10.0

"""Replayer: exact-grid timestamps, markers, speed, looping, drift, and mne-lsl as a reader."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pylsl
import pytest
from mne_lsl.stream import StreamLSL

from acquisition.chunk import HealthKind
from acquisition.lsl_source import LslSource
from acquisition.replayer import Replayer, add_replay_arguments, main
from tests.lsl_helpers import (
    make_recording,
    new_stream_name,
    pull_until,
    replayer_process,
    save_recording_fif,
)

SFREQ = 250.0


def n_pulled(p) -> int:
    return sum(c.n_samples for c in p.chunks)


# ---------------------------------------------------------------- no LSL needed
def test_bad_parameters_are_rejected():
    raw = make_recording(duration_s=0.2)
    with pytest.raises(ValueError, match="chunk_size"):
        Replayer(raw, chunk_size=0)
    with pytest.raises(ValueError, match="speed"):
        Replayer(raw, speed=0)
    with pytest.raises(ValueError, match="loop"):
        Replayer(raw, loop=0)
    with pytest.raises(ValueError, match="already has a 'counter'"):
        Replayer(raw, add_counter=True)


def test_units_are_microvolts_for_eeg_and_none_for_the_counter():
    r = Replayer(make_recording(duration_s=0.2, n_eeg=2), progress=False)
    assert r.ch_names == ("Fz", "C3", "counter")
    assert r.ch_units == ("microvolts", "microvolts", "none")


def test_command_line_options():
    parser = add_replay_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "rec.fif",
            "--loop",
            "forever",
            "--speed",
            "inf",
            "--counter",
            "--chunk-size",
            "32",
            "--name",
            "n",
            "--source-id",
            "s",
        ]
    )
    assert args.loop is None
    assert math.isinf(args.speed)
    assert args.counter
    assert args.chunk_size == 32
    assert (args.name, args.source_id) == ("n", "s")
    assert parser.parse_args(["rec.fif", "--loop", "3"]).loop == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["rec.fif", "--loop", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["rec.fif", "--speed", "-1"])


# ----------------------------------------------------------------- live streams
@pytest.mark.lsl
def test_stream_description_has_channel_metadata():
    name = new_stream_name()
    replayer = Replayer(
        make_recording(duration_s=1.0),
        name=name,
        source_id=name + "-sid",
        loop=None,
        progress=False,
    )
    with replayer:
        info = pylsl.resolve_bypred(f"name='{name}'", 1, 5.0)[0]
        inlet = pylsl.StreamInlet(info)
        full = inlet.info(5.0)
    assert full.type() == "EEG"
    assert full.source_id() == name + "-sid"
    assert full.nominal_srate() == SFREQ
    assert full.channel_format() == pylsl.cf_float32
    ch = full.desc().child("channels").child("channel")
    rows = []
    while not ch.empty():
        rows.append((ch.child_value("label"), ch.child_value("unit"), ch.child_value("type")))
        ch = ch.next_sibling()
    assert rows == [
        ("Fz", "microvolts", "EEG"),
        ("C3", "microvolts", "EEG"),
        ("C4", "microvolts", "EEG"),
        ("Pz", "microvolts", "EEG"),
        ("counter", "none", "MISC"),
    ]
    assert full.desc().child_value("manufacturer") == "closedloop"
    assert full.desc().child("acquisition").child_value("model") == "Replayer"


@pytest.mark.lsl
def test_markers_are_pushed_on_the_sample_grid_each_loop():
    name = new_stream_name()
    raw = make_recording(duration_s=2.0, annotations=((0.5, "rest"), (1.2, "move")))
    replayer = Replayer(raw, name=name, speed=4.0, loop=2, wait_for_consumers_s=10, progress=False)
    with replayer:
        minfo = pylsl.resolve_bypred(f"name='{name}-markers'", 1, 5.0)[0]
        assert minfo.type() == "Markers"
        assert minfo.nominal_srate() == pylsl.IRREGULAR_RATE
        assert minfo.channel_format() == pylsl.cf_string
        marker_inlet = pylsl.StreamInlet(minfo)
        marker_inlet.open_stream(5.0)
        with LslSource(name=name) as src:  # the replay starts when this consumer connects
            got = pull_until(src, lambda p: HealthKind.LOST in p.kinds(), 15.0)
            tc = src.time_correction
        markers = []
        while True:
            sample, ts = marker_inlet.pull_sample(timeout=0.5)
            if sample is None:
                break
            markers.append((sample[0], ts))
    assert [m[0] for m in markers] == ["rest", "move", "rest", "move"]
    counter = got.data[:, -1]
    np.testing.assert_array_equal(counter, np.arange(1000))
    sender_ts = got.timestamps - tc
    for (_, ts), idx in zip(markers, [125, 300, 625, 800], strict=True):
        assert ts == pytest.approx(sender_ts[idx], abs=1e-5)  # exactly on the EEG grid
    assert replayer.stats.markers_pushed == 4


@pytest.mark.lsl
def test_speed_factor_keeps_timestamps_on_the_recording_grid():
    name = new_stream_name()
    replayer = Replayer(
        make_recording(duration_s=2.0),
        name=name,
        speed=5.0,
        wait_for_consumers_s=10,
        marker_stream=False,
        progress=False,
    )
    with replayer, LslSource(name=name) as src:
        got = pull_until(src, lambda p: HealthKind.LOST in p.kinds(), 15.0)
    np.testing.assert_array_equal(got.data[:, -1], np.arange(500))
    np.testing.assert_allclose(np.diff(got.timestamps), 1 / SFREQ, atol=2e-5)
    wall_s = got.chunks[-1].t_arrival - got.chunks[0].t_arrival
    stream_s = got.timestamps[-1] - got.timestamps[0]
    print(f"speed 5: {stream_s:.2f} s of stream in {wall_s:.2f} s of wall time")
    assert 0.1 < wall_s < stream_s / 2.5  # ~0.4 s expected; bounds tolerate a loaded machine


@pytest.mark.lsl
def test_fast_mode_pushes_without_sleeping():
    name = new_stream_name()
    replayer = Replayer(
        make_recording(duration_s=8.0),
        name=name,
        fast=True,
        chunk_size=50,
        wait_for_consumers_s=10,
        marker_stream=False,
        progress=False,
    )
    with replayer, LslSource(name=name) as src:
        got = pull_until(src, lambda p: HealthKind.LOST in p.kinds(), 15.0)
    stats = replayer.stats
    assert stats.samples_pushed == 2000
    assert stats.overruns == 0
    np.testing.assert_array_equal(got.data[:, -1], np.arange(2000))
    np.testing.assert_allclose(np.diff(got.timestamps), 1 / SFREQ, atol=2e-5)
    wall_s = got.chunks[-1].t_arrival - got.chunks[0].t_arrival
    print(f"fast mode: 8 s of stream in {wall_s * 1e3:.0f} ms")
    assert wall_s < 2.0


@pytest.mark.lsl
def test_endless_loop_with_added_counter_keeps_time_and_counter_rising():
    name = new_stream_name()
    raw = make_recording(duration_s=0.4, counter=False)  # 100 samples per pass
    replayer = Replayer(
        raw,
        name=name,
        loop=None,
        speed=2.0,
        add_counter=True,
        wait_for_consumers_s=10,
        marker_stream=False,
        progress=False,
    )
    # stale_after_s 2 s: a pause of the loaded cores is not what this tests
    with replayer, LslSource(name=name, stale_after_s=2.0) as src:
        got = pull_until(src, lambda p: n_pulled(p) >= 450, 15.0)
    stats = replayer.stats
    assert stats.loops_completed >= 4
    assert stats.stopped_early
    counter = got.data[:, -1]
    np.testing.assert_array_equal(counter, np.arange(counter.size))
    np.testing.assert_allclose(np.diff(got.timestamps), 1 / SFREQ, atol=2e-5)
    # the EEG repeats every pass, unchanged
    np.testing.assert_allclose(got.data[100:200, :-1], got.data[:100, :-1])
    assert not [e for e in got.events if e.is_fault]


@pytest.mark.lsl
def test_late_pushes_are_counted_as_overruns_and_the_schedule_catches_up(monkeypatch):
    name = new_stream_name()
    replayer = Replayer(
        make_recording(duration_s=1.6),
        name=name,
        chunk_size=10,
        wait_for_consumers_s=10,
        marker_stream=False,
        progress=False,
    )
    original = replayer._kept_rows

    def stall_once(g: int, n: int):
        if g == 100:
            time.sleep(0.15)  # the 11th chunk is held up by ~4 chunk periods
        return original(g, n)

    monkeypatch.setattr(replayer, "_kept_rows", stall_once)
    with replayer, LslSource(name=name) as src:
        got = pull_until(src, lambda p: HealthKind.LOST in p.kinds(), 15.0)
    stats = replayer.stats
    assert stats.overruns >= 1
    assert stats.max_late_s >= 0.1
    np.testing.assert_array_equal(got.data[:, -1], np.arange(400))  # nothing lost, just late
    # after the stall the pushes return to the grid: the last chunk arrives on time again
    last = got.chunks[-1]
    assert last.t_arrival - (last.t_last - src.time_correction) < 0.05


@pytest.mark.lsl
def test_mne_lsl_stream_reads_the_replayer(tmp_path):
    name = new_stream_name("tomne")
    raw = make_recording(duration_s=2.0)
    path = save_recording_fif(raw, tmp_path)
    with replayer_process(path, name, name, "--loop", "forever", log_dir=tmp_path):
        stream = StreamLSL(bufsize=1.0, name=name, source_id=name)
        stream.connect(timeout=10)
        try:
            assert stream.ch_names == raw.ch_names
            assert stream.get_channel_types() == ["eeg"] * 4 + ["misc"]
            assert stream.info["sfreq"] == SFREQ
            deadline = time.monotonic() + 10
            while stream.n_new_samples < 250 and time.monotonic() < deadline:
                time.sleep(0.05)
            data, ts = stream.get_data()
        finally:
            stream.disconnect()
    counter = data[-1].astype(int) % 500
    assert data.shape == (5, 250)
    np.testing.assert_array_equal(np.diff(data[-1]), 1)  # a full window with no sample lost
    # values arrive in microvolts, as the 'microvolts' unit says
    np.testing.assert_allclose(data[:-1], raw.get_data()[:-1, counter] * 1e6, rtol=1e-6)
    np.testing.assert_allclose(np.diff(ts), 1 / SFREQ, atol=2e-5)


@pytest.mark.lsl
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_no_drift_over_a_60_s_real_time_replay(tmp_path):
    """Arrival (local clock) minus sample timestamp must not grow over 60 s at real speed."""
    name = new_stream_name("drift")
    duration_s = 60.0
    path = save_recording_fif(make_recording(duration_s=duration_s), tmp_path)
    with (
        replayer_process(
            path, name, name, "--wait-consumers", "30", "--no-markers", log_dir=tmp_path
        ) as rp,
        LslSource(name=name, source_id=name) as src,
    ):
        got = pull_until(src, lambda p: HealthKind.LOST in p.kinds(), duration_s + 30)
        rp.proc.wait(10)
    np.testing.assert_array_equal(got.data[:, -1], np.arange(round(duration_s * SFREQ)))
    t_last = np.array([c.t_last for c in got.chunks])
    offset = np.array([c.t_arrival for c in got.chunks]) - t_last  # latency incl. wake-up
    head = np.median(offset[t_last < t_last[0] + 5])
    tail = np.median(offset[t_last > t_last[-1] - 5])
    slope = np.polyfit(t_last - t_last[0], offset, 1)[0]
    print(
        f"60 s replay: latency median {np.median(offset) * 1e3:.2f} ms, "
        f"p99 {np.percentile(offset, 99) * 1e3:.2f} ms; drift first-5-s vs last-5-s "
        f"{(tail - head) * 1e3:.3f} ms; fitted {slope * 60 * 1e3:.3f} ms / 60 s; "
        f"replayer: {rp.log().strip().splitlines()[-1]}"
    )
    assert abs(tail - head) < 1 / SFREQ
    assert abs(slope * duration_s) < 1 / SFREQ
    assert not [e for e in got.events if e.is_fault and e.kind is not HealthKind.LOST]


def test_main_reports_a_missing_file_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing_raw.fif")])
    assert exc.value.code == 2
    assert "missing_raw.fif" in capsys.readouterr().err


def test_start_skips_the_beginning_and_keeps_the_annotations_in_place():
    """`--start` (the demo replays the bundled file from 34 s): the data and the markers are the
    recording's from that second on."""
    from acquisition.readers import load_recording

    path = Path(__file__).resolve().parents[1] / "replay_data" / "sim_4ch_256hz.fif"
    raw = load_recording(path)
    full = Replayer(path, progress=False)
    late = Replayer(path, progress=False, start_s=34.0)
    skip = round(34.0 * raw.info["sfreq"])
    assert late.n_times == full.n_times - skip
    after = full._marker_idx > skip
    moved = late._marker_idx > 0
    assert late._marker_idx[moved].tolist() == (full._marker_idx[after] - skip).tolist()
    assert [d for d, m in zip(late._marker_desc, moved, strict=True) if m] == [
        d for d, a in zip(full._marker_desc, after, strict=True) if a
    ]
    # an annotation running across the start (the first mind-wandering block) starts at 0
    assert [d for d, m in zip(late._marker_desc, moved, strict=True) if not m] == ["mind_wandering"]
    with pytest.raises(ValueError, match="start_s"):
        Replayer(path, progress=False, start_s=1e6)

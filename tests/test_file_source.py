"""FileSource: exact data and timestamps for any chunk size, health events like a live source."""

from __future__ import annotations

import mne
import numpy as np
import pytest

from acquisition.chunk import HealthKind
from acquisition.file_source import FileSource
from acquisition.readers import RecordingError
from acquisition.simulator import replay_data_dir, simulate


@pytest.fixture(scope="module")
def raw() -> mne.io.RawArray:
    return simulate(12.0, 250.0, ["Fz", "Cz", "Pz", "Oz"], seed=5)


def _drain(src: FileSource) -> list:
    chunks = []
    while (c := src.pull()) is not None:
        chunks.append(c)
    return chunks


@pytest.mark.parametrize("chunk_size", [1, 7, 10, 32, 250, 2999, 3000, 5000])
def test_concatenation_exact(raw, chunk_size):
    with FileSource(raw, chunk_size=chunk_size, t0=100.25) as src:
        chunks = _drain(src)
        assert src.finished
        assert src.pull() is None
    data = np.concatenate([c.data for c in chunks])
    np.testing.assert_array_equal(data, raw.get_data().T)
    ts = np.concatenate([c.timestamps for c in chunks])
    np.testing.assert_array_equal(ts, 100.25 + np.arange(raw.n_times) / 250.0)
    assert all(c.n_samples == chunk_size for c in chunks[:-1])
    assert 1 <= chunks[-1].n_samples <= chunk_size
    assert all(np.isnan(c.t_arrival) for c in chunks)
    assert all(c.ch_names == tuple(raw.ch_names) for c in chunks)
    kinds = [e.kind for c in chunks for e in c.events]
    assert kinds == [HealthKind.CONNECTED, HealthKind.END]
    assert HealthKind.END in [e.kind for e in chunks[-1].events]


def test_file_path_and_properties():
    path = replay_data_dir() / "sim_4ch_256hz.fif"
    src = FileSource(path, chunk_size=16, picks="eeg", t0=5.0)
    assert src.ch_names == ("TP9", "AF7", "AF8", "TP10")
    assert src.n_channels == 4
    assert src.sfreq == 256.0
    assert src.duration_s == pytest.approx(180.0)
    assert src.counter_channel == "counter"  # used for checks though not served
    ann = src.annotations
    assert ann.orig_time is None
    raw = mne.io.read_raw_fif(path, verbose="error")
    np.testing.assert_allclose(ann.onset, 5.0 + raw.annotations.onset - raw.first_time)
    assert list(ann.description) == list(raw.annotations.description)
    with src:
        c = src.pull()
        assert c.data.shape == (16, 4)
        assert not c.data.flags.writeable  # a view of the one preallocated array
        assert c.data.base is not None


def test_picks_order_and_counter_exact(raw):
    src = FileSource(raw, chunk_size=64, picks=["Oz", "counter"])
    assert src.ch_names == ("Oz", "counter")
    data = np.concatenate([c.data for c in src])
    np.testing.assert_array_equal(data[:, 1], np.arange(raw.n_times))
    np.testing.assert_array_equal(data[:, 0], raw.get_data(picks="Oz")[0])


def _with(raw: mne.io.BaseRaw, edit) -> mne.io.RawArray:
    data = raw.get_data()
    edit(data)
    out = mne.io.RawArray(data, raw.info, verbose="error")
    return out.set_annotations(raw.annotations)


def test_nan_injection_gives_nonfinite(raw):
    def edit(d):
        d[1, 1000:1003] = np.nan
        d[2, 2000] = np.inf

    bad = _with(raw, edit)
    src = FileSource(bad, chunk_size=100, t0=10.0).connect()
    hits = [(c.timestamps[0], e) for c in src for e in c.events if e.kind == HealthKind.NONFINITE]
    assert len(hits) == 2
    (t_a, a), (_, b) = hits
    assert a.is_fault
    assert a.t_stream == 10.0 + 1000 / 250.0
    assert t_a == 10.0 + 1000 / 250.0  # chunk 10 starts at sample 1000
    assert "3 of 100" in a.detail
    assert "Cz" in a.detail
    assert b.t_stream == 10.0 + 2000 / 250.0
    assert "Pz" in b.detail


def test_nan_spanning_chunks_reported_per_chunk(raw):
    bad = _with(raw, lambda d: d.__setitem__((0, slice(95, 105)), np.nan))
    src = FileSource(bad, chunk_size=10).connect()
    flagged = [c.timestamps[0] * 250 for c in src if any(e.kind == "nonfinite" for e in c.events)]
    assert flagged == pytest.approx([90, 100])


def test_counter_gap_reported(raw):
    dropped = raw.copy().get_data()
    dropped = np.delete(dropped, np.s_[500:520], axis=1)  # 20 samples lost
    lossy = mne.io.RawArray(dropped, raw.info, verbose="error")
    src = FileSource(lossy, chunk_size=33).connect()
    gaps = [e for c in src for e in c.events if e.kind == HealthKind.COUNTER_GAP]
    assert len(gaps) == 1
    assert gaps[0].is_fault
    assert "499 -> 520" in gaps[0].detail
    assert "20 samples missing" in gaps[0].detail
    assert gaps[0].t_stream == 500 / 250.0


def test_no_counter_channel(raw):
    src = FileSource(raw.copy().pick("eeg"), chunk_size=50)
    assert src.counter_channel is None
    assert all(e.kind != HealthKind.COUNTER_GAP for c in src for e in c.events)
    src = FileSource(raw, counter_channel=None)
    assert src.counter_channel is None


def test_lifecycle(raw):
    src = FileSource(raw, chunk_size=1000)
    with pytest.raises(RuntimeError, match="before connect"):
        src.pull()
    src.connect()
    first = src.pull()
    src.connect()  # idempotent: does not rewind while connected
    assert src.position == 1000
    src.disconnect()
    src.disconnect()  # idempotent
    src.close()
    assert not src.connected
    src.connect()  # reconnect starts again
    again = src.pull()
    np.testing.assert_array_equal(first.data, again.data)
    assert [e.kind for e in again.events] == [HealthKind.CONNECTED]


def test_raw_not_modified(raw):
    before = raw.get_data().copy()
    for _ in FileSource(raw, chunk_size=100):
        pass
    np.testing.assert_array_equal(raw.get_data(), before)


def test_bad_arguments(raw, tmp_path):
    with pytest.raises(ValueError, match="chunk_size"):
        FileSource(raw, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        FileSource(raw, chunk_size=2.5)
    with pytest.raises(ValueError, match="t0"):
        FileSource(raw, t0=float("nan"))
    with pytest.raises(ValueError, match="nope"):
        FileSource(raw, picks=["nope"])
    with pytest.raises(RecordingError, match="not found"):
        FileSource(tmp_path / "missing.fif")


def test_cropped_raw_annotations_in_stream_time():
    """A Raw whose first sample is not at meas_date (first_samp > 0): onsets stay correct."""
    full = simulate(60.0, 200.0, ["Fz", "Oz"], seed=9)
    cropped = full.copy().crop(tmin=13.0)
    assert cropped.first_samp == 2600
    src = FileSource(cropped, t0=1000.0)
    ann = cropped.annotations  # onsets still count from meas_date; mne clipped the straddlers
    assert ann.orig_time is not None
    assert ann.onset[0] == pytest.approx(13.0)
    assert list(src.annotations.description) == list(ann.description)
    np.testing.assert_allclose(src.annotations.onset, 1000.0 + ann.onset - 13.0, atol=1e-9)
    assert src.annotations.onset[0] == pytest.approx(1000.0)
    first = next(iter(src))
    assert first.data[0, -1] == 2600  # the counter says which sample this is
    assert first.timestamps[0] == 1000.0

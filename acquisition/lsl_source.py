"""Live source: one numeric LSL stream in, `Chunk`s with health events out.

Life cycle like mne-lsl's `BaseStream`: `connect()` (blocking, bounded by `resolve_timeout_s`),
then `pull(timeout_s)` from the hot-path thread (never blocks longer than asked, except for a
bounded few-ms inlet handshake on reconnection), then `disconnect()` (idempotent).

Choices, with the numbers measured on this machine (pylsl 1.18.6 / liblsl 1.18, loopback):

- Loss: the inlet is opened with `recover=False`, so liblsl raises `LostError` as soon as the
  outlet's TCP connection closes: 5-17 ms after SIGKILL of the outlet process. With the
  default `recover=True` nothing is raised for > 20 s (liblsl silently waits to re-resolve).
  A hung or unreachable peer never closes its socket, so no `LostError` comes: it is STALE
  (a fault) at once, and LOST once it has also not answered resolver queries for
  `UNANSWERED_LOST_S` (a frozen replayer: STALE after 0.3 s, LOST ~4 s later).
- Reconnection without blocking: after a loss a `pylsl.ContinuousResolver` (liblsl resolves in
  its own thread) is polled every `RESTORE_POLL_S`; `results()` costs about 50 µs. A restarted
  outlet was RESTORED 0.1-1.8 s after it existed (the resolver queries in waves). The dead stream
  stays listed for `RESOLVER_FORGET_S`, so only a different uid counts at once; the same uid
  counts only once it is still listed after the forget time (it really is alive).
- Clock: no `proc_clocksync`. With it, the first pull that returns data blocks for 640 ms while
  liblsl gets its first time-correction estimate (measured), which on reconnection would stall
  the hot path. Instead `connect()` waits once for `time_correction()` (0.64 s) and `pull()`
  refreshes it with `time_correction(timeout=0.0)` (5 µs once an estimate exists; until then
  it raises TimeoutError and the last value is kept: the offset belongs to the host, not to
  the stream, so it survives an outlet restart). No `proc_dejitter` (tens of seconds to
  settle) and no `proc_monotonize` (it would hide the backward steps we want to report):
  timestamps are the raw sender timestamps plus the offset.
- Loss, not jitter: amplifier apps stamp chunks when they push them, so raw timestamp steps
  range from below zero to several periods with nothing missing. A clock model of the stream
  (acquisition/clock.py: lower envelope of timestamp against sample count, robust, following
  drift) says where each chunk should lie; GAP only when a chunk and the next both lie more than
  the jitter tolerance later (samples are missing), CLOCK_RESET when both lie that far earlier.
  A second model of the same kind on the arrival times (local clock) catches loss in a stream
  whose sender stamps by sample count (its timestamps never jump). `Chunk.timestamps` are the
  model's (dejittered: an exact grid at the fitted rate); `Chunk.raw_timestamps` the sender's
  plus the offset (the XDF recording holds the sender's).
- Units: values are converted to volts with each channel's `unit` from the stream description
  (`microvolts`, `millivolts`, `volts`, ..., or mne-lsl's power-of-ten codes such as `-6`).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pylsl
from pylsl.util import LostError
from pylsl.util import TimeoutError as LslTimeoutError

from acquisition import clock as clock_mod
from acquisition.chunk import Chunk, HealthEvent, HealthKind
from acquisition.clock import ClockModel
from acquisition.contract import Source

# liblsl keeps this many seconds of samples for a slow reader; a real-time loop that is this far
# behind has other problems, and a smaller buffer bounds memory for wide/fast streams.
INLET_MAX_BUFLEN_S = 30
# After the first match, how long to look for a second stream with the same name/type/source_id.
# On loopback the second answer comes within 1-3 ms of the first (measured), so 0.2 s is ample.
DUPLICATE_CHECK_S = 0.2
# While waiting for a stream that is not there: look this often, report this often.
WAIT_POLL_S = 0.02
WAIT_REPORT_S = 1.0
# How long to listen for streams when listing them in an error message.
LIST_FOR_ERROR_S = 0.5
# Refresh the clock offset this often (liblsl itself re-estimates it every few seconds).
TIME_CORRECTION_REFRESH_S = 5.0
# While lost, look at the background resolver's results at most this often.
RESTORE_POLL_S = 0.1
# A resolver forgets a vanished stream after this long; liblsl re-queries every ~1.75 s here
# (measured: with forget_after=1.0 a live stream flickered in and out), so stay well above it.
RESOLVER_FORGET_S = 5.0
# Stale and not answering resolver queries for this long -> LOST (two ~1.75 s query waves).
UNANSWERED_LOST_S = 4.0
# Bound on the blocking full-info fetch when reopening a restored stream (0.4-2.5 ms measured).
RESTORE_INFO_TIMEOUT_S = 0.05
# After the first sample of a chunk wakes a blocking pull, wait at most this long for the rest
# (see _wait_for_samples).
CHUNK_SETTLE_S = 3e-4
# How far a chunk may lie from the stream's clock model before it is suspect (see
# acquisition/clock.py). Measured here (benchmarks/bench_clock.py): push-time stamps with USB
# jitter and 16 ms FTDI bursts stay within ~17 ms of the model; a lost 10-sample chunk at
# 250 Hz is 40 ms, 30 samples at 1 kHz 30 ms. Never below MIN_TOLERANCE_PERIODS periods.
DEFAULT_JITTER_TOLERANCE_S = 0.020
MIN_TOLERANCE_PERIODS = 2.0
# A late chunk is a loss once the stamps stayed late (never less so) for this long of samples
# (at least the next chunk): bench_clock under load 6-10 gave 4 false gaps in 180 s x 12
# streams when the next chunk alone confirmed (senders late 21-35 ms for two 10-ms pushes),
# with detection 12 ms after the hole at 1 kHz; 40 ms keeps detection well within 100 ms.
TIMESTAMP_CONFIRM_S = 0.04
# The arrival check calls samples missing only when they arrived late for this long: a sender
# stamping by count shows loss only there, and so does a sender that lags (a loss stays, a lag
# is caught up). 0.3 s gave 3 false gaps in 36 stream-minutes with the test suite running
# beside bench_clock (senders 27-44 ms behind for 0.3 s); next-chunk confirmation many more.
# Its detection delay, for such senders only (a counter channel is exact and immediate).
ARRIVAL_CONFIRM_S = 1.0

_FORMAT_NAMES = {
    pylsl.cf_float32: "float32",
    pylsl.cf_double64: "float64",
    pylsl.cf_string: "string",
    pylsl.cf_int32: "int32",
    pylsl.cf_int16: "int16",
    pylsl.cf_int8: "int8",
    pylsl.cf_int64: "int64",
}
_FORMAT_DTYPES = {
    pylsl.cf_float32: np.float32,
    pylsl.cf_double64: np.float64,
    pylsl.cf_int32: np.int32,
    pylsl.cf_int16: np.int16,
    pylsl.cf_int8: np.int8,
    pylsl.cf_int64: np.int64,
}
# Unit strings (lower case) to the factor that turns the value into volts.
_VOLT_SCALES = {
    "v": 1.0, "volt": 1.0, "volts": 1.0,
    "mv": 1e-3, "millivolt": 1e-3, "millivolts": 1e-3,
    "uv": 1e-6, "µv": 1e-6, "μv": 1e-6, "microvolt": 1e-6, "microvolts": 1e-6,
    "nv": 1e-9, "nanovolt": 1e-9, "nanovolts": 1e-9,
}  # fmt: skip
# Channel / stream types whose unit-less values get `missing_unit` (electrophysiology).
_EXG_TYPES = frozenset({"eeg", "eog", "emg", "ecg", "exg", "seeg", "ecog", "dbs"})
# Channel types that are never EEG: a trigger / marker / counter / sensor channel that an
# amplifier app puts inside its EEG stream (XDF / mne-lsl / BrainVision type names).
NON_EEG_TYPES = frozenset(
    {
        "stim", "trigger", "trig", "marker", "markers", "event", "events", "status",
        "misc", "aux", "accel", "acc", "gyro", "counter", "timestamp", "resp", "bio",
        "eog", "emg", "ecg", "temp", "temperature", "battery", "validity",
    }
)  # fmt: skip


class StreamNotFoundError(RuntimeError):
    """No stream, or more than one, matches the requested name / type / source_id."""


def unit_scale(unit: str) -> float | None:
    """Factor turning a value in `unit` into volts; None if `unit` is not a voltage.

    Accepts names (`microvolts`, `uV`, `mV`, `volts`, ...) and mne-lsl's power-of-ten codes
    (`-6` for microvolts, `0` for the SI unit).
    """
    key = unit.strip().lower()
    if key in _VOLT_SCALES:
        return _VOLT_SCALES[key]
    try:
        exponent = int(key)
    except ValueError:
        return None
    return 10.0**exponent


@dataclass(frozen=True)
class StreamDescription:
    """What the network says about one stream (channel fields empty unless read from an inlet)."""

    name: str
    stype: str
    source_id: str
    hostname: str
    uid: str
    n_channels: int
    sfreq: float
    channel_format: str
    created_at: float
    ch_names: tuple[str, ...] = ()
    ch_units: tuple[str, ...] = ()
    ch_types: tuple[str, ...] = ()
    # closedloop's own Replayer declares its speed (desc/acquisition/speed); 1.0 otherwise.
    # Faster than 1, its timestamps (recording time) run ahead of the local clock by design.
    replay_speed: float = 1.0
    labelled: bool | None = None  # the description names the channels (None: not read)

    @classmethod
    def from_info(cls, info: pylsl.StreamInfo, with_channels: bool = False) -> StreamDescription:
        names: list[str] = []
        units: list[str] = []
        types: list[str] = []
        if with_channels:
            ch = info.desc().child("channels").child("channel")
            while not ch.empty() and len(names) < info.channel_count():
                names.append(ch.child_value("label"))
                units.append(ch.child_value("unit"))
                types.append(ch.child_value("type"))
                ch = ch.next_sibling("channel")
        n = info.channel_count()
        speed = 1.0
        if with_channels:
            acq = info.desc().child("acquisition")
            if acq.child_value("manufacturer") == "closedloop" and (
                acq.child_value("model") == "Replayer"
            ):
                try:
                    speed = float(acq.child_value("speed"))
                except ValueError:
                    speed = 1.0
        labelled = any(names) if with_channels else None
        if with_channels:
            # Missing or empty labels fall back to ch0, ch1, ...; missing units stay empty.
            names += [""] * (n - len(names))
            units += [""] * (n - len(units))
            types += [""] * (n - len(types))
            names = [label or f"ch{k}" for k, label in enumerate(names)]
        return cls(
            name=info.name(),
            stype=info.type(),
            source_id=info.source_id(),
            hostname=info.hostname(),
            uid=info.uid(),
            n_channels=n,
            sfreq=float(info.nominal_srate()),
            channel_format=_FORMAT_NAMES.get(info.channel_format(), str(info.channel_format())),
            created_at=float(info.created_at()),
            ch_names=tuple(names),
            ch_units=tuple(units),
            ch_types=tuple(types),
            replay_speed=speed if speed > 0 else 1.0,
            labelled=labelled,
        )

    def __str__(self) -> str:
        rate = f"{self.sfreq:g} Hz" if self.sfreq > 0 else "irregular"
        return (
            f"name={self.name!r} type={self.stype!r} source_id={self.source_id!r} "
            f"host={self.hostname!r} channels={self.n_channels} rate={rate} "
            f"format={self.channel_format}"
        )


def list_streams(timeout_s: float = 1.0) -> list[StreamDescription]:
    """All streams visible within `timeout_s` seconds, sorted by name (blocks `timeout_s`)."""
    found = {
        info.uid(): StreamDescription.from_info(info)
        for info in pylsl.resolve_streams(wait_time=timeout_s)
    }
    return sorted(found.values(), key=lambda d: (d.name, d.source_id, d.hostname))


def describe_streams(
    timeout_s: float = 1.0, info_timeout_s: float = 1.0
) -> list[StreamDescription]:
    """Like list_streams, with each stream's channel description (labels, units, types), read
    through a short-lived inlet (no data is subscribed). A stream that does not answer within
    info_timeout_s is listed without it (labelled None)."""
    found = {info.uid(): info for info in pylsl.resolve_streams(wait_time=timeout_s)}
    out = []
    for info in found.values():
        try:
            full = pylsl.StreamInlet(info, recover=False).info(timeout=info_timeout_s)
            out.append(StreamDescription.from_info(full, with_channels=True))
        except (LslTimeoutError, LostError):
            out.append(StreamDescription.from_info(info))
    return sorted(out, key=lambda d: (d.name, d.source_id, d.hostname))


def _xpath_literal(value: str, what: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{what} {value!r} contains both quote kinds; LSL's XPath cannot match it")


def build_predicate(name: str | None, stype: str | None, source_id: str | None) -> str:
    """XPath predicate selecting numeric streams with the given name / type / source_id."""
    parts = [
        f"{field}={_xpath_literal(value, field)}"
        for field, value in (("name", name), ("type", stype), ("source_id", source_id))
        if value is not None
    ]
    # String streams (markers) cannot become a Chunk; never select them.
    parts.append("channel_format!='string'")
    return " and ".join(parts)


class LslSource(Source):
    """Reads one numeric LSL stream; `pull()` always returns a `Chunk` (maybe 0 samples).

    Health is reported as `HealthEvent`s in `Chunk.events`, never as exceptions: CONNECTED
    (once), STALE / FLOWING, GAP, COUNTER_GAP, NONFINITE, LOST / RESTORED, MISMATCH.
    Not thread-safe: call `pull()` from one thread.
    """

    def __init__(
        self,
        name: str | None = None,
        stype: str | None = None,
        source_id: str | None = None,
        *,
        resolve_timeout_s: float = 5.0,
        stale_after_s: float = 0.5,
        max_chunk: int = 1024,
        counter_channel: str | None = "counter",
        expected_sfreq: float | None = None,
        expected_n_channels: int | None = None,
        missing_unit: str = "microvolts",
        jitter_tolerance_s: float = DEFAULT_JITTER_TOLERANCE_S,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        """Select a stream by any of name / stype / source_id (None: any).

        stale_after_s: no sample for longer than this (local clock) -> STALE.
        max_chunk: most samples returned by one pull (the pull buffer is max_chunk x n_channels).
        counter_channel: label of a sample-counter channel; COUNTER_GAP when it skips.
        missing_unit: unit assumed for EEG-like channels (by channel type, else stream type)
            whose description gives none (the LSL / XDF convention for EEG is microvolts);
            other unit-less channels and the counter channel are passed through unscaled.
        jitter_tolerance_s: how far (seconds) a chunk may lie from the clock model before it
            counts as loss (late) or a clock reset (early); raised to 2 sample periods.
        on_wait: called with 'waiting for stream ..., 12 s' every second while resolve() waits
            for a stream that is not there (yet): start order does not matter.
        """
        if resolve_timeout_s <= 0 or not math.isfinite(resolve_timeout_s):
            raise ValueError(f"resolve_timeout_s must be > 0 and finite, got {resolve_timeout_s}")
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
        if expected_sfreq is not None and expected_sfreq < 0:
            raise ValueError(f"expected_sfreq must be >= 0, got {expected_sfreq}")
        if expected_n_channels is not None and expected_n_channels < 1:
            raise ValueError(f"expected_n_channels must be >= 1, got {expected_n_channels}")
        if not 0 < jitter_tolerance_s <= 10 or not math.isfinite(jitter_tolerance_s):
            raise ValueError(f"jitter_tolerance_s must be in (0, 10], got {jitter_tolerance_s}")
        if unit_scale(missing_unit) is None:
            raise ValueError(f"missing_unit {missing_unit!r} is not a voltage unit")
        self._pred = build_predicate(name, stype, source_id)
        self._name = name
        self._stype = stype
        self._source_id = source_id
        self._resolve_timeout_s = float(resolve_timeout_s)
        self._stale_after_s = float(stale_after_s)
        self._max_chunk = int(max_chunk)
        self._counter_channel = counter_channel
        self._expected_sfreq = expected_sfreq
        self._expected_n_channels = expected_n_channels
        self._missing_unit = missing_unit
        self._jitter_tolerance_s = float(jitter_tolerance_s)
        self.on_wait = on_wait
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        """All per-connection state, in one place."""
        self._inlet: pylsl.StreamInlet | None = None
        self._resolved_inlet: pylsl.StreamInlet | None = None  # resolve() done, not subscribed
        self._resolved_found: pylsl.StreamInfo | None = None
        self._desc: StreamDescription | None = None
        self._buffer: np.ndarray | None = None
        self._buffer_tail: memoryview | None = None
        self._recent_sizes: deque[int] = deque(maxlen=8)  # samples per pull, for the wait
        self._scales: np.ndarray | None = None
        self._scaled = False
        self._counter_idx: int | None = None
        self._clock: ClockModel | None = None  # timestamps against sample count
        self._arrival: ClockModel | None = None  # arrival (local clock) against sample count
        self._empty_data = np.zeros((0, 0))
        self._empty_ts = np.zeros(0)
        self._time_correction = 0.0
        self._next_tc_refresh = math.inf
        self._pending: list[HealthEvent] = []
        self._connected = False
        self._last_ts = math.nan
        self._last_counter = math.nan
        self._last_sample_local = math.nan
        self._stale = False
        self._lost = False
        self._lost_at = math.nan
        self._lost_uid = ""
        self._refused: set[str] = set()  # uids of restored streams with another layout
        self._resolver: pylsl.ContinuousResolver | None = None
        self._next_restore_poll = 0.0
        self._liveness: pylsl.ContinuousResolver | None = None
        self._liveness_since = math.nan
        self._next_liveness_poll = 0.0
        self._n_received = 0
        self._warnings: list[str] = []
        self._eeg_mask: tuple[bool, ...] = ()

    # -------------------------------------------------------------- life cycle
    def resolve(self) -> LslSource:
        """Find the stream and read its description, without subscribing to its data.

        After this, ch_names / sfreq / info are known but the outlet has no consumer yet
        (measured: inlet.info() and time_correction() do not make have_consumers() true), so a
        session can set up its recorder before a replayer that waits for consumers starts.
        Raises StreamNotFoundError (listing the visible streams) if none or several match.
        """
        if self._resolved_inlet is not None or self._connected:
            return self
        found = self._wait_for_stream()
        if not found:
            raise StreamNotFoundError(self._not_found_message("No LSL stream matches"))
        # resolve_bypred returns once `minimum` streams answered, so ask again for two.
        both = pylsl.resolve_bypred(self._pred, 2, DUPLICATE_CHECK_S)
        uids = {info.uid() for info in [*found, *both]}
        if len(uids) > 1:
            raise StreamNotFoundError(
                self._not_found_message(f"{len(uids)} LSL streams match (need exactly one)")
            )
        inlet = self._open_inlet(found[0])
        try:
            full = inlet.info(timeout=self._resolve_timeout_s)
            # The first estimate takes ~0.64 s (measured); later calls are instantaneous.
            # Subscribe only afterwards, so the first pull does not start with that backlog.
            self._time_correction = inlet.time_correction(timeout=self._resolve_timeout_s)
        except (LslTimeoutError, LostError) as exc:
            raise StreamNotFoundError(
                f"found {StreamDescription.from_info(found[0])} but could not open it within "
                f"{self._resolve_timeout_s:g} s: {exc}"
            ) from exc
        self._resolved_inlet = inlet
        self._resolved_found = found[0]
        self._setup_layout(StreamDescription.from_info(full, with_channels=True))
        return self

    def _wait_for_stream(self) -> list[pylsl.StreamInfo]:
        """Poll a background resolver until a stream matches or resolve_timeout_s passes,
        telling on_wait every WAIT_REPORT_S: a session may start before the amplifier.

        (A ContinuousResolver finds a stream that is there in 6-17 ms and one that appears
        within its next query wave, <= ~1.8 s; a blocking resolve_bypred(wait_time=0.5) took
        5.5 s in 3 calls of 6 here when nothing matched.)"""
        t0 = time.monotonic()
        deadline = t0 + self._resolve_timeout_s
        next_report = t0 + WAIT_REPORT_S  # a stream that is there is found at once: no noise
        resolver = pylsl.ContinuousResolver(pred=self._pred, forget_after=RESOLVER_FORGET_S)
        while True:
            found = resolver.results()
            now = time.monotonic()
            if found or now >= deadline:
                return list(found)
            if self.on_wait is not None and now >= next_report:
                next_report += WAIT_REPORT_S
                self.on_wait(
                    f"waiting for stream {self._wanted()}, {now - t0:.0f} s "
                    f"(gives up after {self._resolve_timeout_s:g} s)"
                )
            time.sleep(min(WAIT_POLL_S, max(0.0, deadline - now)))

    def connect(self) -> LslSource:
        """Resolve (if not done yet), then subscribe (blocks up to about 2 x resolve_timeout_s).

        Raises StreamNotFoundError (listing the visible streams) if none or several match.
        """
        if self._connected:
            return self
        self.resolve()
        inlet = self._resolved_inlet
        try:
            inlet.open_stream(timeout=self._resolve_timeout_s)
        except (LslTimeoutError, LostError) as exc:
            raise StreamNotFoundError(
                f"found {StreamDescription.from_info(self._resolved_found)} but could not open "
                f"it within {self._resolve_timeout_s:g} s: {exc}"
            ) from exc
        self._resolved_inlet = None
        now = pylsl.local_clock()
        self._next_tc_refresh = now + TIME_CORRECTION_REFRESH_S
        self._inlet = inlet
        self._connected = True
        self._last_sample_local = now
        self._pending.append(HealthEvent(HealthKind.CONNECTED, math.nan, now, str(self._desc)))
        self._check_expected(now, self._pending)
        return self

    def disconnect(self) -> None:
        """Close the inlet (idempotent)."""
        self._inlet = None  # pylsl destroys the inlet in __del__
        self._resolver = None
        self._reset()

    close = disconnect

    def __enter__(self) -> LslSource:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    def __repr__(self) -> str:
        state = "lost" if self._lost else "connected" if self._connected else "not connected"
        return f"<LslSource {self._pred!r} {state}>"

    # -------------------------------------------------------------- properties
    @property
    def connected(self) -> bool:
        """True between connect() and disconnect(), also while the stream is lost."""
        return self._connected

    @property
    def lost(self) -> bool:
        return self._lost

    @property
    def stale(self) -> bool:
        return self._stale

    @property
    def info(self) -> StreamDescription:
        """Description of the connected stream, with channel labels, units and types."""
        return self._require_desc()

    @property
    def ch_names(self) -> tuple[str, ...]:
        return self._require_desc().ch_names

    @property
    def ch_types(self) -> tuple[str, ...] | None:
        return self._require_desc().ch_types or None

    @property
    def source_id(self) -> str | None:
        return self._require_desc().source_id or None

    @property
    def sfreq(self) -> float:
        return self._require_desc().sfreq

    @property
    def n_channels(self) -> int:
        return self._require_desc().n_channels

    @property
    def scales(self) -> np.ndarray:
        """Per-channel factor applied to the stream's values, shape (n_channels,)."""
        self._require_desc()
        assert self._scales is not None
        return self._scales.copy()

    @property
    def replay_speed(self) -> float:
        """The speed closedloop's Replayer declares for this stream (1.0 for any other)."""
        return self._require_desc().replay_speed

    @property
    def time_correction(self) -> float:
        """Seconds added to sender timestamps to map them to this machine's LSL clock."""
        return self._time_correction

    @property
    def warnings(self) -> list[str]:
        """What the stream's description lacks (labels, units), as sentences."""
        self._require_desc()
        return list(self._warnings)

    @property
    def eeg_mask(self) -> tuple[bool, ...]:
        """Per channel: not a trigger / marker / counter / other non-EEG channel by its type
        (NON_EEG_TYPES) or the counter channel. Names are left to preprocess.exclude."""
        self._require_desc()
        return self._eeg_mask

    @property
    def jitter_tolerance_s(self) -> float:
        """The tolerance in use: the one asked for, at least 2 sample periods (nan if unknown)."""
        return self._clock.tolerance_s if self._clock is not None else math.nan

    @property
    def clock(self) -> ClockModel | None:
        """The stream's clock model (None before connect or for an irregular stream)."""
        return self._clock

    @property
    def n_received(self) -> int:
        """Samples received since connect()."""
        return self._n_received

    def _require_desc(self) -> StreamDescription:
        if self._desc is None:
            raise RuntimeError("LslSource is not connected; call connect() first")
        return self._desc

    # -------------------------------------------------------------------- pull
    def pull(self, timeout_s: float = 0.0) -> Chunk:
        """Samples that arrived since the last pull, at most max_chunk.

        timeout_s: if nothing is there, wait up to this long for the first sample (liblsl wakes
        up as soon as one arrives). Returns a Chunk with 0 samples when nothing came.
        """
        if not self._connected:
            raise RuntimeError("LslSource is not connected; call connect() first")
        events = self._pending
        self._pending = []
        if self._lost:
            self._wait_for_restore(timeout_s, events)
            return self._empty_chunk(events, pylsl.local_clock())
        inlet = self._inlet
        buffer = self._buffer
        assert inlet is not None
        assert buffer is not None
        try:
            _, ts = inlet.pull_chunk(
                timeout=0.0, max_samples=self._max_chunk, dest_obj=buffer, as_numpy=True
            )
            if ts.shape[0] == 0 and timeout_s > 0.0:
                ts = self._wait_for_samples(inlet, timeout_s)
        except LostError:
            now = pylsl.local_clock()
            self._on_lost(now, events)
            return self._empty_chunk(events, now)
        now = pylsl.local_clock()
        n = ts.shape[0]
        if n == 0:
            if not self._stale and now - self._last_sample_local > self._stale_after_s:
                self._stale = True
                events.append(
                    HealthEvent(
                        HealthKind.STALE,
                        self._last_ts,
                        now,
                        f"no sample for {now - self._last_sample_local:.3f} s "
                        f"(limit {self._stale_after_s} s)",
                    )
                )
                self._start_liveness_check(now)
            elif self._liveness is not None and now >= self._next_liveness_poll:
                self._check_liveness(now, events)
            return self._empty_chunk(events, now)

        if now >= self._next_tc_refresh:
            self._refresh_time_correction(inlet, now)
        np.add(ts, self._time_correction, out=ts)  # raw stamps (ts is pylsl's new array)
        timestamps = ts if self._clock is None else np.empty(n)  # the chunk owns both arrays
        if self._scaled:
            data = np.multiply(buffer[:n], self._scales, dtype=np.float64)
        else:
            data = buffer[:n].astype(np.float64)

        if self._stale:
            self._stale = False
            self._liveness = None
            if self._arrival is not None:  # a pause is no loss if the timestamps say so
                self._arrival.reset(keep_slope=True)
            events.append(
                HealthEvent(
                    HealthKind.FLOWING,
                    float(timestamps[0]),
                    now,
                    f"samples again after {now - self._last_sample_local:.3f} s",
                )
            )
        if self._clock is not None:
            self._check_clock(ts, timestamps, now, events)
        self._last_ts = float(timestamps[-1])
        if self._counter_idx is not None:
            self._check_counter(data[:, self._counter_idx], timestamps, now, events)
        if not np.isfinite(data).all():
            bad = ~np.isfinite(data)
            first = int(np.argmax(bad.any(axis=1)))
            chans = [self._require_desc().ch_names[k] for k in np.flatnonzero(bad.any(axis=0))]
            events.append(
                HealthEvent(
                    HealthKind.NONFINITE,
                    float(timestamps[first]),
                    now,
                    f"{int(bad.sum())} non-finite values in channels {', '.join(chans)}",
                )
            )
        self._last_sample_local = now
        self._n_received += n
        self._recent_sizes.append(n)
        desc = self._require_desc()
        return Chunk(data, timestamps, desc.ch_names, desc.sfreq, tuple(events), now, ts)

    def _wait_for_samples(self, inlet: pylsl.StreamInlet, timeout_s: float) -> np.ndarray:
        """Block (in liblsl) until one sample arrives, then take the rest of its chunk.

        liblsl wakes the waiter as soon as the first sample of a chunk is queued, before the
        rest: draining at once split 10-sample chunks into 1 + 9 (measured: 48 of 250 chunks,
        so the lone sample waited 36 ms for nothing). So the rest is polled for until the
        usual chunk size (the largest of the last few pulls) is in, at most CHUNK_SETTLE_S; a
        fixed sleep of that time kept every chunk whole too, but cost ~0.16 ms on every chunk.
        """
        _, first = inlet.pull_chunk(
            timeout=timeout_s, max_samples=1, dest_obj=self._buffer, as_numpy=True
        )
        if first.shape[0] == 0 or self._max_chunk == 1:
            return first
        want = max(self._recent_sizes, default=self._max_chunk)
        parts, got = [first], 1
        row = self._buffer[0].nbytes
        deadline = time.perf_counter() + CHUNK_SETTLE_S
        while True:
            _, rest = inlet.pull_chunk(
                timeout=0.0,
                max_samples=self._max_chunk - got,
                dest_obj=self._buffer_tail[(got - 1) * row :],
                as_numpy=True,
            )
            if rest.shape[0]:
                parts.append(rest)
                got += rest.shape[0]
            if got >= want or got >= self._max_chunk or time.perf_counter() >= deadline:
                break
            os.sched_yield()  # let liblsl's receiving thread queue the rest (2 cores here)
        return np.concatenate(parts) if len(parts) > 1 else first

    # ------------------------------------------------------------ health checks
    def _check_clock(
        self, raw: np.ndarray, out: np.ndarray, now: float, events: list[HealthEvent]
    ) -> None:
        """Judge the chunk against the clock models; `out` gets the dejittered stamps."""
        clock, arrival = self._clock, self._arrival
        assert clock is not None
        assert arrival is not None
        verdict = clock.update(raw, out)
        n = raw.shape[0]
        tol_ms = clock.tolerance_s * 1e3
        if verdict == clock_mod.GAP:
            events.append(
                HealthEvent(
                    HealthKind.GAP,
                    clock.t_event,
                    now,
                    f"~{clock.missing} sample(s) missing: timestamps "
                    f"{clock.excess_s * 1e3:.1f} ms later than the stream clock expects, for "
                    f"{TIMESTAMP_CONFIRM_S * 1e3:g} ms of samples (jitter tolerance {tol_ms:g} ms)",
                )
            )
        elif verdict == clock_mod.RESET:
            events.append(
                HealthEvent(
                    HealthKind.CLOCK_RESET,
                    clock.t_event,
                    now,
                    f"timestamps jumped back {-clock.excess_s * 1e3:.1f} ms against the stream "
                    f"clock, two chunks running (jitter tolerance {tol_ms:g} ms)",
                )
            )
        elif verdict == clock_mod.RATE:
            events.append(
                HealthEvent(
                    HealthKind.GAP,
                    clock.t_event,
                    now,
                    f"effective rate {clock.rate_hz:.2f} Hz is more than "
                    f"{clock_mod.MAX_RATE_SHORTFALL:.0%} below the nominal {clock.sfreq:g} Hz "
                    "(samples lost a few at a time)",
                )
            )
        if verdict != clock_mod.OK:
            arrival.reset(keep_slope=True)  # one event per loss: the arrival line restarts
        if n >= self._max_chunk:
            arrival.skip(n)  # a backlog: its last sample did not just arrive
            return
        verdict = arrival.update_backdated(now, n)
        if verdict == clock_mod.GAP:
            events.append(
                HealthEvent(
                    HealthKind.GAP,
                    float(out[0]),
                    now,
                    f"~{arrival.missing} sample(s) missing: samples arrive "
                    f"{arrival.excess_s * 1e3:.1f} ms later than their count says, for "
                    f"{ARRIVAL_CONFIRM_S:g} s, while their timestamps are continuous (jitter "
                    f"tolerance {tol_ms:g} ms)",
                )
            )
        elif verdict == clock_mod.RATE:
            events.append(
                HealthEvent(
                    HealthKind.GAP,
                    float(out[0]),
                    now,
                    f"samples arrive at {arrival.rate_hz:.2f} Hz, more than "
                    f"{clock_mod.MAX_RATE_SHORTFALL:.0%} below the nominal {arrival.sfreq:g} Hz",
                )
            )

    def _check_counter(
        self, counter: np.ndarray, ts: np.ndarray, now: float, events: list[HealthEvent]
    ) -> None:
        if math.isnan(self._last_counter):
            steps = np.diff(counter)
            offset = 1
        else:
            steps = np.diff(counter, prepend=self._last_counter)
            offset = 0
        self._last_counter = float(counter[-1])
        bad = steps != 1.0
        if not bad.any():
            return
        idx = np.flatnonzero(bad)
        first = int(idx[0])
        missing = float(np.nansum(steps[idx] - 1.0))
        events.append(
            HealthEvent(
                HealthKind.COUNTER_GAP,
                float(ts[first + offset]),
                now,
                f"counter {self._counter_channel!r} jumped {idx.size} time(s) "
                f"(first by {steps[first]:g} at value {counter[first + offset]:g}); "
                f"{missing:g} samples missing in total",
            )
        )

    def _check_expected(self, now: float, events: list[HealthEvent]) -> None:
        desc = self._require_desc()
        problems = []
        exp_fs = self._expected_sfreq
        if exp_fs is not None and not math.isclose(desc.sfreq, exp_fs, rel_tol=1e-9):
            problems.append(f"sfreq {desc.sfreq:g} Hz, expected {exp_fs:g} Hz")
        exp_n = self._expected_n_channels
        if exp_n is not None and desc.n_channels != exp_n:
            problems.append(f"{desc.n_channels} channels, expected {exp_n}")
        if problems:
            events.append(HealthEvent(HealthKind.MISMATCH, math.nan, now, "; ".join(problems)))

    def _refresh_time_correction(self, inlet: pylsl.StreamInlet, now: float) -> None:
        try:
            self._time_correction = inlet.time_correction(timeout=0.0)
            self._next_tc_refresh = now + TIME_CORRECTION_REFRESH_S
        except (LslTimeoutError, LostError):
            # No estimate yet (new inlet: ~0.65 s) or lost (the next pull reports it).
            self._next_tc_refresh = now + RESTORE_POLL_S

    # ---------------------------------------------------------- loss / restore
    def _on_lost(
        self, now: float, events: list[HealthEvent], why: str = "connection closed"
    ) -> None:
        desc = self._require_desc()
        self._lost = True
        self._lost_at = now
        self._lost_uid = desc.uid
        self._inlet = None
        self._liveness = None
        # Resolution runs in liblsl's thread; results() is a ~50 µs non-blocking read.
        self._resolver = pylsl.ContinuousResolver(
            pred=self._restore_predicate(), forget_after=RESOLVER_FORGET_S
        )
        self._next_restore_poll = now + RESTORE_POLL_S
        since = now - self._last_sample_local
        events.append(
            HealthEvent(
                HealthKind.LOST,
                self._last_ts,
                now,
                f"stream {desc.name!r} (uid {desc.uid}) lost ({why}); "
                f"last sample {since:.3f} s ago",
            )
        )

    def _start_liveness_check(self, now: float) -> None:
        """While stale, ask the network whether the stream still answers (see _check_liveness)."""
        self._liveness = pylsl.ContinuousResolver(
            pred=self._restore_predicate(), forget_after=UNANSWERED_LOST_S
        )
        self._liveness_since = now
        self._next_liveness_poll = now + RESTORE_POLL_S

    def _check_liveness(self, now: float, events: list[HealthEvent]) -> None:
        """A hung or unreachable peer (crash, cable, frozen app) never closes its socket, so no
        LostError comes. If the stream stays stale and does not answer resolver queries for
        UNANSWERED_LOST_S, declare it LOST (a restarted outlet then gets RESTORED). A live
        stream answers a fresh resolver within ~10 ms (measured); a quiet but alive one stays
        only STALE."""
        self._next_liveness_poll = now + RESTORE_POLL_S
        assert self._liveness is not None
        uid = self._require_desc().uid
        # The resolver drops a stream UNANSWERED_LOST_S after its last answer, so "not listed"
        # means "silent on the network that long" (or never answered since we started asking).
        listed = any(info.uid() == uid for info in self._liveness.results())
        if not listed and now - self._liveness_since > UNANSWERED_LOST_S:
            self._liveness = None
            self._on_lost(
                now,
                events,
                f"no data, and no answer to resolver queries for {UNANSWERED_LOST_S:g} s",
            )

    def _restore_predicate(self) -> str:
        """Only the same device may come back: the stream's own name and source_id (the
        user's selector may be as loose as type='EEG', which another amplifier matches)."""
        desc = self._require_desc()
        try:
            return build_predicate(desc.name, self._stype, desc.source_id or None)
        except ValueError:
            return self._pred

    def _wait_for_restore(self, timeout_s: float, events: list[HealthEvent]) -> None:
        now = pylsl.local_clock()
        deadline = now + max(timeout_s, 0.0)
        while True:
            if now >= self._next_restore_poll and self._try_restore(now, events):
                return
            if now >= deadline:
                return
            time.sleep(min(deadline, self._next_restore_poll) - now)
            now = pylsl.local_clock()

    def _try_restore(self, now: float, events: list[HealthEvent]) -> bool:
        self._next_restore_poll = now + RESTORE_POLL_S
        assert self._resolver is not None
        candidates = [i for i in self._resolver.results() if i.uid() not in self._refused]
        fresh = [info for info in candidates if info.uid() != self._lost_uid]
        if not fresh and now - self._lost_at > RESOLVER_FORGET_S + RESTORE_POLL_S:
            fresh = candidates  # still listed after the forget time: the old stream is alive
        if not fresh:
            return False
        info = max(fresh, key=lambda i: i.created_at())
        inlet = self._open_inlet(info)
        try:
            full = inlet.info(timeout=RESTORE_INFO_TIMEOUT_S)
        except (LslTimeoutError, LostError):
            return False  # listed but not reachable (yet); try again at the next poll
        old = self._require_desc()
        new = StreamDescription.from_info(full, with_channels=True)
        now = pylsl.local_clock()
        if (new.n_channels, new.sfreq, new.ch_names, new.channel_format) != (
            old.n_channels,
            old.sfreq,
            old.ch_names,
            old.channel_format,
        ):
            # Another rate or channel set: the pipeline was built for the old one. Refuse it
            # (once per uid), stay lost, keep looking for the stream we had.
            self._refused.add(new.uid)
            events.append(
                HealthEvent(
                    HealthKind.MISMATCH,
                    math.nan,
                    now,
                    f"stream {new.name!r} is back with another layout, refused: "
                    f"{old.n_channels} ch @ {old.sfreq:g} Hz {old.channel_format} "
                    f"{list(old.ch_names)} -> {new.n_channels} ch @ {new.sfreq:g} Hz "
                    f"{new.channel_format} {list(new.ch_names)}; still waiting for the original "
                    "(restart the session to use the new one)",
                )
            )
            return False
        self._inlet = inlet
        self._resolver = None
        self._lost = False
        self._setup_layout(new)
        # A restarted stream starts a new timeline and counter: continuity checks restart
        # (_setup_layout made new clock models).
        self._last_ts = math.nan
        self._last_counter = math.nan
        self._last_sample_local = now
        self._next_tc_refresh = now  # keep the host's offset until the new inlet has its own
        changed = "uid changed (restarted)" if new.uid != old.uid else "same uid"
        events.append(
            HealthEvent(
                HealthKind.RESTORED,
                math.nan,
                now,
                f"{changed}: uid {old.uid} -> {new.uid}; down {now - self._lost_at:.3f} s; "
                f"{len(fresh)} candidate(s)",
            )
        )
        self._check_expected(now, events)
        return True

    # ------------------------------------------------------------------ helpers
    def _open_inlet(self, info: pylsl.StreamInfo) -> pylsl.StreamInlet:
        return pylsl.StreamInlet(
            info,
            max_buflen=INLET_MAX_BUFLEN_S,
            recover=False,  # see the module docstring: loss must raise, not hide for ~15 s
            processing_flags=pylsl.proc_none,
        )

    def _setup_layout(self, desc: StreamDescription) -> None:
        """Buffers, unit scales and counter index for a stream (at connect / restore)."""
        fmt = pylsl.cf_float32
        for code, fmt_name in _FORMAT_NAMES.items():
            if fmt_name == desc.channel_format:
                fmt = code
        if fmt not in _FORMAT_DTYPES:
            raise StreamNotFoundError(f"stream {desc} is not numeric")
        n_ch = desc.n_channels
        self._desc = desc
        self._buffer = np.zeros((self._max_chunk, n_ch), dtype=_FORMAT_DTYPES[fmt])
        # The same memory from the second sample on (for the rest of a chunk, see pull()).
        self._buffer_tail = memoryview(self._buffer).cast("B")[self._buffer[0].nbytes :]
        self._empty_data = np.zeros((0, n_ch))
        self._counter_idx = (
            desc.ch_names.index(self._counter_channel)
            if self._counter_channel in desc.ch_names
            else None
        )
        default_scale = unit_scale(self._missing_unit)
        scales = np.ones(n_ch)
        assumed = []
        for k, (unit, ch_type) in enumerate(zip(desc.ch_units, desc.ch_types, strict=True)):
            if k == self._counter_idx:
                continue
            if unit.strip() == "":
                kind = (ch_type or desc.stype).strip().lower()
                scales[k] = default_scale if kind in _EXG_TYPES else 1.0
                if kind in _EXG_TYPES:
                    assumed.append(desc.ch_names[k])
            else:
                scale = unit_scale(unit)
                scales[k] = 1.0 if scale is None else scale  # not a voltage: keep as is
        self._scales = scales
        self._scaled = bool(np.any(scales != 1.0))
        # What a real app's stream lacks, said once (the session puts it in its summary).
        self._warnings = []
        if desc.labelled is False:
            self._warnings.append(
                f"stream {desc.name!r} has no channel labels: channels named by index "
                f"(ch0 .. ch{n_ch - 1}); channel-specific settings cannot match them"
            )
        if assumed:
            self._warnings.append(
                f"stream {desc.name!r} gives no unit for {len(assumed)} EEG channel(s): assumed "
                f"{self._missing_unit} (source.missing_unit)"
            )
        self._eeg_mask = tuple(
            (t or "").strip().lower() not in NON_EEG_TYPES and k != self._counter_idx
            for k, t in enumerate(desc.ch_types)
        )
        if desc.sfreq > 0:
            tol = max(self._jitter_tolerance_s, MIN_TOLERANCE_PERIODS / desc.sfreq)
            self._clock = ClockModel(
                desc.sfreq, tol, self._max_chunk, confirm_s=TIMESTAMP_CONFIRM_S
            )
            self._arrival = ClockModel(
                desc.sfreq, tol, self._max_chunk, report_early=False, confirm_s=ARRIVAL_CONFIRM_S
            )
        else:  # irregular rate: no clock to hold samples against
            self._clock = self._arrival = None

    def _empty_chunk(self, events: list[HealthEvent], now: float) -> Chunk:
        desc = self._require_desc()
        return Chunk(
            self._empty_data, self._empty_ts, desc.ch_names, desc.sfreq, tuple(events), now
        )

    def _wanted(self) -> str:
        return (
            ", ".join(
                f"{k}={v!r}"
                for k, v in (
                    ("name", self._name),
                    ("type", self._stype),
                    ("source_id", self._source_id),
                )
                if v is not None
            )
            or "any numeric stream"
        )

    def _not_found_message(self, head: str) -> str:
        visible = list_streams(LIST_FOR_ERROR_S)
        lines = [f"{head} ({self._wanted()}) within {self._resolve_timeout_s:g} s."]
        if visible:
            lines.append("Visible streams:")
            lines += [f"  {d}" for d in visible]
        else:
            lines.append("No LSL streams are visible on this network.")
        return "\n".join(lines)

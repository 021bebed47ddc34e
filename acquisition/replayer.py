"""Replay a recording as a live LSL stream (like mne-lsl's `PlayerLSL`, and more).

- EEG outlet (float32) with full channel metadata (label, unit, type) and acquisition info.
  Electrophysiological channels (EEG/EOG/EMG/ECG/...) are sent in microvolts with unit
  `microvolts`, as most LSL EEG tools expect; `LslSource` converts back to volts.
- Timestamps on an exact grid `t_start + i / sfreq`, pushed explicitly per sample, so nothing
  accumulates rounding and loops continue the grid (timestamps and the counter keep rising).
- The chunk holding sample i is pushed at wall time `t_start + i_last / (sfreq * speed)`: the
  schedule is recomputed from the start time for every chunk (never accumulates sleep error);
  pushes later than one chunk period are counted as overruns. `speed=inf` / `fast=True`
  pushes with no sleeping at all. At speed != 1 the timestamps stay on the recording's grid
  (stream time is recording time), so decisions match a real-time replay.
- Annotations go to an irregular-rate string outlet `<name>-markers` with explicit timestamps
  on the same grid, pushed when the replay reaches their onset.
- Optional sample-counter channel (`counter`) for recordings that have none.

Run `python -m acquisition.replayer FILE --speed 1 --loop forever` (see `--help`).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mne
import numpy as np
import pylsl
from tqdm import tqdm

from acquisition.readers import RecordingError, load_recording

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

COUNTER_CHANNEL = "counter"
DEFAULT_NAME = "closedloop-replay"
# Keep the outlets open this long after the last push so consumers receive the tail.
END_LINGER_S = 0.5
# Poll interval while waiting for a consumer (only matters for how fast stop() is honoured).
CONSUMER_POLL_S = 0.1
# Channel types sent in microvolts (their mne unit is volts).
MICROVOLT_TYPES = frozenset({"eeg", "eog", "emg", "ecg", "seeg", "ecog", "dbs", "bio"})
# float32 holds integers exactly up to 2**24: the counter is exact for 18.6 h at 250 Hz.
_FLOAT32_EXACT_MAX = 2**24


@dataclass
class ReplayStats:
    """What a replay did. Lateness is wall time after the scheduled push time."""

    samples_pushed: int = 0
    chunks_pushed: int = 0
    markers_pushed: int = 0
    loops_completed: int = 0
    overruns: int = 0
    max_late_s: float = 0.0
    t_start: float = math.nan  # LSL timestamp of sample 0
    t_stop: float = math.nan  # local_clock() when streaming ended
    stopped_early: bool = False

    def summary(self) -> str:
        return (
            f"pushed {self.samples_pushed} samples in {self.chunks_pushed} chunks, "
            f"{self.markers_pushed} markers, {self.loops_completed} loop(s) completed; "
            f"{self.overruns} overrun(s), latest push {self.max_late_s * 1e3:.2f} ms late"
            + (" (stopped early)" if self.stopped_early else "")
        )


def _load(raw_or_path: mne.io.BaseRaw | str | Path) -> mne.io.BaseRaw:
    if isinstance(raw_or_path, mne.io.BaseRaw):
        return raw_or_path.copy().load_data(verbose=False)
    return load_recording(raw_or_path)


class Replayer:
    """Stream a recording over LSL. `run()` blocks; `start()` / `stop()` use a thread."""

    def __init__(
        self,
        raw_or_path: mne.io.BaseRaw | str | Path,
        name: str = DEFAULT_NAME,
        source_id: str | None = None,
        *,
        chunk_size: int = 10,
        speed: float = 1.0,
        loop: int | None = 1,
        add_counter: bool = False,
        stype: str = "EEG",
        marker_stream: bool = True,
        fast: bool = False,
        progress: bool = True,
        wait_for_consumers_s: float = 0.0,
        drop: tuple[int, int] | None = None,
        start_s: float = 0.0,
    ) -> None:
        """Prepare the data (in stream units) and the stream descriptions.

        chunk_size: samples per push. speed: replay speed factor (inf: as fast as possible).
        loop: number of passes through the recording, None for endless.
        add_counter: append a `counter` channel holding the global sample index.
        wait_for_consumers_s: before the first push, wait up to this long for an inlet
            (inf: until one connects), so that a consumer gets the stream from sample 0.
        drop: (first, count) global sample indices never pushed (fault injection for tests:
            the timestamps and the counter then show the gap).
        start_s: skip this much of the recording (s); annotations keep their place.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not speed > 0:
            raise ValueError(f"speed must be > 0 (inf for no sleeping), got {speed}")
        if loop is not None and loop < 1:
            raise ValueError(f"loop must be >= 1 or None (endless), got {loop}")
        if wait_for_consumers_s < 0:
            raise ValueError(f"wait_for_consumers_s must be >= 0, got {wait_for_consumers_s}")
        if drop is not None and (drop[0] < 0 or drop[1] < 1):
            raise ValueError(f"drop must be (first >= 0, count >= 1), got {drop}")
        raw = _load(raw_or_path)
        if start_s:
            if not 0.0 <= start_s < raw.times[-1]:
                raise ValueError(
                    f"start_s must be in [0, {raw.times[-1]:g}) s of the recording, got {start_s}"
                )
            raw.crop(tmin=start_s)
        self._source = (
            str(raw_or_path)
            if isinstance(raw_or_path, str | Path)
            else (raw.filenames[0] if raw.filenames and raw.filenames[0] else "<Raw in memory>")
        )
        ch_names = list(raw.ch_names)
        ch_types = raw.get_channel_types()
        if add_counter and COUNTER_CHANNEL in ch_names:
            raise ValueError(
                f"the recording already has a {COUNTER_CHANNEL!r} channel; drop add_counter"
            )
        data = raw.get_data().T  # (n_times, n_channels), SI units (volts)
        units = []
        for k, (ch_name, ch_type) in enumerate(zip(ch_names, ch_types, strict=True)):
            if ch_name == COUNTER_CHANNEL:
                units.append("none")
            elif ch_type in MICROVOLT_TYPES:
                data[:, k] *= 1e6
                units.append("microvolts")
            elif raw.info["chs"][k]["unit"] == 107:  # FIFF_UNIT_V
                units.append("volts")
            else:
                units.append("none")
        if add_counter:
            data = np.column_stack([data, np.zeros(data.shape[0])])
            ch_names.append(COUNTER_CHANNEL)
            ch_types.append("misc")
            units.append("none")
        self._data = np.ascontiguousarray(data, dtype=np.float32)
        self._counter_idx = ch_names.index(COUNTER_CHANNEL) if COUNTER_CHANNEL in ch_names else None
        self._counter_is_added = add_counter
        self.ch_names = tuple(ch_names)
        self.ch_types = tuple(ch_types)
        self.ch_units = tuple(units)
        self.sfreq = float(raw.info["sfreq"])
        self.n_times = int(self._data.shape[0])
        if self.n_times == 0:
            raise ValueError("the recording has no samples")
        self.name = name
        self.source_id = source_id if source_id is not None else name
        self.stype = stype
        self.chunk_size = int(chunk_size)
        self.fast = bool(fast) or math.isinf(speed)
        self.speed = math.inf if self.fast else float(speed)
        self.loop = loop
        self._progress = progress
        self._wait_for_consumers_s = float(wait_for_consumers_s)
        self._drop = drop
        onsets = np.round((raw.annotations.onset - raw.first_time) * self.sfreq).astype(int)
        keep = (onsets >= 0) & (onsets < self.n_times)
        order = np.argsort(onsets[keep], kind="stable")
        self._marker_idx = onsets[keep][order]
        self._marker_desc = [str(d) for d in raw.annotations.description[keep][order]]
        self._marker_stream = marker_stream
        self._meas_date = raw.info["meas_date"]
        self._stop_event = threading.Event()
        self.ready = threading.Event()  # set once the outlets exist
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.stats = ReplayStats()
        self.uid = ""

    # ----------------------------------------------------------------- outlets
    def _eeg_info(self) -> pylsl.StreamInfo:
        info = pylsl.StreamInfo(
            self.name,
            self.stype,
            len(self.ch_names),
            self.sfreq,
            pylsl.cf_float32,
            self.source_id,
        )
        desc = info.desc()
        desc.append_child_value("manufacturer", "closedloop")
        channels = desc.append_child("channels")
        for label, unit, ch_type in zip(self.ch_names, self.ch_units, self.ch_types, strict=True):
            ch = channels.append_child("channel")
            ch.append_child_value("label", label)
            ch.append_child_value("unit", unit)
            ch.append_child_value("type", ch_type.upper())
        acq = desc.append_child("acquisition")
        acq.append_child_value("manufacturer", "closedloop")
        acq.append_child_value("model", "Replayer")
        acq.append_child_value("source_file", self._source)
        acq.append_child_value("speed", "inf" if self.fast else f"{self.speed:g}")
        acq.append_child_value("loop", "forever" if self.loop is None else str(self.loop))
        if self._meas_date is not None:
            acq.append_child_value("meas_date", self._meas_date.isoformat())
        return info

    def _marker_info(self) -> pylsl.StreamInfo:
        info = pylsl.StreamInfo(
            f"{self.name}-markers",
            "Markers",
            1,
            pylsl.IRREGULAR_RATE,
            pylsl.cf_string,
            f"{self.source_id}-markers",
        )
        ch = info.desc().append_child("channels").append_child("channel")
        ch.append_child_value("label", "annotation")
        ch.append_child_value("type", "Marker")
        info.desc().append_child_value("manufacturer", "closedloop")
        return info

    # --------------------------------------------------------------- life cycle
    def run(self, on_ready: Callable[[Replayer], Any] | None = None) -> ReplayStats:
        """Stream until the end (finite loop) or stop(); returns the statistics."""
        self._stop_event.clear()
        self.stats = ReplayStats()
        outlet = pylsl.StreamOutlet(self._eeg_info(), self.chunk_size)
        markers = pylsl.StreamOutlet(self._marker_info(), 1) if self._marker_stream else None
        self.uid = outlet.get_info().uid()
        self.ready.set()
        if on_ready is not None:
            on_ready(self)
        try:
            if self._wait_for_consumers_s > 0:
                self._wait_for_consumer(outlet)
            if not self._stop_event.is_set():
                self._stream(outlet, markers)
            if not self._stop_event.is_set():
                self._stop_event.wait(END_LINGER_S)
        finally:
            self.stats.t_stop = pylsl.local_clock()
            del outlet, markers  # pylsl destroys the outlets; consumers see the loss
            self.ready.clear()
        return self.stats

    def start(self) -> Replayer:
        """Run in a background thread; returns once the outlets exist."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the replayer is already running")
        self._error = None
        self.ready.clear()

        def target() -> None:
            try:
                self.run()
            except BaseException as exc:  # re-raised by stop() / join(): background errors are loud
                self._error = exc
                self.ready.set()

        self._thread = threading.Thread(target=target, name=f"replayer-{self.name}", daemon=True)
        self._thread.start()
        # A short replay can end (and clear `ready`) before we look: also stop waiting then.
        while not self.ready.wait(0.05) and self._thread.is_alive():
            pass
        if self._error is not None:
            self.join()
        return self

    def request_stop(self) -> None:
        """Ask run() to end after the current push (safe from signal handlers and threads)."""
        self._stop_event.set()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the thread; True if it finished. Re-raises an error from the thread."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return False
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"replayer {self.name!r} failed: {error!r}") from error
        return True

    def stop(self, timeout_s: float = 5.0) -> ReplayStats:
        """Stop the background thread (idempotent) and return the statistics."""
        self.request_stop()
        if not self.join(timeout_s):
            raise RuntimeError(f"replayer {self.name!r} did not stop within {timeout_s} s")
        return self.stats

    def __enter__(self) -> Replayer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------- streaming
    def _wait_for_consumer(self, outlet: pylsl.StreamOutlet) -> None:
        deadline = pylsl.local_clock() + self._wait_for_consumers_s
        while not self._stop_event.is_set():
            remaining = deadline - pylsl.local_clock()
            if remaining <= 0 or outlet.wait_for_consumers(min(CONSUMER_POLL_S, remaining)):
                return

    def _stream(self, outlet: pylsl.StreamOutlet, markers: pylsl.StreamOutlet | None) -> None:
        stats = self.stats
        sfreq, n_times, chunk = self.sfreq, self.n_times, self.chunk_size
        wall_rate = sfreq * self.speed  # samples per wall-clock second (inf when fast)
        chunk_period_s = chunk / wall_rate
        total = None if self.loop is None else self.loop * n_times
        bar = self._make_progress(total)
        buffer = np.empty((chunk, len(self.ch_names)), dtype=np.float32)
        ic = self._counter_idx
        t0 = pylsl.local_clock()
        stats.t_start = t0
        g = 0  # global sample index (across loops)
        loop_idx = 0
        marker_pos = 0
        try:
            while not self._stop_event.is_set():
                a = g - loop_idx * n_times  # index in the recording
                b = min(a + chunk, n_times)
                n = b - a
                buffer[:n] = self._data[a:b]
                if ic is not None:
                    if self._counter_is_added:
                        buffer[:n, ic] = np.arange(g, g + n)
                    else:
                        buffer[:n, ic] += loop_idx * n_times
                stamps = t0 + np.arange(g, g + n) / sfreq
                if not self.fast:
                    target = t0 + (g + n - 1) / wall_rate
                    delay = target - pylsl.local_clock()
                    if delay > 0 and self._stop_event.wait(delay):
                        break
                    late = pylsl.local_clock() - target
                    stats.max_late_s = max(stats.max_late_s, late)
                    if late > chunk_period_s:
                        stats.overruns += 1
                rows = self._kept_rows(g, n)
                if rows is None:
                    outlet.push_chunk(buffer[:n], stamps.tolist())
                    stats.samples_pushed += n
                elif rows.size:
                    outlet.push_chunk(buffer[rows], stamps[rows].tolist())
                    stats.samples_pushed += int(rows.size)
                stats.chunks_pushed += 1
                while marker_pos < len(self._marker_idx) and self._marker_idx[marker_pos] < b:
                    if markers is not None:
                        m = int(self._marker_idx[marker_pos])
                        markers.push_sample(
                            [self._marker_desc[marker_pos]], t0 + (loop_idx * n_times + m) / sfreq
                        )
                        stats.markers_pushed += 1
                    marker_pos += 1
                if bar is not None:
                    bar.update(n)
                g += n
                if b == n_times:
                    loop_idx += 1
                    marker_pos = 0
                    stats.loops_completed = loop_idx
                    if self.loop is not None and loop_idx >= self.loop:
                        break
            stats.stopped_early = self._stop_event.is_set()
        finally:
            if bar is not None:
                bar.close()

    def _kept_rows(self, g: int, n: int) -> np.ndarray | None:
        """Rows of this chunk to push, or None for all (the drop window is for tests only)."""
        if self._drop is None:
            return None
        first, count = self._drop
        if g + n <= first or g >= first + count:
            return None
        idx = np.arange(g, g + n)
        return np.flatnonzero((idx < first) | (idx >= first + count))

    def _make_progress(self, total: int | None) -> Any:
        if not self._progress or total is None or not sys.stderr.isatty():
            return None
        return tqdm(
            total=total,
            unit="smp",
            unit_scale=True,
            file=sys.stderr,
            desc=f"replay {self.name}",
            dynamic_ncols=True,
        )


# ---------------------------------------------------------------------- command line
def _parse_loop(text: str) -> int | None:
    if text.lower() in {"forever", "inf", "endless"}:
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number >= 1 or 'forever', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'forever', got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def add_replay_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the replay options (shared by `python -m acquisition.replayer` and the CLI)."""
    parser.add_argument("file", type=Path, help="recording to replay (any format the readers load)")
    parser.add_argument(
        "--name", default=DEFAULT_NAME, help="LSL stream name (default: %(default)s)"
    )
    parser.add_argument(
        "--source-id", default=None, help="LSL source_id (default: the stream name)"
    )
    parser.add_argument("--stype", default="EEG", help="LSL stream type (default: %(default)s)")
    parser.add_argument(
        "--chunk-size", type=int, default=10, help="samples per push (default: %(default)s)"
    )
    parser.add_argument(
        "--speed",
        type=_positive_float,
        default=1.0,
        help="replay speed factor; 'inf' = no sleeping (default: %(default)s)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="push as fast as possible (= --speed inf)"
    )
    parser.add_argument(
        "--loop",
        type=_parse_loop,
        default=1,
        metavar="N|forever",
        help="passes through the recording (default: 1)",
    )
    parser.add_argument(
        "--counter",
        action="store_true",
        help=f"add a {COUNTER_CHANNEL!r} channel with the sample index",
    )
    parser.add_argument(
        "--no-markers",
        action="store_true",
        help="do not create the <name>-markers annotation stream",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--wait-consumers",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS (inf: forever) for a consumer before streaming",
    )
    parser.add_argument(
        "--start",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="skip this much of the recording (annotations keep their place)",
    )
    # Fault injection for tests: never push samples [FIRST, FIRST + COUNT).
    parser.add_argument(
        "--drop",
        type=int,
        nargs=2,
        metavar=("FIRST", "COUNT"),
        default=None,
        help=argparse.SUPPRESS,
    )
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Build a Replayer from parsed arguments, run it in this thread, print a summary."""
    replayer = Replayer(
        args.file,
        name=args.name,
        source_id=args.source_id,
        chunk_size=args.chunk_size,
        speed=args.speed,
        loop=args.loop,
        add_counter=args.counter,
        stype=args.stype,
        marker_stream=not args.no_markers,
        fast=args.fast,
        progress=not args.no_progress,
        wait_for_consumers_s=args.wait_consumers,
        drop=tuple(args.drop) if args.drop else None,
        start_s=args.start,
    )

    def on_signal(signum: int, frame: object) -> None:
        replayer.request_stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def announce(r: Replayer) -> None:
        # One machine-readable line on stdout once the outlet exists (tests wait for it).
        print(
            f"READY name={r.name} source_id={r.source_id} uid={r.uid} sfreq={r.sfreq:g} "
            f"n_channels={len(r.ch_names)} n_times={r.n_times}",
            flush=True,
        )

    try:
        stats = replayer.run(on_ready=announce)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"replayer {replayer.name}: {stats.summary()}", file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m acquisition.replayer",
        description="Replay a recording as an LSL stream (plus a <name>-markers stream).",
    )
    add_replay_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (RecordingError, OSError, ValueError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())

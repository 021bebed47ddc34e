"""Offline speed and memory over a long accelerated run.

    python -m benchmarks offline memory [--quick]

offline: the bundled 32-channel 500 Hz recording (replay_data/sim_32ch_500hz.fif, 150 s) through
`Session(config, FileSource(...), live=False, arm_action=...)` with the default config, deciding
every 10 samples (the live chunking) one chunk per chain call (the baseline of the same run) and
in 2 s blocks (source.offline_block_s, the default: the same pulses, checked), and deciding every
100 / 500 samples; best and median of five runs: stream seconds / wall seconds, for the whole
`session.run()` (folder, audit, events, summary and the saved eeg_raw.fif included) and for the
processing loop alone (`Pipeline.step` over the same blocks). Loading the file is not counted.

memory: an offline Session over a synthetic 64-channel 1000 Hz stream served in a loop (target
blocks every 2.5 s, so pulses fire and the audit log grows) for one hour of stream time (five
minutes with --quick), as fast as the CPU allows; resident memory (RSS) is sampled every stream
minute. Growth = RSS at the end - RSS after the first tenth of the run (filters, buffers and
imports settled); the slope is a least-squares fit over the second half.
"""

from __future__ import annotations

import gc
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from acquisition.chunk import Chunk
from acquisition.contract import Source
from acquisition.file_source import FileSource
from acquisition.simulator import replay_data_dir
from benchmarks.synth import CHUNK_SAMPLES, alternating_blocks, bench_config, synth
from closedloop.config import SessionConfig, apply_overrides
from closedloop.load import read_jsonl
from closedloop.pipeline import Pipeline
from closedloop.session import Session

OFFLINE_FILE = "sim_32ch_500hz.fif"
OFFLINE_GOAL_X = 500.0
CHUNK_SIZES = (10, 100, 500)
PAGE_KB = os.sysconf("SC_PAGE_SIZE") / 1024 if hasattr(os, "sysconf") else 4.0


def rss_mb() -> float:
    """Resident memory of this process (MB) from /proc (nan elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * PAGE_KB / 1024
    except OSError:
        return math.nan


class SingleChunks:
    """A FileSource without pull_chunks: the session takes it chunk by chunk, one chain call
    per decision (how offline sessions ran before blocks; the baseline of the same run)."""

    def __init__(self, source: FileSource) -> None:
        self._src = source

    def __getattr__(self, name: str) -> Any:
        if name == "pull_chunks":
            raise AttributeError(name)
        return getattr(self._src, name)


def _pulse_times(folder: str) -> list[float]:
    return [
        a["t_stream"]
        for a in read_jsonl(Path(folder) / "audit.jsonl")
        if a.get("event") == "attempt" and a["fired"]
    ]


def _offline_one(
    path: Path, chunk_size: int, block_s: float | None, runs: int, tmp: Path
) -> dict[str, Any]:
    """block_s None: single chunks (one chain call per decision)."""
    over = {"session.name": "bench-offline", "source.chunk_size": chunk_size}
    if block_s is not None:
        over["source.offline_block_s"] = block_s
    config = apply_overrides(SessionConfig(), over)
    session_x, loop_x, cpu_x, duration_s = [], [], [], 0.0
    summary: dict[str, Any] = {}
    for _ in range(runs):
        src = FileSource(path, chunk_size=chunk_size)
        duration_s = src.duration_s
        gc.collect()
        w0, c0 = time.perf_counter(), time.process_time()
        summary = Session(
            config,
            src if block_s is not None else SingleChunks(src),
            live=False,
            out_root=tmp,
            arm_action="benchmark",
        ).run()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        session_x.append(duration_s / wall)
        cpu_x.append(duration_s / cpu)
        src = FileSource(path, chunk_size=chunk_size).connect()
        p = Pipeline.build(config, src.ch_names, src.sfreq, tmp / "audit.jsonl", live=False)
        if block_s is None:
            chunks, every = list(src), None
        else:
            per_block = round(block_s * src.sfreq / chunk_size)
            chunks, every = [], chunk_size
            while (block := src.pull_chunks(per_block)) is not None:
                chunks.append(block)
        gc.collect()
        w0 = time.perf_counter()
        for c in chunks:
            p.step(c, every)
        loop_x.append(duration_s / (time.perf_counter() - w0))
        p.close()
    return {
        "decision_every": chunk_size,
        "block_s": block_s,
        "duration_s": duration_s,
        "pulses": summary["pulses"],
        "pulse_times": _pulse_times(summary["folder"]),
        "session_x_realtime": max(session_x),
        "session_x_median": float(np.median(session_x)),
        "session_x_runs": session_x,
        "session_x_per_cpu_s": max(cpu_x),
        "loop_x_realtime": max(loop_x),
    }


# (decision every n samples, offline block s): single chunks first (the baseline of this run),
# then the default (blocks, the same decisions), then coarser decisions
OFFLINE_MODES = ((10, None), (10, 2.0), (100, 2.0), (500, 2.0))


def offline(quick: bool, log=print) -> dict[str, Any]:
    """Default config on the bundled recording, deciding every 10 samples (the live chunking)
    one chunk per call and in 2 s blocks (the default: the same decisions), and deciding every
    100 / 500 samples (a pulse can then come up to one such chunk later). Best of `runs`."""
    path = replay_data_dir() / OFFLINE_FILE
    runs = 2 if quick else 5
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for every, block_s in OFFLINE_MODES:
            row = _offline_one(path, every, block_s, runs, Path(tmp))
            row["same_pulses_as_single_chunks"] = (
                row["pulse_times"] == rows[0]["pulse_times"] if rows else True
            )
            rows.append(row)
            how = "single chunks" if block_s is None else f"{block_s:g} s blocks"
            log(
                f"  offline 32 ch x 500 Hz ({row['duration_s']:.0f} s), decisions every "
                f"{every:3d} samples, {how}: session {row['session_x_realtime']:.0f}x real time "
                f"(median {row['session_x_median']:.0f}x, {row['session_x_per_cpu_s']:.0f}x per "
                f"CPU s), processing loop alone {row['loop_x_realtime']:.0f}x ({row['pulses']} "
                f"pulses{', the same' if row['same_pulses_as_single_chunks'] else ''})"
            )
    return {
        "recording": OFFLINE_FILE,
        "channels": 32,
        "sfreq_hz": 500.0,
        "runs": runs,
        "goal_x": OFFLINE_GOAL_X,
        "by_mode": rows,
    }


class LoopSource(Source):
    """A synthetic recording served in a loop for `total_s` stream seconds (offline source)."""

    def __init__(
        self,
        names,
        data: np.ndarray,
        sfreq: float,
        total_s: float,
        *,
        sample_every_s: float,
        samples: list[tuple[float, float]],
    ) -> None:
        self.ch_names = tuple(names)
        self.sfreq = float(sfreq)
        self._data = data
        self._n_total = round(total_s * sfreq) // CHUNK_SAMPLES * CHUNK_SAMPLES
        self._pos = 0
        self._every = round(sample_every_s * sfreq)
        self._next_sample = 0
        self.samples = samples  # (stream s, RSS MB)
        self.connected = False

    def connect(self) -> LoopSource:
        self.connected = True
        return self

    def disconnect(self) -> None:
        self.connected = False

    def pull(self, timeout_s: float = 0.0) -> Chunk | None:
        if self._pos >= self._n_total:
            return None
        n = self._data.shape[0]
        a = self._pos % n
        if a + CHUNK_SAMPLES > n:  # data length is a multiple of the chunk: never happens
            a = 0
        ts = (self._pos + np.arange(CHUNK_SAMPLES)) / self.sfreq
        if self._pos >= self._next_sample:
            self.samples.append((self._pos / self.sfreq, rss_mb()))
            self._next_sample += self._every
        self._pos += CHUNK_SAMPLES
        return Chunk(self._data[a : a + CHUNK_SAMPLES], ts, self.ch_names, self.sfreq)


def memory(quick: bool, log=print) -> dict[str, Any]:
    total_s = 300.0 if quick else 3600.0
    loop_s = 60.0  # one minute of signal, served again and again (a multiple of 2.5 s)
    blocks = alternating_blocks(0.5, int(loop_s // 2.5), 1.0, 1.5)
    names, data = synth(64, 1000.0, loop_s, blocks, seed=5)
    samples: list[tuple[float, float]] = []
    src = LoopSource(
        names, data, 1000.0, total_s, sample_every_s=10.0 if quick else 60.0, samples=samples
    )
    config = bench_config(**{"session.name": "bench-memory"})
    with tempfile.TemporaryDirectory() as tmp:
        gc.collect()
        rss0 = rss_mb()
        w0 = time.perf_counter()
        summary = Session(config, src, live=False, out_root=Path(tmp), arm_action="benchmark").run()
        wall = time.perf_counter() - w0
    samples.append((total_s, rss_mb()))
    t = np.array([s[0] for s in samples])
    m = np.array([s[1] for s in samples])
    settled = m[t >= 0.1 * total_s][0]
    half = t >= 0.5 * total_s
    slope = float(np.polyfit(t[half] / 3600.0, m[half], 1)[0]) if half.sum() >= 2 else math.nan
    res = {
        "channels": 64,
        "sfreq_hz": 1000.0,
        "stream_s": total_s,
        "wall_s": wall,
        "x_realtime": total_s / wall,
        "pulses": summary["pulses"],
        "attempts": summary["attempts"],
        "rss_start_mb": rss0,
        "rss_settled_mb": float(settled),
        "rss_end_mb": float(m[-1]),
        "rss_max_mb": float(m.max()),
        "growth_mb": float(m[-1] - settled),
        "slope_mb_per_stream_hour": slope,
        "samples": [[float(a), float(b)] for a, b in samples],
    }
    log(
        f"  memory 64 ch x 1000 Hz, {total_s / 60:.0f} stream min in {wall:.0f} s: RSS settled "
        f"{settled:.1f} MB -> end {m[-1]:.1f} MB (growth {res['growth_mb']:+.1f} MB, slope "
        f"{slope:+.2f} MB per stream hour; {summary['pulses']} pulses, "
        f"{summary['attempts']} attempts)"
    )
    return res

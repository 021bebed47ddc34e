"""Decision latency and throughput of the hot path (`Pipeline.step`), in process, on one core.

    python -m benchmarks decision throughput [--quick]

Decision latency: from the moment a chunk is handed over (what `LslSource.pull` returning is in a
live session: `Chunk.t_arrival = local_clock()`) to the trigger outputs having returned: a tap
placed first in `Pipeline.taps` stamps the time (taps run right after the outputs). The pipeline
is the live one: armed, simulated stimulator + LSL marker outlet as outputs, an event bus with a
subscriber, the state LSL outlet tap; the state enters the target every 2.5 s so pulses fire.
On a chunk that fires, the decision ends when the
last output returned (`Attempt.latency_ms`); the audit line is written (fsync) after that.
Each chunk's thread CPU time is reported beside the wall time: on a shared machine the wall-time
tail includes time-slices given to other processes. Chunks of 10 samples are fed back to back
(as fast as the pipeline takes them) after the
auto-calibration, which is left out of the figures (its one-off cost is reported apart).
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pylsl import local_clock

from acquisition.chunk import Chunk
from benchmarks.synth import CHUNK_SAMPLES, alternating_blocks, bench_config, synth
from closedloop.bus import EventBus
from closedloop.outlets import StateOutlet
from closedloop.pipeline import Pipeline
from triggers.outputs import LslMarkerOutput

CHANNELS = (8, 32, 64, 128)
RATES_HZ = (500.0, 1000.0, 5000.0)
CALIBRATION_DATA_S = 13.0  # warm-up 1 s + settle 0.6 s + 10 s clean baseline, with margin
REP_ON_S, REP_OFF_S = 1.0, 1.5
P99_GOAL_MS = 1.0
BUS_DRAIN_EVERY = 50  # chunks between drains of the bus subscriber (the event-log thread's job)


def pin_one_core() -> set[int] | None:
    """Run this process on one core (the last); returns the previous affinity to restore."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(before)})
    return before


def measure(n_ch: int, sfreq: float, run_s: float, tmp: Path, seed: int = 0) -> dict[str, Any]:
    """Latency figures (ms) of one (channels, rate) configuration over run_s seconds of data."""
    n_reps = max(1, int((run_s - 0.5) // (REP_ON_S + REP_OFF_S)))
    t0 = CALIBRATION_DATA_S
    blocks = alternating_blocks(t0 + 0.5, n_reps, REP_ON_S, REP_OFF_S)
    names, data = synth(n_ch, sfreq, t0 + run_s, blocks, seed)
    ts = np.arange(data.shape[0]) / sfreq + 1000.0
    config = bench_config()
    bus = EventBus()
    sub = bus.subscribe("bench", maxlen=100_000)
    tag = f"bench-decision-{os.getpid()}-{n_ch}-{int(sfreq)}"
    marker = LslMarkerOutput(tag, tag)
    marker.open()
    p = Pipeline.build(config, names, sfreq, tmp / f"audit-{n_ch}-{int(sfreq)}.jsonl", bus=bus,
                       live=True, extra_outputs=[marker])
    t_done = [0.0]

    def stamp(chunk: Chunk, state: object) -> None:
        t_done[0] = local_clock()

    p.taps.append(stamp)
    p.taps.append(StateOutlet(tag + "-state", tag + "-state", p.chain.feature_names))

    n_chunks = data.shape[0] // CHUNK_SAMPLES
    lat = np.full(n_chunks, np.nan)
    step_ms = np.full(n_chunks, np.nan)
    cpu_ms = np.full(n_chunks, np.nan)  # thread CPU time per step: immune to preemption
    cal_chunk_ms = float("nan")
    pulse_step_ms: list[float] = []
    armed = False
    gc.collect()
    cpu0 = time.process_time()
    wall0 = local_clock()
    for i in range(n_chunks):
        a = i * CHUNK_SAMPLES
        c0 = time.thread_time()
        t_arr = local_clock()
        chunk = Chunk(data[a : a + CHUNK_SAMPLES], ts[a : a + CHUNK_SAMPLES], names, sfreq, (),
                      t_arr)
        res = p.step(chunk)
        t_end = local_clock()
        c1 = time.thread_time()
        if not armed:
            if p.chain.calibrated:
                cal_chunk_ms = (t_end - t_arr) * 1e3
                p.trigger.arm("benchmark", operator="bench", calibrated=True)
                armed = True
                cpu0 = time.process_time()
                wall0 = local_clock()
            continue
        if res.attempt is not None:
            # a pulse: the decision ends when the last output returned (Attempt.latency_ms); the
            # audit line (with an fsync, 1-8 ms here) is written after that, before the taps
            lat[i] = res.attempt.latency_ms
            pulse_step_ms.append((t_end - t_arr) * 1e3)
        else:
            lat[i] = (t_done[0] - t_arr) * 1e3
        step_ms[i] = (t_end - t_arr) * 1e3
        cpu_ms[i] = (c1 - c0) * 1e3
        if i % BUS_DRAIN_EVERY == 0:
            sub.drain()
    cpu_s = time.process_time() - cpu0
    wall_s = local_clock() - wall0
    stats = p.trigger.stats
    p.close()
    marker.close()
    lat = lat[np.isfinite(lat)]
    step_ms = step_ms[np.isfinite(step_ms)]
    cpu_ms = cpu_ms[np.isfinite(cpu_ms)]
    period_ms = 1e3 * CHUNK_SAMPLES / sfreq
    p50, p99 = np.percentile(lat, [50, 99])
    return {
        "channels": n_ch,
        "sfreq_hz": sfreq,
        "chunk_samples": CHUNK_SAMPLES,
        "chunk_period_ms": period_ms,
        "chunks": int(lat.size),
        "pulses": int(stats["fired"]),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "max_ms": float(lat.max()),
        "step_mean_ms": float(step_ms.mean()),
        "step_p99_ms": float(np.percentile(step_ms, 99)),
        "cpu_p50_ms": float(np.percentile(cpu_ms, 50)),
        "cpu_p99_ms": float(np.percentile(cpu_ms, 99)),
        "cpu_max_ms": float(cpu_ms.max()),
        "calibration_chunk_ms": cal_chunk_ms,
        "pulse_chunk_step_max_ms": max(pulse_step_ms, default=float("nan")),
        "cpu_s_per_stream_s": cpu_s / (lat.size * CHUNK_SAMPLES / sfreq),
        "realtime_factor": (lat.size * CHUNK_SAMPLES / sfreq) / wall_s,
        "real_time_ok": bool(step_ms.mean() < period_ms and p99 < P99_GOAL_MS),
    }


def run_grid(quick: bool, channels=CHANNELS, rates=RATES_HZ, log=print) -> list[dict[str, Any]]:
    run_s = 6.0 if quick else 25.0
    before = pin_one_core()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for sfreq in rates:
                for n_ch in channels:
                    row = measure(n_ch, sfreq, run_s, Path(tmp))
                    rows.append(row)
                    log(f"  decision {n_ch:4d} ch x {sfreq:5.0f} Hz: p50 {row['p50_ms']:.3f} ms, "
                        f"p99 {row['p99_ms']:.3f} ms, max {row['max_ms']:.3f} ms; CPU p50 "
                        f"{row['cpu_p50_ms']:.3f} p99 {row['cpu_p99_ms']:.3f} ms "
                        f"({row['chunks']} chunks, {row['pulses']} pulses; step mean "
                        f"{row['step_mean_ms']:.3f} ms of a {row['chunk_period_ms']:.1f} ms "
                        "period)")
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)
    return rows


def paced_cpu(n_ch: int, sfreq: float, run_s: float) -> dict[str, Any]:
    """CPU use of the hot path fed in real time (10-sample chunks at their due times): fraction
    of one core over the run (process CPU time / wall time), the loop sleeping between chunks."""
    before = pin_one_core()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            blocks = alternating_blocks(CALIBRATION_DATA_S + 0.5, 100, REP_ON_S, REP_OFF_S)
            names, data = synth(n_ch, sfreq, CALIBRATION_DATA_S + run_s, blocks, 1)
            ts = np.arange(data.shape[0]) / sfreq
            p = Pipeline.build(bench_config(), names, sfreq, Path(tmp) / "audit.jsonl",
                               bus=EventBus(), live=True)
            n_cal = round(CALIBRATION_DATA_S * sfreq) // CHUNK_SAMPLES
            n_chunks = data.shape[0] // CHUNK_SAMPLES
            for i in range(n_cal):  # calibrate as fast as possible, then go real time
                a = i * CHUNK_SAMPLES
                p.step(Chunk(data[a : a + CHUNK_SAMPLES], ts[a : a + CHUNK_SAMPLES], names, sfreq))
            p.trigger.arm("benchmark", operator="bench", calibrated=p.chain.calibrated)
            period = CHUNK_SAMPLES / sfreq
            cpu0, wall0 = time.process_time(), local_clock()
            for j, i in enumerate(range(n_cal, n_chunks)):
                due = wall0 + (j + 1) * period
                rest = due - local_clock()
                if rest > 0:
                    time.sleep(rest)
                a = i * CHUNK_SAMPLES
                p.step(Chunk(data[a : a + CHUNK_SAMPLES], ts[a : a + CHUNK_SAMPLES], names, sfreq,
                             (), local_clock()))
            cpu = time.process_time() - cpu0
            wall = local_clock() - wall0
            p50, p99, pmax = p.latency_percentiles()
            p.close()
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)
    return {"channels": n_ch, "sfreq_hz": sfreq, "wall_s": wall, "cpu_s": cpu,
            "cpu_percent_of_one_core": 100.0 * cpu / wall,
            "p50_ms": p50, "p99_ms": p99, "max_ms": pmax}


def throughput(grid: list[dict[str, Any]], quick: bool, log=print) -> dict[str, Any]:
    """Largest channels x rate of the grid in real time with p99 < 1 ms; CPU at 64 x 1000."""
    ok = [r for r in grid if r["real_time_ok"]]
    best = max(ok, key=lambda r: r["channels"] * r["sfreq_hz"], default=None)
    cpu = paced_cpu(64, 1000.0, 8.0 if quick else 30.0)
    log(f"  throughput: largest real-time config with p99 < 1 ms: "
        f"{best['channels'] if best else '-'} ch x {best['sfreq_hz'] if best else '-'} Hz; "
        f"CPU at 64 ch x 1000 Hz {cpu['cpu_percent_of_one_core']:.1f} % of one core")
    return {
        "largest_ok": None if best is None else {
            "channels": best["channels"], "sfreq_hz": best["sfreq_hz"],
            "channel_samples_per_s": best["channels"] * best["sfreq_hz"],
            "p99_ms": best["p99_ms"], "step_mean_ms": best["step_mean_ms"]},
        "failing": [f"{r['channels']}x{r['sfreq_hz']:g}" for r in grid if not r["real_time_ok"]],
        "cpu_64ch_1000hz": cpu,
    }

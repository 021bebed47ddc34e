"""Shared helpers for session tests: small recordings, configs, epoch scoring."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from acquisition.simulator import simulate
from closedloop.config import SessionConfig, apply_overrides

TARGET = "meditation"
REPLAY_DATA = Path(__file__).resolve().parents[1] / "replay_data"


def small_recording(duration_s: float = 90.0, seed: int = 7, **kw):
    """A 32-channel 500 Hz simulation with `meditation` blocks (about 0.3 s to make)."""
    return simulate(duration_s=duration_s, sfreq=500.0, montage="standard_32", seed=seed, **kw)


def bundled_recording():
    from acquisition.readers import load_recording

    return load_recording(REPLAY_DATA / "sim_32ch_500hz.fif")


def fast_config(**overrides) -> SessionConfig:
    """Defaults with thresholds that give precise pulses on the simulated recordings.

    Measured: precision 1.0 and every target epoch after calibration hit, on the bundled file
    and on a 5-minute simulation.
    """
    base = {"recording.xdf": False}
    base.update(overrides)
    return apply_overrides(SessionConfig(), base)


def target_epochs(raw, label: str = TARGET, t0: float = 0.0) -> list[tuple[float, float]]:
    """(start, end) stream times of the annotated target epochs."""
    ann = raw.annotations
    offset = raw.first_time if ann.orig_time is not None else 0.0
    return [
        (t0 + on - offset, t0 + on - offset + dur)
        for on, dur, desc in zip(ann.onset, ann.duration, ann.description, strict=True)
        if desc == label
    ]


def fraction_inside(
    times: list[float], epochs: list[tuple[float, float]], slack_s: float = 0.0
) -> float:
    if not times:
        return float("nan")
    inside = [any(a <= t <= b + slack_s for a, b in epochs) for t in times]
    return float(np.mean(inside))


def start_replayer(path: Path, name: str, *extra: str, speed: float) -> subprocess.Popen:
    """`python -m acquisition.replayer` in its own process, waiting for its first consumer."""
    cmd = [sys.executable, "-m", "acquisition.replayer", str(path), "--name", name,
           "--source-id", name, "--speed", str(speed), "--no-progress",
           "--wait-consumers", "60", *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def end_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


class SingleChunks:
    """A FileSource without a fixed chunk size (the Source contract's `chunk_size = None`): the
    session feeds it chunk by chunk (the FileSource's own chunk size), as live."""

    chunk_size = None

    def __init__(self, source) -> None:
        self._src = source

    def __getattr__(self, name):
        return getattr(self._src, name)

"""LSL test helpers: unique names, test recordings, a replayer subprocess, pull loops."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mne
import numpy as np

from acquisition.chunk import Chunk, HealthEvent, HealthKind

REPLAYER_READY_TIMEOUT_S = 30.0  # python + mne import on a loaded 2-core machine


def new_stream_name(prefix: str = "cltest") -> str:
    """A stream name nobody else on the machine uses (helpers run tests in parallel)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_recording(
    sfreq: float = 250.0,
    duration_s: float = 4.0,
    n_eeg: int = 4,
    *,
    counter: bool = True,
    nan_at: int | None = None,
    annotations: tuple[tuple[float, str], ...] = (),
    seed: int = 0,
) -> mne.io.RawArray:
    """EEG in volts (~10 µV noise plus a 10 Hz sine) and a 'counter' misc channel = sample index.

    nan_at: sample index where the first EEG channel is NaN (for NONFINITE tests).
    annotations: (onset_s, description) pairs, zero duration.
    """
    n = round(sfreq * duration_s)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sfreq
    eeg = rng.standard_normal((n_eeg, n)) * 10e-6 + 20e-6 * np.sin(2 * np.pi * 10 * t)
    if nan_at is not None:
        eeg[0, nan_at] = np.nan
    names = ["Fz", "C3", "C4", "Pz", "O1", "O2", "P3", "P4"][:n_eeg]
    types = ["eeg"] * n_eeg
    data = eeg
    if counter:
        data = np.vstack([eeg, np.arange(n, dtype=float)[None]])
        names.append("counter")
        types.append("misc")
    raw = mne.io.RawArray(data, mne.create_info(names, sfreq, types), verbose=False)
    if annotations:
        onsets, descs = zip(*annotations, strict=True)
        raw.set_annotations(mne.Annotations(list(onsets), [0.0] * len(onsets), list(descs)))
    return raw


def save_recording_fif(raw: mne.io.BaseRaw, directory: Path, stem: str = "test") -> Path:
    """Save as FIF (name ends in _raw.fif so mne does not warn)."""
    path = Path(directory) / f"{stem}_raw.fif"
    raw.save(path, overwrite=True, verbose=False)
    return path


@dataclass
class ReplayerProcess:
    """A `python -m acquisition.replayer` child process."""

    proc: subprocess.Popen[str]
    ready_line: str
    log_path: Path
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def uid(self) -> str:
        return self.fields["uid"]

    def kill(self) -> None:
        """SIGKILL: the process dies without closing its outlets (like a crash)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_replayer_process(
    path: Path, name: str, source_id: str, *args: str, log_dir: Path
) -> ReplayerProcess:
    """Start the replayer and wait for its READY line (the outlet exists then)."""
    log_path = Path(log_dir) / f"replayer-{uuid.uuid4().hex[:6]}.log"
    cmd = [
        sys.executable,
        "-m",
        "acquisition.replayer",
        str(path),
        "--name",
        name,
        "--source-id",
        source_id,
        "--no-progress",
        *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + REPLAYER_READY_TIMEOUT_S
    line = ""
    while time.monotonic() < deadline and not line.startswith("READY"):
        if proc.poll() is not None:
            break
        if sel.select(timeout=0.2):
            line = proc.stdout.readline()
    sel.close()
    if not line.startswith("READY"):
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"replayer did not start: {cmd}\n{log_path.read_text()}")
    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
    return ReplayerProcess(proc, line.strip(), log_path, fields)


def stop_replayer_process(rp: ReplayerProcess) -> None:
    if rp.proc.poll() is None:
        rp.proc.send_signal(signal.SIGTERM)
        try:
            rp.proc.wait(10)
        except subprocess.TimeoutExpired:
            rp.proc.kill()
            rp.proc.wait(10)
    if rp.proc.stdout is not None:
        rp.proc.stdout.close()


@contextlib.contextmanager
def replayer_process(
    path: Path, name: str, source_id: str, *args: str, log_dir: Path
) -> Iterator[ReplayerProcess]:
    """Context manager around start/stop_replayer_process (stops with SIGTERM, then SIGKILL)."""
    rp = start_replayer_process(path, name, source_id, *args, log_dir=log_dir)
    try:
        yield rp
    finally:
        stop_replayer_process(rp)


@dataclass
class Pulled:
    """Everything a pull loop collected."""

    chunks: list[Chunk] = field(default_factory=list)
    events: list[HealthEvent] = field(default_factory=list)

    def kinds(self) -> list[HealthKind]:
        return [e.kind for e in self.events]

    def of(self, kind: HealthKind) -> list[HealthEvent]:
        return [e for e in self.events if e.kind is kind]

    @property
    def data(self) -> np.ndarray:
        return np.concatenate([c.data for c in self.chunks if c.n_samples])

    @property
    def timestamps(self) -> np.ndarray:
        return np.concatenate([c.timestamps for c in self.chunks if c.n_samples])


def pull_until(
    source: object,
    done: Callable[[Pulled], bool],
    timeout_s: float,
    pull_timeout_s: float = 0.02,
    into: Pulled | None = None,
) -> Pulled:
    """Pull until `done(pulled)` or `timeout_s`; returns what came (check `done` yourself)."""
    pulled = Pulled() if into is None else into
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        chunk = source.pull(pull_timeout_s)  # type: ignore[attr-defined]
        pulled.events.extend(chunk.events)
        if chunk.n_samples:
            pulled.chunks.append(chunk)
        if done(pulled):
            break
    return pulled

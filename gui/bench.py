"""Decision latency with and without the console: `python -m gui.bench [--seconds 40]`.

A replayer process streams a synthetic 64-channel 1 kHz recording (10-sample chunks) over LSL;
the same session config runs (1) headless in a thread, (2) with the console window drawing all
64 channels (offscreen Qt), and (3) the same with Python's default GIL switch interval. Prints
decision latency p50/p99/max (ms) of each run and the console's tick time.

Measured 2026-11-25 on the shared 2-core VM (load 1.5-3, 40 s per run, 4000 chunks):
headless p50 0.9-1.0 ms, p99 1.5-2.1 ms; console p50 1.0 ms, p99 9.5-15 ms (switch 0.5 ms);
console with the default 5 ms switch interval p50 1.0-1.1 ms, p99 13.5-19 ms. The median is
unchanged; the tail comes from GIL contention with painting (see gui/window.py). Only a process
boundary between the loop and the window would remove it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import mne
import numpy as np

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from closedloop.config import SessionConfig, apply_overrides
from closedloop.demo import start_replayer
from gui.model import latency_samples_ms
from gui.runner import SessionRunner, make_lsl_source

N_CHANNELS = 64
SFREQ = 1000.0
NAMES = ["Fz", "FCz", "Pz", "O1", "Oz", "O2"] + [f"E{i:02d}" for i in range(N_CHANNELS - 6)]


def write_recording(path: Path, seconds: float, seed: int = 0) -> Path:
    """Gaussian 20 µV noise plus a 10 Hz rhythm, 64 EEG channels at 1 kHz, float32 FIF."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SFREQ)
    t = np.arange(n) / SFREQ
    data = rng.standard_normal((N_CHANNELS, n)) * 20e-6 + 10e-6 * np.sin(2 * np.pi * 10 * t)
    raw = mne.io.RawArray(data, mne.create_info(NAMES, SFREQ, "eeg"), verbose="error")
    raw.save(path, fmt="single", overwrite=True, verbose="error")
    return path


def config_for(name: str, seconds: float) -> SessionConfig:
    return apply_overrides(
        SessionConfig(),
        {
            "source.name": name,
            "source.source_id": name,
            "source.stype": None,
            "source.resolve_timeout_s": 60.0,
            "source.counter_channel": None,
            "state.calibration_s": 10.0,
            "session.duration_s": seconds,
            "recording.xdf": False,
            "session.publish_lsl": False,
        },
    )


def run_once(recording: Path, seconds: float, gui: bool, switch_s: float, out: Path) -> dict:
    name = f"clbench-{uuid.uuid4().hex[:8]}"
    replayer = start_replayer(recording, name, name, speed=1.0, loop="forever")
    sys.setswitchinterval(switch_s)
    cfg = config_for(name, seconds)
    ticks: list[float] = []
    frames_per_s = float("nan")
    try:
        if gui:
            from PySide6 import QtCore

            from gui.app import _app
            from gui.window import ConsoleWindow

            app = _app()
            win = ConsoleWindow(cfg, out_root=out, list_streams=lambda _t: [])
            win.resize(1600, 1000)
            win.show()
            runner = win.start_session()
            done = threading.Event()

            def check() -> None:
                if not runner.running:
                    done.set()
                    app.quit()

            poll = QtCore.QTimer()
            poll.timeout.connect(check)
            poll.start(200)
            app.exec()
            poll.stop()
            ticks = list(win.tick_durations_ms)
            frames_per_s = len(ticks) / max(seconds, 1e-9)
            session = runner.session
            lat = latency_samples_ms(session.pipeline)
            win.close()
        else:
            runner = SessionRunner(cfg, make_lsl_source(cfg), out_root=out).start()
            while runner.running:
                time.sleep(0.2)
            lat = latency_samples_ms(runner.session.pipeline)
    finally:
        sys.setswitchinterval(0.005)
        replayer.terminate()
        try:
            replayer.wait(timeout=5)
        except subprocess.TimeoutExpired:
            replayer.kill()
    p50, p99 = np.percentile(lat, [50, 99]) if lat.size else (np.nan, np.nan)
    tk = np.asarray(ticks)
    return {
        "chunks": int(lat.size),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "max_ms": float(lat.max()) if lat.size else np.nan,
        "tick_p50_ms": float(np.percentile(tk, 50)) if tk.size else np.nan,
        "tick_p99_ms": float(np.percentile(tk, 99)) if tk.size else np.nan,
        "frames_per_s": frames_per_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="stream seconds per run")
    parser.add_argument(
        "--runs",
        default="headless,gui,gui_default_switch",
        help="comma-separated: headless, gui, gui_default_switch",
    )
    args = parser.parse_args(argv)
    from gui.app import GUI_SWITCH_INTERVAL_S

    with tempfile.TemporaryDirectory(prefix="clbench-") as tmp:
        rec = write_recording(Path(tmp) / "bench_64ch_1khz_raw.fif", 60.0)
        settings = {
            "headless": (False, 0.005),
            "gui": (True, GUI_SWITCH_INTERVAL_S),
            "gui_default_switch": (True, 0.005),
        }
        for run in args.runs.split(","):
            gui, switch = settings[run]
            r = run_once(rec, args.seconds, gui, switch, Path(tmp))
            print(
                f"{run:<20} switch {switch * 1e3:4.1f} ms  chunks {r['chunks']:5d}  latency "
                f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  max {r['max_ms']:.1f} ms"
                + (
                    f"  tick p50 {r['tick_p50_ms']:.1f} ms p99 {r['tick_p99_ms']:.1f} ms"
                    f"  ~{r['frames_per_s']:.0f} frames/s"
                    if gui
                    else ""
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

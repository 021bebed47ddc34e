"""Speed of one tuner setting: a 10-minute 32-channel 500 Hz recording through the offline Session.

    python benchmarks/bench_tune_speed.py [--minutes 10] [--chunk-size 10] [--repeat 2]

Prints wall and CPU seconds per run and the factor faster than real time (wall time depends on what
else runs on the machine; CPU time is the cost of the run itself). The run is exactly what
`closedloop tune` does per (setting, recording): `closedloop.tuning.runner.run_session` (the same
Session as `closedloop offline`) with the recording already loaded in the worker.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from acquisition.simulator import simulate
from closedloop.config import SessionConfig, apply_overrides
from closedloop.tuning.grid import TUNER_OVERRIDES
from closedloop.tuning.runner import run_session
from closedloop.tuning.scoring import read_outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--chunk-size", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    duration_s = args.minutes * 60.0
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        raw = simulate(duration_s, 500.0, "standard_32", seed=1)
        path = Path(tmp) / "bench_raw.fif"
        raw.save(path, verbose="error")
        print(f"simulated {duration_s:.0f} s x 32 ch x 500 Hz in {time.perf_counter() - t:.1f} s")
        config = apply_overrides(
            SessionConfig(), {**TUNER_OVERRIDES, "source.chunk_size": args.chunk_size}
        )
        for i in range(args.repeat):
            cpu = time.process_time()
            session, wall = run_session(str(path), config, Path(tmp) / "sessions")
            cpu = time.process_time() - cpu  # what the run costs without other load on the cores
            out = read_outcome(session.folder)
            print(
                f"run {i + 1}: {wall:.2f} s wall ({cpu:.2f} s CPU) for {out.duration_s:.0f} s of "
                f"data -> {out.duration_s / wall:.0f}x real time ({out.duration_s / cpu:.0f}x per "
                f"CPU second; {out.fired.size} pulses, chunk "
                f"{args.chunk_size} samples){' (includes loading the file)' if i == 0 else ''}"
            )


if __name__ == "__main__":
    main()

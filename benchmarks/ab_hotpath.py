"""Before / after of the feature chain's hot path, interleaved in one process.

    python -m benchmarks.ab_hotpath [--rev 0b328f6] [--channels 64] [--sfreq 1000] [--seconds 30]

Extracts `features/` of git revision `rev` into a temporary package `features_before`, builds
the benchmark config's FeatureChain from it and from the working tree on the same synthetic
recording (benchmarks/synth.py, target blocks every 2.5 s), calibrates both, then feeds the same
10-sample chunks to both, alternating which goes first: back to back (per-chunk mean over blocks
of chunks) and paced (a 10 ms sleep before every step, as chunks arrive live). Both chains see
identical data, so the machine's load hits both alike; the final states are compared (label and
score). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REV = "0b328f6"  # the last commit before the hot-path work (numpy feature chain)


def _extract_before(rev: str, dest: Path) -> None:
    """features/ of `rev` as package dest/features_before (imports rewritten)."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "features"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    pkg = dest / "features_before"
    (dest / "features").rename(pkg)
    for f in pkg.glob("*.py"):
        src = f.read_text(encoding="utf-8")
        src = src.replace("from features.", "from features_before.").replace(
            "from features import", "from features_before import"
        )
        f.write_text(src, encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default=BEFORE_REV)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--sfreq", type=float, default=1000.0)
    ap.add_argument(
        "--seconds", type=float, default=30.0, help="stream seconds fed after calibration"
    )
    args = ap.parse_args(argv)

    from acquisition.chunk import Chunk
    from benchmarks.bench_decision import CALIBRATION_DATA_S, REP_OFF_S, REP_ON_S, pin_one_core
    from benchmarks.synth import CHUNK_SAMPLES, alternating_blocks, bench_config, synth
    from features.chain import FeatureChain

    tmp = tempfile.TemporaryDirectory()
    _extract_before(args.rev, Path(tmp.name))
    sys.path.insert(0, tmp.name)
    from features_before.chain import FeatureChain as BeforeChain

    pin_one_core()
    sfreq, n_ch, cs = args.sfreq, args.channels, CHUNK_SAMPLES
    n_reps = int(args.seconds // (REP_ON_S + REP_OFF_S)) + 1
    blocks = alternating_blocks(CALIBRATION_DATA_S + 0.5, n_reps, REP_ON_S, REP_OFF_S)
    names, data = synth(n_ch, sfreq, CALIBRATION_DATA_S + args.seconds, blocks, 0)
    ts = np.arange(data.shape[0]) / sfreq + 1000.0
    cfg = bench_config()
    chains = {}
    for tag, cls in (("before", BeforeChain), ("after", FeatureChain)):
        chains[tag] = cls(cfg.preprocess, cfg.bandpower, cfg.artifacts, cfg.state, names, sfreq)
    i = 0
    while not all(c.calibrated for c in chains.values()):
        if i >= data.shape[0]:
            raise RuntimeError("a chain did not calibrate on the benchmark data")
        chunk = Chunk(data[i : i + cs], ts[i : i + cs], names, sfreq)
        for c in chains.values():
            c.step(chunk)
        i += cs
    chunks = [
        Chunk(data[a : a + cs], ts[a : a + cs], names, sfreq)
        for a in range(i, data.shape[0] - cs + 1, cs)
    ]
    half = len(chunks) // 2
    b2b: dict[str, list[float]] = {"before": [], "after": []}
    paced: dict[str, list[float]] = {"before": [], "after": []}
    period_s = cs / sfreq
    gc.disable()
    try:
        block = 50
        for r, a in enumerate(range(0, half - block + 1, block)):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for tag in order:
                step = chains[tag].step
                t0 = time.perf_counter()
                for c in chunks[a : a + block]:
                    step(c)
                b2b[tag].append((time.perf_counter() - t0) / block)
        for j, c in enumerate(chunks[half:]):
            for tag in ("before", "after") if j % 2 == 0 else ("after", "before"):
                time.sleep(period_s)
                t0 = time.perf_counter()
                chains[tag].step(c)
                paced[tag].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    out: dict = {
        "rev_before": args.rev,
        "channels": n_ch,
        "sfreq_hz": sfreq,
        "chunks_paced": len(paced["after"]),
        "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for tag in ("before", "after"):
        bb = np.array(b2b[tag]) * 1e6
        pc = np.array(paced[tag]) * 1e6
        out[tag] = {
            "b2b_us_median": round(float(np.median(bb)), 1),
            "paced_p50_us": round(float(np.percentile(pc, 50)), 1),
            "paced_p99_us": round(float(np.percentile(pc, 99)), 1),
        }
    sa, sb = chains["after"].state, chains["before"].state
    out["same_label"] = sa.label is sb.label or sa.label.value == sb.label.value
    out["score_abs_diff"] = abs(sa.score - sb.score)
    print(json.dumps(out))
    tmp.cleanup()
    return out


if __name__ == "__main__":
    main()

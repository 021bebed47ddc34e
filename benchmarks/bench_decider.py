"""What a decider plugin costs in the hot path: the decision latency at 64 ch x 1 kHz with the
built-in rule (fused into the chain's kernel), the same rule through the plugin contract
(`weighted_z`) and the example plugin (examples/logreg_decider: logistic regression over the
band z-scores), interleaved rounds in one process so the machine's load hits all alike.

    python -m benchmarks decider [--quick]     # or: python -m benchmarks.bench_decider

Reports per mode the decision latency p50 / p99 (pull return -> outputs returned, ms), the
thread CPU time p99 per chunk, and the plugin's own `decide()` time per decision (µs, from the
session summary's `decider.cost_us`); the overhead is the p50 difference against the built-in.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from benchmarks.bench_decision import measure

PLUGIN = {"state.decider": "logreg", "state.enter": 2.5, "state.leave": 0.0}
MODES = (
    ("built-in", {}),
    ("weighted_z plugin", {"state.decider": "weighted_z"}),
    ("logreg plugin", PLUGIN),
)


def run(quick: bool, log=print) -> dict[str, Any]:
    from importlib.metadata import entry_points

    if not any(ep.name == "logreg" for ep in entry_points(group="closedloop.deciders")):
        log("  skipped: not installed (pip install -e examples/logreg_decider)")
        return {"skipped": "examples/logreg_decider not installed"}
    run_s = 8.0 if quick else 20.0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decider-") as tmp:
        for rnd in range(2 if quick else 3):
            for mode, extra in MODES:
                r = measure(64, 1000.0, run_s, Path(tmp), seed=rnd, **extra)
                keep = ("p50_ms", "p99_ms", "cpu_p99_ms", "pulses")
                cost = r["decider_cost_us"] or {}
                rows.append(
                    {
                        "mode": mode,
                        "round": rnd,
                        **{k: r[k] for k in keep},
                        "decide_p50_us": cost.get("p50"),
                        "decide_p99_us": cost.get("p99"),
                    }
                )
                log(f"  64x1000 {mode}: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms")
    return {"rows": rows, "run_s": run_s}


def to_markdown(result: dict[str, Any]) -> str:
    if "rows" not in result:
        return f"skipped: {result.get('skipped', '')}"
    lines = [
        "| mode | round | decision p50 (ms) | p99 (ms) | CPU p99 (ms) | decide() p50 / p99 (µs) "
        "| pulses |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['round']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
            f"{r['cpu_p99_ms']:.3f} | {_us(r['decide_p50_us'])} / {_us(r['decide_p99_us'])} | "
            f"{r['pulses']} |"
        )
    return "\n".join(lines)


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    import json
    import sys

    res = run("--quick" in sys.argv)
    print(json.dumps(res, indent=1))
    print(to_markdown(res))

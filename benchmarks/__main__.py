"""Run the benchmarks and write benchmarks/results/latest.json and latest.md.

    python -m benchmarks [NAME ...] [--quick] [--out DIR]      (./dev bench does this)

Names: decision, throughput, e2e, offline, memory, feedback, tune_speed, tune_cluster, clock
(default: all).
--quick: short runs (about 5 minutes in all) to check that everything works, written to quick.json
and quick.md beside latest.*, so the committed results stay; those come from a full run (about 20
minutes on a 2-core machine). A run of some names only goes to partial.json / partial.md. Not part
of the test suite.
The machine, versions, date, git commit and the load average around each benchmark are recorded:
on a shared machine other processes lengthen the latency tails (compare the CPU-time figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NAMES = (
    "decision",
    "throughput",
    "e2e",
    "offline",
    "memory",
    "feedback",
    "tune_speed",
    "tune_cluster",
    "clock",
    "phase",
    "decider",
)
GOALS = {
    "decision_p99_ms_64x1000": 1.0,
    "e2e_p50_ms": 2.0,
    "e2e_ratio": 10.0,
    "offline_x": 500.0,
}


def machine() -> dict[str, Any]:
    import mne
    import mne_lsl
    import numpy as np
    import pylsl
    import scipy

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = math.nan
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "mne": mne.__version__,
        "mne_lsl": mne_lsl.__version__,
        "pylsl": pylsl.__version__,
        "liblsl": str(pylsl.library_version()),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
    }


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def run_script(script: str, args: list[str]) -> dict[str, Any]:
    """Another helper's benchmark script, run as it is; its printed lines are the result."""
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0:
        lines.append(f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return {
        "command": f"python benchmarks/{script} {' '.join(args)}".strip(),
        "lines": lines,
        "wall_s": time.perf_counter() - t,
        "ok": proc.returncode == 0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all): {', '.join(NAMES)}",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="short runs (a smoke test), written to quick.json / quick.md",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="where latest.json and latest.md go (quick.* with --quick, partial.* for a subset)",
    )
    args = ap.parse_args(argv)
    names = args.names or list(NAMES)
    bad = [n for n in names if n not in NAMES]
    if bad:
        ap.error(f"unknown benchmark(s) {bad}; choose from {', '.join(NAMES)}")

    from benchmarks import bench_decision, bench_e2e, bench_offline

    def log(msg: str) -> None:
        print(msg, flush=True)

    res: dict[str, Any] = {
        "machine": machine(),
        "quick": args.quick,
        "results": {},
        "load_average": {},
    }
    log(
        f"closedloop benchmarks ({'quick' if args.quick else 'full'}) on "
        f"{res['machine']['cpu']}, {res['machine']['cores']} cores"
    )
    grid = None
    for name in names:
        load0, t0 = _load(), time.perf_counter()
        log(f"[{name}]")
        if name == "decision":
            grid = bench_decision.run_grid(args.quick, log=log)
            out: Any = grid
        elif name == "throughput":
            if grid is None:
                grid = bench_decision.run_grid(args.quick, log=log)
            out = bench_decision.throughput(grid, args.quick, log=log)
        elif name == "e2e":
            out = bench_e2e.run(args.quick, log=log)
        elif name == "offline":
            out = bench_offline.offline(args.quick, log=log)
        elif name == "memory":
            out = bench_offline.memory(args.quick, log=log)
        elif name == "clock":
            from benchmarks import bench_clock

            out = bench_clock.run(args.quick, log=log)
        elif name == "feedback":
            secs = "3" if args.quick else "10"
            out = run_script("bench_feedback_latency.py", ["--seconds", secs])
            for ln in out["lines"]:
                log(f"  {ln}")
        elif name == "phase":
            from benchmarks import bench_phase

            out = bench_phase.run(args.quick, log=log)
        elif name == "decider":
            from benchmarks import bench_decider

            out = bench_decider.run(args.quick, log=log)
        elif name == "tune_cluster":
            from benchmarks import bench_tune_cluster

            out = bench_tune_cluster.run(args.quick, log=log)
        else:  # tune_speed
            out = run_script(
                "bench_tune_speed.py",
                ["--minutes", "1", "--repeat", "1"]
                if args.quick
                else ["--minutes", "10", "--repeat", "2"],
            )
            for ln in out["lines"]:
                log(f"  {ln}")
        res["results"][name] = out
        res["load_average"][name] = {
            "before": load0,
            "after": _load(),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    res["goals"] = goals(res["results"])
    args.out.mkdir(parents=True, exist_ok=True)
    # a quick run never overwrites the committed results of a full run
    # the committed latest.* hold a full run; a quick or partial run goes beside them
    stem = "quick" if args.quick else "latest" if set(names) == set(NAMES) else "partial"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=_jsonable) + "\n")
    md = markdown(res)
    (args.out / f"{stem}.md").write_text(md)
    log("")
    log(md)
    log(f"written: {args.out / f'{stem}.json'}, {args.out / f'{stem}.md'}")
    return 0


def render(json_path: Path) -> str:
    """Re-write latest.md from a latest.json (after a change to the tables only)."""
    res = json.loads(json_path.read_text())
    md = markdown(res)
    json_path.with_suffix(".md").write_text(md)
    return md


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of issue [8] with the measured figure and whether it is met."""
    out = []

    def add(goal: str, value: float, limit: float, higher_is_better: bool, unit: str) -> None:
        met = value >= limit if higher_is_better else value < limit
        out.append(
            {
                "goal": goal,
                "value": value,
                "limit": limit,
                "unit": unit,
                "met": bool(met) if math.isfinite(value) else False,
            }
        )

    for row in r.get("decision") or []:
        if row["channels"] == 64 and row["sfreq_hz"] == 1000.0:
            add(
                "decision latency p99 at 64 ch x 1000 Hz",
                row["p99_ms"],
                GOALS["decision_p99_ms_64x1000"],
                False,
                "ms",
            )
            add(
                "decision latency p99 at 64 ch x 1000 Hz, thread CPU time",
                row["cpu_p99_ms"],
                GOALS["decision_p99_ms_64x1000"],
                False,
                "ms",
            )
    if "e2e" in r:
        e = r["e2e"]
        add(
            "end-to-end p50 on loopback",
            e["closedloop"]["p50_ms"],
            GOALS["e2e_p50_ms"],
            False,
            "ms",
        )
        add("baseline / closedloop end-to-end p50", e["ratio_p50"], GOALS["e2e_ratio"], True, "x")
    if "offline" in r:
        for row in r["offline"]["by_mode"]:
            how = "single chunks" if row["block_s"] is None else f"{row['block_s']:g} s blocks"
            add(
                f"offline speed, 32 ch x 500 Hz, decisions every {row['decision_every']} "
                f"samples, {how} (session)",
                row["session_x_realtime"],
                GOALS["offline_x"],
                True,
                "x real time",
            )
    return out


def _f(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def clock_markdown(x: dict[str, Any]) -> list[str]:
    """The bench_clock section: false gaps per stamping pattern, detection delay, model cost."""
    c = x["model_cost"]
    lines = [
        "## Loss, not jitter (bench_clock.py)",
        "",
        f"Amplifier-like stamping (benchmarks/pushers.py), every pattern at 250 Hz and 1 kHz "
        f"at once from another process, {x['seconds_per_stream']:g} s each, read by LslSource "
        "(jitter tolerance 20 ms, no counter channel):",
        "",
        "| pattern | rate | samples | faults | suspects cleared |",
        "|---|---|---|---|---|",
    ]
    for row in x["false_gaps"]:
        lines.append(
            f"| {row['pattern']} | {row['sfreq']:g} Hz | {row['samples']} | **{row['faults']}** "
            f"| {row['suspects_cleared']} |"
        )
    lines += [
        "",
        "Real losses (30 samples at 1 kHz, one 10-sample chunk at 250 Hz): GAP events and the "
        "delay from the push of the first sample after the hole to the event:",
        "",
        "| pattern | rate | lost | GAP | other faults | delay ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in x["detection"]:
        lines.append(
            f"| {row['pattern']} | {row['sfreq']:g} Hz | {row['lost']} | {row['gaps']} | "
            f"{row['other_faults']} | {row['delay_ms']} |"
        )
    lines += [
        "",
        f"Clock model cost per 10-sample chunk (timestamps + arrival check, {c['chunks']} "
        f"chunks): median {c['median_us']:.1f} µs, p99 {c['p99_us']:.1f} µs, max "
        f"{c['max_us']:.0f} µs (the max is a refit every 0.5 s of samples, or the machine).",
        "",
    ]
    return lines


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    r = res["results"]
    lines = [
        "# closedloop benchmark results",
        "",
        f"{m['date_utc']}, commit `{m['git_commit']}`, {'quick' if res['quick'] else 'full'} "
        f"run. Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}. "
        f"Python {m['python']}, numpy {m['numpy']}, scipy {m['scipy']}, mne {m['mne']}, "
        f"mne-lsl {m['mne_lsl']}, pylsl {m['pylsl']} (liblsl {m['liblsl']}).",
        "Load average (1 min) before each benchmark: "
        + ", ".join(f"{k} {v['before']:.1f}" for k, v in res["load_average"].items())
        + " (a shared machine lengthens the latency tails; thread CPU time is immune to that).",
        "",
    ]
    if res.get("goals"):
        lines += ["## Goals", "", "| goal | measured | target | met |", "|---|---|---|---|"]
        for g in res["goals"]:
            cmp = ">=" if "x" in g["unit"] else "<"
            lines.append(
                f"| {g['goal']} | {_f(g['value'])} {g['unit']} | {cmp} "
                f"{_f(g['limit'], 1)} {g['unit']} | {'yes' if g['met'] else '**no**'} |"
            )
        lines.append("")
    if r.get("decision"):
        lines += [
            "## Decision latency (chunk handed over -> trigger outputs returned), one core",
            "",
            "10-sample chunks fed in real time after calibration, armed, pulses firing; wall "
            "time (p50 / p99 / max) and the thread CPU time of the same steps (p50 / p99; it "
            "spans the chunk's construction and two clock reads more than the wall figure).",
            "",
            "| channels | rate (Hz) | p50 (ms) | p99 (ms) | max (ms) | CPU p50 (ms) | CPU p99 (ms)"
            " | mean step / chunk period (ms) | chunks |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["decision"]:
            lines.append(
                f"| {row['channels']} | {row['sfreq_hz']:.0f} | {row['p50_ms']:.3f} | "
                f"{row['p99_ms']:.3f} | {row['max_ms']:.3f} | {row['cpu_p50_ms']:.3f} | "
                f"{row['cpu_p99_ms']:.3f} | {row['step_mean_ms']:.3f} / "
                f"{row['chunk_period_ms']:.1f} | {row['chunks']} |"
            )
        lines.append("")
    if "throughput" in r:
        t = r["throughput"]
        cpu = t["cpu_64ch_1000hz"]
        lines += ["## Throughput", "", f"Configurations tried: {', '.join(t['tried'])}.", ""]
        for key, fail, how in (
            ("largest_ok", "failing", "wall-clock p99"),
            ("largest_ok_cpu", "failing_cpu", "thread-CPU-time p99"),
        ):
            best = t.get(key)
            lines.append(
                f"- Largest configuration processed in real time on one core with {how} under "
                "1 ms: "
                + (
                    f"**{best['channels']} channels x {best['sfreq_hz']:.0f} Hz** "
                    f"({best['channel_samples_per_s'] / 1e3:.0f} k channel-samples/s; p99 "
                    f"{best['p99_ms']:.3f} ms wall, {best['cpu_p99_ms']:.3f} ms CPU)"
                    if best
                    else "**none**"
                )
                + (f"; not meeting it: {', '.join(t[fail])}" if t.get(fail) else "")
                + "."
            )
        lines.append(
            f"- CPU use at 64 channels x 1000 Hz, fed in real time: "
            f"**{cpu['cpu_percent_of_one_core']:.1f} % of one core** (decision latency p50 "
            f"{cpu['p50_ms']:.3f} ms, p99 {cpu['p99_ms']:.3f} ms over {cpu['wall_s']:.0f} s)."
        )
        lines.append("")
    if "e2e" in r:
        e = r["e2e"]
        lines += [
            "## End to end over LSL (separate pusher, system and receiver processes, loopback)",
            "",
            "Push of the chunk holding the deciding sample -> receipt of the trigger marker; "
            f"{e['closedloop']['channels']} channels x {e['closedloop']['sfreq_hz']:.0f} Hz, "
            f"{e['closedloop']['chunk_samples']}-sample chunks; trigger.dwell_s = state.dwell_s "
            "= 0.",
            "",
            "| system | p50 (ms) | p99 (ms) | max (ms) | markers (in target blocks) / repetitions "
            "| signal change -> deciding sample (median s) | process CPU |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, label in (
            ("closedloop", "closedloop (Session + LslSource)"),
            ("baseline", "baseline (mne-lsl StreamLSL + scipy welch + threshold)"),
            ("echo", "LSL floor (pull and push back, no processing)"),
        ):
            if key not in e:
                continue
            x = e[key]
            lines.append(
                f"| {label} | {x['p50_ms']:.3f} | {x['p99_ms']:.3f} | {x['max_ms']:.3f} | "
                f"{x['markers']} ({x['markers_in_target']}) / {x['repetitions']} | "
                f"{x['detection_delay_s_median']:.3f} | {x['process_cpu_percent']:.1f} % |"
            )
        lines += [
            "",
            f"Baseline / closedloop: **{e['ratio_p50']:.1f}x** at p50, "
            f"{e['ratio_p99']:.1f}x at p99.",
            "",
        ]
    if "offline" in r:
        o = r["offline"]
        lines += [
            f"## Offline speed ({o['recording']}, 32 channels x 500 Hz, default config)",
            "",
            f"Best (median) of {o['runs']} runs, x real time.",
            "",
            "| decisions every (samples) | chain calls | whole session | per CPU second |"
            " processing loop alone | pulses |",
            "|---|---|---|---|---|---|",
        ]
        for row in o["by_mode"]:
            how = "one per chunk" if row["block_s"] is None else f"{row['block_s']:g} s blocks"
            same = " (the same)" if row["block_s"] and row["same_pulses_as_single_chunks"] else ""
            lines.append(
                f"| {row['decision_every']} | {how} | {row['session_x_realtime']:.0f} "
                f"({row['session_x_median']:.0f}) | {row['session_x_per_cpu_s']:.0f} | "
                f"{row['loop_x_realtime']:.0f} | {row['pulses']}{same} |"
            )
        lines.append("")
    if "memory" in r:
        x = r["memory"]
        lines += [
            "## Memory over a long accelerated run",
            "",
            f"Offline session, 64 channels x 1000 Hz, {x['stream_s'] / 60:.0f} stream minutes in "
            f"{x['wall_s']:.0f} s ({x['pulses']} pulses, {x['attempts']} attempts): resident "
            f"memory {x['rss_settled_mb']:.1f} MB after the first tenth -> {x['rss_end_mb']:.1f} "
            f"MB at the end: growth **{x['growth_mb']:+.1f} MB** "
            f"({x['slope_mb_per_stream_hour']:+.2f} MB per stream hour over the second half).",
            "",
        ]
    if "tune_cluster" in r:
        from benchmarks import bench_tune_cluster

        lines += bench_tune_cluster.markdown(r["tune_cluster"])
    if "clock" in r:
        lines += clock_markdown(r["clock"])
    if "phase" in r:
        from benchmarks import bench_phase

        md = bench_phase.to_markdown(r["phase"])
        lines += ["## Phase-locked pulses (bench_phase.py)", "", md]
    if "decider" in r:
        from benchmarks import bench_decider

        lines += [
            "## Decider plugin overhead (bench_decider.py)",
            "",
            bench_decider.to_markdown(r["decider"]),
            "",
        ]
    for key, title in (
        ("feedback", "Feedback (bench_feedback_latency.py)"),
        ("tune_speed", "Tuner speed (bench_tune_speed.py)"),
    ):
        if key in r:
            lines += [
                f"## {title}",
                "",
                f"`{r[key]['command']}`",
                "",
                "```",
                *r[key]["lines"],
                "```",
                "",
            ]
    lines.append(
        "Reproduce: `./dev bench` (all, about 20 min) or `./dev bench --quick`; "
        "`python -m benchmarks e2e decision` runs a selection."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

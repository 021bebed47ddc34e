"""Decision-to-TTL latency before / after the write-ahead audit (issue 14), interleaved.

    python -m benchmarks.ab_failsafe [--rev 3287111] [--pulses 1000]

Extracts `triggers/` of git revision `rev` into a temporary package `triggers_before` and
builds one TriggerUnit from it and one from the working tree, each with a serial TTL output on
its own real pty, a simulated stimulator, and an fsync'ed audit log on the session disk. Both
get the same pulse-requesting States in turn (which goes first alternates), one pulse per State
(stream time 1.1 s apart, offline interlock). Measured per pulse, with perf_counter:
decision -> TTL (on_state called -> the serial byte handed to the driver, what the stimulator
waits for) and decision -> done (on_state returned: outcome written); then the per-chunk call
without a pulse request (blocks of 1000 States, interleaved). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
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
import serial

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REV = "3287111"  # the last commit before issue 14's second safety pass


def _extract_before(rev: str, dest: Path) -> None:
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "triggers"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    (dest / "triggers").rename(dest / "triggers_before")
    for py in (dest / "triggers_before").glob("*.py"):
        text = py.read_text().replace("from triggers.", "from triggers_before.")
        py.write_text(text.replace("import triggers.", "import triggers_before."))


class StampedSerial(serial.Serial):
    """A real pty port that notes perf_counter when write() has handed the byte over."""

    t_written = float("nan")

    def write(self, data):
        n = super().write(data)
        StampedSerial.t_written = time.perf_counter()
        return n


def _build(pkg: str, folder: Path, port: str):
    unit_mod = importlib.import_module(f"{pkg}.unit")
    out_mod = importlib.import_module(f"{pkg}.outputs")
    il_mod = importlib.import_module(f"{pkg}.interlock")
    pol_mod = importlib.import_module(f"{pkg}.policy")
    audit_mod = importlib.import_module(f"{pkg}.audit")
    settings = importlib.import_module("triggers.settings")  # same models both sides
    il = il_mod.SafetyInterlock(
        settings.SafetySettings(min_interval_s=1.0, max_per_minute=60, session_cap=1800),
        live=False,
    )
    pol = pol_mod.TriggerPolicy(
        settings.PolicySettings(mode="repeat", dwell_s=0.0, repeat_interval_s=1.0)
    )
    outs = [
        out_mod.SerialTtlOutput(port, name="serial", serial_factory=StampedSerial),
        out_mod.SimulatedStimulator(),
    ]
    unit = unit_mod.TriggerUnit(pol, il, outs, audit_mod.AuditLog(folder / f"{pkg}.jsonl"))
    unit.arm("bench")
    return unit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=BEFORE_REV)
    ap.add_argument("--pulses", type=int, default=1000, help="pulses per version")
    ap.add_argument("--blocks", type=int, default=200, help="blocks of 1000 no-pulse calls")
    ap.add_argument("--dir", type=Path, default=ROOT / "sessions", help="audit logs go here")
    args = ap.parse_args(argv)
    from features.types import Label, State

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        _extract_before(args.rev, Path(tmp))
        sys.path.insert(0, tmp)
        args.dir.mkdir(parents=True, exist_ok=True)
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir)))
        ptys = {k: os.openpty() for k in ("before", "after")}
        for m, s in ptys.values():
            stack.callback(os.close, m)
            stack.callback(os.close, s)
        units = {
            "before": _build("triggers_before", folder, os.ttyname(ptys["before"][1])),
            "after": _build("triggers", folder, os.ttyname(ptys["after"][1])),
        }
        ttl: dict[str, list[float]] = {k: [] for k in units}
        done: dict[str, list[float]] = {k: [] for k in units}
        for i in range(args.pulses):
            t_stream = 1.0 + 1.1 * i
            state = State(t_stream, Label.TARGET, 2.0, 10.0, features={"f": 1.0})
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for k in order:
                StampedSerial.t_written = float("nan")
                t0 = time.perf_counter()
                a = units[k].on_state(state)
                t1 = time.perf_counter()
                assert a is not None, (k, i)
                assert a.fired, (k, i, a.reason, a.detail)
                ttl[k].append(1000.0 * (StampedSerial.t_written - t0))
                done[k].append(1000.0 * (t1 - t0))
                os.read(ptys[k][0], 16)  # the byte arrived on the other end
            time.sleep(0.002)  # pulses are >= 1 s apart live; let the disk settle a little
        # the per-chunk path without a pulse (a non-target State each chunk): blocks of 1000
        # calls, alternating which version goes first
        per_call: dict[str, list[float]] = {k: [] for k in units}
        t_base = 2.0 + 1.1 * args.pulses
        for b in range(args.blocks):
            order = ("before", "after") if b % 2 == 0 else ("after", "before")
            for k in order:
                states = [
                    State(t_base + 0.01 * (1000 * b + j), Label.NON_TARGET, 0.0, 1.0)
                    for j in range(1000)
                ]
                t0 = time.perf_counter()
                for st in states:
                    units[k].on_state(st)
                per_call[k].append(1e6 * (time.perf_counter() - t0) / 1000)
        for u in units.values():
            u.close()

    def stats(x: list[float]) -> dict[str, float]:
        a = np.asarray(x)
        return {
            "p50": round(float(np.median(a)), 4),
            "p99": round(float(np.percentile(a, 99)), 4),
            "max": round(float(a.max()), 4),
        }

    out = {
        "rev_before": args.rev,
        "pulses": args.pulses,
        "decision_to_ttl_ms": {k: stats(v) for k, v in ttl.items()},
        "decision_to_done_ms": {k: stats(v) for k, v in done.items()},
        "no_pulse_on_state_us_median_of_blocks": {
            k: round(float(np.median(v)), 3) for k, v in per_call.items()
        },
        "ttl_p50_delta_ms": round(float(np.median(ttl["after"]) - np.median(ttl["before"])), 4),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

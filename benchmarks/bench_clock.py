"""Loss, not jitter: false gaps and detection delay per stamping pattern, and the clock model's
cost per chunk.

    python -m benchmarks clock              (registered in benchmarks/__main__.py)
    python -m benchmarks.bench_clock [--seconds S]

1. Every pattern of benchmarks/pushers.py (ideal, push, usb, burst16, irregular, count) at
   250 Hz and 1 kHz, each pushed by its own process for S seconds (all streams at once: a loaded
   machine) and read by `LslSource` (no counter channel: the clock model alone): faults seen
   (should be 0) and how often a chunk was suspect and then cleared by the next one.
2. Real losses (30 samples at 1 kHz, one 10-sample chunk at 250 Hz, in each pattern): the
   delay from the push of the first sample after the hole to the GAP event (local clock).
3. `ClockModel.update` (+ the arrival check) per chunk, on synthetic stamps: median and p99 µs.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RATES = (250.0, 1000.0)
PATTERNS = ("ideal", "push", "usb", "burst16", "irregular", "count")
READY_TIMEOUT_S = 60.0


@dataclass
class Watched:
    """What one stream's consumer saw."""

    name: str
    pattern: str
    sfreq: float
    lose_n: int = 0
    n_samples: int = 0
    n_chunks: int = 0
    faults: list[Any] = field(default_factory=list)
    t_loss_push: float = float("nan")
    suspects_cleared: int = 0
    done: bool = False
    unit: Any = None  # an armed TriggerUnit fed this stream's health events (arm_dir given)
    t_disarmed: float = float("nan")  # local clock of the first disarm
    disarm_reason: str = ""
    armed: bool = False  # still armed at the end (before the unit was closed)

    def _armed_now(self) -> bool:
        return self.unit is not None and self.unit.interlock.state.value != "disarmed"

    @property
    def gaps(self) -> list[Any]:
        return [e for e in self.faults if e.kind.value == "gap"]

    @property
    def delay_ms(self) -> float:
        """First GAP's local time minus the push of the first sample after the hole."""
        gaps = self.gaps
        return (gaps[0].t_local - self.t_loss_push) * 1e3 if gaps else float("nan")


def spec(pattern: str, sfreq: float, seconds: float, lose_n: int = 0, seed: int = 0) -> dict:
    """One pusher spec (a unique stream name; a loss in the middle if lose_n)."""
    s = {
        "name": f"clk-{pattern}-{int(sfreq)}-{uuid.uuid4().hex[:8]}",
        "pattern": pattern,
        "sfreq": sfreq,
        "seconds": seconds,
        "seed": seed,
    }
    if lose_n:
        s["lose_at"] = round(seconds * sfreq / 2)
        s["lose_n"] = lose_n
    return s


def _armed_unit(audit_dir: Path, name: str) -> Any:
    """A live TriggerUnit (simulated stimulator), armed as an operator would."""
    from triggers.audit import AuditLog
    from triggers.interlock import SafetyInterlock
    from triggers.outputs import SimulatedStimulator
    from triggers.policy import TriggerPolicy
    from triggers.settings import PolicySettings, SafetySettings
    from triggers.unit import TriggerUnit

    unit = TriggerUnit(
        TriggerPolicy(PolicySettings()),
        SafetyInterlock(SafetySettings(), live=True),
        [SimulatedStimulator()],
        AuditLog(audit_dir / f"audit-{name}.jsonl", fsync=False),
    )
    unit.arm("cli_flag", operator="bench_clock")
    return unit


def watch(
    specs: list[dict],
    timeout_s: float,
    jitter_tolerance_s: float = 0.02,
    arm_dir: Path | None = None,
) -> list[Watched]:
    """Run the pushers (one child process) and read every stream until all are done.

    arm_dir: if given, each stream feeds its health events to an armed TriggerUnit (audit log
    written there), as the session does; `Watched.armed` tells whether it stayed armed.
    """
    from pylsl import local_clock

    from acquisition.lsl_source import LslSource

    # one process per stream, as one app per amplifier (one process with a thread per stream
    # made the pushers wait for each other's GIL: 20-35 ms late under load)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.pushers", json.dumps([s])],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for s in specs
    ]
    sel = selectors.DefaultSelector()
    for proc in procs:
        assert proc.stdout is not None
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ)
    pending = {proc.stdout.fileno(): "" for proc in procs}
    out = {
        s["name"]: Watched(s["name"], s["pattern"], s["sfreq"], s.get("lose_n", 0)) for s in specs
    }
    sources = {}
    try:

        def read_lines(wait_s: float) -> list[str]:
            """Complete lines the pushers printed (os.read: no buffering hides lines from
            select)."""
            lines: list[str] = []
            for key, _ in sel.select(timeout=wait_s):
                fd = key.fd
                data = os.read(fd, 65536).decode()
                if not data:
                    sel.unregister(fd)
                    continue
                pending[fd] += data
                *done, pending[fd] = pending[fd].split("\n")
                lines += done
            for line in lines:
                parts = line.split()
                if parts and parts[0] == "LOSS":
                    out[parts[1]].t_loss_push = float(parts[2])
                elif parts and parts[0] == "DONE":
                    out[parts[1]].done = True
            return lines

        deadline = time.monotonic() + READY_TIMEOUT_S
        ready = 0
        while ready < len(procs):
            ready += read_lines(0.1).count("READY")
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("pushers did not start")
        for s in specs:
            src = LslSource(
                name=s["name"],
                source_id=s["name"],
                resolve_timeout_s=30.0,
                counter_channel=None,
                jitter_tolerance_s=jitter_tolerance_s,
                stale_after_s=5.0,  # the streams end: no STALE in the drain time
            )
            sources[s["name"]] = src.connect()
            if arm_dir is not None:
                out[s["name"]].unit = _armed_unit(arm_dir, s["name"])
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        drain_until = float("inf")
        while time.monotonic() < min(deadline, drain_until):
            got = 0
            for name, src in sources.items():
                chunk = src.pull(0.0)
                w = out[name]
                # (a STALE before the first sample is this harness connecting one by one)
                w.faults += [e for e in chunk.events if e.is_fault and w.n_samples]
                if w.unit is not None and w.n_samples:
                    for e in chunk.events:
                        w.unit.on_health(e)
                    if not w._armed_now() and w.t_disarmed != w.t_disarmed:
                        w.t_disarmed = local_clock()
                        w.disarm_reason = w.unit.interlock.last_reason
                if chunk.n_samples:
                    got += 1
                    w.n_samples += chunk.n_samples
                    w.n_chunks += 1
            read_lines(0.0)
            if drain_until == float("inf") and all(w.done for w in out.values()):
                drain_until = time.monotonic() + 0.5
            if not got:
                time.sleep(0.001)
        for name, src in sources.items():
            clock = src.clock
            out[name].suspects_cleared = clock.n_suspects if clock is not None else 0
    finally:
        for src in sources.values():
            src.disconnect()
        for w in out.values():
            if w.unit is not None:
                w.armed = w._armed_now()
                w.unit.close()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
            if proc.stdin is not None:
                proc.stdin.close()
        sel.close()
    return list(out.values())


def model_cost(n_chunks: int = 20_000, chunk: int = 10, sfreq: float = 1000.0) -> dict:
    """µs per chunk of ClockModel.update (dejittered output) + update_backdated (arrival)."""
    from acquisition.clock import ClockModel

    rng = np.random.default_rng(0)
    model = ClockModel(sfreq, 0.02, 1024)
    arrival = ClockModel(sfreq, 0.02, 1024, report_early=False)
    ramp = np.arange(chunk) / sfreq
    out = np.empty(chunk)
    delays = rng.uniform(0.0, 0.004, n_chunks)
    costs = np.empty(n_chunks)
    for i in range(n_chunks):
        t_last = (i + 1) * chunk / sfreq + delays[i]
        ts = t_last - ramp[::-1]
        t = time.perf_counter()
        model.update(ts, out)
        arrival.update_backdated(t_last, chunk)
        costs[i] = time.perf_counter() - t
    costs *= 1e6
    return {
        "median_us": float(np.median(costs)),
        "p99_us": float(np.percentile(costs, 99)),
        "max_us": float(costs.max()),
        "chunks": n_chunks,
    }


def run(quick: bool = False, log=print, seconds: float | None = None) -> dict[str, Any]:
    secs = seconds if seconds is not None else (20.0 if quick else 180.0)
    res: dict[str, Any] = {"seconds_per_stream": secs}
    res["model_cost"] = model_cost()
    log(f"  clock model cost per chunk: {res['model_cost']}")
    specs = [
        spec(p, fs, secs, seed=k)
        for k, (p, fs) in enumerate((p, fs) for p in PATTERNS for fs in RATES)
    ]
    clean = watch(specs, secs + 60.0)
    rows = []
    for w in clean:
        row = {
            "pattern": w.pattern,
            "sfreq": w.sfreq,
            "samples": w.n_samples,
            "chunks": w.n_chunks,
            "faults": len(w.faults),
            "suspects_cleared": w.suspects_cleared,
            "fault_details": [f"{e.kind.value}: {e.detail}" for e in w.faults][:3],
        }
        rows.append(row)
        log(
            f"  {w.pattern:9s} {w.sfreq:6g} Hz: {w.n_samples} samples in {w.n_chunks} pulls, "
            f"faults {len(w.faults)}, suspects cleared {w.suspects_cleared}"
        )
    res["false_gaps"] = rows
    loss_specs = [
        spec(p, fs, 8.0, lose_n=30 if fs == 1000.0 else 10, seed=k)
        for k, (p, fs) in enumerate((p, fs) for p in PATTERNS for fs in RATES)
    ]
    lossy = watch(loss_specs, 70.0)
    rows = []
    for w in lossy:
        rows.append(
            {
                "pattern": w.pattern,
                "sfreq": w.sfreq,
                "lost": w.lose_n,
                "gaps": len(w.gaps),
                "other_faults": len(w.faults) - len(w.gaps),
                "delay_ms": round(w.delay_ms, 1),
                "detail": w.gaps[0].detail if w.gaps else "",
            }
        )
        log(
            f"  loss of {w.lose_n:2d} @ {w.sfreq:6g} Hz, {w.pattern:9s}: {len(w.gaps)} GAP, "
            f"delay {w.delay_ms:.1f} ms"
        )
    res["detection"] = rows
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="per stream (all at once)")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    res = run(seconds=args.seconds)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

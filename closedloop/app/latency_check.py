"""`closedloop latency-check`: the whole delay, amplifier included, measured on the bench.

Wire the stimulating output (the serial TTL box) back into the amplifier's trigger input. The
check arms the interlock explicitly, fires N test pulses through the same TriggerUnit a session
uses (interlock, outputs in their fixed order, one fsync'ed audit line each), at the config's
minimum interval, and finds each pulse as a rising edge in the trigger channel of the EEG stream
it reads over LSL. The delay of a pulse is the stream time of the first high sample minus the
local clock when the outputs were told to fire (both on the LSL clock, the EEG after
`time_correction`): output, trigger box, amplifier, its clock stamping and LSL, all in one
number. A loopback benchmark cannot see the amplifier part (50 ms has been measured on some).

The resolution is one sample period: the edge is seen at the first sample stamped at or after
it. Never with a person connected to the stimulator: the command says so and asks first.
"""

from __future__ import annotations

import html
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pylsl import local_clock

from closedloop.errors import UserError
from closedloop.timing import code_version, percentile_table, sha256_file

WARNING = """\
LATENCY CHECK: this fires {n} test pulses on the configured stimulating outputs ({outputs}),
{interval:g} s apart (the interlock's minimum interval), to measure the delay until each pulse
appears in the EEG's trigger channel '{channel}'.
  - The stimulating output must be wired to the amplifier's trigger input.
  - NEVER run this with a person connected to the stimulator or the amplifier.
  - A TMS stimulator on this output must be disabled or disconnected.
"""
CONFIRM = "fire"  # the word the operator types
TRIGGER_NAMES = ("trigger", "trig", "sti 014", "stim", "status", "markers", "marker")
EDGE_TIMEOUT_S = 0.9  # a pulse not seen within this is 'missing' (must stay below 1 s, the floor)


@dataclass
class PulseResult:
    attempt: int
    t_fire: float  # local clock when the outputs were told to fire (LSL clock)
    t_edge: float  # stream time of the first high sample (nan: not seen)
    delay_ms: float
    output_ms: dict[str, float]


class _OnDemand:
    """A trigger policy that asks for exactly one pulse each time `want` is set."""

    def __init__(self) -> None:
        self.want = False
        self.n = 0

    def update(self, state):
        from triggers.policy import PulseRequest

        if not self.want:
            return None
        self.want = False
        self.n += 1
        return PulseRequest(state.t_stream, state.t_stream, self.n, "latency_check")


def _trigger_index(ch_names: list[str], name: str | None) -> int:
    lower = [c.lower() for c in ch_names]
    if name is not None:
        if name.lower() not in lower:
            raise UserError(
                f"trigger channel {name!r} not in the stream (have: {', '.join(ch_names)})"
            )
        return lower.index(name.lower())
    for cand in TRIGGER_NAMES:
        if cand in lower:
            return lower.index(cand)
    raise UserError(
        f"no trigger channel found (have: {', '.join(ch_names)}); name it with --trigger-channel"
    )


def confirm(n: int, outputs: str, interval_s: float, channel: str, yes: bool) -> None:
    """Print the warning; unless `yes`, require the operator to type the confirmation word."""
    print(
        WARNING.format(n=n, outputs=outputs, interval=interval_s, channel=channel), file=sys.stderr
    )
    if yes:
        print("--yes given: no question asked.", file=sys.stderr)
        return
    print(f"Type '{CONFIRM}' to fire the test pulses: ", end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline().strip()
    except (OSError, ValueError):
        answer = ""
    if answer != CONFIRM:
        raise UserError(f"not confirmed (typed {answer!r}, expected {CONFIRM!r}): nothing fired")


def run_latency_check(
    config_path: Path,
    *,
    n: int = 20,
    trigger_channel: str | None = None,
    threshold: float = 0.5,
    yes: bool = False,
    out_root: Path = Path("sessions"),
) -> tuple[Path, list[PulseResult]]:
    """Fire `n` test pulses and measure each one's delay into the EEG; returns the report's
    folder and the pulses. threshold: trigger-channel value (stream units) above which it is
    high."""
    from acquisition.sources import source_from_settings
    from closedloop.config import load_config
    from features.types import Label, State
    from triggers.audit import AuditLog
    from triggers.interlock import SafetyInterlock
    from triggers.outputs import build_outputs
    from triggers.unit import TriggerUnit

    config = load_config(config_path)
    if not 1 <= n <= config.safety.session_cap:
        raise UserError(f"--n {n}: between 1 and the session cap ({config.safety.session_cap})")
    outputs = build_outputs(config.outputs)
    stim = [o for o in outputs if o.kind == "serial"]
    if not stim:
        raise UserError(
            f"{config_path}: no serial output in outputs.outputs: nothing would reach the "
            "amplifier's trigger input"
        )
    source = source_from_settings(config.source, live=True)  # as `run` builds it
    source.connect()
    try:
        ch_names = list(source.ch_names)
        sfreq = float(source.sfreq)
        k = _trigger_index(ch_names, trigger_channel)
        scale = float(source.scales[k])  # back to the stream's own units
        interval_s = float(config.safety.min_interval_s)
        names = ", ".join(f"{o.name} ({o.port})" for o in stim)
        confirm(n, names, interval_s, ch_names[k], yes)

        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        folder = Path(out_root) / f"latency-check-{stamp}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(Path(config_path).read_text(encoding="utf-8"))
        policy = _OnDemand()
        interlock = SafetyInterlock(config.safety, live=True)
        unit = TriggerUnit(policy, interlock, outputs, AuditLog(folder / "audit.jsonl"))
        try:
            results = _fire_and_find(
                source, unit, policy, k, scale, threshold, n, interval_s, State, Label
            )
        finally:
            unit.close("latency check finished")
    finally:
        source.disconnect()
    write_latency_report(folder, results, ch_names[k], sfreq, config_path)
    return folder, results


def _fire_and_find(source, unit, policy, k, scale, threshold, n, interval_s, State, Label):
    """The loop: pull, fire when due (and the line is low), find the edge of the pulse in flight."""
    results: list[PulseResult] = []
    pending: tuple[Any, float] | None = None  # (attempt, t_fire)
    last_high = False
    t_next = local_clock()
    deadline = local_clock() + n * (interval_s + 2 * EDGE_TIMEOUT_S) + 10.0
    armed = False
    while len(results) < n:
        if local_clock() > deadline:
            raise RuntimeError(f"latency check timed out with {len(results)} of {n} pulses")
        chunk = source.pull(0.002)
        for ev in chunk.events:
            unit.on_health(ev)
            if ev.is_fault:
                raise RuntimeError(f"stream fault during the check: {ev.kind.value} {ev.detail}")
        if not chunk.n_samples:
            continue
        high = chunk.data[:, k] / scale > threshold
        if pending is not None:
            attempt, t_fire = pending
            prev = np.concatenate(([last_high], high[:-1]))
            edges = np.flatnonzero(high & ~prev & (chunk.timestamps >= t_fire - 1e-3))
            if edges.size:
                t_edge = float(chunk.timestamps[edges[0]])
                delay_ms = 1000.0 * (t_edge - t_fire)
                results.append(
                    PulseResult(attempt.attempt_number, t_fire, t_edge, delay_ms, attempt.output_ms)
                )
                pending = None
            elif local_clock() - t_fire > EDGE_TIMEOUT_S:
                results.append(
                    PulseResult(
                        attempt.attempt_number, t_fire, math.nan, math.nan, attempt.output_ms
                    )
                )
                pending = None
        last_high = bool(high[-1])
        if not armed:
            # armed by this explicit command, only once the stream flows
            unit.arm("latency_check_cli", operator="cli", t_stream=chunk.t_last)
            armed = True
        if pending is None and not last_high and local_clock() >= t_next and len(results) < n:
            policy.want = True
            state = State(t_stream=chunk.t_last, label=Label.TARGET, score=0.0, time_in_state_s=0.0)
            attempt = unit.on_state(state, chunk.t_arrival)
            if attempt is None or not attempt.fired:
                t_next = local_clock() + 0.05  # vetoed (e.g. refractory on the local clock)
                if attempt is not None and attempt.reason not in ("refractory", "rate_limit"):
                    raise RuntimeError(f"test pulse vetoed: {attempt.reason} {attempt.detail}")
                continue
            pending = (attempt, attempt.t_local)
            t_next = attempt.t_local + interval_s + 0.01  # the interlock's limit, plus 10 ms
    return results


def write_latency_report(
    folder: Path, results: list[PulseResult], channel: str, sfreq: float, config_path: Path
) -> Path:
    """latency.json and latency.html (the percentile table, every pulse) in `folder`."""
    from closedloop.export.report import CSS, DISCLAIMER, timing_html

    delays = [r.delay_ms for r in results]
    table = {"trigger_delay_ms": percentile_table(delays)}
    missing = sum(1 for d in delays if not math.isfinite(d))
    doc = {
        "what": "decision (outputs told to fire) to the trigger's first high sample in the EEG",
        "trigger_channel": channel,
        "sfreq": sfreq,
        "resolution_ms": 1000.0 / sfreq,
        "pulses": len(results),
        "missing": missing,
        "timing": table,
        "per_pulse": [asdict(r) for r in results],
        "config_sha256": sha256_file(folder / "config.yaml"),
        "config": str(config_path),
        "code": code_version(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    text = json.dumps(_finite(doc), indent=2)
    (folder / "latency.json").write_text(text + "\n", encoding="utf-8")
    rows = "".join(
        f"<tr><td>{r.attempt}</td><td>{r.t_fire:.6f}</td><td>{r.t_edge:.6f}</td>"
        f"<td>{r.delay_ms:.3f}</td></tr>"
        for r in results
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>closedloop latency check</title>
<style>{CSS}</style></head><body>
<h1>Latency check: {html.escape(folder.name)}</h1>
<p class="disclaimer">{html.escape(DISCLAIMER)}</p>
<p>{len(results)} test pulses, {missing} not seen in the trigger channel
'{html.escape(channel)}' ({sfreq:g} Hz: resolution {1000.0 / sfreq:.3f} ms). Delay: the stream
time of the first high sample minus the local clock when the outputs were told to fire:
output, trigger box, amplifier and LSL transport together.</p>
{timing_html(table)}
<table><tr><th>attempt</th><th>fired (LSL clock, s)</th><th>seen in the EEG (s)</th>
<th>delay (ms)</th></tr>{rows}</table>
<p>config sha256 <code>{doc["config_sha256"]}</code>; code
{html.escape(str(doc["code"]["git_describe"] or doc["code"]["package_version"]))}, sources
sha256 <code>{doc["code"]["source_sha256"]}</code></p>
<script type="application/json" id="report-data">{text}</script>
</body></html>
"""
    path = folder / "latency.html"
    path.write_text(page, encoding="utf-8")
    return path


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x

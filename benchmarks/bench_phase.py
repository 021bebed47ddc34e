"""Phase accuracy of the causal estimators against the truth and the acausal reference.

    python -m benchmarks.bench_phase [--quick] [--horizon-ms 5] [--out benchmarks/results]

Data: signals with a known phase (1/f background + a bursting 10 Hz rhythm, graded in-band SNR),
the eyes-closed stretch of the OpenBCI Cyton recording (O1 and O2 mean, 250 Hz, 30-75 s) and
the PhysioNet motor run (mean of O1, Oz, O2, 160 Hz; C3 Hjorth for mu) from ../shared/data.
Each estimator is fitted on the first third (`PhaseTracker.fit`: its bias at the horizon, ETP's
cycle), then evaluated every ~97 ms on the rest where the reference amplitude is above its
median ("inside the state"): the phase forecast `horizon` ahead against the reference there.
Reported per estimator and per SNR bin (narrow-band SNR of the 1 s before each point, dB over a
1/f fit): bias, circular SD, PLV, shares within +-30 / +-45 deg, and the cost of one estimate.
Scheduled pulses end to end (`scheduled`): the phase gate as the trigger runs it (fitted on the
first third, the amplitude gate at the calibration median, `plan_live` with the deciding sample
3 ms old, a request held and planned again every 10 ms until the target is within max_lead_ms
(25 ms) or the look-ahead ends), the pulse placed at the planned instant plus the measured
scheduling error of the trigger unit's own sleep-then-spin wait (`TriggerUnit._wait_until`,
timed here on this machine), scored against the truth or the reference at the instant the
pulse leaves.
Hot path (`decision`): the decision latency of bench_decision at 64 ch x 1 kHz, fed in real
time, with phase mode off and on (O1/Oz/O2 mean, ecHT, gates open so pulses are planned),
interleaved; in phase mode a pulse's own chunk waits for the phase on purpose and is left out.
Writes phase.json and phase.md; prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.phase_signals import known_phase_signal
from features import phase as ph

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SNR_BINS_DB = (-np.inf, 0.0, 3.0, 6.0, 10.0, np.inf)


def _bin_name(lo: float, hi: float) -> str:
    if not math.isfinite(lo):
        return f"< {hi:g} dB"
    if not math.isfinite(hi):
        return f">= {lo:g} dB"
    return f"{lo:g}-{hi:g} dB"


def evaluate(
    x: np.ndarray,
    sfreq: float,
    band: tuple[float, float],
    truth: np.ndarray | None,
    horizon_s: float,
    step_s: float = 0.097,
) -> list[dict]:
    """One row per (estimator, SNR bin) on signal x (n,); truth: the known phase or None (then
    the acausal reference is the truth)."""
    ref, amp, spread = ph.reference_phase(x, sfreq, band)
    target = ref if truth is None else truth
    n_fit = x.size // 3
    h = round(horizon_s * sfreq)
    snr_n = round(1.0 * sfreq)
    ends = np.arange(max(n_fit, snr_n) + round(0.5 * sfreq), x.size - h, round(step_s * sfreq))
    ends = ends[amp[ends - 1] >= np.median(amp[n_fit:])]
    snr = np.array([ph.narrowband_snr_db(x[e - snr_n : e], sfreq, band) for e in ends])
    rows = []
    for name in ph.ESTIMATORS:
        tr = ph.PhaseTracker(np.ones(1), sfreq, band, name, 0.5, horizon_s)
        tr.fit(x[:n_fit])
        errs, costs = [], []
        for e in ends:
            tr._push_signal(x[e - tr.n : e])
            t0 = time.perf_counter()
            est = tr.estimate()
            costs.append(time.perf_counter() - t0)
            errs.append(est.phase - target[e - 1 + h])
        errs_a = np.asarray(errs)
        for lo, hi in [*itertools.pairwise(SNR_BINS_DB), (-np.inf, np.inf)]:
            sel = (snr >= lo) & (snr < hi)
            if sel.sum() < 10:
                continue
            st = ph.phase_error_stats(errs_a[sel])
            rows.append(
                {
                    "estimator": name,
                    "snr_bin": "all"
                    if not (math.isfinite(lo) or math.isfinite(hi))
                    else _bin_name(lo, hi),
                    **st,
                    "cost_us_median": 1e6 * float(np.median(costs)),
                    "reference_spread_deg": math.degrees(float(np.median(spread[ends - 1]))),
                }
            )
    return rows


AGE_S = 0.003  # the deciding sample's age at planning (pull + features, measured 1-3 ms live)
CHUNK_S = 0.01  # the decision grid while a request is held (10-sample chunks at 1 kHz)


def scheduling_error_ms(n: int = 200, seed: int = 0) -> np.ndarray:
    """The trigger unit's wait, timed: n waits of 0-100 ms (uniform); actual minus planned
    (ms, (n,)). Calls TriggerUnit._wait_until itself on a stand-in with a never-halted
    interlock."""
    from types import SimpleNamespace

    from pylsl import local_clock

    from triggers.unit import TriggerUnit

    unit = SimpleNamespace(
        interlock=SimpleNamespace(halted=lambda: False), _clock=local_clock, keepalive=None
    )
    rng = np.random.default_rng(seed)
    out = np.empty(n)
    for i, d in enumerate(rng.uniform(0.0, 0.1, n)):
        t = local_clock() + d
        TriggerUnit._wait_until(unit, t)
        out[i] = 1000.0 * (local_clock() - t)
    return out


def evaluate_scheduled(
    x: np.ndarray,
    sfreq: float,
    band: tuple[float, float],
    truth: np.ndarray | None,
    sched_ms: np.ndarray,
    step_s: float = 0.097,
) -> list[dict]:
    """Scheduled pulses per estimator and SNR bin: error at the instant each pulse leaves."""
    from triggers.phase_gate import PhaseGate, PhaseSettings

    ref, _amp, _ = ph.reference_phase(x, sfreq, band)
    target_phase = ref if truth is None else truth
    n_fit = x.size // 3
    snr_n = round(1.0 * sfreq)
    rng = np.random.default_rng(1)
    rows = []
    for name in ph.ESTIMATORS:
        s = PhaseSettings(
            enabled=True, estimator=name, channels=["X"], spatial="channel", band=band,
            min_snr_db=-20.0, min_amplitude_percentile=50.0, target_deg=180.0,
        )  # fmt: skip
        gate = PhaseGate(s, ["X"], sfreq)
        gate.fit(x[:n_fit])
        step = round(step_s * sfreq)
        errs, snrs, timing = [], [], []
        chunk = max(1, round(CHUNK_S * sfreq))
        for e0 in range(n_fit + snr_n, x.size - round(0.8 * sfreq), step):
            # a request at e0, planned again on each chunk while held (as the trigger does)
            e = e0
            gate.push(x[e - gate.tracker.n : e, None])
            gate._chunk_s = CHUNK_S
            plan = gate.plan_live(AGE_S)
            while plan.veto == "phase_hold":
                gate.push(x[e : e + chunk, None])
                e += chunk
                plan = gate.plan_live(AGE_S, (e - e0) / sfreq)
            if plan.veto is not None:
                continue
            late_s = float(rng.choice(sched_ms)) / 1000.0
            # the newest sample is e - 1; the pulse leaves age + delay + scheduling error later
            k = e - 1 + round((AGE_S + plan.delay_s + late_s) * sfreq)
            errs.append(target_phase[k] - math.pi)
            snrs.append(ph.narrowband_snr_db(x[e - snr_n : e], sfreq, band))
            timing.append(late_s * 1000.0)
        errs_a, snr_a, timing_a = np.asarray(errs), np.asarray(snrs), np.asarray(timing)
        for lo, hi in [*itertools.pairwise(SNR_BINS_DB), (-np.inf, np.inf)]:
            sel = (snr_a >= lo) & (snr_a < hi)
            if sel.sum() < 10:
                continue
            rows.append(
                {
                    "estimator": name,
                    "snr_bin": "all"
                    if not (math.isfinite(lo) or math.isfinite(hi))
                    else _bin_name(lo, hi),
                    **ph.phase_error_stats(errs_a[sel]),
                    "sched_error_ms_median": float(np.median(timing_a[sel])),
                    "sched_error_ms_p99": float(np.percentile(timing_a[sel], 99)),
                }
            )
    return rows


PHASE_ON = {
    "phase.enabled": True,
    "phase.channels": ["O1", "Oz", "O2"],
    "phase.spatial": "mean",
    "phase.min_snr_db": -20.0,  # gates open: the cost of planning pulses is measured too
    "phase.min_amplitude_percentile": 0.0,
}


def decision_cost(quick: bool, log=print) -> list[dict]:
    """bench_decision.measure at 64 ch x 1 kHz, phase mode off / on, interleaved (2 rounds)."""
    import tempfile

    from benchmarks.bench_decision import measure

    run_s = 8.0 if quick else 20.0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-phase-") as tmp:
        for rnd in range(2):
            for mode, extra in (("off", {}), ("phase", PHASE_ON)):
                r = measure(64, 1000.0, run_s, Path(tmp), seed=rnd, **extra)
                keep = ("p50_ms", "p99_ms", "cpu_p99_ms", "pulses", "cpu_percent_of_one_core")
                rows.append({"mode": mode, "round": rnd, **{k: r[k] for k in keep}})
                log(f"  decision 64x1000 phase {mode}: p99 {r['p99_ms']:.3f} ms")
    return rows


def run(quick: bool, horizon_ms: float = 5.0, log=print) -> dict:
    """Everything: the estimators at a fixed horizon and the scheduled pulses, per data set."""
    sched = scheduling_error_ms(100 if quick else 400)
    results: dict = {
        "horizon_ms": horizon_ms,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "sched_error_ms": {
            "median": float(np.median(sched)),
            "p99": float(np.percentile(sched, 99)),
            "max": float(sched.max()),
            "n": int(sched.size),
        },
        "datasets": {},
        "scheduled": {},
    }
    for name, x, sfreq, band, truth in datasets(quick):
        t0 = time.perf_counter()
        results["datasets"][name] = evaluate(x, sfreq, band, truth, horizon_ms / 1000.0)
        results["scheduled"][name] = evaluate_scheduled(x, sfreq, band, truth, sched)
        log(f"  {name}: {time.perf_counter() - t0:.1f} s")
    results["decision"] = decision_cost(quick, log)
    return results


def datasets(quick: bool):
    """(name, x, sfreq, band, truth) for every data set available."""
    dur = 60.0 if quick else 240.0
    for snr_db in (0.0, 3.0, 6.0, 10.0):
        s = known_phase_signal(dur, 1000.0, 10.0, snr_db, seed=int(10 + snr_db))
        yield f"generated 10 Hz, {snr_db:g} dB, 1 kHz", s.x, s.sfreq, (8.0, 12.0), s.phase
    if not SHARED.is_dir():
        return
    from acquisition.readers import load_recording

    cyton = SHARED / "openbci-cyton-blinks-jaw-alpha.txt"
    if cyton.exists():
        raw = load_recording(cyton).crop(30.0, 75.0)
        x = raw.get_data(picks=["O1", "O2"]).mean(axis=0) * 1e6
        yield "OpenBCI eyes closed, O1+O2, 250 Hz", x, raw.info["sfreq"], (8.0, 12.0), None
    motor = SHARED / "eegmmidb-S003R03-motor.edf"
    if motor.exists():
        raw = load_recording(motor)
        data = raw.get_data() * 1e6
        names = raw.ch_names
        w = ph.spatial_weights(names, ["O1", "Oz", "O2"], "mean")
        yield "PhysioNet motor, O1+Oz+O2, 160 Hz", w @ data, raw.info["sfreq"], (8.0, 12.0), None
        w = ph.spatial_weights(names, "C3", "hjorth")
        yield (
            "PhysioNet motor, C3 Hjorth mu, 160 Hz",
            w @ data,
            raw.info["sfreq"],
            (8.0, 13.0),
            None,
        )


def to_markdown(results: dict) -> str:
    lines = [
        f"Phase accuracy, horizon {results['horizon_ms']:g} ms ({results['date']}); errors "
        "against the true phase (generated) or the acausal reference (real).",
        "",
        "| data | estimator | SNR bin | n | bias deg | circ SD deg | PLV | within 30 | "
        "within 45 | cost µs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results["datasets"].items():
        for r in rows:
            lines.append(
                f"| {name} | {r['estimator']} | {r['snr_bin']} | {r['n']} | "
                f"{r['bias_deg']:+.1f} | {r['circ_sd_deg']:.1f} | {r['plv']:.2f} | "
                f"{r['within_30']:.2f} | {r['within_45']:.2f} | {r['cost_us_median']:.0f} |"
            )
    if results.get("scheduled"):
        t = results["sched_error_ms"]
        lines += [
            "",
            f"Scheduled pulses end to end (target 180 deg, amplitude gate at the calibration "
            f"median, sample 3 ms old at planning); the trigger's wait here: scheduling error "
            f"median {t['median']:.3f} ms, p99 {t['p99']:.3f} ms, max {t['max']:.3f} ms "
            f"(n={t['n']}).",
            "",
            "| data | estimator | SNR bin | n | bias deg | circ SD deg | PLV | within 30 | "
            "within 45 | sched err p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, rows in results["scheduled"].items():
            for r in rows:
                lines.append(
                    f"| {name} | {r['estimator']} | {r['snr_bin']} | {r['n']} | "
                    f"{r['bias_deg']:+.1f} | {r['circ_sd_deg']:.1f} | {r['plv']:.2f} | "
                    f"{r['within_30']:.2f} | {r['within_45']:.2f} | "
                    f"{r['sched_error_ms_p99']:.3f} |"
                )
    if results.get("decision"):
        lines += [
            "",
            "Decision latency at 64 ch x 1 kHz fed in real time (bench_decision), phase mode off "
            "and on, interleaved:",
            "",
            "| phase mode | round | p50 ms | p99 ms | thread CPU p99 ms | pulses | CPU % |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["decision"]:
            lines.append(
                f"| {r['mode']} | {r['round']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                f"{r['cpu_p99_ms']:.3f} | {r['pulses']} | {r['cpu_percent_of_one_core']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--horizon-ms", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    results = run(args.quick, args.horizon_ms)
    md = to_markdown(results)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "phase_quick" if args.quick else "phase"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (args.out / f"{stem}.md").write_text(md, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

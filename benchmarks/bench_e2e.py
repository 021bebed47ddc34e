"""End-to-end latency over real LSL on loopback: closedloop vs. a baseline a user might write.

    python -m benchmarks e2e [--quick]

Three separate processes per run (plus this one, which only starts and collects them):

- pusher: an LSL outlet (64 channels x 1000 Hz, float32, 10-sample chunks on a drift-free real-time
  schedule). 13 s of background first (the calibration), then repetitions of 1.0 s of the target
  state (strong posterior alpha + frontal-midline theta) and 1.5 s of background. It records
  `local_clock()` just before each `push_chunk`.
- the system under test, either
  * closedloop: `Session(config, LslSource(...), live=True, arm_action=...)`, the real live
    session (auto-calibration, armed after it, LSL pulse-marker outlet, state outlet; XDF off),
    with trigger.dwell_s = state.dwell_s = 0 so the latency is the system's own; or
  * baseline: mne-lsl `StreamLSL` (1 ms acquisition delay) polled in a loop; on new samples,
    `scipy.signal.welch` over the last 1 s of the six score channels, log alpha + log theta band
    power, a threshold (calibration mean + 3 SD to enter, + 1 SD to leave, 1 s minimum interval)
    and a hand-written pylsl marker outlet carrying the newest sample's timestamp.
- receiver: an inlet on the marker stream blocking in `pull_sample`; records `local_clock()` at
  each receipt.

The deciding sample of a marker is the sample whose chunk produced it (the marker carries its
stream time; sample index = (t_stream - t0) x sfreq). End-to-end latency = receipt time - push time
of the chunk holding that sample: LSL transport in, pull, decision, marker push, LSL transport out.
pylsl's local_clock is one clock for all processes on the machine.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

N_CH = 64
SFREQ_HZ = 1000.0
CHUNK = 10
CAL_S = 13.0
ON_S, OFF_S = 1.0, 1.5
ENTER_Z, LEAVE_Z = 3.0, 1.0
BASELINE_WINDOW_S = 1.0
BASELINE_POLL_S = 0.001  # the baseline's loop sleeps this long when no new sample is there
MIN_INTERVAL_S = 1.0


def _reps(quick: bool) -> int:
    return 12 if quick else 80


def _duration_s(reps: int) -> float:
    return CAL_S + 0.5 + reps * (ON_S + OFF_S) + 1.0


# ----------------------------------------------------------------------------- pusher process
def pusher(name: str, reps: int, out: Path) -> None:
    import pylsl

    from benchmarks.synth import alternating_blocks, synth

    blocks = alternating_blocks(CAL_S + 0.5, reps, ON_S, OFF_S)
    names, data = synth(N_CH, SFREQ_HZ, _duration_s(reps), blocks, seed=3)
    data_uv = np.ascontiguousarray(data * 1e6, dtype=np.float32)
    info = pylsl.StreamInfo(name, "EEG", N_CH, SFREQ_HZ, pylsl.cf_float32, name)
    chans = info.desc().append_child("channels")
    for ch in names:
        c = chans.append_child("channel")
        c.append_child_value("label", ch)
        c.append_child_value("unit", "microvolts")
        c.append_child_value("type", "EEG")
    outlet = pylsl.StreamOutlet(info, CHUNK, 30)
    deadline = time.monotonic() + 60
    while not outlet.have_consumers():
        if time.monotonic() > deadline:
            raise SystemExit("pusher: no consumer within 60 s")
        time.sleep(0.01)
    time.sleep(0.5)  # let the consumer finish subscribing
    n_chunks = data_uv.shape[0] // CHUNK
    t_push = np.zeros(n_chunks)
    late = 0
    t0 = pylsl.local_clock() + 0.05
    for i in range(n_chunks):
        last = (i + 1) * CHUNK - 1
        due = t0 + (last + 1) / SFREQ_HZ  # the last sample exists at this time
        rest = due - pylsl.local_clock()
        if rest > 0.0005:
            time.sleep(rest - 0.0005)
        while pylsl.local_clock() < due:  # spin the last half millisecond: on-time pushes
            pass
        now = pylsl.local_clock()
        late += now - due > CHUNK / SFREQ_HZ
        t_push[i] = now
        outlet.push_chunk(data_uv[i * CHUNK : last + 1], t0 + last / SFREQ_HZ)
    time.sleep(1.0)
    np.save(out.with_suffix(".npy"), t_push)
    out.write_text(
        json.dumps(
            {
                "t0": t0,
                "n_chunks": n_chunks,
                "late": int(late),
                "blocks": blocks,
                "names": list(names),
            }
        )
    )


# --------------------------------------------------------------------------- receiver process
def receiver(marker_name: str, stop_after_s: float, out: Path) -> None:
    import pylsl

    found = pylsl.resolve_byprop("name", marker_name, 1, 60.0)
    if not found:
        raise SystemExit(f"receiver: no marker stream {marker_name!r}")
    inlet = pylsl.StreamInlet(found[0], max_buflen=30)
    inlet.open_stream(timeout=10)
    got = []
    end = pylsl.local_clock() + stop_after_s
    stop_file = out.with_suffix(".stop")  # the orchestrator creates it once the system ended
    while pylsl.local_clock() < end and not stop_file.exists():
        sample, _ts = inlet.pull_sample(timeout=0.2)
        if sample is not None:
            t = pylsl.local_clock()
            got.append((t, sample[0]))
    out.write_text(json.dumps([{"t_recv": t, "payload": p} for t, p in got]))


# ---------------------------------------------------------------------- systems under test
def _usage() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss}


def system(name: str, session_name: str, reps: int, out: Path) -> None:
    import pylsl

    from acquisition.lsl_source import LslSource
    from benchmarks.synth import bench_config
    from closedloop.session import Session

    config = bench_config(
        **{
            "session.name": session_name,
            "session.duration_s": _duration_s(reps) - 0.5,
            "state.enter": ENTER_Z,
            "state.leave": LEAVE_Z,
            "source.counter_channel": None,
        }
    )
    source = LslSource(name=name, source_id=name, resolve_timeout_s=30, counter_channel=None)
    arrivals: dict[float, float] = {}  # t_stream of a chunk's last sample -> its t_arrival

    def note_arrival(chunk, state) -> None:  # a tap: after the outputs, costs ~1 µs
        arrivals[chunk.t_last] = chunk.t_arrival

    with tempfile.TemporaryDirectory() as tmp:
        session = Session(config, source, live=True, out_root=Path(tmp), arm_action="benchmark")
        orig_build = session._add_live_outlets

        def add_tap() -> None:  # the pipeline exists once the live outlets are added
            orig_build()
            session.pipeline.taps.insert(0, note_arrival)

        session._add_live_outlets = add_tap
        u0, w0 = _usage(), pylsl.local_clock()
        summary = session.run()
        u1, w1 = _usage(), pylsl.local_clock()
    (out.with_suffix(".arrivals.json")).write_text(json.dumps(list(arrivals.items())))
    out.write_text(
        json.dumps(
            {
                "cpu_s": u1["cpu_s"] - u0["cpu_s"],
                "wall_s": w1 - w0,
                "maxrss_kb": u1["maxrss_kb"],
                "pulses": summary.get("pulses"),
                "decision_latency_ms": summary.get("latency_ms"),
                "attempts": summary.get("attempts"),
                "vetoes_by_reason": summary.get("vetoes_by_reason"),
                "stop_reason": summary.get("stop_reason"),
                "faults": summary.get("faults"),
            },
            default=str,
        )
    )


def baseline(name: str, marker_name: str, reps: int, out: Path) -> None:
    """What a user might write: mne-lsl StreamLSL + scipy welch + threshold + pylsl markers."""
    import pylsl
    from mne_lsl.stream import StreamLSL
    from scipy.signal import welch

    from benchmarks.synth import FRONTAL_MIDLINE, POSTERIOR

    stream = StreamLSL(bufsize=2.0, name=name, source_id=name).connect(acquisition_delay=0.001)
    fs = stream.info["sfreq"]
    picks = [*FRONTAL_MIDLINE, *POSTERIOR]
    marker = pylsl.StreamOutlet(
        pylsl.StreamInfo(marker_name, "Markers", 1, 0, pylsl.cf_string, marker_name)
    )

    def score() -> tuple[float, float]:
        data, ts = stream.get_data(winsize=BASELINE_WINDOW_S, picks=picks)
        f, psd = welch(data, fs=fs, nperseg=int(fs / 2))
        theta = psd[:2, (f >= 4) & (f < 8)].mean()
        alpha = psd[2:, (f >= 8) & (f < 13)].mean()
        return float(np.log10(theta) + np.log10(alpha)), float(ts[-1])

    u0, w0 = _usage(), pylsl.local_clock()
    while stream.n_new_samples < fs * 2:  # fill the window and let the filters of a user settle
        time.sleep(0.01)
    cal, t_first = [], None
    end_cal = None
    while True:  # calibration: scores over the background part
        if stream.n_new_samples == 0:
            time.sleep(BASELINE_POLL_S)
            continue
        s, t = score()
        t_first = t if t_first is None else t_first
        end_cal = end_cal or t_first + CAL_S - 3.5
        cal.append(s)
        if t >= end_cal:
            break
    mu, sd = float(np.mean(cal)), float(np.std(cal))
    enter, leave = mu + ENTER_Z * sd, mu + LEAVE_Z * sd
    in_state, last_pulse, n_pulses = False, -math.inf, 0
    stop_at = pylsl.local_clock() + _duration_s(reps) - CAL_S
    while pylsl.local_clock() < stop_at:
        if stream.n_new_samples == 0:
            time.sleep(BASELINE_POLL_S)
            continue
        s, t = score()
        if not in_state and s > enter:
            in_state = True
            if pylsl.local_clock() - last_pulse >= MIN_INTERVAL_S:
                marker.push_sample([json.dumps({"t_stream": t, "score": s})])
                last_pulse = pylsl.local_clock()
                n_pulses += 1
        elif in_state and s < leave:
            in_state = False
    u1, w1 = _usage(), pylsl.local_clock()
    stream.disconnect()
    out.write_text(
        json.dumps(
            {
                "cpu_s": u1["cpu_s"] - u0["cpu_s"],
                "wall_s": w1 - w0,
                "maxrss_kb": u1["maxrss_kb"],
                "pulses": n_pulses,
                "calibration_scores": len(cal),
            }
        )
    )


def echo(name: str, marker_name: str, reps: int, out: Path) -> None:
    """The LSL floor: no processing, a marker for the first chunk of every target block."""
    import pylsl

    from benchmarks.synth import alternating_blocks

    found = pylsl.resolve_byprop("source_id", name, 1, 30.0)
    inlet = pylsl.StreamInlet(found[0], max_buflen=30, recover=False)
    marker = pylsl.StreamOutlet(
        pylsl.StreamInfo(marker_name, "Markers", 1, 0, pylsl.cf_string, marker_name)
    )
    buf = np.zeros((1024, N_CH), dtype=np.float32)
    onsets = [a for a, _ in alternating_blocks(CAL_S + 0.5, reps, ON_S, OFF_S)]
    inlet.open_stream(timeout=10)
    u0, w0 = _usage(), pylsl.local_clock()
    t0 = None
    k_next = 0
    stop_at = w0 + _duration_s(reps) + 5
    while k_next < len(onsets) and pylsl.local_clock() < stop_at:
        # block until one sample is there (pull_chunk with a timeout waits for max_samples)
        _, ts = inlet.pull_chunk(timeout=0.2, max_samples=1, dest_obj=buf, as_numpy=True)
        if ts.shape[0] == 0:
            continue
        _, rest = inlet.pull_chunk(timeout=0.0, max_samples=1023, dest_obj=buf[1:], as_numpy=True)
        ts = np.concatenate((ts, rest)) if rest.shape[0] else ts
        if t0 is None:
            t0 = float(ts[0])
        if ts[-1] - t0 >= onsets[k_next]:
            marker.push_sample([json.dumps({"t_stream": float(ts[-1])})])
            k_next += 1
    u1, w1 = _usage(), pylsl.local_clock()
    out.write_text(
        json.dumps(
            {
                "cpu_s": u1["cpu_s"] - u0["cpu_s"],
                "wall_s": w1 - w0,
                "maxrss_kb": u1["maxrss_kb"],
                "pulses": k_next,
            }
        )
    )


# ------------------------------------------------------------------------------ orchestration
def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_e2e", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_one(kind: str, quick: bool, log=print) -> dict[str, Any]:
    """One e2e run of 'closedloop' or 'baseline'; returns latency figures in ms."""
    reps = _reps(quick)
    tag = uuid.uuid4().hex[:8]
    name = f"bench-e2e-eeg-{tag}"
    session_name = f"bench-{tag}"
    marker_name = f"{session_name}-pulses" if kind == "closedloop" else f"bench-e2e-mk-{tag}"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        procs = {
            "pusher": _spawn("pusher", name, str(reps), str(tmp / "pusher.json")),
            "receiver": _spawn(
                "receiver", marker_name, str(_duration_s(reps) + 40), str(tmp / "receiver.json")
            ),
        }
        if kind == "closedloop":
            procs["system"] = _spawn(
                "system", name, session_name, str(reps), str(tmp / "system.json")
            )
        elif kind == "echo":
            procs["system"] = _spawn("echo", name, marker_name, str(reps), str(tmp / "system.json"))
        else:
            procs["system"] = _spawn(
                "baseline", name, marker_name, str(reps), str(tmp / "system.json")
            )
        limit = time.monotonic() + _duration_s(reps) + 90
        outputs = {}
        for role in ("pusher", "system"):
            p = procs[role]
            outputs[role] = p.communicate(timeout=max(1, limit - time.monotonic()))[0]
            if p.returncode != 0:
                for q in procs.values():
                    q.kill()
                raise RuntimeError(f"e2e {kind}: {role} failed:\n{outputs[role][-3000:]}")
        time.sleep(0.5)  # markers in flight
        (tmp / "receiver.stop").touch()
        out = procs["receiver"].communicate(timeout=10)[0]
        if procs["receiver"].returncode != 0:
            raise RuntimeError(f"e2e {kind}: receiver failed:\n{out[-3000:]}")
        return _collect(kind, tmp, log)


def _collect(kind: str, tmp: Path, log) -> dict[str, Any]:
    push = json.loads((tmp / "pusher.json").read_text())
    t_push = np.load(tmp / "pusher.npy")
    sysinfo = json.loads((tmp / "system.json").read_text())
    got = json.loads((tmp / "receiver.json").read_text())
    t0 = push["t0"]
    on = [(a, b) for a, b in push["blocks"]]
    lat, in_target, delays, parts = [], 0, [], []
    arr_path = tmp / "system.arrivals.json"
    arrivals = dict(json.loads(arr_path.read_text())) if arr_path.exists() else {}
    for g in got:
        payload = json.loads(g["payload"])
        t_stream = payload["t_stream"]
        k = round((t_stream - t0) * SFREQ_HZ)
        c = k // CHUNK
        if not 0 <= c < len(t_push):
            continue
        lat.append((g["t_recv"] - t_push[c]) * 1e3)
        t_arr = arrivals.get(t_stream)
        if t_arr is not None and "latency_ms" in payload:
            # push -> pull returned, pull returned -> marker pushed, marker pushed -> received
            t_marker = t_arr + payload["latency_ms"] / 1e3
            parts.append(
                ((t_arr - t_push[c]) * 1e3, payload["latency_ms"], (g["t_recv"] - t_marker) * 1e3)
            )
        ts = k / SFREQ_HZ
        for a, b in on:
            if a <= ts < b + 0.5:
                in_target += 1
                delays.append(ts - a)
                break
    lat_a = np.array(lat)
    res: dict[str, Any] = {
        "system": kind,
        "channels": N_CH,
        "sfreq_hz": SFREQ_HZ,
        "chunk_samples": CHUNK,
        "repetitions": len(on),
        "markers": len(lat),
        "markers_in_target": in_target,
        "pusher_late_chunks": push["late"],
        "p50_ms": float(np.percentile(lat_a, 50)) if lat else math.nan,
        "p99_ms": float(np.percentile(lat_a, 99)) if lat else math.nan,
        "max_ms": float(lat_a.max()) if lat else math.nan,
        "min_ms": float(lat_a.min()) if lat else math.nan,
        "detection_delay_s_median": float(np.median(delays)) if delays else math.nan,
        "process_cpu_percent": 100.0 * sysinfo["cpu_s"] / sysinfo["wall_s"],
        "process": sysinfo,
    }
    if parts:
        pa = np.array(parts)
        res["breakdown_p50_ms"] = {
            "push_to_pull_returned": float(np.median(pa[:, 0])),
            "pull_returned_to_marker_pushed": float(np.median(pa[:, 1])),
            "marker_pushed_to_received": float(np.median(pa[:, 2])),
        }
    log(
        f"  e2e {kind:<10}: p50 {res['p50_ms']:.3f} ms, p99 {res['p99_ms']:.3f} ms, max "
        f"{res['max_ms']:.3f} ms over {res['markers']} markers ({in_target} in target blocks of "
        f"{len(on)}); signal change -> deciding sample median "
        f"{res['detection_delay_s_median']:.3f} s; process CPU {res['process_cpu_percent']:.1f} %"
        + (f"; parts (p50 ms) {res['breakdown_p50_ms']}" if parts else "")
    )
    return res


def run(quick: bool, log=print) -> dict[str, Any]:
    ours = run_one("closedloop", quick, log)
    base = run_one("baseline", quick, log)
    floor = run_one("echo", quick, log)
    ratio = base["p50_ms"] / ours["p50_ms"]
    log(f"  e2e baseline / closedloop p50 ratio: {ratio:.1f}x")
    return {
        "closedloop": ours,
        "baseline": base,
        "echo": floor,
        "ratio_p50": ratio,
        "ratio_p99": base["p99_ms"] / ours["p99_ms"],
    }


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "pusher":
        pusher(args[0], int(args[1]), Path(args[2]))
    elif role == "receiver":
        receiver(args[0], float(args[1]), Path(args[2]))
    elif role == "system":
        system(args[0], args[1], int(args[2]), Path(args[3]))
    elif role == "echo":
        echo(args[0], args[1], int(args[2]), Path(args[3]))
    elif role == "baseline":
        baseline(args[0], args[1], int(args[2]), Path(args[3]))
    else:
        raise SystemExit(f"unknown role {role!r}")

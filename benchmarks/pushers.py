"""LSL outlets that stamp like real amplifier apps, for the clock-model tests and bench_clock.

    python -m benchmarks.pushers SPEC_JSON      (one process, one thread per stream)

SPEC_JSON: a list of {"name", "pattern", "sfreq", "seconds", "lose_at", "lose_n", "seed"}
(lose_at/lose_n optional: samples [lose_at, lose_at + lose_n) are never pushed). Prints
`READY` once every outlet exists, waits for a line `GO` on stdin (every consumer connected: the
streams start together), then prints `LOSS <name> <t>` with the local_clock() at which the
first sample after the hole was pushed, and `DONE <name> <n_pushed>` at the end of each stream.

Patterns (sample k is due at t0 + k / sfreq; the pusher sleeps until then, drift-free):
- ideal: 10-sample chunks with explicit timestamps on the exact grid.
- push: 10-sample chunks stamped with local_clock() at push (LSL back-dates the rest by
  1/sfreq): what many amplifier apps do.
- usb: as push, the stamp plus a uniform 0-4 ms transfer delay, and 1 chunk in 20 held back
  and pushed with the next one (one 20-sample push, one stamp): USB transfers.
- burst16: every 16 ms (FTDI latency timer: an OpenBCI Cyton at 250 Hz) whatever is due goes
  out in one push stamped at push time.
- irregular: chunks of 1-32 samples, stamped at push time plus 0-2 ms.
The pusher's own wake-up delays (load) come on top of every pattern.
- count: 10-sample chunks stamped t0 + count / sfreq, count = samples pushed so far: an app that
  stamps by its own sample count (a loss never shows in its timestamps, only in the arrival).
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import pylsl

PATTERNS = ("ideal", "push", "usb", "burst16", "irregular", "count")
N_CHANNELS = 4
BURST_S = 0.016


def make_outlet(name: str, sfreq: float) -> pylsl.StreamOutlet:
    info = pylsl.StreamInfo(name, "EEG", N_CHANNELS, sfreq, pylsl.cf_float32, name)
    chans = info.desc().append_child("channels")
    for k in range(N_CHANNELS):
        ch = chans.append_child("channel")
        ch.append_child_value("label", f"E{k}")
        ch.append_child_value("unit", "microvolts")
        ch.append_child_value("type", "EEG")
    return pylsl.StreamOutlet(info, chunk_size=0, max_buffered=60)


def _sleep_until(t: float) -> None:
    while True:
        left = t - pylsl.local_clock()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def push_stream(
    outlet: pylsl.StreamOutlet,
    pattern: str,
    sfreq: float,
    seconds: float,
    *,
    lose_at: int | None = None,
    lose_n: int = 0,
    seed: int = 0,
    on_loss=None,
    stop: threading.Event | None = None,
) -> int:
    """Push `seconds` of a 4-channel signal with the given stamping pattern; returns the
    number of samples pushed. on_loss(t): called with local_clock() right after the first
    sample after the hole was pushed."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern {pattern!r} not in {PATTERNS}")
    rng = np.random.default_rng(seed)
    period = 1.0 / sfreq
    n_total = round(seconds * sfreq)
    data = (rng.standard_normal((1024, N_CHANNELS)) * 10).astype(np.float32)
    t0 = pylsl.local_clock() + 0.05
    k = 0  # next sample the device produces
    pushed = 0
    held: list[int] = []  # usb: sample indices held back for the next push
    chunk_no = 0
    loss_reported = lose_at is None
    while k < n_total and not (stop is not None and stop.is_set()):
        if pattern == "burst16":
            t_burst = t0 + (np.floor((k * period) / BURST_S) + 1) * BURST_S
            n = max(1, min(n_total, int(np.ceil((t_burst - t0) / period))) - k)
        elif pattern == "irregular":
            n = int(rng.integers(1, 33))
        else:
            n = 10
        n = min(n, n_total - k)
        idx = list(range(k, k + n))
        k += n
        due = t0 + (k - 1) * period if pattern != "burst16" else t_burst
        _sleep_until(due)
        if lose_at is not None:
            idx = [i for i in idx if not lose_at <= i < lose_at + lose_n]
            if not idx:
                continue
        chunk_no += 1
        # The transfer delay is added to the stamp rather than slept: a second sleep per push
        # overshoots by 10-30 ms on a loaded 2-core machine, push after push, which is this
        # process being starved, not a USB delay (a real driver's delay does not accumulate).
        delay = 0.0
        if pattern == "usb":
            if chunk_no % 20 == 0:
                held = idx
                continue
            delay = rng.uniform(0.0, 0.004)
            idx, held = held + idx, []
        elif pattern == "irregular":
            delay = rng.uniform(0.0, 0.002)
        x = data[np.asarray(idx) % 1024]
        if pattern == "ideal":
            outlet.push_chunk(x, [t0 + i * period for i in idx])
        elif pattern == "count":
            outlet.push_chunk(x, [t0 + (pushed + j) * period for j in range(len(idx))])
        else:
            outlet.push_chunk(x, pylsl.local_clock() + delay)
        pushed += len(idx)
        if not loss_reported and idx[-1] >= lose_at + lose_n:
            loss_reported = True
            if on_loss is not None:
                on_loss(pylsl.local_clock())
    if held:  # usb: the last chunk was held back; it goes out alone
        outlet.push_chunk(data[np.asarray(held) % 1024], pylsl.local_clock())
        pushed += len(held)
    return pushed


def main(argv: list[str] | None = None) -> int:
    specs = json.loads((argv or sys.argv[1:])[0])
    outlets = [make_outlet(s["name"], float(s["sfreq"])) for s in specs]
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            print(line, flush=True)

    def run(spec: dict, outlet: pylsl.StreamOutlet) -> None:
        n = push_stream(
            outlet,
            spec["pattern"],
            float(spec["sfreq"]),
            float(spec["seconds"]),
            lose_at=spec.get("lose_at"),
            lose_n=int(spec.get("lose_n", 0)),
            seed=int(spec.get("seed", 0)),
            on_loss=lambda t: say(f"LOSS {spec['name']} {t!r}"),
        )
        say(f"DONE {spec['name']} {n}")

    threads = [
        threading.Thread(target=run, args=(s, o), daemon=True)
        for s, o in zip(specs, outlets, strict=True)
    ]
    say("READY")
    sys.stdin.readline()  # GO
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(2.0)  # let the consumers drain before the outlets go
    return 0


if __name__ == "__main__":
    sys.exit(main())

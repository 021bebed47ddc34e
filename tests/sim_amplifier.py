"""A simulated amplifier with a trigger input, for `closedloop latency-check` tests.

`python -m tests.sim_amplifier NAME SFREQ DELAY_S` opens a pseudo-terminal (its slave is the
serial output's port), prints the slave's path on stdout, and streams EEG over LSL as NAME:
two EEG channels of noise and TRIG, which is 1 from DELAY_S after each byte arrives on the
master side, for HIGH_S. Samples go out on an exact clock grid as soon as their time has passed
(every ~1 ms). When stdin closes it prints the arrival times (local_clock, JSON) and exits.

Its own process, so its reader thread does not wait for the check's GIL (in one process, a
byte's arrival was once noticed 82 ms late with the 2 cores at load 10).
"""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import time

import numpy as np
import pylsl

HIGH_S = 0.05  # the trigger channel stays high this long


def main(name: str, sfreq: float, delay_s: float) -> None:
    master, slave = os.openpty()
    info = pylsl.StreamInfo(name, "EEG", 3, sfreq, pylsl.cf_float32, name)
    chans = info.desc().append_child("channels")
    for label, kind, unit in (("Cz", "EEG", "microvolts"), ("Pz", "EEG", "microvolts"),
                              ("TRIG", "stim", "")):  # fmt: skip
        ch = chans.append_child("channel")
        ch.append_child_value("label", label)
        ch.append_child_value("type", kind)
        ch.append_child_value("unit", unit)
    outlet = pylsl.StreamOutlet(info)
    arrivals: list[float] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                t = pylsl.local_clock()  # the byte's arrival on the trigger input
                arrivals.extend([t] * len(os.read(master, 64)))

    def push() -> None:
        rng = np.random.default_rng(0)
        t0 = pylsl.local_clock()
        sent = 0
        while not stop.is_set():
            due = int((pylsl.local_clock() - t0) * sfreq) + 1
            if due > sent:
                ts = t0 + np.arange(sent, due) / sfreq
                trig = np.zeros(ts.size)
                for a in list(arrivals):
                    trig[(ts >= a + delay_s) & (ts < a + delay_s + HIGH_S)] = 1.0
                data = np.column_stack([rng.normal(0, 10, (ts.size, 2)), trig])
                outlet.push_chunk(data.astype(np.float32), ts.tolist())
                sent = due
            time.sleep(0.001)

    threads = [threading.Thread(target=f, daemon=True) for f in (read, push)]
    for t in threads:
        t.start()
    print(os.ttyname(slave), flush=True)
    sys.stdin.read()  # until the test closes our stdin
    stop.set()
    for t in threads:
        t.join(timeout=5)
    print(json.dumps(arrivals), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))

"""Feedback costs: the pipeline tap and score-computed -> frame-painted latency.

    QT_QPA_PLATFORM=offscreen python benchmarks/bench_feedback_latency.py \
        [--seconds 10] [--refresh-hz 60]

1. Tap cost: µs per `Feedback.tap` call (live and sham; with and without the LSL outlet; the
   audio is rendered by the writer thread, not in the tap).
2. Window: a thread pushes updates at 100 Hz (10-sample chunks at 1 kHz) while the participant
   window redraws on its QTimer; prints p50/p99/max of tap -> end of paint, and of the draw alone
   (timer slot -> end of paint), so the rest is the wait for the next timer tick.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pylsl import local_clock

from closedloop.participant.feedback import Feedback
from closedloop.participant.settings import FeedbackSettings
from features.types import Label, State

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def tap_cost(settings: FeedbackSettings, folder: Path, n: int = 20_000) -> tuple[float, float]:
    """Median and p99 µs of one tap call (writer thread not started: the call's own cost)."""
    fb = Feedback.from_settings(settings, folder)
    states = [State(k * 0.01, Label.NON_TARGET, math.sin(k / 50), 0.0) for k in range(n)]
    us = np.empty(n)
    for i, s in enumerate(states):
        t = time.perf_counter()
        fb.tap(None, s)
        us[i] = time.perf_counter() - t
    fb.close()
    us *= 1e6
    return float(np.median(us)), float(np.percentile(us, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--refresh-hz", type=float, default=60.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        quiet = {"audio": {"enabled": False}}
        live_dir = tmp / "live"
        live_dir.mkdir()
        for name, kw in (
            ("live, no LSL", {"publish_lsl": False, **quiet}),
            ("live, LSL outlet", {"publish_lsl": True, "lsl_name": "bench-feedback", **quiet}),
            (
                "live, LSL + WAV audio",
                {"publish_lsl": True, "lsl_name": "bench-feedback", "audio": {"output": "wav"}},
            ),
        ):
            folder = live_dir if name == "live, no LSL" else tmp / name.replace(" ", "_")
            folder.mkdir(exist_ok=True)
            p50, p99 = tap_cost(FeedbackSettings(enabled=True, **kw), folder)
            print(f"tap {name:<24} p50 {p50:6.2f} µs, p99 {p99:6.2f} µs per call")
        sham_dir = tmp / "sham"
        sham_dir.mkdir()
        sham = FeedbackSettings(
            enabled=True, publish_lsl=False, mode="sham", sham={"source": live_dir}, **quiet
        )
        p50, p99 = tap_cost(sham, sham_dir)
        print(f"tap {'sham, no LSL':<24} p50 {p50:6.2f} µs, p99 {p99:6.2f} µs per call")

        from PySide6.QtWidgets import QApplication

        from gui.participant import ParticipantWindow

        app = QApplication.instance() or QApplication([])
        win_dir = tmp / "window"
        win_dir.mkdir()
        fb = Feedback.from_settings(
            FeedbackSettings(
                enabled=True,
                publish_lsl=False,
                smoothing_s=0.0,
                **quiet,
                display={"refresh_hz": args.refresh_hz},
            ),
            win_dir,
        ).start()
        draw_ms: list[float] = []

        class Timed(ParticipantWindow):
            def refresh(self) -> bool:
                self._t_slot = local_clock()
                return super().refresh()

            def _painted(self) -> None:
                if math.isfinite(self._pending_t_local):
                    draw_ms.append((local_clock() - self._t_slot) * 1e3)
                super()._painted()

        win = Timed(fb, fb.settings.display)
        win.show()
        stop = threading.Event()

        def producer() -> None:
            k, t_next = 0, local_clock()
            while not stop.is_set():
                fb.tap(None, State(0.01 * k, Label.NON_TARGET, 2 * math.sin(k / 50), 0.0))
                k += 1
                t_next += 0.01
                time.sleep(max(0.0, t_next - local_clock()))

        th = threading.Thread(target=producer, daemon=True)
        th.start()
        t_end = local_clock() + args.seconds
        while local_clock() < t_end:
            app.processEvents()
            time.sleep(0.001)
        stop.set()
        th.join()
        lat = fb.frame_latency_ms()
        d = np.array(draw_ms)
        print(
            f"window {args.refresh_hz:g} Hz: score->frame p50 {lat['p50']:.2f} ms, "
            f"p99 {lat['p99']:.2f} ms, max {lat['max']:.2f} ms over {lat['n']} frames; "
            f"draw alone p50 {np.median(d):.2f} ms, p99 {np.percentile(d, 99):.2f} ms"
        )
        win.close()
        fb.close()


if __name__ == "__main__":
    main()

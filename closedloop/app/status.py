"""What a running session says on the terminal: the live status line, the summary at the end, and
the signal handlers that stop it cleanly (Ctrl-C prints the summary, never a traceback).

Shared by `closedloop run`, `offline` and `demo`.
"""

from __future__ import annotations

import signal
import sys
import threading


def install_signal_handlers(session) -> None:
    def handler(signum, _frame):
        reason = f"signal {signal.Signals(signum).name}"
        session.stop(reason)
        # disarm at once, even while the loop hangs in an output: from a thread, because this
        # handler runs in the loop's thread, which may hold the interlock's or the audit's lock
        threading.Thread(
            target=session.disarm, args=(reason,), name="signal-disarm", daemon=True
        ).start()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def print_status(status) -> None:
    end = "\n" if not sys.stderr.isatty() or status.phase == "stopped" else "\r"
    print(status.line(), end=end, file=sys.stderr, flush=True)


def status_period_s() -> float:
    """A live status line twice a second on a terminal, every 5 s into a log file or CI."""
    return 0.5 if sys.stderr.isatty() else 5.0


def print_summary(summary: dict) -> None:
    def fmt(value):
        if isinstance(value, float):
            return round(value, 2)
        if isinstance(value, dict):
            return {k: fmt(v) for k, v in value.items()}
        return value

    print("\nsession summary", file=sys.stdout)
    for key in (
        "folder",
        "stop_reason",
        "pulses",
        "vetoes_by_reason",
        "time_in_state_s",
        "latency_ms",
        "final_interlock",
        "simulated_outputs",
        "warnings",
    ):
        if key in summary and (key != "simulated_outputs" or summary[key]):
            print(f"  {key:<17} {fmt(summary[key])}")
    fp = summary.get("fingerprint")
    if fp:  # the decisions at a glance: equal digests, equal decisions (closedloop.fingerprint)
        print(f"  {'fingerprint':<17} {fp['sha256'][:16]} ({fp['decisions']} decisions)")
    cal = summary.get("calibration")
    if cal:
        line = f"{cal['status']}"
        if cal.get("calibrated_after_s") is not None:  # live stamps are LSL clock seconds
            line += f" {cal['calibrated_after_s']:.1f} s after the first sample"
        if cal.get("reason"):
            line += f": {cal['reason']}"
        print(f"  {'calibration':<17} {line}")
        bad = cal.get("bad_channels") or {}
        print(
            f"  {'eeg channels':<17} {len(cal.get('eeg_channels') or [])} used as EEG"
            f"{'; bad: ' + ', '.join(f'{c} ({r})' for c, r in bad.items()) if bad else ''}"
        )
    ph = summary.get("phase")
    if ph:  # phase mode: the fired pulses against the acausal reference around each
        st, sched = ph.get("stats") or {}, ph.get("sched_error_ms") or {}
        line = f"{ph['estimator']} at {ph['target_deg']:g} deg: {st.get('n', 0)} pulses"
        if st.get("n"):
            line += (
                f", bias {st['bias_deg']:+.1f} deg, circular SD {st['circ_sd_deg']:.1f} deg, "
                f"PLV {st['plv']:.2f}, within 45 deg {100 * st['within_45']:.0f} %"
            )
        if sched.get("p99") is not None and sched.get("n"):
            line += f"; scheduling error p99 {sched['p99']:.2f} ms"
        print(f"  {'phase':<17} {line}")

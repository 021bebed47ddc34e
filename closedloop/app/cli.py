"""`closedloop` command line: demo, run, offline, replay, simulate, check-config, gui, tune,
streams.

Errors are one clear line and exit status 2 (config, files, streams); `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from closedloop.app.status import (
    install_signal_handlers,
    print_status,
    print_summary,
    status_period_s,
)
from closedloop.config import config_from_args
from closedloop.errors import UserError

EPILOG = """examples:
  closedloop demo                                   replay a bundled recording, run the loop on it
  closedloop check-config configs/default.yaml      validate a session config, nothing else
  closedloop streams --watch                        the LSL streams on the network, refreshed
  closedloop run --config configs/default.yaml      live session on an LSL stream
  closedloop offline replay_data/sim_32ch_500hz.fif --config configs/default.yaml
  closedloop replay replay_data/sim_32ch_500hz.fif --loop forever
  closedloop simulate out.fif --preset sim_4ch_256hz --seed 1
  closedloop tune replay_data/sim_32ch_500hz.fif --grid state.enter=0.5:2:0.5 \
      --grid trigger.dwell_s=0.5,1
"""


def _add_config(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        required=required,
        help="session YAML" + ("" if required else " (default: built-in defaults)"),
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set state.enter=1.5 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="closedloop",
        description=(
            "Closed-loop EEG neurofeedback and brain-state-dependent TMS triggering over LSL."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo", help="replay a bundled recording over LSL and run the closed loop on it"
    )
    p.add_argument(
        "--recording",
        type=Path,
        default=None,
        help="recording to replay (default: bundled 32-ch simulation)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: the whole recording)",
    )
    p.add_argument("--speed", type=float, default=1.0, help="replay speed factor")
    p.add_argument("--headless", action="store_true", help="no window even where a display exists")
    p.add_argument(
        "--out", type=Path, default=Path("sessions"), help="where the session folder goes"
    )
    _add_config(p)

    p = sub.add_parser("run", help="run a live session on an LSL stream")
    _add_config(p, required=True)
    p.add_argument(
        "--arm",
        action="store_true",
        help="arm right after calibration (operator action 'cli_flag')",
    )
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument(
        "--out", type=Path, default=None, help="session folder root (default: session.out_dir)"
    )

    p = sub.add_parser("offline", help="run a config on a recording as fast as possible (no LSL)")
    p.add_argument("recording", type=Path)
    _add_config(p)
    p.add_argument(
        "--no-arm", action="store_true", help="leave the interlock disarmed (policy only)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="session folder root (default: session.out_dir)"
    )
    p.add_argument(
        "--fingerprint-only",
        action="store_true",
        help="print only the decision fingerprint (SHA-256 over every decision) and keep no "
        "session folder: to check that a change left the decisions on a recording alone",
    )

    p = sub.add_parser("replay", help="stream a recording as a live LSL outlet")
    from acquisition.replayer import add_replay_arguments

    add_replay_arguments(p)

    p = sub.add_parser("simulate", help="write a synthetic EEG recording with labelled states")
    p.add_argument(
        "out",
        type=Path,
        nargs="?",
        default=None,
        help="output file (.fif, .edf, .bdf); omit with --regenerate",
    )
    p.add_argument(
        "--preset",
        default="sim_32ch_500hz",
        help="sim_32ch_500hz (32 ch, 500 Hz), sim_4ch_256hz (4 ch, 256 Hz), or eoec_64ch_250hz "
        "(64 ch eyes open 60 s then closed 60 s, with a flat O2, a noisy T8, ECG and blinks)",
    )
    p.add_argument("--duration", type=float, default=None, help="seconds (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="default: the preset's seed")
    p.add_argument(
        "--regenerate",
        action="store_true",
        help="rewrite the bundled replay_data/*.fif byte for byte",
    )

    p = sub.add_parser("check-config", help="validate a session config and exit (0 ok, 2 errors)")
    p.add_argument("config", type=Path)
    p.add_argument(
        "--write-defaults",
        action="store_true",
        help="write the built-in defaults, commented, to CONFIG instead of checking it",
    )
    p.add_argument(
        "--recording",
        type=Path,
        default=None,
        help="also check channels and bands against this recording, and run the calibration "
        "on it (does it complete, when, how much is flagged)",
    )
    p.add_argument(
        "--channels",
        action="store_true",
        help="with --recording: list every channel of the recording with its type",
    )

    p = sub.add_parser("gui", help="open the operator console")
    _add_config(p)
    p.add_argument(
        "--screenshot",
        type=Path,
        default=None,
        help="run the demo offscreen, save a PNG of the window, and exit",
    )
    p.add_argument(
        "--screenshot-pulses",
        type=int,
        default=1,
        metavar="N",
        help="with --screenshot: wait for N pulses before the picture (default 1)",
    )

    p = sub.add_parser("streams", help="list the LSL streams on the network (like `lsl list`)")
    p.add_argument(
        "--timeout", type=float, default=1.0, help="seconds to listen for streams (default 1)"
    )
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=None,
        metavar="S",
        help="refresh every S seconds (default 2) until Ctrl-C",
    )

    p = sub.add_parser(
        "tune",
        help="tune thresholds offline: a grid of settings scored against annotated target epochs",
    )
    from closedloop.tuning.tune import add_tune_arguments

    add_tune_arguments(p)
    _add_report_commands(sub)
    return parser


def _add_report_commands(sub) -> None:
    """report, export-bids, latency-check (issue 17: what a session proves)."""
    p = sub.add_parser("report", help="write an HTML timing and quality report of a session")
    p.add_argument("session", type=Path, help="session folder")
    p.add_argument(
        "--out", type=Path, default=None, help="HTML file (default: SESSION/report.html)"
    )

    p = sub.add_parser(
        "export-bids", help="write a session as a BIDS EEG dataset (pulses as events)"
    )
    p.add_argument("session", type=Path, help="session folder")
    p.add_argument("--bids-root", type=Path, required=True, help="BIDS dataset folder")
    p.add_argument("--subject", required=True, help="BIDS subject label (letters and digits)")
    p.add_argument("--session", dest="bids_session", default=None, help="BIDS session label")
    p.add_argument("--task", default="closedloop", help="BIDS task label (default: closedloop)")
    p.add_argument("--run", type=int, default=None, help="BIDS run index")
    p.add_argument("--include-vetoed", action="store_true", help="also every vetoed attempt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing recording")

    p = sub.add_parser(
        "latency-check",
        help="bench check (never on a person): fire test pulses wired back into the amplifier's "
        "trigger input and measure the whole delay",
    )
    p.add_argument(
        "--config", "-c", type=Path, required=True, help="YAML: source, a serial output, safety"
    )
    p.add_argument("--n", type=int, default=20, help="test pulses (default 20)")
    p.add_argument("--trigger-channel", default=None, help="EEG stream channel of the trigger")
    p.add_argument("--threshold", type=float, default=0.5, help="trigger value counted as high")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--out", type=Path, default=Path("sessions"), help="where the report goes")


def cmd_check_config(args) -> int:
    from closedloop.config import default_yaml, load_config, validate_for_stream

    if args.write_defaults:
        args.config.write_text(default_yaml(), encoding="utf-8")
        print(f"wrote {args.config}")
        return 0
    config = load_config(args.config)
    if args.recording:
        from acquisition.readers import load_recording
        from closedloop.calibration import check_recording

        raw = load_recording(args.recording)
        where = f"{args.config} vs {args.recording}"
        if args.channels:
            types = raw.get_channel_types()
            print(f"{args.recording}: {len(raw.ch_names)} channels")
            for i, (c, t) in enumerate(zip(raw.ch_names, types, strict=True)):
                print(f"  {i:>3}  {c:<12} {t}")
        validate_for_stream(config, raw.ch_names, raw.info["sfreq"], where)
        # run the calibration itself on the recording: does it complete, when, how much flagged
        r = check_recording(config, str(args.recording))
        print(f"{where}: calibration {r['status']}", end="")
        if r["status"] == "done":
            print(f" at {r['calibrated_at_s']:.1f} s of {r['duration_s']:.1f} s")
        else:
            print()
        share, held = r["flagged_share"], r.get("held_share")
        if share is not None:
            of_it = "" if held is None else f" ({held:.1%} held the baseline, the rest veto only)"
            print(f"  flagged during calibration: {share:.1%} of decisions{of_it}")
        hold = ", ".join(r["hold_channels"])
        print(f"  flags that hold the baseline: {hold}; rail, NaN or very large input anywhere")
        if r["top"]:
            print("  most flagged: " + ", ".join(f"{k} {v:.0%} (last {10} s)" for k, v in r["top"]))
        print(
            f"  EEG channels: {len(r['eeg_channels'])}; watched: {', '.join(r['watched_channels'])}"
        )
        if r["bad_channels"]:
            print(
                "  bad channels: "
                + "; ".join(f"{c}: {why}" for c, why in r["bad_channels"].items())
            )
        if r["status"] != "done":
            raise UserError(f"{where}: calibration {r['status']}: {r['reason']}. {r['advice']}")
        return 0
    print(f"{args.config}: ok")
    if config.state.decider is not None:  # the plugin and its settings, as it will run them
        from features.decider import load_decider_class

        cls = load_decider_class(config.state.decider)
        settings = cls.Settings.model_validate(config.state.decider_settings)
        print(f"  decider {config.state.decider} = {cls.__module__}:{cls.__qualname__}")
        for key, value in settings.model_dump().items():
            print(f"    {key}: {value}")
    return 0


def cmd_offline(args) -> int:
    from tqdm import tqdm

    from acquisition.file_source import FileSource
    from closedloop.session import Session

    config = config_from_args(args)
    source = FileSource(args.recording, chunk_size=config.source.chunk_size)
    if args.fingerprint_only:
        return _print_fingerprint(config, source, arm=not args.no_arm)
    bar = tqdm(
        total=round(source.duration_s, 1),
        unit="s",
        desc="offline",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of recording [{elapsed}<{remaining}]",
    )

    def progress(status) -> None:
        if status.t_stream == status.t_stream:  # not nan
            bar.update(max(0.0, status.t_stream - source.t0 - bar.n))

    session = Session(
        config,
        source,
        live=False,
        out_root=args.out,
        arm_action=None if args.no_arm else "offline_run",
        on_status=progress,
        status_period_s=1.0,  # stream seconds offline
    )
    install_signal_handlers(session)
    try:
        summary = session.run()
    finally:
        bar.close()
    print_summary(summary)
    return 0


def _print_fingerprint(config, source, arm: bool) -> int:
    """`offline --fingerprint-only`: the session in a temporary folder, with what cannot change a
    decision turned off (the tuner's overrides: simulated outputs, no LSL outlets, no feedback)."""
    import tempfile

    from closedloop.config import apply_overrides
    from closedloop.session import Session
    from closedloop.tuning.grid import TUNER_OVERRIDES

    config = apply_overrides(config, TUNER_OVERRIDES)
    with tempfile.TemporaryDirectory(prefix="closedloop-fingerprint-") as tmp:
        session = Session(
            config,
            source,
            live=False,
            out_root=Path(tmp),
            arm_action="offline_run" if arm else None,
        )
        install_signal_handlers(session)
        summary = session.run()
    fingerprint = summary.get("fingerprint")
    if fingerprint is None:
        print(f"no fingerprint: {summary.get('stop_reason')}", file=sys.stderr)
        return 1
    print(fingerprint["sha256"])
    return 0


def cmd_run(args) -> int:
    from acquisition.sources import source_from_settings
    from closedloop.session import Session

    config = config_from_args(args)
    if args.duration:
        config.session.duration_s = args.duration
    # kind: lsl -> the stream; kind: file -> the recording played in real time over LSL
    source = source_from_settings(config.source)
    # started before the amplifier: say so every second until it appears or the timeout
    source.on_wait = lambda msg: print(f"closedloop run: {msg}", file=sys.stderr, flush=True)
    session = Session(
        config,
        source,
        live=True,
        out_root=args.out,
        arm_action="cli_flag" if args.arm else None,
        on_status=print_status,
        status_period_s=status_period_s(),
    )
    install_signal_handlers(session)
    summary = session.run()
    print_summary(summary)
    return 0


def cmd_demo(args) -> int:
    from closedloop.app.demo import run_demo

    config = config_from_args(args)
    return run_demo(
        config,
        recording=args.recording,
        duration_s=args.duration,
        speed=args.speed,
        headless=args.headless,
        out_root=args.out,
    )


def cmd_replay(args) -> int:
    from acquisition.replayer import run_from_args

    return run_from_args(args) or 0


def cmd_simulate(args) -> int:
    from acquisition.simulator import PRESETS, write_simulated
    from acquisition.simulator import main as simulator_main

    if args.regenerate:
        return simulator_main(["--regenerate"])
    if args.out is None:
        raise UserError("simulate: give an output file, or --regenerate")
    if args.preset not in PRESETS:
        raise UserError(f"--preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    overrides = {} if args.duration is None else {"duration_s": args.duration}
    path = write_simulated(args.out, args.preset, seed=args.seed, **overrides)
    print(f"wrote {path}")
    return 0


def cmd_gui(args) -> int:
    from gui.app import run_gui

    return run_gui(
        config_from_args(args), screenshot=args.screenshot, screenshot_pulses=args.screenshot_pulses
    )


def format_streams(streams) -> str:
    """A table of StreamDescriptions (name, type, channels, rate, format, source_id, host,
    channel labels present or not)."""
    if not streams:
        return "no LSL streams visible on this network"
    rows = [("NAME", "TYPE", "CH", "RATE", "FORMAT", "SOURCE_ID", "HOST", "LABELS")]
    for d in streams:
        labels = {True: "yes", False: "no (by index)", None: "?"}[d.labelled]
        rate = f"{d.sfreq:g} Hz" if d.sfreq > 0 else "irregular"
        rows.append(
            (d.name, d.stype, str(d.n_channels), rate, d.channel_format, d.source_id,
             d.hostname, labels)
        )  # fmt: skip
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_streams(args) -> int:
    import time

    from acquisition.lsl_source import describe_streams

    if args.timeout <= 0:
        raise UserError(f"--timeout must be > 0, got {args.timeout}")
    if args.watch is None:
        print(format_streams(describe_streams(args.timeout)))
        return 0
    if args.watch <= 0:
        raise UserError(f"--watch must be > 0, got {args.watch}")
    try:
        while True:
            table = format_streams(describe_streams(args.timeout))
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")  # clear the terminal, cursor home
            stamp = time.strftime("%H:%M:%S")
            print(f"{stamp}  LSL streams (every {args.watch:g} s, Ctrl-C stops)\n{table}\n")
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def cmd_tune(args) -> int:
    from closedloop.tuning.tune import run_tune

    return run_tune(args)


def cmd_export_bids(args) -> int:
    from closedloop.export.bids import export_bids

    path = export_bids(
        args.session,
        args.bids_root,
        args.subject,
        session=args.bids_session,
        task=args.task,
        run=args.run,
        include_vetoed=args.include_vetoed,
        overwrite=args.overwrite,
    )
    print(f"wrote {path.fpath}")
    return 0


def cmd_latency_check(args) -> int:
    import statistics

    from closedloop.app.latency_check import run_latency_check

    folder, results = run_latency_check(
        args.config,
        n=args.n,
        trigger_channel=args.trigger_channel,
        threshold=args.threshold,
        yes=args.yes,
        out_root=args.out,
    )
    seen = [r.delay_ms for r in results if r.delay_ms == r.delay_ms]
    if seen:
        print(
            f"{len(seen)} of {len(results)} pulses seen: delay median "
            f"{statistics.median(seen):.2f} ms, max {max(seen):.2f} ms"
        )
    print(f"wrote {folder / 'latency.html'}")
    return 0 if len(seen) == len(results) else 1


def cmd_report(args) -> int:
    from closedloop.export.report import write_report

    print(f"wrote {write_report(args.session, args.out)}")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "run": cmd_run,
    "offline": cmd_offline,
    "replay": cmd_replay,
    "simulate": cmd_simulate,
    "check-config": cmd_check_config,
    "gui": cmd_gui,
    "tune": cmd_tune,
    "report": cmd_report,
    "export-bids": cmd_export_bids,
    "latency-check": cmd_latency_check,
    "streams": cmd_streams,
}


def _user_errors() -> tuple[type[Exception], ...]:
    """Problems the user can fix: one clear line, exit status 2 (bad file, stream, config)."""
    from acquisition.lsl_source import StreamNotFoundError
    from acquisition.readers import RecordingError

    return (UserError, RecordingError, StreamNotFoundError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from acquisition.lsl_config import configure_liblsl_log

    configure_liblsl_log(debug=args.debug)  # liblsl's INFO/ERR lines only with --debug
    try:
        return COMMANDS[args.command](args)
    except _user_errors() as exc:
        if args.debug:
            raise
        print(f"closedloop {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except Exception as exc:
        if args.debug or os.environ.get("CLOSEDLOOP_RAISE"):
            raise
        print(
            f"closedloop {args.command}: error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

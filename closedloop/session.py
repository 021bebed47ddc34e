"""A session: connect, check, calibrate, run the loop, stop cleanly, leave a complete folder.

`Session` is also the `SessionControl` the GUI and MQTT talk to: its methods take a lock that
the loop holds while one chunk is processed (well under a millisecond), so commands take effect
between two chunks and never race a pulse. `disarm` and `emergency_stop` take no session lock:
they must act at once even while the loop is stuck in a chunk (a hung output), so they go
straight to the trigger unit, which never waits for the firing thread (triggers/unit.py).
Live, a watchdog thread disarms when the loop completes no step within `safety.watchdog_ms`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pylsl import local_clock

from closedloop import calibration
from closedloop.bus import EventBus
from closedloop.config import SessionConfig, dump_config, validate_for_stream
from closedloop.control import ControlError
from closedloop.disk import check_disk
from closedloop.pipeline import Pipeline
from closedloop.recording import EventLog, XdfRecorder, write_json
from features.types import Label

log = logging.getLogger(__name__)

HEALTH_PERIOD_S = 1.0  # health event rate (local clock live, stream clock offline)
LSL_PULL_TIMEOUT_S = 0.005  # live pull blocks at most this long so commands stay responsive


@dataclass
class SessionStatus:
    """A snapshot for one-line status and the GUI (copied, never shared with the loop)."""

    phase: str = "idle"  # idle, connecting, calibrating, running, stopped
    label: str = "uncalibrated"
    score: float = float("nan")
    interlock: str = "disarmed"
    pulses: int = 0
    vetoes: int = 0
    calibration_progress: float = 0.0
    latency_p50_ms: float = float("nan")
    latency_p99_ms: float = float("nan")
    t_stream: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        cal = f" cal {self.calibration_progress:4.0%}" if self.phase == "calibrating" else ""
        if self.phase in ("calibrating", "calibration failed"):
            cal += self.extra.get("calibration", "")
        return (
            f"[{self.phase:<11}] state={self.label:<12} score={self.score:+6.2f} "
            f"interlock={self.interlock:<10} pulses={self.pulses:<4} vetoes={self.vetoes:<4} "
            f"latency p50={self.latency_p50_ms:5.2f} ms p99={self.latency_p99_ms:5.2f} ms"
            f"{self.extra.get('decider', '')}{cal}"
        )


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """What a console shows of a running session, read in one go (plain values, picklable).

    Taken without the session lock (single attribute reads, no percentiles computed: latency
    comes from the status the loop refreshes every `status_period_s`), so any thread may call
    `Session.snapshot()` at display rate. Defaults are the "no session yet" view.
    """

    phase: str = "idle"  # idle, connecting, calibrating, running, stopped
    ready: bool = False  # the pipeline exists (commands other than disarm / stop can succeed)
    folder: str = ""
    interlock: str = "disarmed"  # disarmed, armed, refractory
    interlock_reason: str = ""
    locked_out: bool = False  # emergency stop latched: never arms again this session
    session_cap: int = 0  # interlock settings shown beside the counts (0: no session)
    max_per_minute: int = 0
    min_interval_s: float = float("nan")
    calibrated: bool = False
    calibrating: bool = False
    calibration_progress: float = 0.0  # 0..1
    baseline: tuple[tuple[str, float, float], ...] = ()  # (feature, median, MAD), sorted
    thresholds: tuple[float, float] = (float("nan"), float("nan"))  # (enter, leave), z
    pulse_count: int = 0
    vetoes: int = 0
    latency_p50_ms: float = float("nan")  # decision latency, as of the last status update
    latency_p99_ms: float = float("nan")
    audio_device: str = ""  # participant audio: '' none, wav, open, lost, reopened, closed
    decider: str = ""  # a decider plugin's name and decide() p99 (status update), '' built-in
    # phase mode ('' estimator: off): target (deg), the rhythm's SNR (dB) now, and each fired
    # pulse's phase error against the acausal reference (deg, oldest first; phase_monitor.py)
    phase_estimator: str = ""
    phase_target_deg: float | None = None  # None: off (not nan: the snapshot is compared)
    phase_snr_db: float | None = None  # None: off or not measured yet
    phase_errors_deg: tuple[float, ...] = ()


class Session:
    """Runs one config against one source (LslSource live, FileSource offline)."""

    def __init__(
        self,
        config: SessionConfig,
        source,
        *,
        live: bool,
        bus: EventBus | None = None,
        out_root: Path | None = None,
        arm_action: str | None = None,
        on_status: Callable[[SessionStatus], None] | None = None,
        status_period_s: float = 0.5,
    ) -> None:
        self.config = config
        self.source = source
        self.live = live
        self.bus = bus or EventBus()
        self.out_root = Path(out_root or config.session.out_dir)
        self.arm_action = arm_action  # arm right after calibration with this named action
        self.on_status = on_status
        self.status_period_s = status_period_s
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self.status = SessionStatus()
        self.folder: Path | None = None
        self.pipeline: Pipeline | None = None
        self.summary: dict[str, Any] = {}
        self.warnings: list[str] = []
        self._lock = threading.RLock()
        self._stimulation_ended = False
        self._own_source_ids: list[str] = []
        self.feedback = None  # participant.feedback.Feedback when config.feedback.enabled
        self._health_mark = (float("nan"), 0)  # (clock, samples) at the last health event
        self.watchdog = None  # triggers.watchdog.Watchdog in live sessions
        self.disk: dict[str, Any] = {}
        self._cal_watch: calibration.CalibrationWatch | None = None

    # ---- SessionControl -------------------------------------------------------------------
    def arm(self, action: str, operator: str = "") -> None:
        with self._lock:
            p = self._require_pipeline()
            if self._stimulation_ended:
                raise ControlError(
                    "emergency stop was pressed: stimulation is over for this session"
                )
            if self.feedback is not None and not self.feedback.pulses_allowed:
                raise ControlError(
                    "sham feedback with sham.pulses 'disabled': no pulses this session"
                )
            try:
                p.trigger.arm(action, operator=operator, calibrated=p.chain.calibrated)
            except Exception as exc:
                raise ControlError(f"arm refused: {exc}") from exc

    def disarm(self, reason: str) -> None:
        """Disarm at once from any thread (no session lock: the loop may be stuck in a chunk)."""
        p = self.pipeline
        if p is not None:
            p.trigger.disarm(reason)

    def emergency_stop(self, source: str) -> None:
        """Disarm and latch at once from any thread (no session lock, as `disarm`)."""
        self._stimulation_ended = True  # before the pipeline exists too: no auto-arm, no arm
        p = self.pipeline
        if p is not None:
            p.trigger.emergency_stop(source)
        self.bus.emit("emergency_stop", self._t_now(), source=source)

    def set_thresholds(
        self, enter: float, leave: float, source: str, *, refuse_if_armed: bool = False
    ) -> None:
        """Change the thresholds (every source: GUI, MQTT, ...); audited, then published.

        refuse_if_armed: ControlError unless the interlock is disarmed (checked under the lock
        that arming also needs, so no arm can slip in between). An audit write that fails
        undoes the change (no threshold change without its record).
        """
        with self._lock:
            p = self._require_pipeline()
            if refuse_if_armed and p.trigger.interlock.state.value != "disarmed":
                raise ControlError(
                    f"refused while the interlock is {p.trigger.interlock.state.value}: disarm "
                    "first (or set mqtt.allow_remote_thresholds_while_armed)"
                )
            old = p.chain.thresholds
            try:
                p.chain.set_thresholds(enter, leave)
            except ValueError as exc:
                raise ControlError(str(exc)) from exc
            try:
                p.trigger.audit_note(
                    "thresholds",
                    source,
                    enter=float(enter),
                    leave=float(leave),
                    previous={"enter": old[0], "leave": old[1]},
                    t_stream=self._t_now(),
                )
            except Exception as exc:
                p.chain.set_thresholds(*old)
                raise ControlError(f"threshold change not audited, undone: {exc}") from exc
            self.bus.emit(
                "thresholds",
                self._t_now(),
                enter=enter,
                leave=leave,
                source=source,
                previous={"enter": old[0], "leave": old[1]},
            )

    def start_calibration(self, source: str) -> None:
        with self._lock:
            p = self._require_pipeline()
            p.trigger.disarm(f"calibration restarted ({source})")
            p.chain.start_calibration()
            self.bus.emit("calibration", self._t_now(), phase="started", source=source)

    def stop_calibration(self, source: str) -> None:
        with self._lock:
            p = self._require_pipeline()
            try:
                p.chain.finish_calibration()
            except ValueError as exc:
                raise ControlError(str(exc)) from exc
            self._publish_baseline(source)

    def thresholds(self) -> tuple[float, float]:
        with self._lock:
            return self._require_pipeline().chain.thresholds

    def snapshot(self) -> SessionSnapshot:
        """The values a console displays, now (any thread, no lock: see SessionSnapshot)."""
        st = self.status
        p = self.pipeline
        folder = str(self.folder) if self.folder is not None else ""
        fb = self.feedback
        audio = getattr(getattr(fb, "audio", None), "device_state", "") if fb is not None else ""
        if p is None:
            return SessionSnapshot(phase=st.phase, folder=folder, audio_device=audio)
        chain, il = p.chain, p.trigger.interlock
        _, vetoed = p.trigger.counts
        limits = il.settings
        return SessionSnapshot(
            phase=st.phase,
            ready=True,
            folder=folder,
            interlock=il.state.value,
            interlock_reason=il.last_reason,
            locked_out=bool(il.locked_out),
            session_cap=int(limits.session_cap),
            max_per_minute=int(limits.max_per_minute),
            min_interval_s=float(limits.min_interval_s),
            calibrated=chain.calibrated,
            calibrating=chain.calibrating,
            calibration_progress=float(chain.calibration_progress),
            baseline=tuple(sorted((k, float(m), float(d)) for k, (m, d) in chain.baseline.items())),
            thresholds=tuple(chain.thresholds),
            pulse_count=int(il.pulse_count),
            vetoes=int(vetoed),
            latency_p50_ms=st.latency_p50_ms,
            latency_p99_ms=st.latency_p99_ms,
            audio_device=audio,
            decider=st.extra.get("decider", "").strip(),
            **_phase_snapshot(p),
        )

    def stop(self, reason: str = "stop requested") -> None:
        """Ask the loop to end (thread-safe; SIGINT/SIGTERM handlers call this)."""
        if not self.stop_event.is_set():
            self.stop_reason = reason
            self.stop_event.set()

    def _t_now(self) -> float:
        """Stream time of the newest processed sample (nan before the first)."""
        p = self.pipeline
        return p.state.t_stream if p is not None and p.state is not None else float("nan")

    def _require_pipeline(self) -> Pipeline:
        if self.pipeline is None:
            raise ControlError("session not running yet")
        return self.pipeline

    # ---- life cycle ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run until the source ends, the duration passes or `stop()`; return the summary."""
        self._set_phase("connecting")
        # Live: learn the stream's layout without subscribing, set up our outlets and the XDF
        # recorder, and only then subscribe, so LabRecorder is the first consumer and a replayer
        # that waits for consumers is recorded from its first sample.
        self.source.resolve()
        ch_names, sfreq = list(self.source.ch_names), float(self.source.sfreq)
        validate_for_stream(self.config, ch_names, sfreq)
        # only EEG is EEG: channels typed ecg / eog / emg / misc / stim stay out (issue 20)
        mask = calibration.eeg_mask(ch_names, self.source.ch_types, self.config.preprocess.exclude)
        # A live stream's own description: what it lacks (labels, units) goes to the summary;
        # channels typed as trigger / marker / counter there are never EEG, whatever their names.
        self.warnings += self.source.warnings
        source_mask = self.source.eeg_mask
        if source_mask:
            mask = [m and s for m, s in zip(mask, source_mask, strict=True)]

        self.folder = self._make_folder()
        (self.folder / "config.yaml").write_text(dump_config(self.config), encoding="utf-8")
        events = EventLog(self.bus, self.folder / "events.jsonl").start()
        self._check_disk(len(ch_names), sfreq)
        with self._lock:
            self.pipeline = Pipeline.build(
                self.config,
                ch_names,
                sfreq,
                self.folder / "audit.jsonl",
                bus=self.bus,
                live=self.live,
                extra_outputs=self._live_marker_outputs(),
                replay_speed=float(self.source.replay_speed),
                eeg_mask=mask,
            )
            self._prepare_calibration()
            self.pipeline.trigger.interlock.add_observer(self._on_interlock_change)
            self._add_live_outlets()
            self._add_feedback()
        xdf = self._start_xdf()
        eeg_saver = self._save_recording()
        mqtt = self._start_mqtt()
        t_start_local = local_clock()
        if self.live:
            from triggers.watchdog import Watchdog

            timeout_s = self.config.safety.watchdog_ms / 1000.0
            self.watchdog = Watchdog(self.pipeline.trigger, timeout_s).start()
            wd = self.watchdog

            def keepalive() -> None:  # a scheduled phase pulse waits in the loop's thread
                wd.t_progress = local_clock()

            self.pipeline.trigger.keepalive = keepalive
        try:
            if not self.source.connected:
                self.source.connect()
            self.bus.emit(
                "session",
                phase="started",
                folder=str(self.folder),
                live=self.live,
                ch_names=ch_names,
                sfreq=sfreq,
                source_id=self._source_id(),
                t0_stream=self.source.t0 if not self.live else None,
            )
            if self.feedback is not None:
                self.feedback.start()
            self.start_calibration("session start")
            self._set_phase("calibrating")
            self._loop()
        except BaseException as exc:
            self.stop_reason = self.stop_reason or f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._shutdown(events, xdf, eeg_saver, t_start_local)
            if mqtt is not None:
                mqtt.stop()  # after the summary: the final interlock and session events go out
        return self.summary

    def _loop(self) -> None:
        p = self.pipeline
        assert p is not None
        duration_s = self.config.session.duration_s
        next_status = next_health = 0.0
        t0_stream = None
        wd = self.watchdog
        p.on_calibrated = self._on_calibrated
        # Offline from a file: blocks of offline_block_s through the chain, decisions on the
        # source's chunk grid (the same pulses as single chunks, ~2x faster).
        every = self.source.chunk_size
        blocks = not self.live and every is not None
        if blocks:
            per_block = round(self.config.source.offline_block_s * self.source.sfreq / every)
        while not self.stop_event.is_set():
            if blocks:
                chunk = self.source.pull_chunks(per_block, stop_after_s=duration_s)
            elif self.live:
                chunk = self.source.pull(LSL_PULL_TIMEOUT_S)
            else:
                chunk = self.source.pull()
            if chunk is None:  # finite source ended
                self.stop_reason = self.stop_reason or "end of recording"
                break
            with self._lock:
                result = p.step(chunk, every if blocks else None)
            if self._cal_watch is not None and chunk.n_samples:
                self._watch_calibration(chunk.t_last)
            if chunk.n_samples:
                if t0_stream is None:
                    t0_stream = float(chunk.timestamps[0])
                    self.bus.emit("first_sample", t0_stream)
                now = local_clock() if self.live else chunk.t_last
                if duration_s is not None and chunk.t_last - t0_stream >= duration_s:
                    self.stop_reason = self.stop_reason or f"duration {duration_s:g} s reached"
                    break
            else:
                now = local_clock() if self.live else float("nan")
            if wd is not None:
                wd.t_progress = now  # one float store: the watchdog sees the loop is alive
            if now >= next_health:
                next_health = now + HEALTH_PERIOD_S
                self._publish_health(chunk)
            if now >= next_status:
                next_status = now + self.status_period_s
                self._update_status(result.state)

    def _prepare_calibration(self) -> None:
        """Offline: refuse a recording too short to calibrate, keep its target-annotated
        stretches out of the baseline; live and offline: watch the calibration."""
        p = self.pipeline
        assert p is not None
        duration = self.source.duration_s
        if not self.live and duration is not None:
            calibration.check_length(p.chain, float(duration), "recording")
        ann = self.source.annotations
        if not self.live and ann is not None and self.config.state.exclude_target_annotations:
            name = self.config.state.target_name
            p.chain.exclude_from_calibration(calibration.target_intervals(ann, name), name)
        self._cal_watch = calibration.CalibrationWatch(self.bus)
        raw = self.source.recording
        note = raw.info.get("description") if raw is not None else None
        if note and "Latin-1" in note:  # the reader fell back (acquisition.readers.LATIN1_NOTE)
            self.warnings.append(note)

    def _watch_calibration(self, t: float) -> None:
        """Progress / failure events while calibrating; a failure also goes to the warnings."""
        p = self.pipeline
        assert p is not None
        assert self._cal_watch is not None
        chain = p.chain
        if chain.calibrating or (chain.calibration_failure and not self._cal_watch.failed_reported):
            self._cal_watch.after_step(chain, t)
            if self._cal_watch.failed_reported:
                self.warnings.append(chain.calibration_failure)
                self._set_phase("calibration failed")

    def _on_calibrated(self) -> None:
        """The first calibrated decision went out: publish the baseline, arm when asked to."""
        p = self.pipeline
        assert p is not None
        self._publish_baseline("auto")
        self._set_phase("running")
        sham_off = self.feedback is not None and not self.feedback.pulses_allowed
        if self.arm_action and not self._stimulation_ended and not sham_off:
            try:
                p.trigger.arm(self.arm_action, operator="auto", calibrated=True)
            except Exception as exc:
                self.warnings.append(f"could not arm after calibration: {exc}")

    def _shutdown(
        self,
        events: EventLog,
        xdf: XdfRecorder | None,
        eeg_saver: threading.Thread | None,
        t_start_local: float,
    ) -> None:
        """Disarm first, then close outputs, then flush records (issue [4] order).

        Every step runs whatever an earlier one raised (a full disk, a dead device): a failed
        step is a warning in the summary and an error on the console; a summary that cannot be
        written is reported on the console (log.error) and in `self.summary`."""
        reason = self.stop_reason or "session ended"
        failed: list[str] = []

        def step(name: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
            except Exception as exc:
                msg = f"shutdown step '{name}' failed: {type(exc).__name__}: {exc}"
                failed.append(msg)
                self.warnings.append(msg)
                log.error(msg)

        def close_pipeline() -> None:
            with self._lock:  # the loop has ended; an `arm` in progress must not outlive this
                if self.pipeline is not None:
                    self.pipeline.close(reason)

        step("disarm and close outputs", close_pipeline)
        if self.watchdog is not None:
            step("watchdog", self.watchdog.stop)
        if self.feedback is not None:
            step("feedback", self.feedback.close)
        try:
            self.source.disconnect()
        except Exception as exc:  # the stream may be gone already; nothing is lost by this
            self.warnings.append(f"source disconnect: {exc}")
        self._set_phase("stopped")
        step("session event", lambda: self.bus.emit("session", phase="stopped", reason=reason))

        def stop_xdf() -> None:
            if xdf is not None:
                xdf.stop()
                if xdf.error:
                    self.warnings.append(xdf.error)

        step("XDF recording", stop_xdf)
        if eeg_saver is not None:
            step("EEG record", eeg_saver.join)

        def summary() -> None:
            self.summary = self._build_summary(reason, local_clock() - t_start_local, events)

        step("summary", summary)
        if not self.summary:  # keep what is known, so the caller still has a summary
            self.summary = {"folder": str(self.folder), "stop_reason": reason}
        step("event log", events.close)
        self.summary["shutdown_errors"] = failed
        if self.folder is not None:
            try:
                write_json(self.folder / "summary.json", self.summary)
            except Exception as exc:
                msg = f"summary.json not written: {type(exc).__name__}: {exc}"
                self.summary["summary_error"] = msg
                self.summary.setdefault("warnings", self.warnings).append(msg)
                log.error(msg)
        step("status", lambda: self._update_status(self.pipeline.state if self.pipeline else None))

    # ---- helpers ---------------------------------------------------------------------------
    def _check_disk(self, n_channels: int, sfreq: float) -> None:
        """Free space at start: a warning (console, events, status, summary) when low."""
        assert self.folder is not None
        try:
            self.disk = check_disk(self.folder, n_channels, sfreq)
        except OSError as exc:
            self.disk = {"level": "unknown", "message": f"free disk space unknown: {exc}"}
        self.status.extra["disk"] = self.disk["level"]
        if self.disk["message"]:
            self.warnings.append(self.disk["message"])
            log.warning(self.disk["message"])
        self.bus.emit("disk", **self.disk)

    def _make_folder(self) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = self.out_root / f"{self.config.session.name}-{stamp}"
        folder, i = base, 1
        while folder.exists():
            folder, i = base.with_name(f"{base.name}-{i}"), i + 1
        folder.mkdir(parents=True)
        return folder

    def _start_xdf(self) -> XdfRecorder | None:
        if not (self.live and self.config.recording.xdf):
            return None
        assert self.folder is not None
        streams = [{"source_id": sid} for sid in self._streams_to_record()]
        rec = XdfRecorder(self.folder / "session.xdf", streams)
        if not rec.start():
            msg = f"no XDF recording: {rec.error}"
            if self.config.recording.xdf_required:
                raise RuntimeError(msg)
            self.warnings.append(msg)
            log.warning(msg)
            return None
        return rec

    def _save_recording(self) -> threading.Thread | None:
        """Offline: the recording itself is the session's EEG record. It is known in full at the
        start, so it is written now, on its own thread (the file is there even if the loop
        fails, and the ~80 ms write of a 150 s 32-channel file overlaps the processing)."""
        raw = self.source.recording
        if self.live or raw is None:
            return None
        assert self.folder is not None
        path = self.folder / "eeg_raw.fif"

        def save() -> None:
            try:
                raw.save(path, overwrite=True, verbose="error")
            except Exception as exc:  # reported, never silent; the decisions are in the audit
                msg = f"could not save the EEG record {path.name}: {type(exc).__name__}: {exc}"
                self.warnings.append(msg)
                log.error(msg)

        thread = threading.Thread(target=save, name="eeg-record", daemon=False)
        thread.start()
        return thread

    def _source_id(self) -> str | None:
        return self.source.source_id

    def _live_marker_outputs(self) -> list:
        """Live: an LSL marker per attempt is the pulse record, unless the config has its own."""
        from triggers.outputs import LslMarkerOutput

        if not self.live or any(o.kind == "lsl_marker" for o in self.config.outputs.outputs):
            return []
        assert self.folder is not None
        sid = f"closedloop-pulses-{self.folder.name}"
        out = LslMarkerOutput(f"{self.config.session.name}-pulses", sid)
        return [out]

    def _start_mqtt(self):
        """Telemetry and remote control on their own thread (never in the firing path)."""
        if not self.config.mqtt.enabled:
            return None
        from closedloop.telemetry.bridge import MqttBridge

        assert self.folder is not None
        bridge = MqttBridge(self.config.mqtt, self.bus, self, session_id=self.folder.name)
        bridge.start()  # returns at once; retries in the background while the broker is down
        return bridge

    def _add_feedback(self) -> None:
        """Participant feedback (display value, audio, guided audio, sham) as a pipeline tap."""
        if not self.config.feedback.enabled:
            return
        from closedloop.participant.feedback import Feedback

        assert self.pipeline is not None
        assert self.folder is not None
        self.feedback = Feedback.from_settings(
            self.config.feedback, self.folder, self.bus, live=self.live
        )
        self.pipeline.taps.append(self.feedback.tap)
        self._own_source_ids.extend(self.feedback.source_ids)

    def _add_live_outlets(self) -> None:
        """Live: the state and features as an LSL stream (recorded in the XDF with the EEG)."""
        from closedloop.outlets import StateOutlet

        if not (self.live and self.config.session.publish_lsl):
            return
        assert self.pipeline is not None
        assert self.folder is not None
        for out in self.pipeline.trigger.outputs:
            if out.kind == "lsl_marker":
                out.open()  # before LabRecorder starts, so the XDF includes it
                self._own_source_ids.append(out.source_id)
        sid = f"closedloop-state-{self.folder.name}"
        outlet = StateOutlet(
            f"{self.config.session.name}-state", sid, self.pipeline.chain.feature_names
        )
        self.pipeline.taps.append(outlet)
        self._own_source_ids.append(sid)

    def _streams_to_record(self) -> list[str]:
        """Source ids of the EEG stream and of our own outlets (state, trigger markers)."""
        import pylsl

        eeg = self._source_id()
        ids = [eeg, *self._own_source_ids]
        # the source's own marker stream (the replayer's `<source_id>-markers`), when present
        if eeg and pylsl.resolve_bypred(f"source_id='{eeg}-markers'", 1, 0.5):
            ids.append(f"{eeg}-markers")
        return [i for i in ids if i]

    def _on_interlock_change(self, old, new, reason: str, t_stream: float) -> None:
        self.bus.emit("interlock", t_stream, state=new.value, previous=old.value, reason=reason)

    def _publish_baseline(self, source: str) -> None:
        assert self.pipeline is not None
        baseline = {
            k: {"median": m, "mad": d} for k, (m, d) in self.pipeline.chain.baseline.items()
        }
        r = calibration.summary(self.pipeline.chain)
        self.bus.emit(
            "calibration",
            self._t_now(),
            phase="done",
            source=source,
            baseline=baseline,
            baseline_score=r["baseline_score"],
            bad_channels=r["bad_channels"],
            limits=r["limits"],
            eeg_channels=r["eeg_channels"],
            note=r["note"],
        )

    def _publish_health(self, chunk) -> None:
        p = self.pipeline
        assert p is not None
        p50, p99, pmax = p.latency_percentiles()
        # effective rate over the last period: samples processed / clock elapsed (local clock
        # live, stream clock offline)
        now = local_clock() if self.live else p.state.t_stream if p.state else float("nan")
        last_now, last_n = self._health_mark
        self._health_mark = (now, p.n_samples)
        rate = (p.n_samples - last_n) / (now - last_now) if now > last_now else float("nan")
        age = local_clock() - p.state.t_stream if (self.live and p.state) else float("nan")
        self.bus.emit(
            "health",
            chunk.t_last if chunk.n_samples else float("nan"),
            effective_sfreq=rate,
            nominal_sfreq=float(self.source.sfreq),
            stream_age_s=age,
            gaps=sum(1 for f in p.faults if f.startswith(("gap", "counter_gap"))),
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            latency_max_ms=pmax,
            samples=p.n_samples,
            # queue overruns per consumer; the MQTT state queue drops on purpose (newest wins)
            dropped=sum(v for k, v in self.bus.dropped.items() if k != "mqtt-state"),
            dropped_by_queue=self.bus.dropped,
            interlock=p.trigger.interlock.state.value,
            faults=len(p.faults),
        )

    def _update_status(self, state) -> None:
        p = self.pipeline
        s = self.status
        if p is not None:
            s.pulses, s.vetoes = p.trigger.counts
            s.interlock = p.trigger.interlock.state.value
            s.calibration_progress = p.chain.calibration_progress
            if s.phase in ("calibrating", "calibration failed"):
                s.extra["calibration"] = calibration.status_note(p.chain.calibration_report())
            s.latency_p50_ms, s.latency_p99_ms, _ = p.latency_percentiles()
            if p.decider is not None:
                name = self.config.state.decider
                s.extra["decider"] = (
                    f" decider {name} OFF (fault)"
                    if p.decider_fault
                    else f" decider {name} p99={p.decider.cost_us()['p99']:.0f} µs"
                )
        if state is not None:
            s.label, s.score, s.t_stream = state.label.value, state.score, state.t_stream
        if self.on_status is not None:
            self.on_status(s)

    def _set_phase(self, phase: str) -> None:
        """A new phase, shown with the counts as they are now (the periodic status could be up
        to status_period_s old: a demo printed 'stopped ... pulses=1' after its second pulse)."""
        self.status.phase = phase
        self._update_status(None)

    def _build_summary(self, reason: str, wall_s: float, events: EventLog) -> dict[str, Any]:
        p = self.pipeline
        out: dict[str, Any] = {
            "folder": str(self.folder),
            "live": self.live,
            "stop_reason": reason,
            "wall_time_s": round(wall_s, 3),
            "warnings": self.warnings,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if p is not None:
            st = p.trigger.stats
            p50, p99, pmax = p.latency_percentiles()
            out.update(
                pulses=st["fired"],
                attempts=st["attempts"],
                vetoes_by_reason=st["vetoes_by_reason"],
                output_errors=st["output_errors"],
                time_in_state_s=p.chain.time_in_label,
                latency_ms={"p50": p50, "p99": p99, "max": pmax},
                samples=p.n_samples,
                faults=p.faults,
                final_interlock=p.trigger.interlock.state.value,
                simulated_outputs=p.simulated_outputs,
                events_dropped=events.dropped,
                audit_failed=p.trigger.audit.failed or None,
                calibration=calibration.summary(p.chain),
                fingerprint=p.fingerprint.summary(),
            )
            if p.decider is not None:  # a plugin's own cost per decision, beside the latency
                out["decider"] = {
                    "name": self.config.state.decider,
                    "cost_us": p.decider.cost_us(),
                    "fault": p.decider_fault,  # None, or the reason it was turned off
                }
        out["disk"] = self.disk
        if self.watchdog is not None:
            out["watchdog"] = {
                "timeout_ms": 1000.0 * self.watchdog.timeout_s,
                "tripped": self.watchdog.n_tripped,
                "last": self.watchdog.last_detail,
            }
        if self.feedback is not None:
            out["feedback"] = {k: v for k, v in self.feedback.summary().items() if k != "settings"}
        if p is not None and p.phase is not None:
            out["phase"] = _phase_summary(p)
        from closedloop.timing import session_timing

        out.update(session_timing(self.folder, self.live))  # timing table, code version
        return out


def _phase_snapshot(p: Pipeline) -> dict[str, Any]:
    gate, mon = p.phase, p.phase_monitor
    if gate is None or mon is None:
        return {}
    return {
        "phase_estimator": gate.settings.estimator,
        "phase_target_deg": float(gate.settings.target_deg),
        "phase_snr_db": float(mon.snr_db) if math.isfinite(mon.snr_db) else None,
        "phase_errors_deg": mon.errors_deg(),
    }


def _phase_summary(p: Pipeline) -> dict[str, Any]:
    """Phase mode in the summary: what was fitted, and the fired pulses' phase against the
    acausal reference around each (bias, circular SD, PLV, within +-30 / +-45 deg)."""
    gate, mon = p.phase, p.phase_monitor
    mon.flush()
    fitted = gate.fitted or {}
    return {
        "estimator": gate.settings.estimator,
        "target_deg": gate.settings.target_deg,
        "fitted": {k: (list(v) if isinstance(v, tuple) else v) for k, v in fitted.items()},
        "fit_error": gate.fit_error or None,
        "pulses": list(mon.results),
        "stats": mon.stats(),
        "sched_error_ms": p.trigger.stats.get("phase_sched_error_ms"),
    }


def label_is_target(label: str) -> bool:
    return label == Label.TARGET.value

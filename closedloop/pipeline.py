"""The hot path: one `step(chunk)` runs features, state, policy, interlock and outputs.

Called in the acquisition thread right after the pull (DESIGN.md): no queue between the pull and
the trigger output. Everything slow leaves through the event bus, which never blocks.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from pylsl import local_clock

from acquisition.chunk import Chunk, HealthEvent
from closedloop.bus import Event, EventBus
from closedloop.config import SessionConfig
from closedloop.fingerprint import DecisionFingerprint
from features.chain import FeatureChain
from features.types import Label, State
from triggers.audit import AuditLog
from triggers.interlock import SafetyInterlock
from triggers.outputs import build_outputs, simulate_stimulators
from triggers.policy import TriggerPolicy
from triggers.unit import Attempt, TriggerUnit

UNCALIBRATED = frozenset({Label.UNCALIBRATED, Label.CALIBRATING})
LATENCY_RING = 8192  # decision latencies kept for p50/p99 (about 80 s of 10-sample chunks at 1 kHz)


@dataclass(slots=True)
class StepResult:
    state: State | None
    attempt: Attempt | None


class Pipeline:
    """Features -> state -> trigger for one stream. Same code live and offline."""

    def __init__(
        self,
        chain: FeatureChain,
        trigger: TriggerUnit,
        bus: EventBus | None = None,
        live: bool = True,
    ) -> None:
        hardware = [o.name for o in trigger.outputs if o.hardware]
        if not live and hardware:  # offline never drives a stimulator (see `build`)
            raise ValueError(f"offline pipeline with hardware outputs {hardware}")
        self.chain = chain
        self.trigger = trigger
        self.bus = bus
        self.live = live
        # one sentence per stimulating output replaced by the simulated one (`build`)
        self.simulated_outputs: list[str] = []
        # Taps: cheap non-blocking callables (chunk, state) run after each decision, e.g. the
        # state LSL outlet, the GUI's EEG ring buffer, the feedback stream. They run after the
        # trigger output, so they never delay a pulse; an exception in a tap disarms like any fault.
        self.taps: list[Callable[[Chunk, State], None]] = []
        self.state: State | None = None
        # called once, after the first calibrated State went to the trigger (e.g. auto-arm)
        self.on_calibrated: Callable[[], None] | None = None
        self.n_samples = 0
        self.n_chunks = 0
        self.faults: list[str] = []
        self.first_t = float("nan")  # stream time of the first sample processed
        self._railing = False
        self._latency_ms = np.full(LATENCY_RING, np.nan)
        self._n_latency = 0
        self._pct: tuple[int, tuple[float, float, float]] = (-1, (float("nan"),) * 3)
        # phase mode (triggers/phase_gate.py): fed every chunk, fitted when the chain calibrates
        self.phase = None
        self.phase_monitor = None  # closedloop.phase_monitor.PhaseMonitor (a tap) with it
        self.fingerprint = DecisionFingerprint()
        self.decider = None  # features.decider.DeciderStage when state.decider names a plugin
        self.decide_every = 0  # live with a decider: decide every this many session samples
        self.decider_fault: str | None = None  # the decider's first fault: off from then on
        self._decided = 0  # session samples up to the last decision

    @classmethod
    def build(
        cls,
        config: SessionConfig,
        ch_names: list[str] | tuple[str, ...],
        sfreq: float,
        audit_path: str | Path,
        bus: EventBus | None = None,
        live: bool = True,
        clock=local_clock,
        extra_outputs: list | None = None,
        replay_speed: float = 1.0,
        eeg_mask: list[bool] | tuple[bool, ...] | None = None,
    ) -> Pipeline:
        """Wire the stages from a validated config (call `validate_for_stream` first).

        extra_outputs: outputs added to the configured ones (the session's LSL pulse markers).
        Not live (offline, tuning): every stimulating output (serial, ...) is replaced by the
        simulated stimulator, always (no setting keeps it): `simulated_outputs` says which, and
        the audit log opens with one `outputs_simulated` line each. The same holds live on a
        declared replay faster than real time (replay_speed > 1, `LslSource.replay_speed`):
        its stamps run ahead of the clock, so the sample-age check falls back to the pull age,
        and such a simulation must not reach a stimulator either.
        eeg_mask: which channels are EEG (from the channel types; default: by name,
        preprocess.exclude).
        """
        chain = FeatureChain.from_settings(
            config.preprocess,
            config.bandpower,
            config.artifacts,
            config.state,
            list(ch_names),
            sfreq,
            eeg_mask,
        )
        fast_replay = live and replay_speed > 1.0
        interlock = SafetyInterlock(
            config.safety, clock=clock, live=live, stamps_ahead_ok=fast_replay
        )
        outputs = build_outputs(
            config.outputs, bus=bus, session_cap=config.safety.session_cap
        ) + list(extra_outputs or [])
        notes: list[str] = []
        if not live or fast_replay:
            outputs, notes = simulate_stimulators(outputs)
            if fast_replay:
                why = f"a replay at {replay_speed:g}x real time"
                notes = [n.replace("not a live session", why) for n in notes]
        audit = AuditLog(audit_path)
        for note in notes:
            audit.write({"event": "outputs_simulated", "reason": note})
        trigger = TriggerUnit(
            TriggerPolicy(config.trigger, sfreq), interlock, outputs, audit, clock=clock
        )
        pipeline = cls(chain, trigger, bus, live)
        if config.phase.enabled:
            from closedloop.phase_monitor import PhaseMonitor
            from triggers.phase_gate import PhaseGate

            pipeline.phase = trigger.phase = PhaseGate(config.phase, list(ch_names), sfreq)
            pipeline.phase_monitor = PhaseMonitor(pipeline.phase, trigger.phase_pulses)
            pipeline.taps.append(pipeline.phase_monitor)
        if config.state.decider is not None:
            from features.decider import DeciderContext, DeciderStage, DecisionHysteresis

            st = config.state
            pipeline.decider = DeciderStage.build(
                st.decider,
                st.decider_settings,
                DeciderContext(
                    tuple(ch_names),
                    float(sfreq),
                    chain.feature_names,
                    st.target_name,
                    tuple(float(w) for w in chain.feature_weights),
                ),
                DecisionHysteresis(
                    st.enter, st.leave, st.dwell_s, st.leave_dwell_s, st.resume_after_artifact
                ),
                baseline_of=lambda: chain.baseline,
                mad_floor=st.mad_floor,
                thresholds_of=lambda: chain.thresholds,
            )
            pipeline.decide_every = config.source.chunk_size
        pipeline.simulated_outputs = notes
        return pipeline

    def step(self, chunk: Chunk, every: int | None = None) -> StepResult:
        """Process one chunk; never raises for data problems (they become faults -> DISARMED).

        every: offline blocks, decide after every `every` samples of the chunk (the live chunk
        grid, `FeatureChain.step_every`): each State goes to the trigger, the taps and the bus
        in turn, and each health event just before the first State at or after its time, so
        the pulses equal those of a run fed `every`-sample chunks.
        Live with a decider plugin, decisions fall on the same grid of the session's samples
        (every `decide_every`-th sample, whatever the chunks the stream delivers), so the
        plugin decides on the same samples live and offline (`_decision_grid`).
        Decision latency: live, from the pull returning (chunk.t_arrival) to the outputs having
        returned; offline (no arrival time), the compute time of this step.
        """
        t_start = chunk.t_arrival if self.live else local_clock()
        n = chunk.n_samples
        events = list(chunk.events)
        if n == 0 or every is None:  # a single decision: every fault before it
            self._on_health(events)
            events = []
        if n == 0:
            return StepResult(self.state, None)
        if self.n_chunks == 0:
            self.first_t = float(chunk.timestamps[0])
        grid, decides = self._decision_grid(n, every)
        try:
            states = [self.chain.step(chunk)] if grid is None else self.chain.step_at(chunk, grid)
        except Exception as exc:  # a bug in a feature must not fire or crash the loop silently
            self._on_health(events)
            reason = f"exception in features: {type(exc).__name__}: {exc}"
            self.trigger.fault(reason, chunk.t_last)
            self.faults.append(reason)
            if self.bus is not None:
                self.bus.emit(
                    "error", chunk.t_last, reason=reason, traceback=traceback.format_exc()
                )
            return StepResult(self.state, None)
        ends = [n] if grid is None else (grid + 1).tolist()  # each State's end in the chunk
        last_attempt = None
        last = len(states) - 1 if decides else len(states) - 2  # the last deciding State
        decided = self._decided  # first sample of the current decision (session count)
        bus, taps, phase, decider = self.bus, self.taps, self.phase, self.decider
        if phase is not None and grid is None:
            phase.push(chunk.data)
        publish_states = bus is not None and bus.wants("state")
        state = self.state
        begin = 0
        for i, chain_state in enumerate(states):
            end = ends[i]
            part = chunk if grid is None else _part(chunk, begin, end)
            begin = end
            if phase is not None and grid is not None:  # the phase sees the samples up to here
                phase.push(part.data)
            if i > last:  # the chunk's tail before the next grid sample: no decision on it
                if taps and state is not None:
                    self._run_taps(part, state)
                break
            state = chain_state
            if events:  # faults before the state they precede (nan times: at once)
                due = [e for e in events if not e.t_stream > state.t_stream]
                if due:
                    self._on_health(due)
                    events = [e for e in events if e.t_stream > state.t_stream]
            if phase is not None:
                self._phase_calibration(phase, state)
            if decider is not None:
                state = self._apply_decider(decider, state, part, self.n_samples + end)
            attempt = self._decide(state, chunk.t_arrival)
            self.fingerprint.add(
                decided,
                self.n_samples + end,
                state.label.value,
                state.score,
                "" if attempt is None else f"{attempt.fired:d}|{attempt.reason}",
            )
            decided = self.n_samples + end
            if i == last:
                self._latency_ms[self._n_latency % LATENCY_RING] = (local_clock() - t_start) * 1e3
                self._n_latency += 1
            if taps:
                self._run_taps(part, state)  # offline blocks: the part this state decided on
            if bus is not None:
                if publish_states:
                    bus.publish(Event("state", _state_payload(state), state.t_stream))
                if attempt is not None:
                    bus.publish(Event("attempt", asdict(attempt), attempt.t_stream))
            if attempt is not None:
                last_attempt = attempt
            if self.on_calibrated is not None and state.label not in UNCALIBRATED:
                hook, self.on_calibrated = self.on_calibrated, None
                hook()
        self._on_health(events)
        self._decided = decided
        self.n_samples += n
        self.n_chunks += 1
        return StepResult(state, last_attempt)

    def _decision_grid(self, n: int, every: int | None) -> tuple[np.ndarray | None, bool]:
        """Where in an n-sample chunk the States are taken: (sample indices, or None for one
        State after the last sample; whether the last index is a decision).

        Offline blocks: every `every` samples from the block's start (blocks start on the
        grid). Live with a decider: the samples whose session count is a multiple of
        `decide_every`, plus the chunk's last sample (not a decision: it carries the chain
        over the tail and feeds the taps). Live without one: None (one decision per chunk).
        """
        if every is not None:
            return self.chain.grid(n, every), True
        e = self.decide_every
        if self.decider is None or not e:
            return None, True
        first = (e - 1 - self.n_samples) % e  # first index whose session count ends a step
        grid = np.arange(first, n, e, dtype=np.int64)
        if grid.size and grid[-1] == n - 1:
            return grid, True
        return np.append(grid, np.int64(n - 1)), False

    def _decide(self, state: State, t_arrival: float) -> Attempt | None:
        """One State to the trigger (a railing amplifier first becomes a fault)."""
        if state.artifacts:
            self._check_railing(state)
        elif self._railing:
            self._railing = False
        try:
            attempt = self.trigger.on_state(state, t_arrival)
        except Exception as exc:  # TriggerUnit already disarmed (fault) before re-raising
            reason = f"exception in trigger: {type(exc).__name__}: {exc}"
            self.faults.append(reason)
            if self.bus is not None:
                self.bus.emit(
                    "error", state.t_stream, reason=reason, traceback=traceback.format_exc()
                )
            attempt = None
        self.state = state
        return attempt

    def _apply_decider(self, decider, state: State, part: Chunk, sample_end: int) -> State:
        """The decider plugin's score and label for this State (`part`: the samples it decides
        on; `sample_end`: the session's sample count after them). Its first exception or
        non-finite output is a fault (disarmed, logged once); the decider is then off for the
        rest of the session and every calibrated State stays NON_TARGET with no score (a
        broken rule must not fault 100 times a second, nor ask for pulses after a re-arm)."""
        if self.decider_fault is not None:
            if state.label in (Label.TARGET, Label.NON_TARGET):
                return replace(state, label=Label.NON_TARGET, score=float("nan"))
            return state
        try:
            return decider.apply(state, part if decider.wants_chunk else None, sample_end)
        except Exception as exc:
            reason = f"exception in decider: {type(exc).__name__}: {exc}"
            self.decider_fault = reason
            self.trigger.fault(reason, state.t_stream)
            self.faults.append(reason)
            if self.bus is not None:
                self.bus.emit(
                    "error", state.t_stream, reason=reason, traceback=traceback.format_exc()
                )
            return replace(state, label=Label.NON_TARGET, score=float("nan"))

    def _phase_calibration(self, phase, state: State) -> None:
        """Fit the phase gate on the end of the state's calibration when it completes (about
        0.2 s once, at 1 kHz); forget the fit when the calibration restarts."""
        calibrated = state.label not in UNCALIBRATED
        if calibrated and phase.fitted is None and not phase.fit_error:
            learnt = phase.fit_history()
            if self.bus is not None:
                self.bus.emit(
                    "phase_calibration",
                    state.t_stream,
                    fitted=learnt is not None,
                    error=phase.fit_error,
                    **(dict(learnt.items()) if learnt else {}),
                )
        elif not calibrated and (phase.fitted is not None or phase.fit_error):
            phase.unfit()
            phase.fit_error = ""

    def _run_taps(self, chunk: Chunk, state: State) -> None:
        for tap in self.taps:
            try:
                tap(chunk, state)
            except Exception as exc:
                reason = f"exception in tap {getattr(tap, '__qualname__', tap)}: {exc}"
                self.trigger.fault(reason, chunk.t_last)
                self.faults.append(reason)

    def _on_health(self, events: list[HealthEvent]) -> None:
        """Source health events: faults go to the interlock; all are published."""
        for event in events:
            if event.is_fault:
                self.trigger.on_health(event)
                self.faults.append(f"{event.kind.value}: {event.detail}")
            if self.bus is not None:
                self.bus.publish(
                    Event(
                        "health_event",
                        {"health": event.kind.value, "detail": event.detail},
                        event.t_stream,
                        event.t_local,
                    )
                )

    def _check_railing(self, state: State) -> None:
        """A railing amplifier is a fault (DESIGN.md safety model), not only an artifact veto."""
        railing = [a for a in state.artifacts if a.startswith(("rail:", "nonfinite:"))]
        if railing and not self._railing:
            reason = f"railing or non-finite input: {', '.join(railing[:4])}"
            self.trigger.fault(reason, state.t_stream)
            self.faults.append(reason)
        self._railing = bool(railing)

    def latency_samples(self) -> np.ndarray:
        """The recent decision latencies in ms (a copy, oldest order not kept), for histograms."""
        return self._latency_ms[: min(self._n_latency, LATENCY_RING)].copy()

    def latency_percentiles(self) -> tuple[float, float, float]:
        """Decision latency (pull return -> outputs returned) p50, p99, max in ms (nan if none)."""
        if self._pct[0] == self._n_latency:  # status and health ask after the same chunk
            return self._pct[1]
        n = min(self._n_latency, LATENCY_RING)
        lat = self._latency_ms[:n]
        lat = np.sort(lat[np.isfinite(lat)])  # a chunk without t_arrival gives nan
        if lat.size == 0:
            return (float("nan"),) * 3
        # np.percentile's linear method on the sorted values: 10 µs instead of 130 µs for a
        # short ring (an offline session asks once per stream second)
        self._pct = (
            self._n_latency,
            (_sorted_percentile(lat, 0.5), _sorted_percentile(lat, 0.99), float(lat[-1])),
        )
        return self._pct[1]

    def close(self, reason: str = "session ended") -> None:
        """Disarm first (with the reason), then close outputs, then flush the audit log."""
        self.trigger.disarm(reason)
        self.trigger.close()


def _part(chunk: Chunk, a: int, b: int) -> Chunk:
    """Samples [a, b) of a chunk (clipped), as a Chunk of their own."""
    b = min(b, chunk.n_samples)
    return Chunk(
        chunk.data[a:b],
        chunk.timestamps[a:b],
        chunk.ch_names,
        chunk.sfreq,
        t_arrival=chunk.t_arrival,
    )


def _sorted_percentile(values: np.ndarray, q: float) -> float:
    """Quantile q (0..1) of ascending values, linear between the two nearest ranks."""
    x = q * (values.size - 1)
    i = int(x)
    j = min(i + 1, values.size - 1)
    return float(values[i] + (values[j] - values[i]) * (x - i))


def _state_payload(state: State) -> dict:
    return {
        "label": state.label.value,
        "score": state.score,
        "time_in_state_s": state.time_in_state_s,
        "dwell_progress": state.dwell_progress,
        "features": state.features,
        "z": state.z,
        "artifacts": list(state.artifacts),
    }

"""Phase mode: once the state holds and the interlock would allow a pulse, fire at a chosen phase
of an ongoing rhythm (e.g. the trough of posterior alpha or of the sensorimotor mu rhythm).

`PhaseGate` keeps a `features.phase.PhaseTracker` fed with every chunk and, asked for a plan,
estimates the phase of the newest sample, checks signal quality (band amplitude against the
calibration's distribution, narrow-band SNR over a 1/f fit, as PHASTIMATE) and says when the
target phase next occurs: live, the delay from now at which the stimulating outputs must be
told (the output's own latency taken off, so the pulse leaves at the target phase); offline,
whether the deciding sample is within the tolerance of it. Every failure is a veto reason.
The gate only plans; the trigger unit re-checks the interlock at the planned instant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.phase import PhaseTracker, narrowband_snr_db, spatial_weights
from triggers.interlock import MAX_SCHEDULE_S

# How long the trigger may hold a pulse back waiting for the phase: longer than one cycle of the
# slowest band it makes sense for (theta at 4 Hz: 250 ms), and short enough that the state the
# decision was taken on still holds. The acquisition thread waits that long at most.
MAX_WAIT_S = MAX_SCHEDULE_S
# The spatially filtered signal kept for the fit at the end of calibration (the newest this many
# seconds; the state's calibration is 45 s by default): 60 s at 1 kHz is 480 kB.
CALIBRATION_KEEP_S = 60.0


class PhaseSettings(BaseModel):
    """Phase-locked pulses: wait for a phase of a rhythm before each pulse. Off by default."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Wait for the target phase before each pulse.")
    estimator: Literal["echt", "etp", "ar"] = Field(
        "echt",
        description="Phase estimator: 'echt' (endpoint-corrected Hilbert; the most accurate on "
        "the real recordings, benchmarks/results/phase.md), 'etp' (educated temporal "
        "prediction) or 'ar' (autoregressive forward prediction; needs ~1 kHz).",
    )
    channels: list[str] = Field(
        default_factory=lambda: ["O1", "Oz", "O2"],
        min_length=1,
        description="Channel(s) the rhythm is read from.",
    )
    spatial: Literal["channel", "mean", "hjorth"] = Field(
        "mean",
        description="'channel' (one channel), 'mean' (their mean) or 'hjorth' (one channel "
        "minus the mean of its neighbours, e.g. C3 for the mu rhythm).",
    )
    neighbours: list[str] | None = Field(
        None, description="'hjorth': the neighbours (None: the four nearest on the 10-05 head)."
    )
    band: tuple[float, float] = Field((8.0, 12.0), description="The rhythm's band (Hz).")
    recentre: bool = Field(
        True, description="Move the band (same width) onto the person's peak at calibration."
    )
    target_deg: float = Field(
        180.0,
        ge=-180.0,
        le=360.0,
        description="Target phase in degrees, cosine convention: 0 peak, 180 trough, 90 the "
        "falling zero crossing.",
    )
    tolerance_deg: float = Field(
        20.0,
        gt=0.0,
        le=90.0,
        description="Degrees of slack around the target: a phase just past it by up to this "
        "fires at once (not a cycle later); a pulse that would leave later than this after the "
        "planned instant (a slow disk write) is not fired ('phase_late').",
    )
    window_s: float = Field(0.5, ge=0.2, le=2.0, description="Estimator window (s).")
    # 'ar' only (Zrenner 2018 / PHASTIMATE): FIR length, edge dropped at each end of the
    # zero-phase filter output and forecast across, AR model order
    ar_filter_ms: float = Field(
        128.0, ge=16.0, le=1000.0, description="'ar': band-pass FIR length (ms; 128 taps at 1 kHz)."
    )
    ar_edge_ms: float = Field(
        64.0,
        ge=1.0,
        le=250.0,
        description="'ar': samples dropped at each end of the filtered window (ms), forecast "
        "across.",
    )
    ar_order: int = Field(30, ge=2, le=100, description="'ar': autoregressive model order.")
    max_wait_cycles: float = Field(
        1.0,
        gt=0.0,
        le=2.0,
        description="Give up ('phase_timeout') when the target phase is further away than this "
        f"many cycles (and never wait longer than {MAX_WAIT_S} s).",
    )
    max_lead_ms: float = Field(
        25.0,
        ge=0.0,
        le=1000.0 * MAX_WAIT_S,
        description="Schedule the pulse only when the target phase is at most this far ahead "
        "(or would pass before the next chunk); further away, hold the request and plan again "
        "on the next chunks, within the look-ahead: a shorter forecast is a more accurate one "
        f"(benchmarks/results/phase.md). {1000.0 * MAX_WAIT_S:g}: schedule at once.",
    )
    output_latency_ms: float = Field(
        0.0,
        ge=0.0,
        le=50.0,
        description="The stimulating output's own delay (closedloop latency-check measures it): "
        "the pulse is sent this much before the target instant.",
    )
    min_amplitude_percentile: float = Field(
        50.0,
        ge=0.0,
        le=99.0,
        description="Veto ('phase_amplitude') when the band amplitude is below this percentile "
        "of the calibration data.",
    )
    min_snr_db: float = Field(
        3.0,
        ge=-20.0,
        le=40.0,
        description="Veto ('phase_snr') when the band's power over a 1/f fit of the window is "
        "below this (dB).",
    )

    @field_validator("band")
    @classmethod
    def _band_rises(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.5 <= lo < hi <= 100.0):
            raise ValueError(f"band must be [low, high] with 0.5 <= low < high <= 100 Hz, not {v}")
        return v

    @model_validator(mode="after")
    def _spatial_fits(self) -> PhaseSettings:
        if self.spatial in ("channel", "hjorth") and len(self.channels) != 1:
            raise ValueError(f"spatial '{self.spatial}' takes exactly one channel")
        # 'ar' fits its model on the window minus both edges: keep at least half of it
        if self.estimator == "ar" and 4.0 * self.ar_edge_ms > 1000.0 * self.window_s:
            raise ValueError(
                f"ar_edge_ms {self.ar_edge_ms:g} leaves too little of the {self.window_s:g} s "
                "window to fit the AR model (two edges must be at most half of it)"
            )
        return self


@dataclass(frozen=True, slots=True)
class PhasePlan:
    """What the gate says about a pulse now.

    veto: None or 'phase_not_ready', 'phase_amplitude', 'phase_snr', 'phase_timeout',
    'phase_wait' (offline: not yet within the tolerance; ask again on the next chunk).
    delay_s: live, seconds from the planning instant at which to fire the outputs.
    phase_now: estimated phase of the newest sample (rad); predicted: the phase at which the pulse
    will leave (rad); snr_db, amplitude: the quality figures.
    """

    veto: str | None
    delay_s: float
    phase_now: float
    predicted: float
    freq_hz: float
    snr_db: float
    amplitude: float

    def record(self, target: float) -> dict[str, float | str | None]:
        """The audit line's phase fields (degrees)."""
        return {
            "phase_target_deg": round(math.degrees(target), 2),
            "phase_predicted_deg": _deg(self.predicted),
            "phase_now_deg": _deg(self.phase_now),
            "phase_freq_hz": _round(self.freq_hz, 3),
            "phase_snr_db": _round(self.snr_db, 2),
            "phase_amplitude": _sig(self.amplitude),
            "phase_delay_ms": _round(1000.0 * self.delay_s, 3),
            "phase_veto": self.veto,
        }


def _round(x: float, nd: int) -> float | None:
    return round(x, nd) if math.isfinite(x) else None


def _sig(x: float, digits: int = 4) -> float | None:
    """x to `digits` significant digits (amplitudes are in volts: 7e-06)."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def _deg(rad: float) -> float | None:
    return round(math.degrees(rad), 2) if math.isfinite(rad) else None


def wrap(angle: float) -> float:
    """An angle into (-pi, pi]."""
    return -((-angle + math.pi) % (2 * math.pi) - math.pi)


class PhaseGate:
    """Build once per session (validated settings, the stream's channels and rate)."""

    def __init__(self, settings: PhaseSettings, ch_names: Sequence[str], sfreq: float) -> None:
        self.settings = settings
        weights = spatial_weights(
            ch_names,
            settings.channels[0] if settings.spatial != "mean" else settings.channels,
            settings.spatial,
            settings.neighbours,
        )
        nyquist = sfreq / 2.0
        if not settings.band[1] < nyquist:
            raise ValueError(f"phase.band {settings.band} must lie below Nyquist ({nyquist:g} Hz)")
        self.tracker = PhaseTracker(
            weights,
            sfreq,
            settings.band,
            settings.estimator,
            settings.window_s,
            horizon_s=0.0,
            recentre=settings.recentre,
            **(
                {
                    "filter_s": settings.ar_filter_ms / 1000.0,
                    "edge_s": settings.ar_edge_ms / 1000.0,
                    "ar_order": settings.ar_order,
                }
                if settings.estimator == "ar"
                else {}
            ),
        )
        self.target = math.radians(settings.target_deg)
        self._tol = math.radians(settings.tolerance_deg)
        self._latency_s = settings.output_latency_ms / 1000.0
        self.fitted: dict | None = None
        self.fit_error = ""
        # the newest CALIBRATION_KEEP_S of the filtered signal (a ring), for `fit_history`
        self._hist = np.zeros(max(1, round(CALIBRATION_KEEP_S * sfreq)))
        self._n_hist = 0
        self._lead_s = settings.max_lead_ms / 1000.0
        self._chunk_s = 0.0  # duration of the newest chunk pushed (the decision grid)

    @property
    def output_latency_s(self) -> float:
        return self._latency_s

    def push(self, data: np.ndarray) -> None:
        """Every chunk (n_samples, n_channels) of EEG, in order: O(chunk), no allocation
        beyond the spatial filter's product (about 3 µs for 10 x 64 here)."""
        x = data @ self.tracker.weights
        self.tracker._push_signal(x)
        self._chunk_s = x.size / self.tracker.sfreq
        if self.fitted is None:  # keep the calibration stretch until the fit
            h, m = self._hist, x.size
            if m >= h.size:
                h[:] = x[-h.size :]
            else:
                i = self._n_hist % h.size
                first = min(m, h.size - i)
                h[i : i + first] = x[:first]
                h[: m - first] = x[first:]
            self._n_hist += m

    def history(self) -> np.ndarray:
        """The kept filtered signal (n,), oldest first (a copy)."""
        h = self._hist
        if self._n_hist < h.size:
            return h[: self._n_hist].copy()
        i = self._n_hist % h.size
        return np.concatenate((h[i:], h[:i]))

    def fit(self, calibration: np.ndarray) -> dict:
        """Learn from calibration data (n_samples, n_channels), or (n_samples,) already
        spatially filtered; returns what was learnt."""
        self.fitted = self.tracker.fit(calibration)
        self.fit_error = ""
        return self.fitted

    def fit_history(self) -> dict | None:
        """Fit on what `push` kept (the end of the state's calibration); None and `fit_error`
        set when it is too short (the gate then vetoes 'phase_not_ready')."""
        try:
            return self.fit(self.history())
        except ValueError as exc:
            self.fit_error = str(exc)
            return None

    def unfit(self) -> None:
        """Calibration restarted: forget the fit and collect again."""
        self.fitted = None
        self._n_hist = 0

    def _quality(self) -> tuple[str | None, float, float, float, float]:
        """(veto, phase_now, freq, snr_db, amplitude)."""
        if not self.tracker.ready or self.fitted is None:
            return "phase_not_ready", math.nan, math.nan, math.nan, math.nan
        est = self.tracker.estimate()
        snr = narrowband_snr_db(self.tracker.window(), self.tracker.sfreq, self.tracker.band)
        q = self.tracker.amplitude_quantiles
        assert q is not None
        floor = float(np.interp(self.settings.min_amplitude_percentile, np.arange(101), q))
        if not est.amplitude >= floor:  # nan fails too
            return "phase_amplitude", est.phase, est.freq_hz, snr, est.amplitude
        if not snr >= self.settings.min_snr_db:
            return "phase_snr", est.phase, est.freq_hz, snr, est.amplitude
        if not (math.isfinite(est.phase) and est.freq_hz > 0.0):
            return "phase_not_ready", est.phase, est.freq_hz, snr, est.amplitude
        return None, est.phase, est.freq_hz, snr, est.amplitude

    def plan_live(self, age_s: float, waited_s: float = 0.0) -> PhasePlan:
        """Live: when to fire, counted from now, with the newest sample `age_s` old, the request
        having waited `waited_s` already (held on earlier chunks).

        The rhythm is extrapolated at its frequency: the pulse must leave at the next instant
        the phase equals the target, so the outputs are told `output_latency_ms` earlier.
        'phase_hold': the target is further than max_lead_ms and the next chunk comes before
        it: ask again then (offline too: the same chunk grid)."""
        veto, phi, f, snr, amp = self._quality()
        if veto is not None:
            return PhasePlan(veto, math.nan, phi, math.nan, f, snr, amp)
        omega = 2 * math.pi * f
        lead_s = age_s + self._latency_s  # from the newest sample to the pulse, at the earliest
        ahead = (self.target - phi - omega * lead_s) % (2 * math.pi)
        # just past the target (within the tolerance): fire at once rather than a cycle later
        to_target = 0.0 if ahead >= 2 * math.pi - self._tol else ahead / omega
        limit = min(self.settings.max_wait_cycles / f, MAX_WAIT_S) - waited_s
        if not age_s >= 0.0 or to_target > limit:
            return PhasePlan("phase_timeout", math.nan, phi, math.nan, f, snr, amp)
        predicted = wrap(phi + omega * (lead_s + to_target))
        # 1.5 chunks: the next chunk's plan must still come before the target
        if to_target > max(self._lead_s, 1.5 * self._chunk_s):
            return PhasePlan("phase_hold", to_target, phi, predicted, f, snr, amp)
        return PhasePlan(None, to_target, phi, predicted, f, snr, amp)

    def plan_offline(self) -> PhasePlan:
        """Offline (decisions on the chunk grid): fire now when the phase at which the pulse
        would leave is within the tolerance of the target, else 'phase_wait'."""
        veto, phi, f, snr, amp = self._quality()
        if veto is not None:
            return PhasePlan(veto, math.nan, phi, math.nan, f, snr, amp)
        predicted = wrap(phi + 2 * math.pi * f * self._latency_s)
        if abs(wrap(predicted - self.target)) <= self._tol:
            return PhasePlan(None, 0.0, phi, predicted, f, snr, amp)
        return PhasePlan("phase_wait", math.nan, phi, predicted, f, snr, amp)

    def wait_limit_s(self) -> float:
        """The longest a request may wait for its phase (stream s)."""
        f = 0.5 * sum(self.tracker.band)
        return min(self.settings.max_wait_cycles / f, MAX_WAIT_S)

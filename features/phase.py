"""Phase of an ongoing oscillation (alpha/mu, theta), estimated causally and forecast past the
output delay: the basis for firing at a chosen phase.

Convention: the phase of the analytic signal, x = A cos(phase): 0 at a peak, +-pi at a trough,
+pi/2 on the falling zero crossing. Angles are radians in (-pi, pi].

Three estimators, each a pure function of the most recent window of one spatially filtered
signal (so chunk sizes cannot change a result: `PhaseTracker` keeps the window):

- `ar_phase`: autoregressive forward prediction (Zrenner et al. 2018, Brain Stimulation 11:374;
  the PHASTIMATE family): zero-phase FIR band-pass over the window, drop the edges the filter
  cannot see past, fit an AR model (Yule-Walker) on the rest, forecast across the dropped edge and
  the horizon, Hilbert, read the phase at "now + horizon".
- `etp_phase`: Educated Temporal Prediction (Shirinpour et al. 2020, Brain Stimulation 13:1375):
  the median inter-peak interval and the procedure's own bias are learnt from calibration data
  (`EtpModel.fit`); at run time, the last reliable peak of the band-passed window plus elapsed time.
- `echt_phase`: endpoint-corrected Hilbert transform (Schreglmann et al. 2021, Nat Commun 12:363):
  FFT of the window, analytic spectrum, a causal 2nd-order band-pass applied in the frequency
  domain (zero phase shift at its centre frequency), inverse FFT, phase of the last sample,
  advanced by 2 pi f0 horizon.

`reference_phase` is the acausal truth the estimators are scored against: zero-phase band-pass
plus Hilbert of the whole recording, averaged over several equivalent filters, with the spread
between them as the reference's own uncertainty (as PHASTIMATE does). Written from the papers
(the reference implementations carry GPL or no licence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import linalg, signal

ESTIMATORS = ("ar", "etp", "echt")


@dataclass(frozen=True, slots=True)
class PhaseEstimate:
    """phase: radians at now + horizon; amplitude: band amplitude at the window's end (input
    units); freq_hz: the frequency used to advance the phase."""

    phase: float
    amplitude: float
    freq_hz: float


# ---- filters (designed once per parameter set) --------------------------------------------------
@lru_cache(maxsize=32)
def fir_bandpass(sfreq: float, lo: float, hi: float, n_taps: int) -> np.ndarray:
    """Linear-phase FIR band-pass taps (n_taps,), odd length (a Hamming window, as Zrenner 2018)."""
    n_taps = int(n_taps) | 1
    return signal.firwin(n_taps, [lo, hi], pass_zero=False, fs=sfreq)


@lru_cache(maxsize=32)
def _echt_response(n: int, sfreq: float, lo: float, hi: float) -> np.ndarray:
    """The analytic-signal mask times a causal 2nd-order Butterworth band-pass, (n,) complex."""
    b, a = signal.butter(1, [lo, hi], btype="bandpass", fs=sfreq)
    freqs = np.fft.fftfreq(n, d=1.0 / sfreq)
    _, h = signal.freqz(b, a, worN=np.abs(freqs), fs=sfreq)
    mask = np.zeros(n)
    mask[0] = 1.0
    mask[1 : (n + 1) // 2] = 2.0
    if n % 2 == 0:
        mask[n // 2] = 1.0
    return mask * h


@lru_cache(maxsize=32)
def _fir_twice(sfreq: float, lo: float, hi: float, n_taps: int) -> np.ndarray:
    """The FIR applied forward then backward as one symmetric kernel (2 n_taps - 1,)."""
    taps = fir_bandpass(sfreq, lo, hi, n_taps)
    return np.convolve(taps, taps[::-1])


def zero_phase_fir(x: np.ndarray, sfreq: float, band: tuple[float, float], filter_s: float):
    """filtfilt of x (n,) with the FIR band-pass, odd-extended at both ends like scipy's filtfilt
    but without its initial-condition solve (a 128 x 128 linear system per call: 30 ms of the
    37 ms an estimate took at 1 kHz). Returns (y (n,), n_taps)."""
    n_taps = max(3, round(filter_s * sfreq)) | 1
    h2 = _fir_twice(sfreq, band[0], band[1], n_taps)
    pad = min(x.size - 1, n_taps - 1)
    left = 2.0 * x[0] - x[pad:0:-1]
    right = 2.0 * x[-1] - x[-2 : -pad - 2 : -1]
    y = np.convolve(np.concatenate((left, x, right)), h2, mode="same")
    return y[pad : pad + x.size], n_taps


def _wrap(phase: float) -> float:
    """An angle into (-pi, pi]."""
    return float(-((-phase + math.pi) % (2 * math.pi) - math.pi))


def _fit_ar(y: np.ndarray, order: int) -> np.ndarray:
    """Yule-Walker AR coefficients a (order,): y[n] ~ sum_k a[k] y[n-1-k]."""
    y = y - y.mean()
    n = y.size
    r = np.array([y[: n - k] @ y[k:] for k in range(order + 1)]) / n  # biased autocorrelation
    if not r[0] > 0.0:
        return np.zeros(order)
    r[0] *= 1.0 + 1e-9  # a whisker of ridge: a pure sinusoid makes the Toeplitz matrix singular
    return linalg.solve_toeplitz(r[:order], r[1 : order + 1])


def _forecast(y: np.ndarray, a: np.ndarray, n: int) -> np.ndarray:
    """Continue y by n samples with the AR model a (zero innovation), as an IIR filter run on
    zero input from the last len(a) samples (scipy's lfilter: no Python loop per sample)."""
    den = np.concatenate(([1.0], -a))
    zi = signal.lfiltic([1.0], den, y[::-1][: a.size])
    out, _ = signal.lfilter([1.0], den, np.zeros(n), zi=zi)
    return out


# ---- estimators ----------------------------------------------------------------------------
def ar_phase(
    window: np.ndarray,
    sfreq: float,
    band: tuple[float, float],
    horizon_s: float = 0.0,
    *,
    filter_s: float = 0.128,
    edge_s: float = 0.064,
    ar_order: int = 30,
) -> PhaseEstimate:
    """AR forward prediction on window (n_samples,), the newest sample last.

    filter_s: FIR length (Zrenner 2018: 128 taps at 1 kHz); edge_s: samples dropped at each end of
    the filtfilt output (64 at 1 kHz); ar_order: AR model order (30), lowered to a third of the
    samples left for the fit when the window is short.
    """
    edge = max(1, round(edge_s * sfreq))
    y, _ = zero_phase_fir(window, sfreq, band, filter_s)
    y = y[edge:-edge]
    order = int(min(ar_order, max(2, y.size // 3)))
    a = _fit_ar(y, order)
    h = max(0, round(horizon_s * sfreq))
    # forecast past the point of interest as far again as the dropped edge, so that the Hilbert
    # transform's own end effect sits beyond it
    fc = _forecast(y, a, 2 * edge + h)
    z = signal.hilbert(np.concatenate((y, fc)))
    k = y.size + edge - 1 + h  # the newest sample, plus the horizon
    amp = float(np.abs(z[y.size + edge - 1]))
    inst_f = float(np.angle(z[k] * np.conj(z[k - 1]))) * sfreq / (2 * math.pi)
    return PhaseEstimate(_wrap(float(np.angle(z[k]))), amp, inst_f)


@dataclass(frozen=True, slots=True)
class EtpModel:
    """What ETP learns from calibration data: the cycle length (s)."""

    ipi_s: float
    band: tuple[float, float]
    filter_s: float = 0.128
    edge_s: float = 0.064

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        sfreq: float,
        band: tuple[float, float],
        filter_s: float = 0.128,
        edge_s: float = 0.064,
    ) -> EtpModel:
        """The median peak-to-peak interval of calibration data x (n_samples,), zero-phase
        band-passed, within the band's cycle lengths (Shirinpour 2020's training step; the bias
        of the whole procedure is learnt by `PhaseTracker.fit`, as for every estimator)."""
        lo, hi = band
        sos = signal.butter(2, [lo, hi], btype="bandpass", fs=sfreq, output="sos")
        xf = signal.sosfiltfilt(sos, x)
        peaks, _ = signal.find_peaks(xf, distance=max(1, int(sfreq / hi)))
        ipis = np.diff(peaks) / sfreq
        ipis = ipis[(ipis >= 1.0 / hi) & (ipis <= 1.0 / lo)]
        ipi = float(np.median(ipis)) if ipis.size else 2.0 / (lo + hi)
        return cls(ipi, band, filter_s, edge_s)


def etp_phase(
    window: np.ndarray, sfreq: float, model: EtpModel, horizon_s: float = 0.0
) -> PhaseEstimate:
    """ETP on window (n_samples,): time since the last reliable peak over the learnt cycle."""
    lo, hi = model.band
    edge = max(1, round(model.edge_s * sfreq))
    y, _ = zero_phase_fir(window, sfreq, model.band, model.filter_s)
    usable = y[:-edge]
    peaks, _ = signal.find_peaks(usable, distance=max(1, int(sfreq / hi)))
    amp = float(np.max(np.abs(usable[-max(1, round(sfreq / lo)) :])))
    if peaks.size == 0:
        return PhaseEstimate(math.nan, amp, 1.0 / model.ipi_s)
    elapsed_s = (window.size - 1 - peaks[-1]) / sfreq + horizon_s
    phase = 2 * math.pi * elapsed_s / model.ipi_s
    return PhaseEstimate(_wrap(phase), amp, 1.0 / model.ipi_s)


def echt_phase(
    window: np.ndarray, sfreq: float, band: tuple[float, float], horizon_s: float = 0.0
) -> PhaseEstimate:
    """Endpoint-corrected Hilbert transform of window (n_samples,); the phase advanced by
    2 pi f0 horizon with f0 the band's centre (where the causal filter's phase shift is zero).

    Correcting the filter's phase shift at a measured instantaneous frequency instead was tried
    and made it worse (circular SD 32 -> 66 deg at 6 dB): one window's frequency is too noisy.

    freq_hz (what a scheduled pulse extrapolates with) is the mean instantaneous frequency over
    the last two cycles (the phase step of sum z[k] z*[k-1]; f0 when outside the band): with f0
    the planned pulses at a rhythm 0.5 Hz off the band centre landed 11 deg early on average
    (10.9 deg at 6 dB, 11.0 at 10 dB, 1 kHz, delays 0-100 ms); with it 3.5 and 4.3 deg, at the
    same circular SD (63.8 vs 63.0 deg ungated)."""
    lo, hi = band
    n = window.size
    z = np.fft.ifft(np.fft.fft(window - window.mean()) * _echt_response(n, sfreq, lo, hi))
    f0 = 0.5 * (lo + hi)
    m = min(n - 1, max(2, round(2.0 * sfreq / f0)))
    seg = z[-m - 1 :]
    f = float(np.angle(np.sum(seg[1:] * np.conj(seg[:-1])))) * sfreq / (2 * math.pi)
    f = f if lo <= f <= hi else f0
    end = z[-1]
    return PhaseEstimate(_wrap(float(np.angle(end)) + 2 * math.pi * f0 * horizon_s), abs(end), f)


def narrowband_snr_db(
    window: np.ndarray,
    sfreq: float,
    band: tuple[float, float],
    fit_hz: tuple[float, float] = (2.0, 30.0),
) -> float:
    """Power in `band` over a 1/f fit of the flanks, in dB (as PHASTIMATE's SNR), of window (n,).

    The periodogram (Hann) of the window; a straight line in log power against log frequency is
    fitted to fit_hz outside the band; SNR is the band's summed power over the fit's."""
    n = window.size
    f = np.fft.rfftfreq(n, 1.0 / sfreq)
    p = np.abs(np.fft.rfft((window - window.mean()) * np.hanning(n))) ** 2
    lo, hi = band
    in_band = (f >= lo) & (f <= hi)
    flank = (f >= fit_hz[0]) & (f <= min(fit_hz[1], sfreq / 2)) & ~in_band & (p > 0)
    if in_band.sum() == 0 or flank.sum() < 3:
        return math.nan
    slope, icpt = np.polyfit(np.log(f[flank]), np.log(p[flank]), 1)
    fit = np.exp(icpt + slope * np.log(f[in_band]))
    return float(10.0 * np.log10(p[in_band].sum() / fit.sum()))


def recentre_band(x: np.ndarray, sfreq: float, band: tuple[float, float]) -> tuple[float, float]:
    """The band moved (same width) onto the person's spectral peak inside it: the Welch
    spectrum (2 s segments) of x (n,) above a 1/f line fitted to 2-30 Hz; the band unchanged
    when no peak stands out. Phase estimators lag or lead a rhythm off their band's centre."""
    f, p = signal.welch(x, sfreq, nperseg=min(x.size, round(2 * sfreq)))
    lo, hi = band
    fit = (f >= 2.0) & (f <= min(30.0, sfreq / 2)) & ((f < lo) | (f > hi)) & (p > 0)
    inside = (f >= lo) & (f <= hi)
    if fit.sum() < 3 or inside.sum() < 3:
        return band
    slope, icpt = np.polyfit(np.log(f[fit]), np.log(p[fit]), 1)
    excess = np.log(p[inside]) - (icpt + slope * np.log(f[inside]))
    if excess.max() < math.log(2.0):  # no peak 3 dB above the background
        return band
    peak = float(f[inside][np.argmax(excess)])
    half = 0.5 * (hi - lo)
    return (peak - half, peak + half)


# ---- the acausal reference -------------------------------------------------------------------
def reference_phase(
    x: np.ndarray, sfreq: float, band: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Acausal phase of the whole signal x (n_samples,): (phase, amplitude, spread), each
    (n_samples,). The circular mean over five equivalent zero-phase band-passes (Butterworth
    orders 2, 3 and 4, FIR of 3 and 5 cycles of the low edge) of the Hilbert phase; spread is
    the circular SD between them (rad): the reference's own uncertainty."""
    lo, hi = band
    zs = []
    for order in (2, 3, 4):
        sos = signal.butter(order, [lo, hi], btype="bandpass", fs=sfreq, output="sos")
        zs.append(signal.hilbert(signal.sosfiltfilt(sos, x)))
    for cycles in (3, 5):
        taps = fir_bandpass(sfreq, lo, hi, round(cycles * sfreq / lo))
        zs.append(signal.hilbert(signal.filtfilt(taps, [1.0], x)))
    z = np.asarray(zs)
    unit = z / np.maximum(np.abs(z), 1e-30)
    mean = unit.mean(axis=0)
    r = np.clip(np.abs(mean), 1e-12, 1.0)
    return np.angle(mean), np.abs(z).mean(axis=0), np.sqrt(-2.0 * np.log(r))


# ---- accuracy figures ------------------------------------------------------------------------
def phase_error_stats(errors: np.ndarray) -> dict[str, float]:
    """Circular statistics of phase errors (radians) -> degrees and shares.

    bias_deg: circular mean; circ_sd_deg: sqrt(-2 ln R); plv: R (the phase-locking value of the
    fired phases around their mean); within_30 / within_45: shares of |error| within 30 / 45 deg.
    """
    e = np.asarray(errors, dtype=float)
    e = e[np.isfinite(e)]
    if e.size == 0:
        nan = math.nan
        return {"n": 0, "bias_deg": nan, "circ_sd_deg": nan, "plv": nan,
                "within_30": nan, "within_45": nan}  # fmt: skip
    m = np.mean(np.exp(1j * e))
    r = float(np.abs(m))
    wrapped = np.angle(np.exp(1j * e))
    return {
        "n": int(e.size),
        "bias_deg": math.degrees(float(np.angle(m))),
        # R can round to just above 1 (identical errors): log > 0 would make the root fail
        "circ_sd_deg": math.degrees(math.sqrt(max(0.0, -2.0 * math.log(max(r, 1e-12))))),
        "plv": r,
        "within_30": float(np.mean(np.abs(wrapped) <= math.radians(30))),
        "within_45": float(np.mean(np.abs(wrapped) <= math.radians(45))),
    }


# ---- spatial filters -------------------------------------------------------------------------
def spatial_weights(
    ch_names: Sequence[str],
    target: str | Sequence[str],
    kind: str = "channel",
    neighbours: Sequence[str] | None = None,
) -> np.ndarray:
    """Weights (n_channels,) that make one signal from a chunk (n_samples, n_channels) @ w.

    kind 'channel': the target alone; 'mean': the mean of the target channels; 'hjorth': the
    target minus the mean of its neighbours (a surface Laplacian, e.g. C3 minus FC1, FC5, CP1,
    CP5 for the mu rhythm), neighbours given or the four nearest on the 10-05 head (colin27_1005).
    """
    names = [c.strip().rstrip(".").lower() for c in ch_names]

    def index(name: str) -> int:
        key = name.strip().rstrip(".").lower()
        if key not in names:
            raise ValueError(f"channel {name!r} is not in the stream ({len(names)} channels)")
        return names.index(key)

    w = np.zeros(len(names))
    targets = [target] if isinstance(target, str) else list(target)
    if kind == "channel":
        if len(targets) != 1:
            raise ValueError("kind 'channel' takes one target channel")
        w[index(targets[0])] = 1.0
    elif kind == "mean":
        for t in targets:
            w[index(t)] += 1.0 / len(targets)
    elif kind == "hjorth":
        if len(targets) != 1:
            raise ValueError("kind 'hjorth' takes one target channel")
        nb = (
            list(neighbours)
            if neighbours is not None
            else nearest_neighbours(ch_names, targets[0], 4)
        )
        if not nb:
            raise ValueError(f"no neighbours of {targets[0]!r} for a Hjorth filter")
        w[index(targets[0])] = 1.0
        for n in nb:
            w[index(n)] -= 1.0 / len(nb)
    else:
        raise ValueError(f"spatial filter kind must be 'channel', 'mean' or 'hjorth', not {kind!r}")
    return w


def nearest_neighbours(ch_names: Sequence[str], target: str, k: int = 4) -> list[str]:
    """The k channels of ch_names nearest to target on the standard 10-05 head (names as given)."""
    import mne

    pos = mne.channels.make_standard_montage("colin27_1005").get_positions()["ch_pos"]
    lower = {n.lower(): p for n, p in pos.items()}

    def where(name: str):
        return lower.get(name.strip().rstrip(".").lower())

    p0 = where(target)
    if p0 is None:
        raise ValueError(f"{target!r} has no standard 10-05 position; give the neighbours")
    dist = [
        (float(np.linalg.norm(where(c) - p0)), c)
        for c in ch_names
        if where(c) is not None and c.strip().rstrip(".").lower() != target.lower()
    ]
    return [c for _, c in sorted(dist)[:k]]


# ---- the run-time tracker --------------------------------------------------------------------
class PhaseTracker:
    """The newest `window_s` of one spatially filtered signal, and its phase on request.

    `push(data)` per chunk (n_samples, n_channels), O(chunk) with no allocation: a ring buffer of
    twice the window, so the newest window is always one contiguous slice. `estimate()` runs the
    chosen estimator on that slice (only when a pulse is being considered): the result depends
    only on the samples, never on how they were chunked. `fit(calibration)` learns what the
    estimators need from the person's own data: ETP's cycle length, the estimator's systematic
    error at the configured horizon (subtracted afterwards: every estimator has one, e.g. the
    causal filter of ecHT lags a few degrees off its centre frequency) and the band amplitude's
    distribution (for the quality gate).
    """

    def __init__(
        self,
        weights: np.ndarray,
        sfreq: float,
        band: tuple[float, float],
        estimator: str = "ar",
        window_s: float = 0.5,
        horizon_s: float = 0.0,
        recentre: bool = True,
        **options: float,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, not {estimator!r}")
        self.weights = np.ascontiguousarray(weights, dtype=float)
        self.sfreq = float(sfreq)
        self.configured_band = (float(band[0]), float(band[1]))
        self.band = self.configured_band
        self.recentre = recentre
        self.estimator = estimator
        self.horizon_s = float(horizon_s)
        self.options = options
        self.n = round(window_s * sfreq)
        self.etp: EtpModel | None = None
        self.bias = 0.0  # rad, learnt by fit
        self.amplitude_quantiles: np.ndarray | None = None  # 0..100 %, learnt by fit
        self._buf = np.zeros(2 * self.n)
        self._pos = 0  # samples written in all

    @property
    def ready(self) -> bool:
        return self._pos >= self.n and (self.estimator != "etp" or self.etp is not None)

    def push(self, data: np.ndarray) -> None:
        """Append a chunk (n_samples, n_channels) through the spatial filter."""
        self._push_signal(data @ self.weights)

    def _push_signal(self, x: np.ndarray) -> None:
        n, m = self.n, x.size
        if m >= n:  # a long block (offline): only its newest window matters
            idx = (self._pos + m - n + np.arange(n)) % n
            self._buf[idx] = x[-n:]
            self._buf[idx + n] = x[-n:]
            self._pos += m
            return
        i = self._pos % n
        # every sample goes at i and i + n, so buf[j : j + n] is the newest window for j = pos % n
        first = min(m, n - i)
        self._buf[i : i + first] = x[:first]
        self._buf[i + n : i + n + first] = x[:first]
        if first < m:
            rest = m - first
            self._buf[:rest] = x[first:]
            self._buf[n : n + rest] = x[first:]
        self._pos += m

    def window(self) -> np.ndarray:
        """The newest window (n,), oldest sample first (a view)."""
        j = self._pos % self.n
        return self._buf[j : j + self.n]

    def _raw_estimate(self, w: np.ndarray) -> PhaseEstimate:
        if self.estimator == "ar":
            return ar_phase(w, self.sfreq, self.band, self.horizon_s, **self.options)
        if self.estimator == "etp":
            assert self.etp is not None
            return etp_phase(w, self.sfreq, self.etp, self.horizon_s)
        return echt_phase(w, self.sfreq, self.band, self.horizon_s)

    def estimate(self) -> PhaseEstimate:
        """The phase at now + horizon_s (bias removed); nan until the window is full."""
        if not self.ready:
            return PhaseEstimate(math.nan, math.nan, math.nan)
        est = self._raw_estimate(self.window())
        return PhaseEstimate(_wrap(est.phase - self.bias), est.amplitude, est.freq_hz)

    def fit(self, calibration: np.ndarray, n_points: int = 200, seed: int = 0) -> dict:
        """Learn from calibration data (n_samples, n_channels), or (n_samples,) already
        spatially filtered. Returns what was learnt (for the summary and the console)."""
        x = calibration @ self.weights if calibration.ndim == 2 else np.asarray(calibration)
        if x.size < 2 * self.n:
            raise ValueError(
                f"phase calibration needs at least {2 * self.n / self.sfreq:g} s of data, "
                f"got {x.size / self.sfreq:g} s"
            )
        if self.recentre:
            self.band = recentre_band(x, self.sfreq, self.configured_band)
        if self.estimator == "etp":
            self.etp = EtpModel.fit(
                x,
                self.sfreq,
                self.band,
                self.options.get("filter_s", 0.128),
                self.options.get("edge_s", 0.064),
            )
        ref, amp, _ = reference_phase(x, self.sfreq, self.configured_band)
        h = round(self.horizon_s * self.sfreq)
        ends = np.random.default_rng(seed).integers(self.n, x.size - h, size=n_points)
        ends = ends[amp[ends - 1] >= np.median(amp)]  # where the rhythm is there
        errs = np.array(
            [self._raw_estimate(x[e - self.n : e]).phase - ref[e - 1 + h] for e in ends]
        )
        errs = errs[np.isfinite(errs)]
        self.bias = float(np.angle(np.mean(np.exp(1j * errs)))) if errs.size else 0.0
        self.amplitude_quantiles = np.percentile(amp, np.arange(101))
        stats = phase_error_stats(errs - self.bias)
        return {
            "band": self.band,
            "bias_deg": math.degrees(self.bias),
            "calibration_circ_sd_deg": stats["circ_sd_deg"],
            "ipi_s": self.etp.ipi_s if self.etp is not None else None,
            "amplitude_median": float(self.amplitude_quantiles[50]),
        }

"""Signals with a known phase for the phase-estimator tests and benchmark.

A 1/f (pink) background plus one narrowband rhythm whose phase is known sample by sample: the
frequency wanders slowly around f0 (a random walk, +-0.5 Hz), the amplitude comes in bursts (a
smoothed random envelope), and the SNR is set exactly as the rhythm's power over the
background's power inside f0 +- 2 Hz.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import signal


@dataclass(frozen=True)
class KnownPhase:
    x: np.ndarray  # (n_samples,) the signal
    phase: np.ndarray  # (n_samples,) the rhythm's true phase, radians, cos convention
    envelope: np.ndarray  # (n_samples,) the rhythm's amplitude
    sfreq: float
    f0: float
    snr_db: float


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f power noise (n,), zero mean, unit SD."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1]
    x = np.fft.irfft(spec / np.sqrt(f), n)
    x -= x.mean()
    return x / x.std()


def known_phase_signal(
    duration_s: float = 60.0,
    sfreq: float = 1000.0,
    f0: float = 10.0,
    snr_db: float = 6.0,
    seed: int = 0,
    burst_s: float = 1.0,
) -> KnownPhase:
    """Background plus a bursting rhythm at f0 with the given in-band SNR (dB)."""
    rng = np.random.default_rng(seed)
    n = round(duration_s * sfreq)
    bg = pink_noise(n, rng)
    walk = np.cumsum(rng.standard_normal(n)) / math.sqrt(sfreq)  # ~1 per sqrt(s)
    walk = signal.sosfiltfilt(signal.butter(2, 0.2, fs=sfreq, output="sos"), walk)
    freq = f0 + 0.5 * np.tanh(walk)
    phase = np.angle(np.exp(1j * 2 * math.pi * np.cumsum(freq) / sfreq))
    env_raw = rng.standard_normal(n)
    sos = signal.butter(2, 1.0 / burst_s, fs=sfreq, output="sos")
    env = signal.sosfiltfilt(sos, env_raw)
    env = np.clip(env / env.std() + 0.8, 0.0, None)  # bursts: on most of the time, off at times
    rhythm = env * np.cos(phase)
    band = [f0 - 2.0, f0 + 2.0]
    sos_b = signal.butter(4, band, btype="bandpass", fs=sfreq, output="sos")
    p_rhythm = np.mean(signal.sosfiltfilt(sos_b, rhythm) ** 2)
    p_bg = np.mean(signal.sosfiltfilt(sos_b, bg) ** 2)
    gain = math.sqrt(p_bg / p_rhythm * 10 ** (snr_db / 10.0))
    return KnownPhase(bg + gain * rhythm, phase, gain * env, sfreq, f0, snr_db)

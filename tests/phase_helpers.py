"""Phase-mode test helpers: a recording with a rhythm of known phase at Oz, and a config that
asks for a pulse every ~1.5 s once calibrated (the state gate is not under test here)."""

from __future__ import annotations

import mne
import numpy as np

from benchmarks.phase_signals import KnownPhase, known_phase_signal, pink_noise
from closedloop.config import SessionConfig, apply_overrides

NAMES = ["Fz", "Cz", "Pz", "O1", "Oz", "O2"]
SCALE_V = 10e-6  # ~10 µV background: well inside the artifact limits


def known_phase_raw(
    duration_s: float = 90.0, sfreq: float = 500.0, snr_db: float = 10.0, seed: int = 3
) -> tuple[mne.io.RawArray, KnownPhase]:
    """6 EEG channels (volts) + 'counter' (sample index); the known rhythm at Oz (10 Hz), pink
    noise elsewhere."""
    sig = known_phase_signal(duration_s, sfreq, 10.0, snr_db=snr_db, seed=seed)
    rng = np.random.default_rng(seed + 1)
    n = sig.x.size
    eeg = np.vstack([pink_noise(n, rng) for _ in NAMES]) * SCALE_V
    eeg[NAMES.index("Oz")] = sig.x * SCALE_V
    data = np.vstack([eeg, np.arange(n, dtype=float)[None]])
    info = mne.create_info([*NAMES, "counter"], sfreq, ["eeg"] * len(NAMES) + ["misc"])
    return mne.io.RawArray(data, info, verbose=False), sig


def phase_config(**overrides) -> SessionConfig:
    """Phase mode at the Oz trough; the state is always 'target' after a 20 s calibration (enter
    far below any score), and the policy repeats its request every 1.5 s."""
    base = {
        "recording.xdf": False,
        "state.calibration_s": 20.0,
        "state.enter": -50.0,
        "state.leave": -60.0,
        "state.dwell_s": 0.0,
        "trigger.mode": "repeat",
        "trigger.dwell_s": 0.0,
        "trigger.repeat_interval_s": 1.5,
        "safety.min_interval_s": 1.0,
        "safety.max_per_minute": 60,
        "phase.enabled": True,
        "phase.channels": ["Oz"],
        "phase.spatial": "channel",
        "phase.target_deg": 180.0,
        "phase.min_snr_db": 0.0,
        "phase.min_amplitude_percentile": 25.0,
    }
    base.update(overrides)
    return apply_overrides(SessionConfig(), base)

"""Seeded, realistic-enough EEG simulator with labelled brain states and artifacts.

What it makes (all in volts, float64 in memory):

- background: 1/f ("pink") noise, spatially correlated through a smooth distance-based
  covariance on the montage positions (nearby electrodes share more signal), ~12 µV RMS;
- posterior alpha (~10 Hz, narrowband so it waxes and wanes) strongest at Pz/POz/O1/Oz/O2/P3/P4
  (TP9/TP10 on the 4-channel consumer montage);
- frontal-midline theta (~6 Hz) strongest at Fz/FCz/Cz (AF7/AF8 on the consumer montage);
- alternating state blocks annotated ``meditation`` / ``mind_wandering`` (random 20-40 s),
  where meditation scales theta and alpha amplitude by ``state_gain`` (2.75x), ramping in over
  ``ramp_s`` seconds after the block onset;
- eye blinks on frontal channels (100-200 µV at Fp1/Fp2), annotated ``blink``;
- EMG bursts (20 Hz to ~0.45 fs, broadband) on temporal channels, annotated ``emg``;
- 50 Hz line noise (1-4 µV per channel, random phase);
- one bad-channel episode (flat or railing at ±187.5 mV for 3-6 s), annotated ``bad_channel``
  with the channel named in the annotation's ``ch_names``;
- a ``counter`` misc channel holding the sample index (exact integers stored as float).

Same arguments and seed give identical arrays; `write_simulated` also gives identical file bytes
(see `save_fif_reproducible`). Regenerate the committed recordings with
``python -m acquisition.simulator --regenerate``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
from collections.abc import Sequence
from pathlib import Path

import mne
import numpy as np
from scipy.linalg import cholesky

# Positions come from colin27_1005 (mne >= 1.13 name for the old standard_1005, same coordinates).
MONTAGE_NAME = "colin27_1005"

STANDARD_32 = (
    "Fp1", "Fp2", "AF3", "AF4", "F7", "F3", "Fz", "F4", "F8",
    "FC5", "FC1", "FCz", "FC2", "FC6", "T7", "C3", "Cz", "C4", "T8",
    "CP5", "CP1", "CP2", "CP6", "P7", "P3", "Pz", "P4", "P8", "POz", "O1", "Oz", "O2",
)  # fmt: skip
CONSUMER_4 = ("TP9", "AF7", "AF8", "TP10")  # Muse order
# The 64 channels of the PhysioNet EEG Motor Movement/Imagery recordings, in their order
PHYSIONET_64 = (
    "FC5", "FC3", "FC1", "FCz", "FC2", "FC4", "FC6", "C5", "C3", "C1", "Cz", "C2", "C4", "C6",
    "CP5", "CP3", "CP1", "CPz", "CP2", "CP4", "CP6", "Fp1", "Fpz", "Fp2", "AF7", "AF3", "AFz",
    "AF4", "AF8", "F7", "F5", "F3", "F1", "Fz", "F2", "F4", "F6", "F8", "FT7", "FT8", "T7",
    "T8", "T9", "T10", "TP7", "TP8", "P7", "P5", "P3", "P1", "Pz", "P2", "P4", "P6", "P8",
    "PO7", "PO3", "POz", "PO4", "PO8", "O1", "Oz", "O2", "Iz",
)  # fmt: skip

COUNTER_CHANNEL = "counter"
STATE_MEDITATION = "meditation"
STATE_MIND_WANDERING = "mind_wandering"
BLINK = "blink"
EMG = "emg"
BAD_CHANNEL = "bad_channel"

# Fixed so that files are byte-stable; any date works, this one is easy to spot.
MEAS_DATE = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)

RAIL_V = 0.1875  # OpenBCI Cyton full scale (±187.5 mV at gain 24): what a railing channel shows
HIGHPASS_HZ = 0.5  # below this the pink spectrum is tapered to zero (amplifier-like high-pass)
SPATIAL_LENGTH_M = 0.04  # correlation length of the background (4 cm: neighbours r ~ 0.6-0.75)
BLINK_FALLOFF_M = 0.05  # blink amplitude falls by e every 5 cm away from Fp1/Fp2
EMG_FALLOFF_M = 0.04  # EMG falls by e every 4 cm away from T7/T8/TP9/TP10

# Where each rhythm / artifact is strongest (electrode names, positions from MONTAGE_NAME).
ALPHA_CENTRES = ("Pz", "POz", "O1", "Oz", "O2", "P3", "P4")
THETA_CENTRES = ("Fz", "FCz", "Cz")
BLINK_CENTRES = ("Fp1", "Fp2")
EMG_CENTRES = ("T7", "T8", "TP9", "TP10")

PRESETS: dict[str, dict] = {
    # baseline_s 65: warm-up 2 + artifact learning 10 + settle 2.25 + calibration 45 s, with
    # room for blinks, before the first `meditation` block (the baseline never sees the target;
    # before, the 32-channel file's first block at 26-51 s sat inside a 60 s baseline)
    "sim_32ch_500hz": {
        "duration_s": 150.0,
        "sfreq": 500.0,
        "montage": "standard_32",
        "seed": 32,
        "baseline_s": 65.0,
    },
    "sim_4ch_256hz": {
        "duration_s": 180.0,
        "sfreq": 256.0,
        "montage": "consumer_4",
        "seed": 4,
        "baseline_s": 65.0,
    },
    # Not bundled (7.7 MB): an eyes-open / eyes-closed session on a 64-channel cap with what
    # goes wrong on one: eyes open 0-60 s, closed 60-120 s (the `meditation` block: alpha
    # x2.75), a flat O2, a noisy T8, an ECG channel, 12 blinks a minute, an EMG burst and a
    # railing episode. `closedloop simulate eoec.fif --preset eoec_64ch_250hz --seed 12`;
    # tests/test_estimator_real.py runs configs/eyes_closed_alpha.yaml on it.
    "eoec_64ch_250hz": {
        "duration_s": 120.0,
        "sfreq": 250.0,
        "montage": "physionet_64",
        "seed": 1,
        "block_s": (60.0, 60.0),
        "baseline_s": 60.0,
        "ecg": True,
        "dead_channels": ("O2",),
        "noisy_channels": ("T8",),
        "blinks_per_min": 12.0,
        "alpha_uv_rms": 8.0,
        "theta_uv_rms": 1.0,
    },
}
BUNDLED_PRESETS = ("sim_32ch_500hz", "sim_4ch_256hz")  # replay_data/<name>.fif

_POSITIONS: dict[str, np.ndarray] | None = None


def _positions() -> dict[str, np.ndarray]:
    """Electrode name -> xyz position in metres (cached)."""
    global _POSITIONS  # noqa: PLW0603 - a read-only cache of a 343-entry table
    if _POSITIONS is None:
        montage = mne.channels.make_standard_montage(MONTAGE_NAME)
        _POSITIONS = {k: np.asarray(v) for k, v in montage.get_positions()["ch_pos"].items()}
    return _POSITIONS


def montage_channels(montage: str | Sequence[str]) -> tuple[str, ...]:
    """Channel names of a named montage ('standard_32', 'consumer_4', 'physionet_64') or a list
    of names."""
    if isinstance(montage, str):
        if montage == "standard_32":
            return STANDARD_32
        if montage == "consumer_4":
            return CONSUMER_4
        if montage == "physionet_64":
            return PHYSIONET_64
        raise ValueError(
            f"unknown montage {montage!r}; use 'standard_32', 'consumer_4', 'physionet_64' or names"
        )
    names = tuple(montage)
    pos = _positions()
    lower = {k.lower(): k for k in pos}
    out = []
    for name in names:
        if name.lower() not in lower:
            raise ValueError(f"channel {name!r} is not a {MONTAGE_NAME} electrode name")
        out.append(lower[name.lower()])
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate channel names in {names}")
    return tuple(out)


def _topography(ch_pos: np.ndarray, centres: Sequence[str], falloff_m: float | None) -> np.ndarray:
    """Weights (n_channels,) from the distance to the nearest centre electrode.

    falloff_m=None: Gaussian with 5 cm width, normalised so the best channel has weight 1 (so a
    montage without the centre electrodes still has its best-placed channel at full amplitude).
    falloff_m given: exp(-d / falloff_m), not normalised (artifacts have physical sources).
    """
    pos = _positions()
    c = np.stack([pos[n] for n in centres])  # (n_centres, 3)
    d = np.linalg.norm(ch_pos[:, None, :] - c[None, :, :], axis=-1).min(axis=1)
    if falloff_m is None:
        w = np.exp(-0.5 * (d / 0.05) ** 2)
        return w / w.max()
    return np.exp(-d / falloff_m)


def _spectral_noise(rng: np.random.Generator, n: int, n_ch: int, gain: np.ndarray) -> np.ndarray:
    """Gaussian noise (n, n_ch), amplitude spectrum `gain` (n // 2 + 1,), unit RMS per column."""
    spec = rng.standard_normal((n // 2 + 1, n_ch)) + 1j * rng.standard_normal((n // 2 + 1, n_ch))
    spec *= gain[:, None]
    x = np.fft.irfft(spec, n=n, axis=0)
    std = x.std(axis=0, keepdims=True)
    x /= np.where(std > 0, std, 1.0)  # an empty band (e.g. EMG at a low rate) stays zero
    return x


def _state_schedule(
    rng: np.random.Generator,
    duration_s: float,
    block_s: tuple[float, float],
    first: str,
    baseline_s: float = 0.0,
) -> list[tuple[float, float, str]]:
    """Alternating (onset_s, duration_s, label) blocks covering [0, duration_s); the first block
    lasts at least baseline_s."""
    blocks = []
    t = 0.0
    label = first
    while t < duration_s - 1e-9:
        d = float(rng.uniform(*block_s))
        if not blocks:
            d = max(d, baseline_s)
        d = min(d, duration_s - t)
        blocks.append((t, d, label))
        t += d
        label = STATE_MEDITATION if label == STATE_MIND_WANDERING else STATE_MIND_WANDERING
    return blocks


def _event_times(
    rng: np.random.Generator, duration_s: float, per_min: float, min_gap_s: float, dur_s: float
) -> np.ndarray:
    """Onsets (s) of a Poisson-like process with a minimum gap, each event fitting in the file."""
    if per_min <= 0:
        return np.zeros(0)
    mean_gap = 60.0 / per_min
    gaps = min_gap_s + rng.exponential(max(mean_gap - min_gap_s, 1e-3), size=int(duration_s) + 2)
    onsets = np.cumsum(gaps)
    return onsets[onsets + dur_s < duration_s]


def simulate(
    duration_s: float = 180.0,
    sfreq: float = 500.0,
    montage: str | Sequence[str] = "standard_32",
    seed: int = 0,
    *,
    background_uv_rms: float = 12.0,
    alpha_uv_rms: float = 5.0,
    alpha_hz: float | None = None,
    theta_uv_rms: float = 4.0,
    theta_hz: float = 6.0,
    state_gain: float = 2.75,
    block_s: tuple[float, float] = (20.0, 40.0),
    first_state: str = STATE_MIND_WANDERING,
    ramp_s: float = 1.5,
    blinks_per_min: float = 5.0,
    blink_uv: tuple[float, float] = (100.0, 200.0),
    emg_per_min: float = 1.5,
    emg_uv_rms: tuple[float, float] = (15.0, 40.0),
    line_hz: float | None = 50.0,
    line_uv: tuple[float, float] = (1.0, 4.0),
    bad_channel: bool = True,
    counter: bool = True,
    baseline_s: float = 0.0,
    ecg: bool = False,
    dead_channels: Sequence[str] = (),
    noisy_channels: Sequence[str] = (),
) -> mne.io.RawArray:
    """Simulate EEG with labelled states and artifacts; see the module docstring.

    Returns a RawArray (n_channels [+ counter], n_samples = round(duration_s * sfreq)) in volts,
    with a colin27_1005 (standard 10-05) montage, meas_date fixed to MEAS_DATE and annotations
    ``meditation``, ``mind_wandering``, ``blink``, ``emg``, ``bad_channel``.
    alpha_hz=None draws an individual alpha frequency in 9.5-10.5 Hz from the seed.
    baseline_s: the first (mind-wandering) block lasts at least this long, so a baseline taken
    at the start never contains the target state. ecg: add an 'ECG' channel (type ecg, ~1 mV
    QRS at 60-75 bpm) and its ~5-10 µV far field on the EEG. dead_channels: EEG channels that
    hold a constant for the whole recording (a disconnected electrode); noisy_channels: ones
    carrying 80 µV RMS of uncorrelated broadband noise all along (a bad contact).
    """
    names = montage_channels(montage)
    if duration_s < 1.0 or sfreq < 20.0:
        raise ValueError(f"need duration_s >= 1 and sfreq >= 20 Hz, got {duration_s}, {sfreq}")
    if first_state not in (STATE_MEDITATION, STATE_MIND_WANDERING):
        raise ValueError(f"first_state must be {STATE_MEDITATION!r} or {STATE_MIND_WANDERING!r}")
    rng = np.random.default_rng(seed)
    n = round(duration_s * sfreq)
    n_ch = len(names)
    pos_table = _positions()
    ch_pos = np.stack([pos_table[c] for c in names])
    freqs = np.fft.rfftfreq(n, 1.0 / sfreq)
    t = np.arange(n) / sfreq
    uv = 1e-6

    # Background: pink noise mixed through a smooth spatial covariance (unit diagonal, so each
    # channel keeps unit variance before scaling).
    pink = np.zeros_like(freqs)
    nz = freqs > 0
    pink[nz] = 1.0 / np.sqrt(freqs[nz])
    pink[freqs < HIGHPASS_HZ] = 0.0
    dist = np.linalg.norm(ch_pos[:, None, :] - ch_pos[None, :, :], axis=-1)
    cov = np.exp(-0.5 * (dist / SPATIAL_LENGTH_M) ** 2) + 1e-6 * np.eye(n_ch)
    mix = cholesky(cov, lower=True)
    mix /= np.linalg.norm(mix, axis=1, keepdims=True)
    data = _spectral_noise(rng, n, n_ch, pink) @ mix.T
    data *= background_uv_rms * uv

    # State schedule and the smooth gain it implies for theta and alpha (causal linear ramp).
    # Block edges on the sample grid so annotation onsets are exact sample times.
    blocks = [
        (round(o * sfreq) / sfreq, round((o + d) * sfreq) / sfreq - round(o * sfreq) / sfreq, lab)
        for o, d, lab in _state_schedule(rng, duration_s, block_s, first_state, baseline_s)
    ]
    target = np.ones(n)
    for onset, dur, label in blocks:
        if label == STATE_MEDITATION:
            target[round(onset * sfreq) : round((onset + dur) * sfreq)] = state_gain
    ramp_n = max(round(ramp_s * sfreq), 1)
    padded = np.concatenate([np.full(ramp_n, target[0]), target])
    csum = np.cumsum(padded)
    state_env = (csum[ramp_n:] - csum[:-ramp_n]) / ramp_n  # mean of the last ramp_n targets

    # Rhythms: one narrowband source each (Gaussian spectral peak of 1 Hz SD -> envelope that
    # waxes and wanes over ~0.5-1 s), projected with a smooth topography.
    if alpha_hz is None:
        alpha_hz = float(rng.uniform(9.5, 10.5))
    for f0, amp, centres in (
        (alpha_hz, alpha_uv_rms, ALPHA_CENTRES),
        (theta_hz, theta_uv_rms, THETA_CENTRES),
    ):
        peak = np.exp(-0.5 * ((freqs - f0) / 1.0) ** 2)
        src = _spectral_noise(rng, n, 1, peak)[:, 0] * state_env * (amp * uv)
        data += src[:, None] * _topography(ch_pos, centres, None)[None, :]

    annotations: list[tuple[float, float, str, tuple[str, ...]]] = [
        (o, d, label, ()) for o, d, label in blocks
    ]

    # Blinks: positive ~400 ms bump (gamma shape, peak at 100 ms), frontal.
    blink_dur_s = 0.4
    blink_w = _topography(ch_pos, BLINK_CENTRES, BLINK_FALLOFF_M)
    tb = np.arange(round(blink_dur_s * sfreq)) / sfreq
    shape = (tb / 0.05) ** 2 * np.exp(-tb / 0.05)
    shape /= shape.max()
    for onset in _event_times(rng, duration_s, blinks_per_min, 1.5, blink_dur_s):
        i0 = round(onset * sfreq)
        amp = rng.uniform(*blink_uv) * uv
        data[i0 : i0 + shape.size] += (amp * shape)[:, None] * blink_w[None, :]
        annotations.append((i0 / sfreq, blink_dur_s, BLINK, ()))

    # EMG: independent broadband noise per channel, 20 Hz .. 0.45 fs, Tukey-tapered bursts.
    emg_band = ((freqs >= 20.0) & (freqs <= 0.45 * sfreq)).astype(float)
    emg_w = _topography(ch_pos, EMG_CENTRES, EMG_FALLOFF_M)
    emg_onsets = _event_times(rng, duration_s, emg_per_min, 4.0, 2.0)
    if emg_onsets.size:
        emg = _spectral_noise(rng, n, n_ch, emg_band)
        for onset in emg_onsets:
            dur = float(rng.uniform(0.5, 2.0))
            i0, i1 = round(onset * sfreq), round((onset + dur) * sfreq)
            taper = np.ones(i1 - i0)
            edge = min(round(0.05 * sfreq), taper.size // 2)
            if edge > 0:
                ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(edge) / edge)
                taper[:edge] = ramp
                taper[-edge:] = ramp[::-1]
            amp = rng.uniform(*emg_uv_rms) * uv
            data[i0:i1] += emg[i0:i1] * (amp * taper)[:, None] * emg_w[None, :]
            annotations.append((i0 / sfreq, (i1 - i0) / sfreq, EMG, ()))

    if line_hz is not None and line_hz < sfreq / 2:
        amp = rng.uniform(*line_uv, size=n_ch) * uv
        phase = rng.uniform(0, 2 * np.pi, size=n_ch)
        data += amp[None, :] * np.sin(2 * np.pi * line_hz * t[:, None] + phase[None, :])

    if bad_channel and duration_s > 40.0:
        # Not in the first 30 s, which consumers may use as a baseline.
        dur = float(rng.uniform(3.0, 6.0))
        onset = float(rng.uniform(30.0, duration_s - dur - 1.0))
        ch = int(rng.integers(n_ch))
        i0, i1 = round(onset * sfreq), round((onset + dur) * sfreq)
        if rng.random() < 0.5:
            data[i0:i1, ch] = data[i0, ch]  # flat: amplifier holds the last value
        else:
            data[i0:i1, ch] = RAIL_V * (1 if rng.random() < 0.5 else -1)
        annotations.append((i0 / sfreq, (i1 - i0) / sfreq, BAD_CHANNEL, (names[ch],)))

    ch_names = list(names)
    ch_types = ["eeg"] * n_ch
    extra_rng = np.random.default_rng([seed, 20])  # own stream: the defaults stay unchanged
    for name in noisy_channels:
        j = ch_names.index(montage_channels([name])[0])
        data[:, j] += extra_rng.standard_normal(n) * 80.0 * uv
    for name in dead_channels:
        data[:, ch_names.index(montage_channels([name])[0])] = 1e-3  # a DC offset, no signal
    if ecg:
        bpm = float(extra_rng.uniform(60.0, 75.0))
        beats = np.arange(0.3, duration_s, 60.0 / bpm)
        beats = beats + extra_rng.normal(0, 0.02, beats.size)
        qrs = np.zeros(n)
        tq = np.arange(round(0.12 * sfreq)) / sfreq - 0.06
        wave = np.exp(-0.5 * (tq / 0.012) ** 2) - 0.25 * np.exp(-0.5 * ((tq - 0.03) / 0.015) ** 2)
        for b in beats:
            i0 = round(b * sfreq)
            seg = wave[: max(0, min(wave.size, n - i0))]
            qrs[i0 : i0 + seg.size] += seg
        far = extra_rng.uniform(5.0, 10.0, size=n_ch) * uv * extra_rng.choice([-1, 1], n_ch)
        data += qrs[:, None] * far[None, :]
        data = np.concatenate([data, (1e-3 * qrs)[:, None]], axis=1)
        ch_names.append("ECG")
        ch_types.append("ecg")
    if counter:
        data = np.concatenate([data, np.arange(n, dtype=np.float64)[:, None]], axis=1)
        ch_names.append(COUNTER_CHANNEL)
        ch_types.append("misc")
    info = mne.create_info(ch_names, sfreq, ch_types)
    raw = mne.io.RawArray(data.T, info, verbose="error")
    raw.set_montage(mne.channels.make_standard_montage(MONTAGE_NAME), verbose="error")
    raw.set_meas_date(MEAS_DATE)
    annotations.sort(key=lambda a: (a[0], a[2]))
    raw.set_annotations(
        mne.Annotations(
            onset=[a[0] for a in annotations],
            duration=[a[1] for a in annotations],
            description=[a[2] for a in annotations],
            ch_names=[a[3] for a in annotations],
            orig_time=MEAS_DATE,
        )
    )
    return raw


def save_fif_reproducible(raw: mne.io.BaseRaw, path: str | Path) -> Path:
    """Save `raw` as float32 FIF whose bytes depend only on the data, not machine or time.

    mne writes a FIFF_FILE_ID tag at the start of the file holding the machine id (from the MAC
    address); we zero that id after writing. meas_date must be fixed by the caller (simulate does).
    """
    path = Path(path)
    if path.suffix != ".fif":
        raise ValueError(f"{path}: reproducible saving needs a plain .fif name (no .gz)")
    raw.save(path, fmt="single", overwrite=True, verbose="error")
    with path.open("r+b") as fid:
        head = np.frombuffer(fid.read(36), dtype=">i4")
        # tag: kind=100 (FIFF_FILE_ID), type=31 (ID struct), size=20, next, then
        # version, machid[0], machid[1], secs, usecs.
        if head[0] != 100 or head[2] != 20:
            raise RuntimeError(f"{path}: unexpected FIF header {head[:3]}")
        fid.seek(20)
        fid.write(np.zeros(2, dtype=">i4").tobytes())
    return path


def write_simulated(
    path: str | Path, preset_name: str, seed: int | None = None, **overrides
) -> Path:
    """Simulate preset `preset_name` (see PRESETS) and write it to `path`.

    seed: None uses the preset's seed. overrides: any `simulate` keyword (duration_s, sfreq,
    montage, alpha_uv_rms, ...), applied on top of the preset.
    A plain ``.fif`` is written as reproducible float32 FIF (`save_fif_reproducible`: same
    arguments, same bytes); other names (.fif.gz, .edf, .bdf) go through
    `acquisition.readers.save_recording` and are not guaranteed byte-stable.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    params = dict(PRESETS[preset_name])
    if seed is not None:
        params["seed"] = seed
    params.update(overrides)
    raw = simulate(**params)
    path = Path(path)
    if path.name.lower().endswith(".fif") and not path.name.lower().endswith(".fif.gz"):
        return save_fif_reproducible(raw, path)
    from acquisition.readers import save_recording

    return save_recording(raw, path)


def replay_data_dir() -> Path:
    """The project's replay_data/ folder."""
    return Path(__file__).resolve().parents[1] / "replay_data"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m acquisition.simulator --regenerate`` rewrites replay_data/*.fif."""
    parser = argparse.ArgumentParser(prog="python -m acquisition.simulator", description=__doc__)
    parser.add_argument("--regenerate", action="store_true", help="rewrite replay_data/*.fif")
    parser.add_argument("--out", type=Path, default=None, help="folder (default replay_data/)")
    parser.add_argument(
        "--preset", choices=sorted(BUNDLED_PRESETS), action="append", help="only these"
    )
    args = parser.parse_args(argv)
    if not args.regenerate:
        parser.print_help()
        return 2
    out = args.out or replay_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in args.preset or sorted(BUNDLED_PRESETS):
        path = write_simulated(out / f"{name}.fif", name)
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB  sha256 {_sha256(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

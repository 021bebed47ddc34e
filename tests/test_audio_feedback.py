"""Audio feedback rendered to WAV (the headless / CI path): envelope, pitch, chime, formats."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest

from closedloop.participant.audio import (
    AudioError,
    WavFeedbackAudio,
    audio_outputs,
    chime_waveform,
    open_feedback_audio,
    read_wav,
    write_wav,
)
from closedloop.participant.feedback import SUMMARY_NAME, Feedback
from closedloop.participant.settings import AudioSettings, ChimeSettings, FeedbackSettings
from features.types import Label, State

CHUNK_S = 0.01
SR = 22050


def audio_settings(**kw) -> dict:
    kw.setdefault("output", "wav")
    kw.setdefault("sample_rate_hz", SR)
    return kw


def render(
    tmp_path, score, target, t0=300.0, smoothing_s=0.0, **audio
) -> tuple[np.ndarray, Feedback]:
    """Run scores through Feedback with WAV audio; return (wav samples float, feedback)."""
    settings = FeedbackSettings(
        enabled=True, publish_lsl=False, smoothing_s=smoothing_s, audio=audio_settings(**audio)
    )
    fb = Feedback.from_settings(settings, tmp_path).start()
    for k, (s, tg) in enumerate(zip(score, target, strict=True)):
        fb.tap(
            None, State(t0 + k * CHUNK_S, Label.TARGET if tg else Label.NON_TARGET, float(s), 0.0)
        )
    fb.close()
    data, sr = read_wav(tmp_path / settings.audio.wav_name)
    assert sr == SR
    return data[:, 0].astype(float), fb


def window_stats(x: np.ndarray, win_s: float, n_windows: int, fn) -> np.ndarray:
    w = round(win_s * SR)
    return np.array([fn(x[i * w : (i + 1) * w]) for i in range(n_windows)])


def slow_score(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) * CHUNK_S
    return 1.6 * np.sin(2 * np.pi * 0.3 * t) + 0.3 * np.sin(2 * np.pi * 1.1 * t + rng.uniform(0, 6))


def test_auto_output_renders_wav_without_a_device(tmp_path):
    if audio_outputs():
        pytest.skip("an audio device exists here: 'auto' would play, not render")
    sink = open_feedback_audio(AudioSettings(), tmp_path)
    assert isinstance(sink, WavFeedbackAudio)
    sink.close()
    with pytest.raises(AudioError, match="no audio output"):
        open_feedback_audio(AudioSettings(output="device"), tmp_path)


def test_offline_feedback_renders_wav_even_when_device_is_asked(tmp_path):
    settings = FeedbackSettings(enabled=True, publish_lsl=False, audio={"output": "device"})
    fb = Feedback.from_settings(settings, tmp_path, live=False)
    assert isinstance(fb.audio, WavFeedbackAudio)
    fb.close()


def test_wav_envelope_follows_score_volume(tmp_path):
    n = 800  # 8 s
    score = slow_score(n, seed=0)
    x, _ = render(tmp_path, score, np.zeros(n, bool), chime={"enabled": False})
    # sample-aligned to stream time: 8 s of updates (last at 7.99 s) + the 0.5 s tail
    assert len(x) == round(7.99 * SR) + round(0.5 * SR)
    win = 0.1
    k = round((n - 1) * CHUNK_S / win)
    rms_amp = window_stats(x, win, k, lambda s: np.sqrt(2 * np.mean(s**2)))
    per_win = round(win / CHUNK_S)
    score_win = np.array([score[i * per_win : (i + 1) * per_win].mean() for i in range(k)])
    r = np.corrcoef(rms_amp, score_win)[0, 1]
    print(f"envelope-score correlation {r:.4f}")
    assert r > 0.9, f"envelope-score correlation {r:.3f}"
    # and the level is the configured mapping: 0.3 * clip((score + 2) / 4)
    expected = 0.3 * np.clip((score_win + 2) / 4, 0, 1)
    np.testing.assert_allclose(rms_amp, expected, atol=0.02)
    record = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert record["audio"] == "wav"
    assert record["audio_file"].endswith("feedback_audio.wav")


def test_wav_pitch_follows_score(tmp_path):
    n = 600
    score = slow_score(n, seed=1)
    x, _ = render(
        tmp_path,
        score,
        np.zeros(n, bool),
        chime={"enabled": False},
        tone={"follows": "pitch", "pitch_range_hz": (200.0, 400.0)},
    )
    win = 0.1
    k = round((n - 1) * CHUNK_S / win)

    def zc_freq(s):
        return np.count_nonzero(np.diff(np.signbit(s))) / 2 / win

    freq = window_stats(x, win, k, zc_freq)
    per_win = round(win / CHUNK_S)
    score_win = np.array([score[i * per_win : (i + 1) * per_win].mean() for i in range(k)])
    r = np.corrcoef(freq, score_win)[0, 1]
    print(f"pitch-score correlation {r:.4f}")
    assert r > 0.9, f"pitch-score correlation {r:.3f}"
    assert freq.min() > 190
    assert freq.max() < 410


def test_wav_soft_noise_level_follows_score(tmp_path):
    n = 600
    score = slow_score(n, seed=2)
    x, _ = render(
        tmp_path, score, np.zeros(n, bool), chime={"enabled": False}, tone={"kind": "noise"}
    )
    win = 0.1
    k = round((n - 1) * CHUNK_S / win)
    rms = window_stats(x, win, k, lambda s: np.sqrt(np.mean(s**2)))
    per_win = round(win / CHUNK_S)
    score_win = np.array([score[i * per_win : (i + 1) * per_win].mean() for i in range(k)])
    r = np.corrcoef(rms, score_win)[0, 1]
    print(f"noise level-score correlation {r:.4f}")
    assert r > 0.9, f"noise level-score correlation {r:.3f}"


def test_chime_at_each_target_entry_and_nowhere_else(tmp_path):
    n = 700
    target = np.zeros(n, bool)
    for start, length in ((50, 30), (190, 100), (400, 5), (520, 150)):
        target[start : start + length] = True
    entries = np.array([50, 190, 400, 520])
    t0 = 77.0
    x, fb = render(tmp_path, np.zeros(n), target, t0=t0, tone={"enabled": False})
    np.testing.assert_allclose(fb.audio.chimes_at, t0 + entries * CHUNK_S)
    # onsets from the signal itself: a 2 ms envelope above 10% of the chime's peak with none in
    # the 200 ms before (the chime stays above 10% for 0.23 s; entries are >= 1.2 s apart)
    w = round(0.002 * SR)
    env = np.abs(x[: len(x) // w * w]).reshape(-1, w).max(axis=1)
    loud = env > 0.1 * ChimeSettings().volume
    loud_before = np.convolve(loud, np.ones(100), "full")[: len(loud)]
    onsets = np.flatnonzero(loud & (np.r_[0, loud_before[:-1]] == 0)) * w / SR
    np.testing.assert_allclose(onsets, entries * CHUNK_S, atol=0.006)
    # silence between chimes (tone disabled)
    quiet = x[round((entries[0] * CHUNK_S + 1.0) * SR) : round((entries[1] * CHUNK_S - 0.01) * SR)]
    assert np.abs(quiet).max() < 0.01


def test_chime_waveform_shape():
    c = chime_waveform(ChimeSettings(freq_hz=660.0, duration_s=0.5, volume=0.4), SR)
    assert len(c) == round(0.5 * SR)
    assert 0.3 < np.abs(c).max() <= 0.4
    assert np.abs(c[-100:]).max() < 0.01  # decays: no click at the cut


def test_stream_gap_renders_silence_not_a_ramp(tmp_path):
    settings = AudioSettings(output="wav", sample_rate_hz=SR, chime=ChimeSettings(enabled=False))
    sink = WavFeedbackAudio(settings, tmp_path / "a.wav")
    t = np.r_[np.arange(0, 1, CHUNK_S), 3.0 + np.arange(0, 1, CHUNK_S)]
    sink.feed(t, np.ones_like(t), np.zeros_like(t, bool))
    sink.close()
    x, _ = read_wav(tmp_path / "a.wav")
    gap = x[round(1.2 * SR) : round(2.9 * SR), 0]
    assert np.abs(gap).max() < 1e-3
    assert np.abs(x[round(0.5 * SR) : round(0.9 * SR), 0]).max() > 0.25


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_pcm_widths(tmp_path, width):
    sig = 0.5 * np.sin(2 * np.pi * 5 * np.arange(200) / 200)
    path = tmp_path / f"w{width}.wav"
    if width == 2:
        write_wav(path, np.c_[sig, -sig], 8000)
        expected = np.c_[sig, -sig]
    else:
        full = 2 ** (8 * width - 1)
        ints = np.round(sig * (full - 1)).astype(np.int64)
        if width == 1:
            raw = (ints + 128).astype(np.uint8).tobytes()
        elif width == 3:
            u = ints & 0xFFFFFF
            raw = (
                np.stack([u & 0xFF, (u >> 8) & 0xFF, (u >> 16) & 0xFF], 1)
                .astype(np.uint8)
                .tobytes()
            )
        else:
            raw = ints.astype("<i4").tobytes()
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(width)
            w.setframerate(8000)
            w.writeframes(raw)
        expected = sig[:, None]
    data, sr = read_wav(path)
    assert sr == 8000
    np.testing.assert_allclose(data, expected, atol=2.0 / 2 ** (8 * width - 1))


def test_read_wav_rejects_non_wav(tmp_path):
    bad = tmp_path / "x.wav"
    bad.write_bytes(b"OggS not a wav")
    with pytest.raises(AudioError, match="not a PCM WAV"):
        read_wav(bad)

"""Audio for the participant: a feedback tone / soft noise, a chime on target entry, guided audio.

Everything the feedback plays is generated here with numpy (no sound files). Where an audio
output exists (PulseAudio or PipeWire's PulseAudio server; ALSA where a sound card is present),
`open_feedback_audio` streams it in real time through miniaudio (pyminiaudio: the C library is in
the wheel and loads the system's libpulse / libasound at run time); otherwise (CI, headless) it
renders the same synthesis to a WAV file with the stdlib `wave` module, driven by stream time,
so the file is a faithful record of what the participant would have heard.

Guided audio (a recording played through the session: WAV, OGG Vorbis, MP3 or FLAC, decoded by
miniaudio; WAV by `wave`) writes its start, pauses, resumes and end as LSL markers (a separate
irregular-rate string stream) and as 'guided_audio' bus events; it plays on the output where one
exists and is timed and marked, silently, where none does.

`python -m closedloop.participant.audio` lists the outputs found (names to put in `audio.device`).
"""

from __future__ import annotations

import json
import math
import threading
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pylsl
from scipy.signal import lfilter

from closedloop.participant.settings import (
    GUIDED_FORMATS,
    UNSUPPORTED_FORMAT_MESSAGE,
    AudioSettings,
    ChimeSettings,
    GuidedAudioSettings,
)

WAV_SAMPLE_WIDTH = 2  # bytes: 16-bit PCM output
INT16_FULL_SCALE = 32767.0
NOISE_SMOOTH_HZ = 800.0  # one-pole low-pass corner of the "soft noise" (white noise is harsh)
CHIME_HARMONIC = 2.76  # partial ratio of a small bell (free-free bar mode 2 / mode 1)
MAX_SEGMENT_S = 1.0  # a gap in the feedback trace longer than this renders as silence
GAP_FADE_S = 0.02  # fade-out at the start of such a gap (no click)
GUIDED_PERIOD_MS = 40  # a recording needs no low latency: larger periods, fewer wake-ups
# A device whose callbacks stop for this long is lost (its sink removed, its server gone). Not
# shorter: an otherwise idle PulseAudio null sink renders in ~2 s blocks, and a new stream's
# second callback came 0.5-1.5 s after its first (tests/test_audio_device.py, keep_busy); a
# sound card calls back every period_ms (10-40 ms).
DEVICE_LOST_AFTER_S = 3.0
# While lost, look for the output again this often (one probe: ~5-25 ms on the feedback
# writer thread, never on the acquisition thread); the device reopens on the first success.
DEVICE_REOPEN_EVERY_S = 1.0
LATENCY_RING = 4096  # update -> rendered latencies kept for percentiles


class AudioError(RuntimeError):
    """Audio could not be set up as configured (a clear one-line reason)."""


# ---- devices ---------------------------------------------------------------------------------
def _miniaudio():
    """The miniaudio module (imported on first use: config loading must not pay ~0.2 s)."""
    import miniaudio

    return miniaudio


def _backends() -> list:
    """miniaudio backends to try, in order. PulseAudio first (PipeWire serves it too); ALSA only
    where a sound card exists (without /dev/snd, libasound prints 'Cannot get card index'
    noise on stderr and finds nothing). JACK and miniaudio's silent 'null' backend: never."""
    ma = _miniaudio()
    backends = [ma.Backend.PULSEAUDIO]
    if Path("/dev/snd").is_dir():
        backends.append(ma.Backend.ALSA)
    return [b for b in backends if ma.is_backend_enabled(b)]


def _find_output(name: str = "") -> tuple[object, dict] | None:
    """(backend, device info) of the output to use: the system default ('' -> the first working
    backend's default, info {}) or the first whose name contains `name` (case-insensitive);
    None without any. Probing never starts a sound server: miniaudio's context leaves
    PulseAudio's autospawn off (pulse.tryAutoSpawn defaults to false)."""
    ma = _miniaudio()
    for backend in _backends():
        try:
            outputs = ma.Devices([backend]).get_playbacks()
        except ma.MiniaudioError:
            continue  # no server / no card on this backend
        if not name:
            if outputs:
                return backend, {}
            continue
        for info in outputs:
            if name.lower() in info["name"].lower():
                return backend, info
    return None


def audio_outputs() -> list[str]:
    """Names of the audio outputs of the first backend that has any ([] without a device)."""
    ma = _miniaudio()
    for backend in _backends():
        try:
            outputs = ma.Devices([backend]).get_playbacks()
        except ma.MiniaudioError:
            continue
        if outputs:
            return [f"{info['name']} ({ma.Backend(backend).name.lower()})" for info in outputs]
    return []


def _open_playback(name: str, channels: int, sample_rate_hz: int, period_ms: int, app_name: str):
    """A started-later miniaudio PlaybackDevice on the chosen output, 16-bit PCM."""
    ma = _miniaudio()
    found = _find_output(name)
    if found is None:
        raise AudioError(
            f"no audio output {name!r}" if name else "no audio output device (PulseAudio/ALSA)"
        )
    backend, info = found
    try:
        return ma.PlaybackDevice(
            output_format=ma.SampleFormat.SIGNED16,
            nchannels=channels,
            sample_rate=sample_rate_hz,
            buffersize_msec=period_ms,
            device_id=info.get("id"),
            backends=[backend],
            app_name=app_name,
        )
    except ma.MiniaudioError as exc:
        raise AudioError(f"could not open audio output: {exc}") from exc


def _start(device, generator) -> None:
    """Start a miniaudio device; on failure close it and raise AudioError."""
    ma = _miniaudio()
    try:
        device.start(generator)
    except ma.MiniaudioError as exc:
        device.close()
        raise AudioError(f"could not start audio output: {exc}") from exc


# ---- synthesis -------------------------------------------------------------------------------
def chime_waveform(settings: ChimeSettings, sample_rate_hz: int) -> np.ndarray:
    """A bell-like chime: two decaying partials, 5 ms attack. Returns (n,) float64 in -1..1."""
    n = max(1, round(settings.duration_s * sample_rate_hz))
    t = np.arange(n) / sample_rate_hz
    decay = np.exp(-t * (6.0 / settings.duration_s))  # -52 dB by the end: no click on cut
    attack = np.minimum(1.0, t / 0.005)
    f = settings.freq_hz
    partial2 = (
        0.3 * np.sin(2 * np.pi * f * CHIME_HARMONIC * t)
        if f * CHIME_HARMONIC < sample_rate_hz / 2
        else 0
    )
    wave_ = (np.sin(2 * np.pi * f * t) + partial2) / 1.3
    return settings.volume * attack * decay * wave_


class Synth:
    """Stateful tone / noise synthesiser: continuous phase, amplitude ramped between updates.

    `render(n, value_end)` returns n samples (float64, -1..1) whose amplitude (or pitch) moves
    linearly from the previous feedback value to `value_end` (nan = silence), so successive calls
    join without clicks. Chimes queued with `chime()` are mixed in from the next sample.
    """

    def __init__(self, audio: AudioSettings, seed: int = 0) -> None:
        self.tone = audio.tone
        self.sr = audio.sample_rate_hz
        self._chime = chime_waveform(audio.chime, self.sr) if audio.chime.enabled else None
        self._chimes: list[int] = []  # read positions of chimes still sounding
        self._phase = 0.0
        self._amp = 0.0
        self._freq = self.tone.freq_hz
        self._rng = np.random.default_rng(seed)
        self._noise_zi = np.zeros(1)
        self._noise_a = math.exp(-2 * math.pi * NOISE_SMOOTH_HZ / self.sr)

    def _targets(self, value: float) -> tuple[float, float]:
        tone = self.tone
        if not tone.enabled or not math.isfinite(value):
            return 0.0, self._freq
        v0, v1 = tone.volume_range
        if tone.follows == "volume":
            return v0 + (v1 - v0) * value, tone.freq_hz
        f0, f1 = tone.pitch_range_hz
        return v1, f0 + (f1 - f0) * value

    def chime(self) -> None:
        if self._chime is not None:
            self._chimes.append(0)

    def render(self, n: int, value_end: float, ramp_n: int | None = None) -> np.ndarray:
        """n samples moving to `value_end` over the first `ramp_n` samples (default: all n)."""
        out = np.zeros(n)
        if n == 0:
            return out
        amp_end, freq_end = self._targets(value_end)
        ramp = np.minimum(np.arange(1, n + 1) / (ramp_n or n), 1.0)
        amp = self._amp + (amp_end - self._amp) * ramp
        if self.tone.kind == "sine":
            freq = self._freq + (freq_end - self._freq) * ramp
            phase = self._phase + 2 * np.pi * np.cumsum(freq) / self.sr
            out += amp * np.sin(phase)
            self._phase = float(phase[-1] % (2 * np.pi))
        else:
            white = self._rng.standard_normal(n)
            # one-pole low-pass y[k] = a y[k-1] + (1-a) x[k], gain-corrected to unit RMS
            a = self._noise_a
            y, self._noise_zi = lfilter([1 - a], [1, -a], white, zi=self._noise_zi)
            out += amp * y * math.sqrt((1 + a) / (1 - a))
        self._amp, self._freq = amp_end, freq_end
        if self._chimes and self._chime is not None:
            still = []
            for pos in self._chimes:
                seg = self._chime[pos : pos + n]
                out[: len(seg)] += seg
                if pos + n < len(self._chime):
                    still.append(pos + n)
            self._chimes = still
        return out


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * INT16_FULL_SCALE), -INT16_FULL_SCALE, INT16_FULL_SCALE).astype(
        "<i2"
    )


# ---- feedback audio sinks --------------------------------------------------------------------
class WavFeedbackAudio:
    """Renders the feedback sound to a mono 16-bit WAV, sample-aligned to stream time.

    Sample k of the file is stream time `t0 + k / sample_rate`, t0 the first fed update, so the
    file lines up with the EEG and the feedback trace whatever the replay speed. `feed` is called
    by the feedback writer thread (never the acquisition thread).
    """

    kind = "wav"
    device_state = "wav"  # what the console shows for the participant audio

    def __init__(self, audio: AudioSettings, path: Path) -> None:
        self.path = Path(path)
        self.synth = Synth(audio)
        self.sr = audio.sample_rate_hz
        self._wav = wave.open(str(self.path), "wb")  # noqa: SIM115 - closed in close()
        self._wav.setnchannels(1)
        self._wav.setsampwidth(WAV_SAMPLE_WIDTH)
        self._wav.setframerate(self.sr)
        self.t0: float | None = None
        self.n_written = 0
        self.chimes_at: list[float] = []  # stream times of the chimes rendered

    def feed(self, t: np.ndarray, value: np.ndarray, entry: np.ndarray) -> None:
        """Render up to each update: t (n,) stream s, value (n,) 0..1 or nan, entry (n,) bool."""
        if self._wav is None or len(t) == 0:
            return
        if self.t0 is None:
            self.t0 = float(t[0])
        parts = []
        for ti, vi, ei in zip(t.tolist(), value.tolist(), entry.tolist(), strict=True):
            target_k = round((ti - self.t0) * self.sr)
            n = target_k - self.n_written
            if n <= 0:
                if ei:
                    self.synth.chime()
                    self.chimes_at.append(ti)
                continue
            if n > MAX_SEGMENT_S * self.sr:  # a gap (stream loss): fade out, then silence
                parts.append(self.synth.render(n, math.nan, ramp_n=round(GAP_FADE_S * self.sr)))
            else:
                parts.append(self.synth.render(n, vi))
            self.n_written = target_k
            if ei:  # the chime starts at the entry's sample
                self.synth.chime()
                self.chimes_at.append(ti)
        if parts:
            self._wav.writeframes(to_int16(np.concatenate(parts)).tobytes())

    def close(self) -> None:
        if self._wav is not None:
            # let a chime still sounding finish
            self._wav.writeframes(
                to_int16(self.synth.render(round(0.5 * self.sr), math.nan)).tobytes()
            )
            self._wav.close()
            self._wav = None


class DeviceFeedbackAudio:
    """Streams the feedback sound to an audio output in real time (a miniaudio playback callback).

    The device's own thread asks for one period (`audio.period_ms`) of frames at a time and the
    generator renders them right then with the newest feedback value, read through `poll()`
    straight from the feedback ring (not via the writer's 50 ms drain), so the sound lags the
    score by the rendering wait plus the device buffer only. A rise in poll's entry count starts a
    chime. Rendering never raises into the audio thread: an error is kept in `error` and the
    output goes silent. `feed` (writer thread) records the chimes' stream times for the record.

    poll() -> (value 0..1 or nan, t_local of that update, update count, target entries so far);
    without one, the values given to `feed` are played (a standalone sink, one drain late).

    A lost output (callbacks stopped for DEVICE_LOST_AFTER_S: its sink removed, its server
    gone) is closed and looked for again every DEVICE_REOPEN_EVERY_S; when it is back the device
    is reopened on it. `check()` does this (the feedback writer thread calls it every 50 ms) and
    returns each change of `device_state` (open -> lost -> reopened -> lost ...); the session
    and its pulses never wait for it.
    """

    kind = "device"

    def __init__(
        self,
        audio: AudioSettings,
        poll: Callable[[], tuple[float, float, int, int]] | None = None,
        clock: Callable[[], float] = pylsl.local_clock,
    ) -> None:
        self.sr = audio.sample_rate_hz
        self.synth = Synth(audio)
        self.clock = clock
        self._fed: tuple[float, float, int, int] = (math.nan, math.nan, 0, 0)
        self.poll = poll if poll is not None else (lambda: self._fed)
        self.chimes_at: list[float] = []  # stream times of the entries (chimes) fed
        self.n_frames = 0  # frames rendered into the device
        self.n_callbacks = 0
        self.error: str | None = None
        self._lat_ms = np.full(LATENCY_RING, np.nan)
        self.n_latencies = 0
        self._settings = audio
        self._device = None
        self._open()
        self.backend: str = self._device.backend
        self.t_opened = clock()
        self.t_closed = math.nan
        self.device_state = "open"  # open, lost, reopened (closed after close())
        self.n_losses = 0
        self.n_reopens = 0
        self._callbacks_seen = 0
        self._t_progress = self.t_opened  # last time the callback count was seen to move
        self._next_try = math.nan

    def _open(self) -> None:
        """Open and start a playback device on the configured output (AudioError if none)."""
        a = self._settings
        device = _open_playback(a.device, 1, self.sr, a.period_ms, "closedloop feedback")
        gen = self._generate()
        next(gen)
        _start(device, gen)
        self._device = device

    def check(self) -> tuple[str, str] | None:
        """Notice a lost output, reopen it when it is back: (new state, detail) on a change.

        Writer thread only (as close()); never raises (a failed reopen is retried later).
        """
        now = self.clock()
        if self._device is not None:
            return self._watch(now)
        if self.device_state == "closed" or not now >= self._next_try:
            return None
        self._next_try = now + DEVICE_REOPEN_EVERY_S
        return self._reopen(now)

    def _watch(self, now: float) -> tuple[str, str] | None:
        n = self.n_callbacks
        if n != self._callbacks_seen:
            self._callbacks_seen, self._t_progress = n, now
            return None
        stalled_s = now - self._t_progress
        if stalled_s < DEVICE_LOST_AFTER_S:
            return None
        device, self._device = self._device, None
        try:
            device.close()
        except Exception as exc:  # a dead device may fail to close: it is gone either way
            self.error = self.error or f"closing the lost output: {exc}"
        self.device_state = "lost"
        self.n_losses += 1
        self._next_try = now + DEVICE_REOPEN_EVERY_S
        return "lost", f"no audio callback for {stalled_s:.1f} s"

    def _reopen(self, now: float) -> tuple[str, str] | None:
        try:
            self._open()
        except AudioError:
            return None  # not back yet
        except Exception as exc:  # unexpected: keep trying, say why once
            self.error = self.error or f"reopening the output: {type(exc).__name__}: {exc}"
            return None
        self.device_state = "reopened"
        self.n_reopens += 1
        self._callbacks_seen, self._t_progress = self.n_callbacks, now
        return "reopened", f"output back after loss {self.n_losses}"

    def _generate(self):
        """miniaudio callback generator: receives a frame count, yields that many int16 frames."""
        n = yield b""
        seen_updates, seen_entries = 0, -1
        while True:
            try:
                value, t_update, updates, entries = self.poll()
                if seen_entries < 0:
                    seen_entries = entries  # entries before the device started: no chime
                while seen_entries < entries:
                    self.synth.chime()
                    seen_entries += 1
                if updates != seen_updates:
                    seen_updates = updates
                    if math.isfinite(t_update):
                        k = self.n_latencies % LATENCY_RING
                        self._lat_ms[k] = (self.clock() - t_update) * 1e3
                        self.n_latencies += 1
                block = to_int16(self.synth.render(n, value)).tobytes()
                self.n_frames += n
                self.n_callbacks += 1
            except Exception as exc:  # never into the audio thread: it would stop for good
                if self.error is None:
                    self.error = f"audio callback: {type(exc).__name__}: {exc}"
                block = bytes(WAV_SAMPLE_WIDTH * n)
            n = yield block

    def feed(self, t: np.ndarray, value: np.ndarray, entry: np.ndarray) -> None:
        """Writer thread: note the entries' stream times (and play `value` if there is no poll)."""
        if len(t) == 0:
            return
        entries = t[entry].tolist()
        self.chimes_at.extend(entries)
        _, _, updates, n_entries = self._fed
        self._fed = (float(value[-1]), self.clock(), updates + len(t), n_entries + len(entries))

    def render_latency_ms(self) -> dict[str, float]:
        """Update (score computed) -> first rendered into the device: p50 / p99 / max, ms."""
        k = min(self.n_latencies, LATENCY_RING)
        if k == 0:
            return {"p50": math.nan, "p99": math.nan, "max": math.nan, "n": 0}
        lat = self._lat_ms[:k]
        p50, p99 = np.percentile(lat, [50, 99])
        return {
            "p50": float(p50),
            "p99": float(p99),
            "max": float(lat.max()),
            "n": self.n_latencies,
        }

    def health(self) -> dict[str, object]:
        """What the output did: seconds rendered vs seconds open (a server lost mid-session
        stops the callbacks: `played_s` falls behind `open_s`), latency, first error."""
        end = self.t_closed if math.isfinite(self.t_closed) else self.clock()
        return {
            "backend": self.backend,
            "played_s": self.n_frames / self.sr,
            "open_s": end - self.t_opened,
            "render_latency_ms": self.render_latency_ms(),
            "losses": self.n_losses,
            "reopens": self.n_reopens,
            "error": self.error,
        }

    def close(self) -> None:
        if self.device_state != "closed":
            self.device_state = "closed"
            self.t_closed = self.clock()
        if self._device is not None:
            self._device.close()
            self._device = None


def open_feedback_audio(
    audio: AudioSettings,
    folder: Path,
    poll: Callable[[], tuple[float, float, int, int]] | None = None,
) -> WavFeedbackAudio | DeviceFeedbackAudio:
    """The device sink where an output exists (output auto/device), else the WAV renderer.

    `poll`: see DeviceFeedbackAudio (the Feedback passes its ring reader)."""
    if audio.output in ("auto", "device") and _find_output(audio.device) is not None:
        return DeviceFeedbackAudio(audio, poll)
    if audio.output == "device":
        what = f"no audio output matching {audio.device!r}" if audio.device else "no audio output"
        raise AudioError(
            f"audio.output is 'device' but {what} exists here (PulseAudio/PipeWire server or an "
            "ALSA sound card); use 'auto' or 'wav'"
        )
    return WavFeedbackAudio(audio, Path(folder) / audio.wav_name)


# ---- guided audio ----------------------------------------------------------------------------
def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Decode a PCM WAV. Returns (data (n_frames, n_channels) float32 in -1..1, sample rate)."""
    try:
        with wave.open(str(path), "rb") as w:
            n_ch, width, sr, n = (
                w.getnchannels(),
                w.getsampwidth(),
                w.getframerate(),
                w.getnframes(),
            )
            raw = w.readframes(n)
    except (wave.Error, EOFError) as exc:
        raise AudioError(f"{path}: not a PCM WAV file ({exc})") from exc
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8  # sign-extend 24-bit
        data = ints.astype(np.float32) / 8388608.0
    elif width == 4:
        data = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise AudioError(f"{path}: unsupported WAV sample width {width} bytes")
    return data.reshape(-1, n_ch), sr


def write_wav(path: Path, data: np.ndarray, sample_rate_hz: int) -> None:
    """Write float data (n,) or (n, n_channels) in -1..1 as 16-bit PCM WAV."""
    data = np.asarray(data, dtype=float)
    if data.ndim == 1:
        data = data[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(WAV_SAMPLE_WIDTH)
        w.setframerate(sample_rate_hz)
        w.writeframes(to_int16(data).tobytes())


def decode_audio(path: Path) -> tuple[np.ndarray, int]:
    """Decode a guided-audio file (GUIDED_FORMATS) at its own rate and channel count.

    Returns (data (n_frames, n_channels) float32 in -1..1, sample rate Hz). WAV goes through
    `read_wav`; OGG Vorbis / MP3 / FLAC through miniaudio (stb_vorbis, dr_mp3, dr_flac). An MP3
    decodes with the encoder's padding (about 50 ms of near-silence at each end: lame adds it).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in GUIDED_FORMATS:
        raise AudioError(f"guided audio {path.name!r}: {UNSUPPORTED_FORMAT_MESSAGE}")
    if suffix == ".wav":
        return read_wav(path)
    ma = _miniaudio()
    try:
        info = ma.get_file_info(str(path))
        decoded = ma.decode_file(
            str(path), ma.SampleFormat.FLOAT32, info.nchannels, info.sample_rate
        )
    except ma.MiniaudioError as exc:  # DecodeError is one
        raise AudioError(f"{path}: cannot decode as {suffix[1:].upper()} ({exc})") from exc
    data = np.frombuffer(decoded.samples, dtype=np.float32).reshape(-1, info.nchannels)
    return data, info.sample_rate


class _DevicePlayer:
    """Guided audio on an output: a miniaudio callback reading the decoded 16-bit PCM.

    Paused = silence while the device keeps running (resume is immediate, no device re-open);
    past the end it yields silence until stop() closes the device. Any thread may call
    suspend / resume / stop (plain flags and miniaudio's thread-safe stop).
    """

    def __init__(self, data: np.ndarray, sample_rate_hz: int, device: str = "") -> None:
        self._pcm = to_int16(data)  # (n_frames, n_channels)
        self.n_channels = self._pcm.shape[1]
        self.sr = sample_rate_hz
        self.position = 0  # frames handed to the device
        self.paused = True
        self._device = _open_playback(
            device, self.n_channels, sample_rate_hz, GUIDED_PERIOD_MS, "closedloop guided audio"
        )
        self.backend: str = self._device.backend

    def _generate(self):
        n = yield b""
        while True:
            if self.paused or self.position >= len(self._pcm):
                block = bytes(WAV_SAMPLE_WIDTH * self.n_channels * n)
            else:
                chunk = self._pcm[self.position : self.position + n]
                self.position += len(chunk)
                block = chunk.tobytes()  # a short last block: miniaudio pads with silence
            n = yield block

    def start(self) -> None:
        self.paused = False
        gen = self._generate()
        next(gen)
        _start(self._device, gen)

    def suspend(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def stop(self) -> None:
        if self._device is not None:
            self._device.close()
            self._device = None


class GuidedAudio:
    """Plays a recording through the session and marks its start, pauses, resumes and end.

    Markers are JSON strings on an irregular-rate LSL 'Markers' stream, e.g.
    `{"guided_audio": "pause", "file": "guide.wav", "position_s": 12.345}`, timestamped with
    `pylsl.local_clock()` at the action (the end marker carries the computed end time, not the
    timer's wake-up). The same actions go to the bus as 'guided_audio' events. The sound plays on
    the output named `device` ('' = system default; None = never a device); without one the
    playback is timed (position, end) but silent, and a 'no_device' event says so. Markers and
    position follow the local clock, not the device (whose buffer adds a few tens of ms).

    Life cycle: start() -> pause()/resume() ... -> end (automatic) or stop(); close() is idempotent.
    """

    def __init__(
        self,
        settings: GuidedAudioSettings,
        source_id: str,
        emit: Callable[..., None] | None = None,
        clock: Callable[[], float] = pylsl.local_clock,
        device: str | None = "",
    ) -> None:
        if settings.path is None:
            raise AudioError("guided audio: no path configured")
        path = Path(settings.path)
        if not path.is_file():
            raise AudioError(f"guided audio file not found: {path}")
        self.path = path
        self.emit = emit
        self.clock = clock
        data, sr = decode_audio(path)
        self.duration_s = len(data) / sr
        self._player = (
            _DevicePlayer(data, sr, device)
            if device is not None and _find_output(device) is not None
            else None
        )
        self.device = self._player is not None
        self._wanted = f" matching {device!r}" if device else ""
        info = pylsl.StreamInfo(
            settings.marker_stream, "Markers", 1, pylsl.IRREGULAR_RATE, pylsl.cf_string, source_id
        )
        info.desc().append_child_value("file", path.name)
        info.desc().append_child_value("duration_s", f"{self.duration_s:.6f}")
        self.source_id = source_id
        self._outlet: pylsl.StreamOutlet | None = pylsl.StreamOutlet(info)
        self._lock = threading.Lock()
        self.state: Literal["ready", "playing", "paused", "ended", "stopped"] = "ready"
        self._pos_s = 0.0  # position at the last start/resume/pause
        self._t_resumed = math.nan  # local clock when playing (re)started
        self._timer: threading.Timer | None = None
        self.markers: list[tuple[float, str]] = []  # (local time, marker) as pushed

    @property
    def position_s(self) -> float:
        with self._lock:
            return self._position(self.clock())

    def _position(self, now: float) -> float:
        if self.state == "playing":
            return min(self.duration_s, self._pos_s + now - self._t_resumed)
        return self._pos_s

    def _mark(self, action: str, t: float, **extra) -> None:
        marker = json.dumps(
            {
                "guided_audio": action,
                "file": self.path.name,
                "position_s": round(self._pos_s, 6),
                **extra,
            }
        )
        if self._outlet is not None:
            self._outlet.push_sample([marker], t)
        self.markers.append((t, marker))
        if self.emit is not None:
            self.emit(
                "guided_audio",
                action=action,
                file=self.path.name,
                position_s=self._pos_s,
                t_marker=t,
                **extra,
            )

    def _schedule_end(self, now: float) -> None:
        remaining = self.duration_s - self._pos_s
        t_end = now + remaining
        self._timer = threading.Timer(max(0.0, remaining), self._on_end, args=(t_end,))
        self._timer.daemon = True
        self._timer.name = "guided-audio-end"
        self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def start(self) -> None:
        with self._lock:
            if self.state != "ready":
                raise AudioError(f"guided audio already {self.state}")
            now = self.clock()
            self.state, self._t_resumed = "playing", now
            if self._player is not None:
                self._player.start()
            self._mark("start", now, duration_s=self.duration_s, device=self.device)
            if not self.device and self.emit is not None:
                self.emit(
                    "guided_audio",
                    action="no_device",
                    file=self.path.name,
                    detail=f"no audio output{self._wanted}: playback is timed and marked "
                    "but silent",
                )
            self._schedule_end(now)

    def pause(self) -> None:
        with self._lock:
            if self.state != "playing":
                return
            now = self.clock()
            self._cancel_timer()
            self._pos_s = self._position(now)
            self.state = "paused"
            if self._player is not None:
                self._player.suspend()
            self._mark("pause", now)

    def resume(self) -> None:
        with self._lock:
            if self.state != "paused":
                return
            now = self.clock()
            self.state, self._t_resumed = "playing", now
            if self._player is not None:
                self._player.resume()
            self._mark("resume", now)
            self._schedule_end(now)

    def _on_end(self, t_end: float) -> None:
        with self._lock:
            if self.state != "playing":
                return
            self._timer = None
            self._pos_s, self.state = self.duration_s, "ended"
            self._mark("end", t_end)
            # the device stays open (silent) until close(): closing now would cut the last
            # blocks still in its buffer

    def wait_end(self, timeout: float | None = None) -> bool:
        """Block until the recording ended (True) or timeout (False); for tests and scripts."""
        timer = self._timer
        if timer is not None:
            timer.join(timeout)
        return self.state == "ended"

    def stop(self, reason: str = "stopped") -> None:
        """End playback early (a 'stop' marker); no-op once ended or stopped."""
        with self._lock:
            if self.state in ("ended", "stopped"):
                return
            now = self.clock()
            self._cancel_timer()
            was_started = self.state != "ready"
            self._pos_s = self._position(now)
            self.state = "stopped"
            if self._player is not None:
                self._player.stop()
            if was_started:
                self._mark("stop", now, reason=reason)

    def close(self) -> None:
        self.stop("session ended")
        if self._player is not None:
            self._player.stop()
        self._outlet = None


# python -m closedloop.participant.audio: the outputs `audio.device` can name
if __name__ == "__main__":
    names = audio_outputs()
    print(
        "\n".join(names)
        if names
        else "no audio output (no PulseAudio/PipeWire server, no ALSA card)"
    )

"""The `feedback:` section of a session config (display, audio, guided audio, sham): pydantic
only, so that loading a config never imports the audio or LSL libraries."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TRACE_NAME = "feedback.csv"
COLOUR_PATTERN = r"^#[0-9A-Fa-f]{6}$"
GUIDED_FORMATS = (".wav", ".ogg", ".mp3", ".flac")  # guided audio: decoded by wave / miniaudio
UNSUPPORTED_FORMAT_MESSAGE = (
    "guided audio must be WAV, OGG (Vorbis), MP3 or FLAC (what miniaudio decodes); convert "
    "other formats first (e.g. ffmpeg -i in.m4a out.ogg)"
)
# Default device period (frames asked per callback; audio.period_ms). Measured on a PulseAudio
# 16 null sink recorded back (tests/test_audio_device.py, 2 cores): update -> rendered p50
# 3-6 ms, p99 < 10 ms; update -> chime onset heard on the monitor 5-16 ms (capture path
# included); no dropout at moderate load. A real sound card adds its own buffer (PulseAudio on
# ALSA: typically 20-50 ms). Cost: rendering one 10 ms block takes 50 us (sine) to 80 us
# (noise) of Python/numpy on the device's thread, < 1 % of the GIL beside the acquisition
# thread. With the 2 cores overloaded by other work (load 5-7) a 10 ms callback was late often
# enough to lose 3-13 % of the blocks (dropouts); 20-40 ms lost 0-5 %: raise period_ms there.
DEVICE_PERIOD_MS = 10


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ToneSettings(_Strict):
    """The continuous sound that follows the feedback value (0..1)."""

    enabled: bool = Field(True, description="play a continuous sound that follows the feedback")
    kind: Literal["sine", "noise"] = Field(
        "sine", description="a pure tone or soft (low-passed) noise"
    )
    follows: Literal["volume", "pitch"] = Field(
        "volume", description="what the feedback value drives (noise: volume only)"
    )
    freq_hz: float = Field(
        220.0, gt=20, le=8000, description="tone frequency when following volume"
    )
    pitch_range_hz: tuple[float, float] = Field(
        (196.0, 392.0), description="tone frequency at feedback 0 and 1 when following pitch"
    )
    volume_range: tuple[float, float] = Field(
        (0.0, 0.3), description="amplitude (fraction of full scale) at feedback 0 and 1"
    )

    @model_validator(mode="after")
    def _check(self) -> ToneSettings:
        lo, hi = self.volume_range
        if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
            raise ValueError(f"volume_range values must be within 0..1, got {self.volume_range}")
        if not all(20.0 < f <= 8000.0 for f in self.pitch_range_hz):
            raise ValueError(
                f"pitch_range_hz must be within 20..8000 Hz, got {self.pitch_range_hz}"
            )
        if self.kind == "noise" and self.follows == "pitch":
            raise ValueError("tone.kind 'noise' has no pitch: use follows: volume")
        return self


class ChimeSettings(_Strict):
    """A short bell-like chime each time the (displayed) state enters the target state."""

    enabled: bool = Field(True, description="chime on entry into the target state")
    freq_hz: float = Field(880.0, gt=50, le=8000, description="fundamental of the chime")
    duration_s: float = Field(0.6, gt=0.02, le=5.0, description="length of the chime (s)")
    volume: float = Field(
        0.3, ge=0.0, le=1.0, description="peak amplitude (fraction of full scale)"
    )


class AudioSettings(_Strict):
    """Audio feedback: where it goes and what it sounds like."""

    enabled: bool = Field(True, description="audio feedback on or off")
    output: Literal["auto", "device", "wav"] = Field(
        "auto",
        description="'auto': stream to the audio output (PulseAudio/PipeWire, or ALSA with a "
        "sound card) if one exists, else render a WAV file; 'device': refuse to start without "
        "an output; 'wav': always render to the WAV file (offline sessions always do)",
    )
    device: str = Field(
        "",
        max_length=200,
        description="output to play on: '' for the system default (e.g. PulseAudio's default "
        "sink, or PULSE_SINK), else part of an output's name as listed by "
        "`python -m closedloop.participant.audio` (case-insensitive); also used by guided audio",
    )
    sample_rate_hz: int = Field(22050, ge=8000, le=96000, description="synthesis sample rate")
    period_ms: int = Field(
        DEVICE_PERIOD_MS,
        ge=5,
        le=100,
        description="device only: audio rendered per callback (ms). Smaller follows the score "
        "sooner; larger survives a busy CPU without dropouts (10: 5-16 ms score to sound on "
        "a null sink)",
    )
    wav_name: str = Field(
        "feedback_audio.wav",
        pattern=r"^[A-Za-z0-9_.-]+\.wav$",
        description="file name (in the session folder) of the rendered audio",
    )
    tone: ToneSettings = ToneSettings()
    chime: ChimeSettings = ChimeSettings()


class GuidedAudioSettings(_Strict):
    """A recording (e.g. meditation guidance) played through the session."""

    path: Path | None = Field(
        None, description="recording to play: WAV (PCM 8/16/24/32-bit), OGG Vorbis, MP3 or FLAC"
    )
    autostart: bool = Field(True, description="start playing when the feedback starts")
    marker_stream: str = Field(
        "closedloop-guided-audio", min_length=1, description="LSL marker stream name"
    )

    @model_validator(mode="after")
    def _check(self) -> GuidedAudioSettings:
        if self.path is not None and self.path.suffix.lower() not in GUIDED_FORMATS:
            raise ValueError(f"guided audio {self.path.name!r}: {UNSUPPORTED_FORMAT_MESSAGE}")
        return self


class DisplaySettings(_Strict):
    """The participant window: one calm shape, nothing of the operator's controls."""

    kind: Literal["circle", "bar"] = Field(
        "circle",
        description="'circle': a disc whose size follows the feedback; 'bar': a "
        "vertical bar whose height follows it",
    )
    size_range: tuple[float, float] = Field(
        (0.15, 0.8),
        description="shape size at feedback 0 and 1, fraction of the window's "
        "shorter side (circle diameter) or height (bar)",
    )
    brightness_follows: bool = Field(True, description="the shape also brightens with the feedback")
    min_brightness: float = Field(0.35, ge=0.0, le=1.0, description="brightness at feedback 0")
    colour: str = Field("#3A6EA5", pattern=COLOUR_PATTERN, description="shape colour")
    target_colour: str = Field(
        "#3FBF7F", pattern=COLOUR_PATTERN, description="shape colour in the target state"
    )
    idle_colour: str = Field(
        "#404040",
        pattern=COLOUR_PATTERN,
        description="shape colour when there is no feedback "
        "(before calibration, after a sham trace ends)",
    )
    background: str = Field("#000000", pattern=COLOUR_PATTERN, description="window background")
    fullscreen: bool = Field(False, description="open full-screen")
    screen: int | None = Field(
        None, ge=0, description="screen index; None: the last screen (the second one if two)"
    )
    refresh_hz: float = Field(60.0, ge=5.0, le=240.0, description="redraw rate")

    @model_validator(mode="after")
    def _check(self) -> DisplaySettings:
        lo, hi = self.size_range
        if not (0.0 < lo <= 1.0 and 0.0 < hi <= 1.0):
            raise ValueError(f"size_range values must be within (0, 1], got {self.size_range}")
        return self


class ShamSettings(_Strict):
    """Sham feedback: replay the feedback trace of an earlier session."""

    source: Path | None = Field(
        None, description="earlier session folder (its feedback.csv is used) or a trace file"
    )
    pulses: Literal["live", "disabled"] = Field(
        "live", description="'live': pulses still follow the live state; 'disabled': no pulses"
    )


class FeedbackSettings(_Strict):
    """The `feedback:` section of the session config."""

    enabled: bool = Field(False, description="run participant feedback in this session")
    mode: Literal["live", "sham"] = Field(
        "live",
        description="'live': feedback follows this session's score; 'sham': it replays "
        "an earlier session's feedback trace (see sham)",
    )
    smoothing_s: float = Field(
        1.0,
        ge=0.0,
        le=60.0,
        description="time constant (stream s) of the exponential smoothing of the score; 0: none",
    )
    score_range: tuple[float, float] = Field(
        (-2.0, 2.0), description="score mapped to feedback 0 and 1 (clipped outside)"
    )
    publish_lsl: bool = Field(True, description="publish the feedback as an LSL stream")
    lsl_name: str = Field("closedloop-feedback", min_length=1, description="LSL stream name")
    display: DisplaySettings = DisplaySettings()
    audio: AudioSettings = AudioSettings()
    guided: GuidedAudioSettings = GuidedAudioSettings()
    sham: ShamSettings = ShamSettings()

    @field_validator("score_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] != v[1]):
            raise ValueError(f"score_range needs two different finite scores, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> FeedbackSettings:
        if self.mode == "sham":
            if self.sham.source is None:
                raise ValueError("feedback.mode is 'sham' but feedback.sham.source is not set")
            trace = trace_path(self.sham.source)
            if not trace.is_file():
                raise ValueError(f"sham source has no feedback trace: {trace} not found")
        if self.guided.path is not None and not Path(self.guided.path).is_file():
            raise ValueError(f"guided audio file not found: {self.guided.path}")
        return self


def trace_path(source: Path) -> Path:
    """A session folder -> its feedback.csv; a file -> itself."""
    source = Path(source)
    return source / TRACE_NAME if source.is_dir() else source

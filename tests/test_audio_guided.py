"""Guided audio: start / pause / resume / end as LSL markers (separate inlet) and bus events."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pylsl
import pytest
from pydantic import ValidationError

from closedloop.bus import EventBus
from closedloop.participant.audio import AudioError, GuidedAudio, decode_audio, write_wav
from closedloop.participant.feedback import SUMMARY_NAME, Feedback
from closedloop.participant.settings import FeedbackSettings, GuidedAudioSettings

DURATION_S = 0.8


@pytest.fixture
def guide_wav(tmp_path):
    path = tmp_path / "guide.wav"
    sr = 16000
    t = np.arange(round(DURATION_S * sr)) / sr
    write_wav(path, 0.2 * np.sin(2 * np.pi * 330 * t), sr)
    return path


def open_marker_inlet(source_id: str) -> pylsl.StreamInlet:
    infos = pylsl.resolve_byprop("source_id", source_id, timeout=5.0)
    assert infos, "guided-audio marker stream not found"
    inlet = pylsl.StreamInlet(infos[0])
    inlet.open_stream(timeout=5.0)
    return inlet


def pull_markers(
    inlet: pylsl.StreamInlet, n: int, timeout_s: float = 5.0
) -> list[tuple[float, dict]]:
    out = []
    deadline = pylsl.local_clock() + timeout_s
    while len(out) < n and pylsl.local_clock() < deadline:
        sample, ts = inlet.pull_sample(timeout=0.1)
        if sample is not None:
            out.append((ts, json.loads(sample[0])))
    return out


@pytest.mark.lsl
@pytest.mark.timeout(30)
def test_guided_markers_order_and_timing_in_a_separate_inlet(guide_wav, unique_name):
    bus = EventBus()
    sub = bus.subscribe("t", kinds={"guided_audio"})
    guided = GuidedAudio(
        GuidedAudioSettings(path=guide_wav, marker_stream=unique_name),
        source_id=unique_name,
        emit=bus.emit,
    )
    assert guided.duration_s == pytest.approx(DURATION_S)
    inlet = open_marker_inlet(unique_name)
    t_calls = {}
    t_calls["start"] = pylsl.local_clock()
    guided.start()
    time.sleep(0.25)
    t_calls["pause"] = pylsl.local_clock()
    guided.pause()
    time.sleep(0.3)  # paused: the end moves later by this much
    t_calls["resume"] = pylsl.local_clock()
    guided.resume()
    assert guided.wait_end(timeout=5.0)
    markers = pull_markers(inlet, 4)
    inlet.close_stream()
    guided.close()  # after the end: no 'stop' marker

    actions = [m["guided_audio"] for _, m in markers]
    assert actions == ["start", "pause", "resume", "end"]
    ts = {m["guided_audio"]: t for t, m in markers}
    for action, t_call in t_calls.items():  # stamped at the call (local clock), not on arrival
        assert 0.0 <= ts[action] - t_call < 0.2  # tolerant: a loaded 2-core CI machine
    pos_at_pause = markers[1][1]["position_s"]
    assert pos_at_pause == pytest.approx(ts["pause"] - ts["start"], abs=1e-6)
    # the end marker carries the computed end: resume + what was left to play
    assert ts["end"] - ts["resume"] == pytest.approx(DURATION_S - pos_at_pause, abs=1e-6)
    assert markers[3][1]["position_s"] == pytest.approx(DURATION_S)
    assert all(m["file"] == "guide.wav" for _, m in markers)
    # inlet timestamps are exactly what was pushed
    np.testing.assert_allclose([t for t, _ in markers], [t for t, _ in guided.markers], atol=1e-6)

    events = [e.payload for e in sub.drain()]
    ordered = [e["action"] for e in events if e["action"] != "no_device"]
    assert ordered == ["start", "pause", "resume", "end"]
    if not guided.device:
        assert any(e["action"] == "no_device" for e in events)
    np.testing.assert_allclose(
        [e["t_marker"] for e in events if e["action"] != "no_device"],
        [t for t, _ in markers],
        atol=1e-9,
    )


@pytest.mark.lsl
@pytest.mark.timeout(30)
def test_guided_stop_before_end_and_commands_out_of_order(guide_wav, unique_name):
    guided = GuidedAudio(
        GuidedAudioSettings(path=guide_wav, marker_stream=unique_name), source_id=unique_name
    )
    guided.pause()  # not playing: ignored
    guided.resume()  # not paused: ignored
    guided.start()
    with pytest.raises(AudioError, match="already playing"):
        guided.start()
    time.sleep(0.1)
    guided.stop("operator")
    time.sleep(DURATION_S)  # the end timer was cancelled
    guided.close()
    actions = [json.loads(m)["guided_audio"] for _, m in guided.markers]
    assert actions == ["start", "stop"]
    assert guided.state == "stopped"
    assert 0.05 < guided.position_s < DURATION_S


@pytest.mark.lsl
@pytest.mark.timeout(30)
def test_feedback_autostarts_guided_audio_and_records_its_markers(guide_wav, tmp_path, unique_name):
    bus = EventBus()
    sub = bus.subscribe("t", kinds={"guided_audio"})
    settings = FeedbackSettings(
        enabled=True,
        publish_lsl=False,
        audio={"enabled": False},
        guided={"path": guide_wav, "marker_stream": unique_name},
    )
    fb = Feedback.from_settings(settings, tmp_path, bus)
    assert fb.source_ids == [fb.guided.source_id]
    fb.start()
    time.sleep(0.1)
    summary = fb.close()  # ends the guidance early: a 'stop' marker
    actions = [json.loads(m)["guided_audio"] for m in summary["guided_markers"]]
    assert actions == ["start", "stop"]
    assert [
        e.payload["action"] for e in sub.drain() if e.payload["action"] != "no_device"
    ] == actions
    record = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert record["guided_file"] == str(guide_wav)


def test_offline_feedback_skips_guided_audio_and_says_so(guide_wav, tmp_path):
    bus = EventBus()
    sub = bus.subscribe("t", kinds={"guided_audio"})
    settings = FeedbackSettings(
        enabled=True, publish_lsl=False, audio={"enabled": False}, guided={"path": guide_wav}
    )
    fb = Feedback.from_settings(settings, tmp_path, bus, live=False).start()
    assert fb.guided is None
    assert fb.source_ids == []
    summary = fb.close()
    assert summary["guided_skipped"] is True
    assert summary["live"] is False
    assert [e.payload["action"] for e in sub.drain()] == ["skipped"]


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["guide_440_660hz_1s.ogg", "guide_440_660hz_1s.mp3"])
def test_decode_ogg_mp3(name):
    """The committed fixtures (tests/data/README.md): 1 s stereo, left 440 Hz, right 660 Hz."""
    data, sr = decode_audio(DATA / name)
    assert sr == 22050
    assert data.shape[1] == 2
    assert data.dtype == np.float32
    # MP3 keeps the encoder's padding (lame: 1105 + 576-sample frames at 22.05 kHz, ~0.05 s)
    assert len(data) / sr == pytest.approx(1.0, abs=0.12)
    for ch, f in ((0, 440.0), (1, 660.0)):
        x = data[round(0.2 * sr) : round(0.8 * sr), ch].astype(float)
        spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        assert np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)] == pytest.approx(f, abs=2.0)
        assert np.sqrt(2 * np.mean(x**2)) == pytest.approx(0.3, abs=0.03)


@pytest.mark.lsl
@pytest.mark.timeout(30)
def test_guided_ogg_is_timed_by_its_decoded_length(unique_name):
    guided = GuidedAudio(
        GuidedAudioSettings(path=DATA / "guide_440_660hz_1s.ogg", marker_stream=unique_name),
        source_id=unique_name,
        device=None,  # never a device: the timing alone
    )
    assert guided.duration_s == pytest.approx(1.0, abs=1e-3)
    assert not guided.device
    guided.start()
    assert guided.wait_end(timeout=5.0)
    guided.close()
    (t_start, _), (t_end, end) = guided.markers
    assert t_end - t_start == pytest.approx(guided.duration_s, abs=1e-6)
    assert json.loads(end)["file"] == "guide_440_660hz_1s.ogg"


def test_guided_other_formats_and_broken_files_are_refused_clearly(tmp_path):
    path = tmp_path / "guide.m4a"
    path.write_bytes(b"\0\0\0\x18ftypM4A ")
    with pytest.raises(ValidationError, match="must be WAV, OGG"):
        GuidedAudioSettings(path=path)
    # and at construction, should a settings object bypass validation
    with pytest.raises(AudioError, match="must be WAV, OGG"):
        GuidedAudio(GuidedAudioSettings.model_construct(path=path, marker_stream="x"), "unused")
    for name in ("broken.ogg", "broken.mp3"):
        bad = tmp_path / name
        bad.write_bytes(b"OggS" + bytes(200))
        with pytest.raises(AudioError, match="cannot decode"):
            GuidedAudio(GuidedAudioSettings(path=bad), "unused")


def test_guided_missing_file(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        GuidedAudio(GuidedAudioSettings(path=tmp_path / "nope.wav"), source_id="unused")

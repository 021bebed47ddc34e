"""Feedback as a real Pipeline tap on a recorded file: trace, audio, and an exact sham replay."""

from __future__ import annotations

import json

import numpy as np
import pytest

from acquisition.file_source import FileSource
from closedloop.bus import EventBus
from closedloop.config import SessionConfig
from closedloop.participant.audio import read_wav
from closedloop.participant.feedback import SUMMARY_NAME, Feedback, read_trace
from closedloop.participant.settings import FeedbackSettings
from closedloop.pipeline import Pipeline
from features.types import Label
from tests.conftest import REPLAY_DATA

RECORDING = REPLAY_DATA / "sim_32ch_500hz.fif"
SR = 8000  # audio rate: enough for the 220 Hz tone, keeps the test light


def run_session(folder, settings: FeedbackSettings, t0: float) -> tuple[Feedback, list, Pipeline]:
    folder.mkdir()
    source = FileSource(RECORDING, chunk_size=10, t0=t0).connect()
    bus = EventBus()
    pipeline = Pipeline.build(
        SessionConfig(), source.ch_names, source.sfreq, folder / "audit.jsonl", bus=bus, live=False
    )
    fb = Feedback.from_settings(settings, folder, bus)
    states = []
    pipeline.taps.append(lambda chunk, state: states.append(state))
    pipeline.taps.append(fb.tap)
    fb.start()
    while (chunk := source.pull()) is not None:
        pipeline.step(chunk)
    fb.close()
    pipeline.close()
    assert pipeline.faults == []
    return fb, states, pipeline


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_pipeline_tap_live_then_exact_sham(tmp_path):
    settings = FeedbackSettings(
        enabled=True, publish_lsl=False, audio={"output": "wav", "sample_rate_hz": SR}
    )
    fb, states, _ = run_session(tmp_path / "live", settings, t0=0.0)
    tr = read_trace(tmp_path / "live")
    assert len(tr["t_stream"]) == len(states) == fb.n
    np.testing.assert_array_equal(tr["t_stream"], [s.t_stream for s in states])
    np.testing.assert_array_equal(tr["score"], [s.score for s in states])
    target = np.array([s.label is Label.TARGET for s in states])
    np.testing.assert_array_equal(tr["target"] > 0, target)
    assert fb.entries > 0
    assert len(fb.audio.chimes_at) == fb.entries
    # no feedback while calibrating (score nan), then values in 0..1
    calibrating = np.array([not np.isfinite(s.score) for s in states])
    assert calibrating.any()
    assert np.isnan(tr["value"][calibrating]).all()
    assert (tr["value"][~calibrating] >= 0).all()
    assert (tr["value"][~calibrating] <= 1).all()
    assert np.nanstd(tr["value"]) > 0.05  # it moves

    # the rendered tone's envelope follows the feedback value (chime-free stretches)
    x = read_wav(tmp_path / "live" / "feedback_audio.wav")[0][:, 0]
    win = round(0.2 * SR)
    amp = np.sqrt(2 * np.mean(x[: len(x) // win * win].reshape(-1, win) ** 2, axis=1))
    t_win = tr["t_stream"][0] + (np.arange(len(amp)) + 0.5) * 0.2
    value = np.interp(t_win, tr["t_stream"], np.nan_to_num(tr["value"]))
    near_chime = np.zeros(len(amp), bool)
    for t_c in fb.audio.chimes_at:
        near_chime |= (t_win > t_c - 0.2) & (t_win < t_c + 0.8)
    keep = ~near_chime & (t_win < tr["t_stream"][-1])
    r = np.corrcoef(amp[keep], value[keep])[0, 1]
    assert r > 0.9, f"envelope-feedback correlation {r:.3f}"

    # sham: the same recording on another stream clock; feedback comes from the first session
    sham = FeedbackSettings.model_validate(
        {
            **settings.model_dump(),
            "mode": "sham",
            "sham": {"source": tmp_path / "live", "pulses": "disabled"},
        }
    )
    fb2, states2, _ = run_session(tmp_path / "sham", sham, t0=5000.25)
    tr2 = read_trace(tmp_path / "sham")
    np.testing.assert_array_equal(tr2["value"], tr["value"])
    np.testing.assert_array_equal(tr2["target"], tr["target"])
    np.testing.assert_array_equal(tr2["t_stream"], [s.t_stream for s in states2])
    assert fb2.entries == fb.entries
    record = json.loads((tmp_path / "sham" / SUMMARY_NAME).read_text())
    assert (record["mode"], record["sham_pulses"], record["pulses_allowed"]) == (
        "sham",
        "disabled",
        False,
    )

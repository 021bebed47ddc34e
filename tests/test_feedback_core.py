"""Feedback: score -> value mapping, settings validation, trace, bus events, sham, LSL stream."""

from __future__ import annotations

import json
import math

import numpy as np
import pylsl
import pytest
from pydantic import ValidationError

from closedloop.bus import EventBus
from closedloop.participant.feedback import SUMMARY_NAME, Feedback, FeedbackMapper, read_trace
from closedloop.participant.settings import TRACE_NAME, FeedbackSettings
from features.types import Label, State

CHUNK_S = 0.01  # 10-sample chunks at 1 kHz


def quiet(**kw) -> FeedbackSettings:
    """Feedback without LSL or audio (tests of the mapping and trace only)."""
    kw.setdefault("publish_lsl", False)
    kw.setdefault("audio", {"enabled": False})
    return FeedbackSettings(enabled=True, **kw)


def scripted_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy slow oscillation (nan for the first 50 updates: calibration) and a target flag."""
    rng = np.random.default_rng(seed)
    score = 1.5 * np.sin(2 * np.pi * np.arange(n) / 200 + rng.uniform(0, 6)) + rng.normal(0, 0.2, n)
    score[:50] = np.nan
    target = np.nan_to_num(score, nan=-9) > 0.8
    return score, target


def run(fb: Feedback, t0: float, score: np.ndarray, target: np.ndarray) -> dict:
    fb.start()
    for k, (s, tg) in enumerate(zip(score, target, strict=True)):
        label = Label.TARGET if tg else Label.NON_TARGET
        fb.tap(None, State(t0 + k * CHUNK_S, label, float(s), 0.0))
    return fb.close()


# ---- mapping ---------------------------------------------------------------------------------
def test_mapping_linear_clipped_without_smoothing():
    m = FeedbackMapper(0.0, (-2.0, 2.0))
    got = [m.step(i, s) for i, s in enumerate([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0])]
    assert got == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    inverted = FeedbackMapper(0.0, (2.0, -2.0))  # a reversed range maps high scores to 0
    assert inverted.step(0.0, 1.0) == pytest.approx(0.25)


def test_mapping_nan_gives_nan_and_restarts_smoothing():
    m = FeedbackMapper(5.0, (0.0, 1.0))
    m.step(0.0, 0.0)
    assert math.isnan(m.step(0.1, math.nan))
    assert m.step(0.2, 1.0) == 1.0  # no memory of the score before the gap


def test_smoothing_time_constant_in_stream_time_any_update_rate():
    """A unit step reaches 1 - 1/e after tau, whether updated every 10 ms or every 50 ms."""
    tau = 0.5
    for dt in (0.01, 0.05):
        m = FeedbackMapper(tau, (0.0, 1.0))
        m.step(0.0, 0.0)
        n = round(tau / dt)
        for k in range(1, n + 1):
            v = m.step(k * dt, 1.0)
        assert v == pytest.approx(1 - math.exp(-1), abs=1e-12)


# ---- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mode": "sham"}, "sham.source is not set"),
        ({"mode": "sham", "sham": {"source": "/nonexistent/session"}}, "no feedback trace"),
        ({"score_range": (1.0, 1.0)}, "two different finite scores"),
        ({"display": {"colour": "blue"}}, "should match pattern"),
        ({"display": {"size_range": (0.0, 0.5)}}, "size_range"),
        ({"audio": {"tone": {"kind": "noise", "follows": "pitch"}}}, "no pitch"),
        ({"audio": {"tone": {"volume_range": (0.0, 1.5)}}}, "volume_range"),
        ({"guided": {"path": "/nonexistent/guide.wav"}}, "guided audio file not found"),
        ({"guided": {"path": "guide.m4a"}}, "guided audio must be WAV, OGG"),
        ({"smothing_s": 1.0}, "Extra inputs are not permitted"),
    ],
)
def test_settings_errors_say_what(kw, message):
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        FeedbackSettings(**kw)


def test_settings_defaults_and_yaml_roundtrip():
    s = FeedbackSettings()
    assert not s.enabled
    assert s.mode == "live"
    again = FeedbackSettings.model_validate(json.loads(s.model_dump_json()))
    assert again == s


# ---- trace, events ---------------------------------------------------------------------------
def test_trace_records_every_update_and_live_mode(tmp_path):
    score, target = scripted_scores(600, seed=1)
    bus = EventBus()
    sub = bus.subscribe("t")
    summary = run(
        Feedback.from_settings(quiet(smoothing_s=0.3), tmp_path, bus), 50.0, score, target
    )
    tr = read_trace(tmp_path)
    assert len(tr["t_stream"]) == 600
    np.testing.assert_array_equal(tr["t_stream"], 50.0 + np.arange(600) * CHUNK_S)
    np.testing.assert_array_equal(tr["score"], score)
    ref = FeedbackMapper(0.3, (-2.0, 2.0))
    expected = [ref.step(t, s) for t, s in zip(tr["t_stream"], score, strict=True)]
    np.testing.assert_array_equal(tr["value"], expected)  # written losslessly (repr)
    assert np.isnan(tr["value"][:50]).all()
    assert set(tr["mode"]) == {"live"}
    entries = np.flatnonzero(target & ~np.r_[False, target[:-1]])
    np.testing.assert_array_equal(np.flatnonzero(tr["entry"]), entries)

    events = [e for e in sub.drain() if e.kind == "feedback"]
    assert events[0].payload["event"] == "started"
    assert events[0].payload["mode"] == "live"
    assert events[-1].payload["event"] == "stopped"
    entry_times = [e.t_stream for e in events if e.payload["event"] == "target_entry"]
    np.testing.assert_allclose(entry_times, 50.0 + entries * CHUNK_S)
    record = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert record["mode"] == "live"
    assert record["sham_source"] is None
    assert record["updates"] == summary["updates"] == 600
    assert record["target_entries"] == len(entries) > 0


def test_close_is_idempotent_and_tap_after_start_only_cheap(tmp_path):
    fb = Feedback.from_settings(quiet(), tmp_path).start()
    fb.tap(None, State(1.0, Label.NON_TARGET, 0.0, 0.0))
    first = fb.close()
    assert fb.close()["updates"] == first["updates"] == 1
    assert (tmp_path / TRACE_NAME).read_text().count("\n") == 2


# ---- sham ------------------------------------------------------------------------------------
def test_sham_reproduces_the_earlier_trace_exactly(tmp_path):
    earlier, later = tmp_path / "earlier", tmp_path / "later"
    earlier.mkdir()
    later.mkdir()
    score_a, target_a = scripted_scores(800, seed=2)
    run(Feedback.from_settings(quiet(smoothing_s=0.5), earlier), 1234.567, score_a, target_a)

    score_b, target_b = scripted_scores(800, seed=3)  # a different live session
    bus = EventBus()
    sub = bus.subscribe("t")
    settings = quiet(smoothing_s=0.5, mode="sham", sham={"source": earlier, "pulses": "disabled"})
    fb = Feedback.from_settings(settings, later, bus)
    assert not fb.pulses_allowed
    summary = run(fb, 98765.4321, score_b, target_b)  # another stream clock origin

    a, b = read_trace(earlier), read_trace(later)
    np.testing.assert_array_equal(b["value"], a["value"])  # nan where a had nan
    np.testing.assert_array_equal(b["target"], a["target"])
    np.testing.assert_array_equal(b["entry"], a["entry"])
    np.testing.assert_array_equal(b["score"], score_b)  # the live score is still recorded
    assert not np.array_equal(
        np.nan_to_num(b["value"]),
        np.nan_to_num([FeedbackMapper(0.5, (-2, 2)).step(0, s) for s in score_b]),
    )
    assert set(b["mode"]) == {"sham"}
    record = json.loads((later / SUMMARY_NAME).read_text())
    assert record["mode"] == "sham"
    assert record["sham_source"] == str(earlier / TRACE_NAME)
    assert record["sham_pulses"] == "disabled"
    assert record["pulses_allowed"] is False
    assert summary["target_entries"] == int(a["entry"].sum()) > 0
    started = next(e for e in sub.drain() if e.payload.get("event") == "started")
    assert started.payload["mode"] == "sham"


def test_sham_holds_values_across_a_coarser_grid_and_ends_with_nan(tmp_path):
    earlier, later = tmp_path / "earlier", tmp_path / "later"
    earlier.mkdir()
    later.mkdir()
    score_a, target_a = scripted_scores(300, seed=4)
    run(Feedback.from_settings(quiet(smoothing_s=0.0), earlier), 10.0, score_a, target_a)
    a = read_trace(earlier)

    bus = EventBus()
    sub = bus.subscribe("t")
    fb = Feedback.from_settings(
        quiet(mode="sham", sham={"source": earlier / TRACE_NAME}), later, bus
    )
    assert fb.pulses_allowed  # sham.pulses defaults to 'live'
    fb.start()
    # 25 ms updates (a different chunk size), running 1 s past the earlier session's end
    times = 500.0 + np.arange(0, 4.0, 0.025)
    for t in times:
        fb.push(float(t), 0.0, False)
    fb.close()
    b = read_trace(later)
    elapsed = times - times[0]
    for e, v in zip(elapsed, b["value"], strict=True):
        if e <= a["elapsed_s"][-1] + 1e-9:
            i = np.searchsorted(a["elapsed_s"], e + 1e-6, side="right") - 1
            assert v == a["value"][i] or (np.isnan(v) and np.isnan(a["value"][i]))
        else:
            assert np.isnan(v)
    exhausted = [e for e in sub.drain() if e.payload.get("event") == "sham_exhausted"]
    assert len(exhausted) == 1
    assert exhausted[0].payload["elapsed_s"] > a["elapsed_s"][-1]


# ---- LSL -------------------------------------------------------------------------------------
@pytest.mark.lsl
def test_feedback_lsl_stream_carries_value_target_score(tmp_path, unique_name):
    fb = Feedback.from_settings(
        quiet(publish_lsl=True, lsl_name=unique_name, smoothing_s=0.0), tmp_path
    ).start()
    sid = fb.source_ids[0]
    infos = pylsl.resolve_byprop("source_id", sid, timeout=5.0)
    assert infos, "feedback stream not found"
    inlet = pylsl.StreamInlet(infos[0])
    inlet.open_stream(timeout=5.0)
    desc = inlet.info(timeout=5.0).desc()
    assert desc.child_value("mode") == "live"
    sent = [(200.0 + k * CHUNK_S, s, s > 1.0) for k, s in enumerate(np.linspace(-3, 3, 40))]
    for t, s, tg in sent:
        fb.tap(None, State(t, Label.TARGET if tg else Label.NON_TARGET, float(s), 0.0))
    got, stamps = [], []
    deadline = pylsl.local_clock() + 5.0
    while len(got) < len(sent) and pylsl.local_clock() < deadline:
        data, ts = inlet.pull_chunk(timeout=0.2)
        got += data
        stamps += ts
    fb.close()
    inlet.close_stream()
    assert len(got) == len(sent)
    got = np.array(got)
    np.testing.assert_allclose(stamps, [t for t, _, _ in sent], atol=1e-6)
    np.testing.assert_allclose(
        got[:, 0], np.clip((np.array([s for _, s, _ in sent]) + 2) / 4, 0, 1), atol=1e-6
    )
    np.testing.assert_array_equal(got[:, 1], [float(tg) for _, _, tg in sent])
    np.testing.assert_allclose(got[:, 2], [s for _, s, _ in sent], atol=1e-6)

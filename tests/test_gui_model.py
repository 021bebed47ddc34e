"""Console logic without Qt: the scope ring buffers and the event model (banner, raster, counts)."""

from __future__ import annotations

import numpy as np
import pytest

from acquisition.chunk import Chunk
from closedloop.bus import Event
from features.types import Label, State
from gui.model import GUI_REASON_PREFIX, ConsoleModel, effective_rate
from gui.scope import LABELS, Scope


def _chunk(start: int, n: int, n_ch: int = 3, sfreq: float = 100.0, t_arrival=np.nan) -> Chunk:
    idx = np.arange(start, start + n)
    data = np.repeat(idx[:, None].astype(float), n_ch, axis=1) + np.arange(n_ch)[None] * 1e6
    return Chunk(data, idx / sfreq, tuple(f"c{i}" for i in range(n_ch)), sfreq, t_arrival=t_arrival)


def _state(t: float, label=Label.NON_TARGET, score=0.5, artifacts=(), feats=(1.0, 2.0)) -> State:
    features = dict(zip(("a", "b"), feats, strict=True))
    return State(t, label, score, 1.0, 0.0, features, {}, artifacts)


@pytest.mark.parametrize("chunk_size", [1, 7, 10, 333, 500])
def test_scope_keeps_newest_samples_in_order_across_wraps(chunk_size):
    scope = Scope(("c0", "c1", "c2"), 100.0, ("a", "b"), seconds=1.0)  # ring of 300 samples
    total = 1000
    for start in range(0, total, chunk_size):
        n = min(chunk_size, total - start)
        art = ("amplitude:c0",) if start >= 950 else ()
        scope(_chunk(start, n), _state((start + n - 1) / 100.0, artifacts=art))
    view = scope.samples(1.0)
    assert scope.n_samples == total
    np.testing.assert_array_equal(view.data[:, 0], np.arange(total - 100, total))
    np.testing.assert_array_equal(view.data[:, 2], np.arange(total - 100, total) + 2e6)
    np.testing.assert_allclose(view.t, np.arange(total - 100, total) / 100.0)
    if chunk_size <= 50:  # artifact flags of the newest chunks only
        assert view.art[-1]
        assert not view.art[0]


def test_scope_decisions_window_and_labels():
    scope = Scope(("c0", "c1", "c2"), 100.0, ("a", "b"), seconds=2.0)
    for k in range(50):
        label = Label.TARGET if k >= 40 else Label.NON_TARGET
        scope(
            _chunk(10 * k, 10, t_arrival=5.0 + 0.1 * k),
            _state(0.1 * k + 0.09, label, score=k, feats=(k, -k)),
        )
    dec = scope.decisions(1.0)
    assert dec.t[-1] == pytest.approx(4.99)
    assert dec.t[0] >= dec.t[-1] - 1.0
    assert dec.score[-1] == 49
    np.testing.assert_array_equal(dec.features[-1], [49, -49])
    assert LABELS[dec.label[-1]] is Label.TARGET
    assert effective_rate(dec.arrival, dec.n_samples, dec.t) == pytest.approx(100.0)


def _ev(event_kind, t=float("nan"), **payload):
    return Event(event_kind, payload, t, t_local=1.0)


def test_model_banner_only_for_self_disarm_and_stream_loss():
    m = ConsoleModel()
    m.apply([_ev("interlock", state="armed", reason="armed: gui_button")])
    m.apply([_ev("interlock", state="disarmed", reason=f"{GUI_REASON_PREFIX}: DISARM button")])
    assert m.banner is None
    m.apply([_ev("interlock", state="armed", reason="armed: gui_button")])
    m.apply([_ev("interlock", state="disarmed", reason="stale_data: stale: no sample for 0.5 s")])
    assert m.banner is not None
    assert "stale_data" in m.banner.text
    m.acknowledge()
    m.apply([_ev("health_event", health="lost", detail="outlet gone")])
    assert "STREAM LOST" in m.banner.text
    m.apply([_ev("health_event", health="restored", detail="")])
    assert "restored" in m.banner.text
    assert m.stream_state == "restored"


def test_model_raster_counts_and_rolling_minute():
    m = ConsoleModel()
    events = [
        _ev("attempt", t, fired=True, reason="fired", t_stream=t, latency_ms=0.4)
        for t in (0.0, 10.0, 65.0, 70.0)
    ]
    events.append(_ev("attempt", 71.0, fired=False, reason="refractory", detail="", t_stream=71.0))
    m.apply(events)
    assert (m.n_fired, m.n_vetoed) == (4, 1)
    assert m.fired_in_window(71.0) == 2  # 65 and 70 (10 is 61 s old)
    assert m.attempts[-1].tip == "vetoed: refractory"
    assert m.attempts[0].tip.startswith("fired")
    assert m.changed_attempts


def test_model_calibration_thresholds_and_estop():
    m = ConsoleModel()
    m.apply([_ev("calibration", phase="started", source="auto")])
    assert m.calibration_phase == "started"
    m.apply(
        [
            _ev(
                "calibration",
                phase="done",
                source="auto",
                baseline={"alpha@posterior": {"median": -11.0, "mad": 0.2}},
            )
        ]
    )
    assert m.baseline == {"alpha@posterior": (-11.0, 0.2)}
    m.apply([_ev("thresholds", enter=1.5, leave=0.2, source="mqtt")])
    assert m.thresholds == (1.5, 0.2)
    assert m.changed_thresholds
    m.apply([_ev("emergency_stop", source="mqtt")])
    assert m.estopped
    assert "EMERGENCY STOP" in m.banner.text


def test_scope_reader_on_the_writers_buffer_sees_samples_and_state():
    """The console attaches a second Scope to the session process's buffer (shared memory)."""
    names, feats = ("c0", "c1", "c2"), ("a", "b")
    size = Scope.buffer_size(len(names), 100.0, len(feats), seconds=1.0)
    buf = bytearray(size)
    writer = Scope(names, 100.0, feats, seconds=1.0, buffer=buf)
    reader = Scope(names, 100.0, feats, seconds=1.0, buffer=buf, init=False)
    assert reader.n_samples == 0
    assert reader.last_state is None
    for k in range(40):
        label = Label.TARGET if k == 39 else Label.NON_TARGET
        writer(_chunk(10 * k, 10, t_arrival=7.0 + k), _state(0.1 * k, label, score=k))
    assert (reader.n_samples, reader.n_decisions) == (400, 40)
    assert reader.last_arrival == 46.0
    np.testing.assert_array_equal(reader.samples(1.0).data, writer.samples(1.0).data)
    np.testing.assert_array_equal(reader.decisions(1.0).features, writer.decisions(1.0).features)
    st = reader.last_state  # rebuilt from the buffer's scalar fields
    assert st.label is Label.TARGET
    assert st.score == 39
    assert st.t_stream == pytest.approx(3.9)
    assert writer.last_state is not st  # the writer keeps its own State object
    with pytest.raises(ValueError, match="scope buffer"):
        Scope(names, 100.0, feats, seconds=1.0, buffer=bytearray(size - 1))


def test_model_and_health_line_follow_the_participant_audio_device():
    from closedloop.session import SessionSnapshot
    from gui.panels import audio_text

    m = ConsoleModel()
    assert audio_text(m, SessionSnapshot()) == ""  # no feedback audio: no line
    assert "WAV" in audio_text(m, SessionSnapshot(audio_device="wav"))
    m.apply([_ev("audio_device", state="open", detail="", backend="PulseAudio")])
    line = audio_text(m, SessionSnapshot(audio_device="open"))
    assert ">open<" in line
    assert "PulseAudio" in line
    m.apply([_ev("audio_device", state="lost", detail="no audio callback for 3.0 s")])
    line = audio_text(m, SessionSnapshot(audio_device="open"))  # the event is newer
    assert "LOST" in line
    assert "no audio callback for 3.0 s" in line
    assert "lost 1x, reopened 0x" in line
    assert m.banner is None  # the session goes on: no alarm banner for the participant's sound
    m.apply([_ev("audio_device", state="reopened", detail="output back after loss 1")])
    line = audio_text(m, SessionSnapshot(audio_device="reopened"))
    assert ">reopened<" in line
    assert "lost 1x, reopened 1x" in line
    assert "no audio callback" not in line


def test_model_calibration_progress_failure_and_bad_channels():
    """Issue 20: the console shows what holds the baseline back, a failure as a red banner, and
    the bad channels with the baseline's own score spread."""
    m = ConsoleModel()
    m.apply([_ev("calibration", phase="started", source="auto")])
    m.apply(
        [
            _ev(
                "calibration",
                phase="progress",
                clean_s=12.0,
                target_s=45.0,
                recent_flagged=0.6,
                recent_s=10,
                top=[["amplitude:Fp1", 0.5], ["muscle:T8", 0.2]],
                bad_channels={"CP6": "flat"},
            )
        ]
    )
    assert "60% of the last 10 s held back by artifacts: amplitude:Fp1 50%" in m.calibration_note
    assert m.bad_channels == {"CP6": "flat"}
    m.apply([_ev("calibration", phase="failed", reason="calibration failed at calibration_max_s")])
    assert m.calibration_phase == "failed"
    assert m.banner is not None
    assert "CALIBRATION FAILED" in m.banner.text
    m.apply([_ev("calibration", phase="started", source="console")])
    m.apply(
        [
            _ev(
                "calibration",
                phase="done",
                baseline={},
                baseline_score={"p10": -1.2, "p50": 0.0, "p90": 1.3, "above_enter": 0.01},
                bad_channels={"C4": "deviation"},
            )
        ]
    )
    assert "p10/p50/p90 -1.2/+0.0/+1.3" in m.calibration_note
    assert "bad: C4" in m.calibration_note

"""The example decider, tested as a lab would test its own: closedloop's pytest plugin
(`offline_session`, `replayed_stream`) on closedloop's bundled recording."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from logreg_decider import fit_logistic

from closedloop.bundled import BUNDLED
from closedloop.config import apply_overrides, load_config
from closedloop.errors import ConfigError

pytestmark = pytest.mark.timeout(240)
DECIDER = {"state.decider": "logreg", "state.enter": 2.5, "state.leave": 0.0}


def test_fit_finds_the_direction_that_separates_the_classes():
    rng = np.random.default_rng(0)
    rest = rng.standard_normal((400, 2))
    target = rest + np.array([2.0, 0.0])  # only the first feature moves
    y = np.r_[np.zeros(400), np.ones(400)]
    w = fit_logistic(np.vstack([rest, target]), y, 1.0, 25)
    assert w[0] > 1.5
    assert abs(w[1]) < 0.3
    assert abs(w[2] + w[0]) < 0.5  # the boundary sits halfway: intercept ~ -2 w0 / 2


def test_the_entry_point_name_finds_the_class_and_bad_settings_are_named():
    config = apply_overrides(load_config(None), DECIDER)
    assert config.state.decider == "logreg"
    with pytest.raises(ConfigError, match=r"decider_settings\.l2: .*greater than 0"):
        apply_overrides(config, {"state.decider_settings": {"l2": -1}})


def test_offline_it_fires_in_the_meditation_epochs_and_reports_its_cost(offline_session):
    run = offline_session(BUNDLED, None, **DECIDER)
    assert run.summary["pulses"] >= 2
    assert run.score("meditation")["precision"] >= 0.8
    cost = run.summary["decider"]["cost_us"]
    assert cost["n"] > 1000
    assert cost["p50"] > 0
    scores = np.array([s["score"] for s in run.states if s["label"] in ("target", "non_target")])
    assert np.all(np.isfinite(scores))


def test_an_unknown_feature_is_refused_when_the_session_is_built(offline_session):
    bad = {**DECIDER, "state.decider_settings": {"target_shift_z": {"gamma@nowhere": 1.0}}}
    with pytest.raises(Exception, match=r"gamma@nowhere.*not features of this config"):
        offline_session(BUNDLED, None, **bad)


@pytest.mark.lsl
def test_live_on_a_replayed_stream_it_decides_exactly_as_offline(
    replayed_stream, offline_session, tmp_path
):
    """The recording streamed at 6x by a replayer process, and offline on the same samples
    (`as_streamed`): the same decisions, state by state (label and score at each 10-sample
    step of the session), and the same pulse requests. Live, chunks arrive as the stream
    delivers them (bursts of 40-80 ms under CI load); with a decider the session still decides
    on its own sample grid, which is what makes this exact."""
    from acquisition.readers import load_recording
    from acquisition.sources import source_from_settings
    from closedloop.load import load_session
    from closedloop.session import Session
    from closedloop.testing import as_streamed

    stream = replayed_stream(BUNDLED, speed=6.0)
    config = apply_overrides(
        load_config(None), {**DECIDER, **stream.overrides, "source.resolve_timeout_s": 30.0}
    )
    session = Session(config, source_from_settings(config.source), live=True, out_root=tmp_path,
                      arm_action="test_arm")  # fmt: skip
    states = session.bus.subscribe("test", maxlen=1_000_000, kinds={"state"})

    def stop_when_replay_ends():
        stream.process.wait()
        threading.Event().wait(2.0)  # let the loop drain the tail
        session.stop("replay finished")

    threading.Thread(target=stop_when_replay_ends, daemon=True).start()
    summary = session.run()
    live = [e.payload for e in states.drain()]
    rec = load_session(session.folder)
    first = next(e for e in rec.events if e.get("kind") == "first_sample")
    k = round((first["t_stream"] - rec.t0_stream) * 500.0)  # 0: the replayer waits for us
    offline = offline_session(as_streamed(load_recording(BUNDLED).crop(tmin=k / 500.0)), config)

    def decisions(states):
        return [(s["label"], f"{s['score']:.6f}") for s in states]

    n = len(offline.states)
    assert summary["samples"] // 10 in (n - 1, n)  # the offline run's tail is a decision too
    assert decisions(live) == decisions(offline.states)[: len(live)], k
    assert sum(1 for s in live if s["label"] == "target") > 50
    t_live = [a["t_stream"] - rec.t0_stream for a in rec.audit if a.get("event") == "attempt"]
    assert len(t_live) == len(offline.requested) >= 2, (t_live, offline.requested)
    assert np.max(np.abs(np.subtract(offline.requested + k / 500.0, t_live))) < 0.004

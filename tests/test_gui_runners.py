"""One contract for both session runners of the console (gui.runner.Runner).

The same test runs against the thread runner (gui/runner.py, `SessionRunner`) and the process
runner (gui/procrunner.py, `ProcessRunner`) on a replayed LSL stream: what the window relies on
(start, scope, events, `Session.snapshot()`, commands, latency, stop with a summary) behaves the
same whichever runs the session. No Qt here.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import numpy as np
import pytest

from closedloop.control import ControlError
from closedloop.session import SessionSnapshot
from gui.procrunner import ProcessRunner
from gui.runner import Runner, SessionRunner, SourceSpec
from tests.test_gui_console import CONNECT_TIMEOUT_MS, _config

RUNNERS = [SessionRunner, ProcessRunner]
METHODS = ("start", "stop", "poll", "snapshot", "latency_samples")
PROPERTIES = ("running", "started", "ready")  # events_dropped: a plain attribute may serve


def _wait(pred, timeout_s: float, what: str, runner) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        runner.poll()
        if runner.error is not None:
            pytest.fail(f"{what}: the session failed: {runner.error_text}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout_s} s")
        time.sleep(0.02)


@pytest.mark.parametrize("runner_class", RUNNERS, ids=lambda c: c.__name__)
def test_runner_classes_have_the_protocols_members_and_signatures(runner_class):
    for name in METHODS:
        want = inspect.signature(getattr(Runner, name))
        got = inspect.signature(getattr(runner_class, name))
        assert list(got.parameters) == list(want.parameters), name
        defaults = {k: p.default for k, p in want.parameters.items()}
        assert {k: p.default for k, p in got.parameters.items()} == defaults, name
    for name in PROPERTIES:
        assert isinstance(inspect.getattr_static(runner_class, name), property), name


@pytest.mark.lsl
@pytest.mark.timeout(120)
@pytest.mark.parametrize("runner_class", RUNNERS, ids=lambda c: c.__name__)
def test_runner_contract_on_a_replayed_stream(
    runner_class, tmp_path, unique_name, looping_replayer
):
    config = _config(unique_name)
    runner = runner_class(config, SourceSpec(), out_root=tmp_path)
    assert isinstance(runner, Runner)
    assert not runner.started
    assert not runner.running
    assert not runner.ready
    before = runner.snapshot()
    assert isinstance(before, SessionSnapshot)
    assert before.phase == "idle"
    assert not before.ready
    assert runner.start() is runner
    assert runner.started

    # the scope fills and the snapshot says what the window shows
    _wait(
        lambda: runner.scope is not None and runner.scope.n_decisions > 0,
        CONNECT_TIMEOUT_MS / 1000,
        "scope data",
        runner,
    )
    _wait(lambda: runner.snapshot().ready, 5.0, "snapshot ready", runner)
    snap = runner.snapshot()
    assert runner.running
    assert runner.ready
    assert snap.phase in ("calibrating", "running")
    assert snap.thresholds == (config.state.enter, config.state.leave)
    assert snap.session_cap == config.safety.session_cap
    assert snap.max_per_minute == config.safety.max_per_minute
    assert snap.min_interval_s == config.safety.min_interval_s
    assert snap.interlock == "disarmed"
    assert not snap.locked_out
    assert Path(snap.folder).parent == tmp_path
    events = runner.subscription.drain()
    assert any(e.kind == "session" and e.payload.get("phase") == "started" for e in events)
    assert runner.subscription.dropped == runner.events_dropped == 0

    # commands through `session`: accepted ones show in the next snapshots, refused ones raise
    runner.session.set_thresholds(1.5, -1.5, source="contract test")
    _wait(lambda: runner.snapshot().thresholds == (1.5, -1.5), 2.0, "thresholds", runner)
    with pytest.raises(ControlError):
        runner.session.set_thresholds(-1.0, 1.0, source="contract test")
    runner.session.disarm("contract test")
    _wait(lambda: runner.latency_samples().size > 0, 3.0, "latency samples", runner)
    lat = runner.latency_samples()
    assert isinstance(lat, np.ndarray)
    assert np.all(np.isfinite(lat))
    assert np.all(lat >= 0)

    # stop: disarmed, ended, a summary
    assert runner.stop("contract test ended", 20.0)
    runner.poll()  # harmless after the end
    assert not runner.running
    assert runner.error is None
    assert runner.summary is not None
    assert "contract test ended" in runner.summary["stop_reason"]
    assert runner.summary["final_interlock"] == "disarmed"
    assert runner.snapshot().phase == "stopped"

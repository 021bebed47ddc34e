"""closedloop's pytest plugin (closedloop/testing.py): its fixtures here, and in a lab's own
project (a test file outside this repository, run by pytest through the entry point)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from closedloop.testing import score_pulses
from tests.session_helpers import REPLAY_DATA

pytestmark = pytest.mark.timeout(120)
BUNDLED = REPLAY_DATA / "sim_32ch_500hz.fif"


def test_offline_session_returns_pulses_states_and_the_tuners_scores(offline_session):
    run = offline_session(BUNDLED, "configs/default.yaml")
    assert run.summary["pulses"] == len(run.fired) > 0
    assert len(run.states) == run.summary["fingerprint"]["decisions"]
    assert {"t_stream", "label", "score", "z", "artifacts"} <= set(run.states[0])
    labels = {s["label"] for s in run.states}
    assert {"calibrating", "target", "non_target"} <= labels
    epochs = run.epochs_of("meditation")
    assert epochs.shape[1] == 2
    assert len(epochs) >= 2
    # the run's score is the tuner's, and a pulse train scored by hand agrees with it
    scores = run.score()  # default: the config's target_name ('meditation')
    inside = sum(any(a <= t < b for a, b in epochs) for t in run.fired)
    assert scores["precision"] == pytest.approx(inside / len(run.fired))
    assert scores["n_pulses"] == len(run.fired)
    window = (run.fired.min() - 1.0, run.states[-1]["t_stream"])
    assert score_pulses(run.fired, epochs, window)["precision"] == scores["precision"]
    # a second run of the same config decides the same, in its own folder
    again = offline_session(BUNDLED, "configs/default.yaml")
    assert again.folder != run.folder
    assert again.fingerprint == run.fingerprint
    higher = offline_session(BUNDLED, "configs/default.yaml", **{"state.enter": 4.0})
    assert len(higher.fired) <= len(run.fired)
    assert higher.fingerprint != run.fingerprint


def test_score_pulses_counts_hits_precision_and_delay():
    epochs = np.array([[10.0, 20.0], [40.0, 50.0], [70.0, 72.0]])  # the last is too short
    got = score_pulses([12.0, 13.0, 30.0, 71.0], epochs, (0.0, 100.0))
    assert got["hit_rate"] == 0.5  # 1 of the 2 epochs of at least 5 s
    assert got["precision"] == 0.75  # 71.0 is inside an epoch, even a short one
    assert got["delay_median_s"] == 2.0
    assert got["n_pulses"] == 4


@pytest.mark.lsl
def test_replayed_stream_is_a_real_lsl_stream_with_a_unique_name(replayed_stream):
    from acquisition.lsl_source import LslSource

    a = replayed_stream(REPLAY_DATA / "sim_4ch_256hz.fif", loop="forever")
    b = replayed_stream(REPLAY_DATA / "sim_4ch_256hz.fif", loop="forever")
    assert a.name != b.name
    assert a.overrides["source.name"] == a.name
    src = LslSource(name=a.name, source_id=a.source_id, resolve_timeout_s=30.0).connect()
    try:
        n = 0
        for _ in range(200):
            n += src.pull(0.05).n_samples
            if n >= 256:
                break
        assert n >= 256
        assert src.sfreq == 256.0
        assert len(src.ch_names) >= 4
    finally:
        src.disconnect()
    assert a.process.poll() is None  # stopped by the fixture after the test


LAB_TEST = """
from pathlib import Path

REC = Path({rec!r})


def test_lab_config(offline_session):
    run = offline_session(REC, None, **{{"state.calibration_s": 30.0}})
    assert run.summary["stop_reason"] == "end of recording"
    assert run.score("meditation")["n_pulses"] == len(run.fired)
"""


def test_a_lab_project_gets_the_fixtures_through_the_entry_point(tmp_path):
    """No conftest, no import of ours in the test file: pytest finds the plugin as installed."""
    (tmp_path / "test_lab.py").write_text(textwrap.dedent(LAB_TEST.format(rec=str(BUNDLED))))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_lab.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout

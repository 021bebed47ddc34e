"""closedloop's pytest plugin: replay recordings and run configs in a lab's own tests.

Installed with the package and registered through the `pytest11` entry point, so a project that
depends on closedloop gets these fixtures in any test, with no conftest:

- `replayed_stream(recording, speed=1.0, ...) -> ReplayedStream`: the recording played as a real
  LSL stream by `python -m acquisition.replayer` in its own process, under a name and source id
  unique to the test; the process is stopped when the test ends. `stream.overrides` point a
  config's `source` at it.
- `offline_session(recording, config=None, **overrides) -> OfflineRun`: a config (a path, a
  `SessionConfig`, or None for the defaults) run offline on a recording, exactly as `closedloop
  offline` runs it, in the test's temporary folder; the run holds the summary, the audit lines,
  the fired and requested pulse times, every state, and the decision fingerprint.
- `as_streamed(recording)`: the recording's samples exactly as a live session receives them from
  `replayed_stream` (float32 on the wire), so an offline run on it decides as the live one did.
- `score_pulses(times, epochs, window)` and `OfflineRun.score(target)`: precision, hits and delay
  against annotated target epochs, with the tuner's definitions (`closedloop.tuning.scoring`).

Example (a lab's own test of its own config):

    def test_our_config_fires_only_in_meditation(offline_session):
        run = offline_session("data/pilot01.fif", "configs/our_lab.yaml", **{"state.enter": 2.0})
        assert run.summary["pulses"] > 0
        assert run.score("meditation")["precision"] >= 0.9

Everything heavy (mne, pylsl, the session) is imported when a fixture is used, so having the
plugin installed costs a pytest run nothing.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@dataclass
class ReplayedStream:
    """A recording streaming over LSL from its own process (see `replayed_stream`)."""

    name: str
    source_id: str
    recording: Path
    process: Any  # subprocess.Popen

    @property
    def overrides(self) -> dict[str, Any]:
        """Config overrides (`apply_overrides`) that point `source` at this stream."""
        return {"source.kind": "lsl", "source.name": self.name, "source.source_id": self.source_id}


@dataclass
class OfflineRun:
    """What one offline session did (see `offline_session`).

    fired / requested: stream times (s) of the fired pulses / of every pulse request.
    states: one dict per decision: t_stream (s), label, score, features, z, artifacts.
    epochs_of(label): the recording's annotated epochs named `label`, (n, 2) stream seconds.
    """

    folder: Path
    summary: dict[str, Any]
    audit: list[dict[str, Any]]
    states: list[dict[str, Any]]
    annotations: Any = field(repr=False)  # mne.Annotations in stream time (FileSource's)

    @property
    def attempts(self) -> list[dict[str, Any]]:
        return [a for a in self.audit if a.get("event") == "attempt"]

    @property
    def fired(self) -> np.ndarray:
        return np.array([a["t_stream"] for a in self.attempts if a["fired"]], dtype=float)

    @property
    def requested(self) -> np.ndarray:
        return np.array([a["t_stream"] for a in self.attempts], dtype=float)

    @property
    def fingerprint(self) -> str:
        return self.summary["fingerprint"]["sha256"]

    def epochs_of(self, label: str) -> np.ndarray:
        from closedloop.tuning.scoring import target_epochs

        return target_epochs(self.annotations, label)

    def score(self, label: str | None = None, min_epoch_s: float = 5.0) -> dict[str, float]:
        """The tuner's metrics of the fired pulses against the epochs named `label` (default:
        the config's `state.target_name`), over the window the tuner scores (from arming, or
        calibration, to the end): hit_rate, precision, false_per_min, delay_median_s, ..."""
        from closedloop.tuning.scoring import metrics, read_outcome, score_outcome

        label = label or self._target_name()
        counts = score_outcome(read_outcome(self.folder), self.epochs_of(label), min_epoch_s)
        return metrics(counts["fired"])

    def _target_name(self) -> str:
        import yaml

        config = yaml.safe_load((self.folder / "config.yaml").read_text(encoding="utf-8"))
        return str(config["state"]["target_name"])


def score_pulses(
    times: Sequence[float] | np.ndarray,
    epochs: np.ndarray,
    window: tuple[float, float],
    min_epoch_s: float = 5.0,
) -> dict[str, float]:
    """Pulse times (s) against target epochs (n, 2) within `window` (s): the tuner's metrics
    (hit_rate, precision, false_per_min, delay_median_s, delay_p90_s, pulses_per_min, n_pulses;
    nan where undefined). Epochs shorter than `min_epoch_s` count for precision, not hits."""
    from closedloop.tuning.scoring import count, metrics

    return metrics(count(times, epochs, window, min_epoch_s))


def run_offline(
    recording: str | Path | Any,
    config: str | Path | Any = None,
    *,
    out_root: str | Path,
    arm: bool = True,
    **overrides: Any,
) -> OfflineRun:
    """Run `config` (YAML path, SessionConfig or None) with `overrides` (dotted keys, as
    `--set`) offline on `recording` (a path or an mne Raw), as `closedloop offline` does."""
    from acquisition.file_source import FileSource
    from closedloop.config import SessionConfig, apply_overrides, load_config
    from closedloop.load import read_jsonl
    from closedloop.session import Session

    if config is None or isinstance(config, str | Path):
        config = load_config(config)
    elif not isinstance(config, SessionConfig):
        raise TypeError(f"config: a path, a SessionConfig or None, not {type(config).__name__}")
    if overrides:
        config = apply_overrides(config, overrides)
    source = FileSource(recording, chunk_size=config.source.chunk_size)
    session = Session(
        config,
        source,
        live=False,
        out_root=Path(out_root),
        arm_action="offline_run" if arm else None,
    )
    states_queue = session.bus.subscribe("closedloop.testing", maxlen=10_000_000, kinds={"state"})
    summary = session.run()
    states = [{"t_stream": e.t_stream, **e.payload} for e in states_queue.drain()]
    assert session.folder is not None
    return OfflineRun(
        folder=session.folder,
        summary=summary,
        audit=read_jsonl(session.folder / "audit.jsonl"),
        states=states,
        annotations=source.annotations,
    )


def as_streamed(recording: Any) -> Any:
    """The recording (a path or an mne Raw, not modified) as a live session receives it from
    `replayed_stream`: the replayer sends float32, electrophysiological channels in microvolts,
    and `LslSource` turns them back into volts in float64. A session with a decider plugin
    decides on the same sample grid live and offline (`source.chunk_size`), so an offline run
    on `as_streamed(rec)` makes the decisions of a live session on the replay of `rec`
    exactly: the same labels and scores at the same samples."""
    from acquisition.readers import load_recording
    from acquisition.replayer import MICROVOLT_TYPES

    raw = load_recording(recording) if isinstance(recording, str | Path) else recording.copy()
    raw.load_data()
    types = raw.get_channel_types()
    volts = [k for k, t in enumerate(types) if t in MICROVOLT_TYPES]
    other = [k for k, t in enumerate(types) if t not in MICROVOLT_TYPES]
    # the replayer's wire format (float32 microvolts), then LslSource's scaling back to volts
    raw.apply_function(_through_float32_microvolts, picks=volts, channel_wise=False)
    if other:
        raw.apply_function(_through_float32, picks=other, channel_wise=False)
    return raw


def _through_float32_microvolts(x: np.ndarray) -> np.ndarray:
    return np.multiply((x * 1e6).astype(np.float32), 1e-6, dtype=np.float64)


def _through_float32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(np.float64)


def _unique_name(request: pytest.FixtureRequest) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name[:40])
    return f"cltest-{safe}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def replayed_stream(request: pytest.FixtureRequest) -> Iterator[Callable[..., ReplayedStream]]:
    """Factory: `replayed_stream(recording, speed=1.0, loop="1", start_s=0.0)` starts a replayer
    process for `recording` under a unique name; every one is stopped after the test. The stream
    starts with its first consumer (the replayer waits up to 60 s), so nothing is missed."""
    from acquisition.replayer_process import start_replayer_process, stop_replayer_process

    started: list[Any] = []

    def start(
        recording: str | Path, *, speed: float = 1.0, loop: str = "1", start_s: float = 0.0
    ) -> ReplayedStream:
        name = _unique_name(request)
        proc = start_replayer_process(
            Path(recording), name, name, speed=speed, loop=loop, start_s=start_s
        )
        started.append(proc)
        return ReplayedStream(name, name, Path(recording), proc)

    yield start
    for proc in started:
        stop_replayer_process(proc)


@pytest.fixture
def offline_session(tmp_path: Path) -> Callable[..., OfflineRun]:
    """Factory: `offline_session(recording, config=None, arm=True, **overrides) -> OfflineRun`,
    each run in its own folder under the test's `tmp_path`."""
    counter = itertools.count()

    def run(recording: str | Path | Any, config: Any = None, **kwargs: Any) -> OfflineRun:
        return run_offline(recording, config, out_root=tmp_path / f"run{next(counter)}", **kwargs)

    return run

"""source_from_settings: one way from a config's `source` section to a source (CLI, console,
demo), and `kind: file` played through the live path by `closedloop run`."""

from __future__ import annotations

import json

import pytest
import yaml

from acquisition.file_source import FileSource
from acquisition.lsl_source import LslSource
from acquisition.sources import FilePlaybackSource, source_from_settings
from closedloop.app.cli import main
from closedloop.config import SessionConfig, apply_overrides
from tests.lsl_helpers import make_recording, save_recording_fif


def test_kinds_and_picks(tmp_path):
    path = save_recording_fif(make_recording(duration_s=1.0), tmp_path)
    lsl = apply_overrides(SessionConfig(), {"source.jitter_tolerance_ms": 35.0}).source
    src = source_from_settings(lsl)
    assert type(src) is LslSource
    assert src._jitter_tolerance_s == pytest.approx(0.035)
    file = apply_overrides(SessionConfig(), {"source.kind": "file", "source.path": str(path)})
    assert isinstance(source_from_settings(file.source, live=False), FileSource)
    playback = source_from_settings(file.source)
    assert isinstance(playback, FilePlaybackSource)
    assert playback.stream_name.startswith("closedloop-playback-")
    # a stream picked in the console is LSL whatever the kind
    picked = source_from_settings(file.source, name="amp", source_id="x")
    assert type(picked) is LslSource
    assert picked._pred.startswith("name='amp'")


@pytest.mark.lsl
@pytest.mark.slow
def test_run_on_a_file_goes_through_the_live_path_to_the_end(tmp_path, capsys):
    path = save_recording_fif(make_recording(duration_s=4.0), tmp_path)
    cfg = tmp_path / "file.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "source": {"kind": "file", "path": str(path), "stype": None},
                "recording": {"xdf": False},
                "session": {"publish_lsl": False},
            }
        )
    )
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "end of recording" in out
    (folder,) = (tmp_path / "out").iterdir()
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e.get("phase") == "started")
    assert started["live"] is True  # the live path: LSL, health checks, clock model
    assert started["source_id"].startswith("closedloop-playback-")
    health = [e.get("health") for e in events if e.get("kind") == "health_event"]
    assert health == ["connected"], health  # no gap, stale or lost: read to the end, cleanly

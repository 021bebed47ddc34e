"""Start order does not matter: a source (and `closedloop run`) started before the amplifier
waits visibly; a stream that comes back with another layout is refused and stays refused."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pylsl
import pytest
import yaml

from acquisition.chunk import HealthKind
from acquisition.lsl_source import LslSource
from tests.lsl_helpers import new_stream_name, pull_until


def outlet(name: str, n_ch: int = 3, sfreq: float = 250.0) -> pylsl.StreamOutlet:
    info = pylsl.StreamInfo(name, "EEG", n_ch, sfreq, pylsl.cf_float32, name)
    chans = info.desc().append_child("channels")
    for k in range(n_ch):
        chans.append_child("channel").append_child_value("label", f"E{k}")
    return pylsl.StreamOutlet(info)


@pytest.mark.lsl
def test_a_source_started_before_the_amplifier_waits_visibly_then_connects():
    name = new_stream_name("late")
    said: list[str] = []
    holder: list[pylsl.StreamOutlet] = []
    later = threading.Timer(2.6, lambda: holder.append(outlet(name)))
    later.start()
    try:
        t0 = time.monotonic()
        src = LslSource(name=name, resolve_timeout_s=30.0, on_wait=said.append).connect()
        waited = time.monotonic() - t0
        assert 2.5 < waited < 10.0
        assert src.ch_names == ("E0", "E1", "E2")
        assert len(said) >= 2
        assert said[0].startswith(f"waiting for stream name={name!r}, 1 s")
        assert said[1].startswith(f"waiting for stream name={name!r}, 2 s")
        assert "gives up after 30 s" in said[0]
        src.disconnect()
    finally:
        later.join()


@pytest.mark.lsl
def test_run_before_any_stream_says_it_waits_then_lists_what_it_found(tmp_path):
    name = new_stream_name("never")
    other = new_stream_name("other")
    keep = outlet(other)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump({"source": {"name": name, "resolve_timeout_s": 2.5}, "recording": {}})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "closedloop.app.cli", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        check=False,
    )
    del keep
    assert proc.returncode == 2, proc.stderr
    waits = [ln for ln in proc.stderr.splitlines() if "waiting for stream" in ln]
    assert len(waits) >= 2, proc.stderr
    assert f"No LSL stream matches (name={name!r}, type='EEG') within 2.5 s." in proc.stderr
    assert "Visible streams:" in proc.stderr
    assert other in proc.stderr  # what was found instead


@pytest.mark.lsl
def test_a_stream_back_with_another_layout_is_refused_until_the_original_returns():
    name = new_stream_name("layout")
    first = outlet(name)
    src = LslSource(name=name, source_id=name, counter_channel=None).connect()
    try:
        first.push_chunk(np.zeros((20, 3), np.float32))
        pull_until(src, lambda p: sum(c.n_samples for c in p.chunks) >= 20, 10.0)
        del first  # the amplifier app quits: LOST
        lost = pull_until(src, lambda p: HealthKind.LOST in p.kinds(), 10.0)
        assert HealthKind.LOST in lost.kinds()
        wider = outlet(name, n_ch=4)  # back, with a channel more
        refused = pull_until(src, lambda p: HealthKind.MISMATCH in p.kinds(), 20.0)
        (event,) = refused.of(HealthKind.MISMATCH)
        assert event.is_fault
        assert "another layout, refused: 3 ch @ 250 Hz" in event.detail
        assert "-> 4 ch @ 250 Hz" in event.detail
        assert src.lost
        assert src.n_channels == 3  # the pipeline's layout is kept
        wider.push_chunk(np.zeros((20, 4), np.float32))
        more = pull_until(src, lambda p: bool(p.chunks), 1.5)
        assert not more.chunks  # nothing read from the refused stream
        assert HealthKind.MISMATCH not in more.kinds()  # said once
        del wider
        again = outlet(name)  # the original layout: accepted (RESTORED never re-arms)
        back = pull_until(src, lambda p: HealthKind.RESTORED in p.kinds(), 20.0)
        assert HealthKind.RESTORED in back.kinds()
        assert not src.lost
        del again
    finally:
        src.disconnect()

"""`closedloop streams`: the LSL streams on the network, once or refreshed."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time

import pylsl
import pytest

from closedloop.app.cli import main
from tests.lsl_helpers import new_stream_name


def outlet(name: str, labels: bool, fmt=pylsl.cf_float32, sfreq: float = 250.0):
    info = pylsl.StreamInfo(name, "EEG", 3, sfreq, fmt, f"{name}-sid")
    if labels:
        chans = info.desc().append_child("channels")
        for label in ("Fz", "Cz", "Pz"):
            chans.append_child("channel").append_child_value("label", label)
    return pylsl.StreamOutlet(info)


def row(text: str, name: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    assert len(lines) == 1, text
    return lines[0].split()


@pytest.mark.lsl
def test_streams_lists_name_type_channels_rate_format_source_host_and_labels(capsys):
    named, bare = new_stream_name("named"), new_stream_name("bare")
    keep = [outlet(named, True), outlet(bare, False, pylsl.cf_double64, 1000.0)]
    assert main(["streams", "--timeout", "1.5"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "NAME", "TYPE", "CH", "RATE", "FORMAT", "SOURCE_ID", "HOST", "LABELS"
    ]  # fmt: skip
    host = socket.gethostname()
    assert row(out, named) == [
        named,
        "EEG",
        "3",
        "250",
        "Hz",
        "float32",
        f"{named}-sid",
        host,
        "yes",
    ]
    assert row(out, bare) == [
        bare, "EEG", "3", "1000", "Hz", "float64", f"{bare}-sid", host, "no", "(by", "index)"
    ]  # fmt: skip
    del keep


def test_streams_rejects_a_bad_timeout(capsys):
    assert main(["streams", "--timeout", "0"]) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err


@pytest.mark.lsl
def test_streams_watch_shows_a_stream_that_appears_later_and_stops_on_ctrl_c():
    name = new_stream_name("late")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "PYTHONUNBUFFERED": "1"}
    cmd = ["-m", "closedloop.app.cli", "streams", "--watch", "0.3", "--timeout", "0.5"]
    proc = subprocess.Popen(
        [sys.executable, *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    text = ""
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        while "LSL streams (every" not in text and time.monotonic() < deadline:
            if sel.select(0.2):
                text += os.read(proc.stdout.fileno(), 65536).decode()
        assert name not in text
        keep = outlet(name, True)
        while name not in text and time.monotonic() < deadline:
            if sel.select(0.2):
                text += os.read(proc.stdout.fileno(), 65536).decode()
        assert name in text  # a later refresh lists it
        del keep
        sel.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        proc.stdout.close()

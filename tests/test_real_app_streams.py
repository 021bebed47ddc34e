"""Streams as amplifier apps send them: no channel labels, no units, a trigger channel inside
the EEG stream, float64 and integer formats; real LSL outlets, and a live Session on one."""

from __future__ import annotations

import threading

import numpy as np
import pylsl
import pytest

from acquisition.lsl_source import LslSource
from acquisition.sources import source_from_settings
from closedloop.config import SessionConfig, apply_overrides
from closedloop.session import Session
from tests.lsl_helpers import new_stream_name, pull_until

FORMATS = {
    "float64": (pylsl.cf_double64, np.float64),
    "int32": (pylsl.cf_int32, np.int32),
    "int16": (pylsl.cf_int16, np.int16),
}


def app_outlet(name, labels=None, types=None, units=None, fmt=pylsl.cf_float32, n_ch=4):
    """An outlet with only what the app fills in (None: that field is absent)."""
    info = pylsl.StreamInfo(name, "EEG", n_ch, 250.0, fmt, name)
    if labels or types or units:
        chans = info.desc().append_child("channels")
        for k in range(n_ch):
            ch = chans.append_child("channel")
            if labels:
                ch.append_child_value("label", labels[k])
            if types:
                ch.append_child_value("type", types[k])
            if units:
                ch.append_child_value("unit", units[k])
    return pylsl.StreamOutlet(info)


@pytest.mark.lsl
def test_no_labels_and_no_units_are_named_by_index_assumed_microvolts_and_said():
    name = new_stream_name("bare")
    keep = app_outlet(name)
    with LslSource(name=name) as src:
        assert src.ch_names == ("ch0", "ch1", "ch2", "ch3")
        np.testing.assert_allclose(src.scales, 1e-6)
        text = " | ".join(src.warnings)
        assert "no channel labels: channels named by index (ch0 .. ch3)" in text
        assert "no unit for 4 EEG channel(s): assumed microvolts" in text
    # configurable: an app that sends millivolts without saying so
    with LslSource(name=name, missing_unit="millivolts") as src:
        np.testing.assert_allclose(src.scales, 1e-3)
        assert "assumed millivolts" in " | ".join(src.warnings)
    # a described stream has nothing to say
    named = new_stream_name("named")
    keep2 = app_outlet(named, ["Fz", "Cz", "Pz", "Oz"], units=["uV"] * 4)
    with LslSource(name=named) as src:
        assert src.warnings == []
    del keep, keep2


@pytest.mark.lsl
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_float64_and_integer_streams_are_read_exactly(fmt):
    code, dtype = FORMATS[fmt]
    name = new_stream_name(fmt)
    keep = app_outlet(name, ["Fz", "Cz", "Pz", "Oz"], units=["microvolts"] * 4, fmt=code)
    x = (np.arange(80).reshape(20, 4) * 7 - 100).astype(dtype)
    with LslSource(name=name, counter_channel=None) as src:
        src.pull()
        keep.push_chunk(x)
        got = pull_until(src, lambda p: sum(c.n_samples for c in p.chunks) >= 20, 10.0)
        assert src.info.channel_format == fmt
    np.testing.assert_array_equal(got.data, x.astype(np.float64) * 1e-6)
    assert got.data.dtype == np.float64
    del keep


@pytest.mark.lsl
def test_a_trigger_channel_inside_the_eeg_stream_is_not_eeg_by_type():
    name = new_stream_name("trig")
    keep = app_outlet(
        name, ["Fz", "Cz", "DIN", "Pz"], types=["EEG", "EEG", "STIM", "EEG"], units=None
    )
    with LslSource(name=name) as src:
        assert src.eeg_mask == (True, True, False, True)
        np.testing.assert_allclose(src.scales, [1e-6, 1e-6, 1.0, 1e-6])  # the trigger: as is
        assert "no unit for 3 EEG channel(s)" in " | ".join(src.warnings)
    del keep


@pytest.mark.lsl
@pytest.mark.slow
def test_a_live_session_on_an_int16_app_stream_with_a_trigger_channel(tmp_path):
    """The session excludes the STIM-typed channel (and a 'Trigger'-named one) from EEG and
    says in its summary that the unit was assumed."""
    name = new_stream_name("app")
    labels = ["Fz", "C3", "C4", "Pz", "DIN", "Trigger"]
    types = ["EEG", "EEG", "EEG", "EEG", "STIM", "EEG"]
    outlet = app_outlet(name, labels, types, units=None, fmt=pylsl.cf_int16, n_ch=6)
    config = apply_overrides(
        SessionConfig(),
        {
            "source.name": name,
            "source.stype": None,
            "source.counter_channel": None,
            "session.duration_s": 3.0,
            "session.publish_lsl": False,
            "recording.xdf": False,
        },
    )
    stop = threading.Event()

    def push() -> None:  # an app: 10 samples, stamped when pushed
        rng = np.random.default_rng(0)
        t_next = pylsl.local_clock()
        while not stop.is_set():
            t_next += 0.04
            stop.wait(max(0.0, t_next - pylsl.local_clock()))
            x = (rng.standard_normal((10, 6)) * 20).astype(np.int16)
            outlet.push_chunk(x, pylsl.local_clock())

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    try:
        session = Session(config, source_from_settings(config.source), live=True, out_root=tmp_path)
        summary = session.run()
    finally:
        stop.set()
        pusher.join(5)
    assert session.pipeline.chain.eeg_names == ("Fz", "C3", "C4", "Pz")
    assert any("assumed microvolts" in w for w in summary["warnings"]), summary["warnings"]
    assert "duration" in summary["stop_reason"]
    assert not [f for f in session.pipeline.faults if f.startswith(("gap", "clock_reset"))]

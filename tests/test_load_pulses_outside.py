"""load_session reports fired pulses that lie outside the recorded EEG instead of dropping them
(MNE's set_annotations would omit them with only a warning: issue 14, item 11)."""

from __future__ import annotations

import json
import warnings

import mne
import numpy as np
import pytest

from closedloop.load import PULSE, load_session

SFREQ = 100.0
T0 = 100.0  # stream time of the first sample (s)
N = 200  # 2 s of EEG: samples at 100.00 ... 101.99


def _folder(tmp_path, pulse_times: list[float | None]):
    folder = tmp_path / "s1"
    folder.mkdir()
    raw = mne.io.RawArray(
        np.zeros((2, N)), mne.create_info(["Fz", "Cz"], SFREQ, "eeg"), verbose="error"
    )
    raw.save(folder / "eeg_raw.fif", verbose="error")
    started = {"kind": "session", "phase": "started", "t0_stream": T0, "source_id": "x"}
    (folder / "events.jsonl").write_text(json.dumps(started) + "\n")
    lines = [{"event": "attempt", "fired": False, "reason": "refractory", "t_stream": 100.5}]
    for i, t in enumerate(pulse_times, start=1):
        lines.append({"event": "attempt", "fired": True, "pulse_number": i, "t_stream": t})
    (folder / "audit.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_pulses_outside_the_eeg_are_listed_not_dropped_silently(tmp_path):
    # inside: 101.0, the last sample 101.99, and 99.996 (within half a sample of the first);
    # outside: after the end, before the start, and a pulse without a time (null)
    times = [101.0, 101.99, T0 - 0.004, 102.5, 99.0, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MNE's "Omitted 1 annotation(s)" would raise here
        rec = load_session(_folder(tmp_path, times))
    onsets = rec.raw.annotations.onset[rec.raw.annotations.description == PULSE]
    np.testing.assert_allclose(sorted(onsets), [0.0, 1.0, 1.99], atol=1e-9)
    assert [p["t_stream"] for p in rec.pulses_outside] == [102.5, 99.0, None]
    assert [p["pulse_number"] for p in rec.pulses_outside] == [4, 5, 6]
    (note,) = [n for n in rec.notes if "outside the EEG" in n]
    assert note.startswith("3 of 6 fired pulse(s)")


def test_all_pulses_inside_leave_no_note(tmp_path):
    rec = load_session(_folder(tmp_path, [100.5, 101.5]))
    assert rec.pulses_outside == []
    assert not any("outside" in n for n in rec.notes)
    assert list(rec.raw.annotations.description).count(PULSE) == 2


@pytest.mark.parametrize(("t_pulse", "inside"), [(101.994, True), (101.996, False)])
def test_half_a_sample_past_the_last_is_the_edge(tmp_path, t_pulse, inside):
    rec = load_session(_folder(tmp_path, [t_pulse]))  # last sample at 101.99, half = 5 ms
    assert (rec.pulses_outside == []) is inside

"""The closed loop live: a replayer in its own process, real LSL, the session, the XDF record."""

from __future__ import annotations

import json
import threading

import numpy as np
import pylsl
import pytest

from acquisition.file_source import FileSource
from acquisition.lsl_source import LslSource
from closedloop.load import load_session, read_jsonl
from closedloop.session import Session
from tests.session_helpers import (
    REPLAY_DATA,
    bundled_recording,
    end_process,
    fast_config,
    fraction_inside,
    start_replayer,
    target_epochs,
)

pytestmark = [pytest.mark.lsl, pytest.mark.slow]
RECORDING = REPLAY_DATA / "sim_32ch_500hz.fif"
SPEED = 3.0


class MarkerListener(threading.Thread):
    """An external LSL inlet collecting every trigger marker of the session."""

    def __init__(self, stream_name: str) -> None:
        super().__init__(daemon=True)
        self.stream_name = stream_name
        self.markers: list[tuple[float, dict]] = []
        self.stop_event = threading.Event()
        self.connected = threading.Event()

    def run(self) -> None:
        found = pylsl.resolve_bypred(f"name='{self.stream_name}'", 1, 60)
        if not found:
            return
        inlet = pylsl.StreamInlet(found[0])
        inlet.open_stream(timeout=10)
        self.connected.set()
        while not self.stop_event.is_set():
            sample, ts = inlet.pull_sample(timeout=0.2)
            if sample is not None:
                self.markers.append((ts + inlet.time_correction(), json.loads(sample[0])))
        # drain what is left
        while True:
            sample, ts = inlet.pull_sample(timeout=0.5)
            if sample is None:
                break
            self.markers.append((ts + inlet.time_correction(), json.loads(sample[0])))


def run_live_session(name: str, tmp_path, config=None, arm=True, on_session=None):
    config = config or fast_config(**{"recording.xdf": True, "session.name": name})
    source = LslSource(name=name, source_id=name, stype=None, resolve_timeout_s=20.0)
    session = Session(
        config, source, live=True, out_root=tmp_path, arm_action="test_arm" if arm else None
    )
    if on_session is not None:
        on_session(session)
    summary = session.run()
    return session, summary


@pytest.mark.timeout(240)
def test_live_replay_fires_in_target_epochs_records_everything_and_matches_offline(
    unique_name, tmp_path
):
    replayer = start_replayer(RECORDING, unique_name, speed=SPEED)
    listener = MarkerListener(f"{unique_name}-pulses")
    listener.start()
    done = threading.Event()

    def stop_when_replayer_ends(session):
        def watch():
            replayer.wait()
            done.wait(2.0)  # let the loop drain the tail
            session.stop("replay finished")

        threading.Thread(target=watch, daemon=True).start()

    try:
        session, _summary = run_live_session(
            unique_name, tmp_path, on_session=stop_when_replayer_ends
        )
    finally:
        listener.stop_event.set()
        end_process(replayer)
    listener.join(timeout=10)
    rec = load_session(session.folder)
    raw = rec.raw
    assert rec.eeg_source == "xdf"

    # every sample the replayer sent is in the session's XDF, in order (counter proof)
    counter = raw.get_data(picks=["counter"])[0]
    n_total = bundled_recording().n_times
    np.testing.assert_array_equal(counter, np.arange(n_total))

    fired = rec.pulses
    assert len(fired) >= 2
    # pulse times in recording seconds (the XDF's first sample is the recording's first)
    t_rec = [p["t_stream"] - rec.t0_stream for p in fired]
    epochs = target_epochs(bundled_recording())
    assert fraction_inside(t_rec, epochs) >= 0.9
    armed_at = min(a["t_stream"] for a in rec.audit if a.get("new") == "armed") - rec.t0_stream
    eligible = [(a, b) for a, b in epochs if b > armed_at + 5.0]
    hit = [any(a <= t <= b for t in t_rec) for a, b in eligible]
    assert np.mean(hit) > 0.5

    # an external inlet received every trigger marker, stamped with the firing time
    assert [m["pulse"] for _, m in listener.markers] == [p["pulse_number"] for p in fired]
    np.testing.assert_allclose(
        [ts for ts, _ in listener.markers], [p["t_local"] for p in fired], atol=0.005
    )

    # offline on the samples the live session processed: the same pulse requests within one chunk.
    # (Requests, fired or vetoed, not only fired pulses: at replay speed 3 the live interlock's
    # refractory time also holds on the monotonic clock, so it vetoes more than offline does.)
    first = next(e for e in rec.events if e.get("kind") == "first_sample")
    k = round((first["t_stream"] - rec.t0_stream) * 500.0)
    offline_raw = bundled_recording().crop(tmin=k / 500.0)
    offline = Session(
        fast_config(),
        FileSource(offline_raw),
        live=False,
        out_root=tmp_path / "offline",
        arm_action="offline_run",
    )
    offline.run()
    t_off = [
        a["t_stream"] + k / 500.0
        for a in read_jsonl(offline.folder / "audit.jsonl")
        if a.get("event") == "attempt"
    ]
    t_live = [a["t_stream"] - rec.t0_stream for a in rec.audit if a.get("event") == "attempt"]
    assert len(t_off) == len(t_live) >= 2, (t_off, t_live)
    assert np.max(np.abs(np.subtract(t_off, t_live))) <= 10 / 500.0 + 1e-6

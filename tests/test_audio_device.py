"""Audio through a real output: a private PulseAudio daemon with a null sink, recorded back.

The daemon (one per test module) runs with its own runtime dir and socket; each test points
PULSE_SERVER at it, so the code under test finds "an audio device" exactly as on a desktop.
What reaches the sink is recorded from its monitor source with a miniaudio capture device whose
blocks are stamped with pylsl.local_clock(), the same clock the feedback stamps its updates
with, so "score to sound" is measured end to end (an upper bound: the capture path's own
buffering is included). Without the pulseaudio binary, or when it will not start, every test
here skips and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pylsl
import pytest
from scipy.ndimage import minimum_filter1d
from scipy.signal import butter, sosfiltfilt

from closedloop.bus import EventBus
from closedloop.participant.audio import (
    AudioError,
    DeviceFeedbackAudio,
    GuidedAudio,
    WavFeedbackAudio,
    audio_outputs,
    open_feedback_audio,
)
from closedloop.participant.feedback import SUMMARY_NAME, Feedback
from closedloop.participant.settings import AudioSettings, FeedbackSettings, GuidedAudioSettings

SINK = "cltest"
SR = 22050
UPDATE_S = 0.01  # feedback update period (a 10-sample chunk at 1 kHz)
PULSE_START_TIMEOUT_S = 10.0
DATA = Path(__file__).parent / "data"
OGG = DATA / "guide_440_660hz_1s.ogg"
MP3 = DATA / "guide_440_660hz_1s.mp3"


# ---- the daemon ------------------------------------------------------------------------------
@dataclass
class Pulse:
    proc: subprocess.Popen[bytes]
    folder: Path
    server: str
    log: Path
    keepalive: object = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def keep_busy(self) -> None:
        """Play silence at 10 ms latency for the daemon's life. Why: an idle null sink renders
        in 2 s blocks (pactl: sink latency 1.65 s when a stream joins), so a new stream got its
        second callback only 0.5-1.5 s after the first (measured) and a capture started just
        as late; with one low-latency stream always there the sink stays at ~2.5 ms."""
        import miniaudio

        def silence():
            n = yield b""
            while True:
                n = yield bytes(2 * n)

        gen = silence()
        next(gen)
        saved = os.environ.get("PULSE_SERVER")
        os.environ["PULSE_SERVER"] = self.server  # libpulse reads it at connect
        try:
            self.keepalive = miniaudio.PlaybackDevice(
                nchannels=1,
                sample_rate=SR,
                buffersize_msec=10,
                backends=[miniaudio.Backend.PULSEAUDIO],
                app_name="test keepalive",
            )
            self.keepalive.start(gen)
        finally:
            if saved is None:
                os.environ.pop("PULSE_SERVER")
            else:
                os.environ["PULSE_SERVER"] = saved
        time.sleep(2.0)  # the idle block the sink was in when we joined runs out

    def stop(self) -> None:
        if self.keepalive is not None:
            self.keepalive.close()
            self.keepalive = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)


def start_pulse() -> Pulse:
    binary = shutil.which("pulseaudio")
    if binary is None:
        pytest.skip(
            "pulseaudio not installed (apt-get install pulseaudio pulseaudio-utils; ./dev test "
            "does it as root): device-audio tests need a real sound server"
        )
    # a short path: a unix socket path must stay under 108 bytes (pytest's tmp_path may not)
    folder = Path(tempfile.mkdtemp(prefix="clpulse-"))
    sock = folder / "pulse.sock"
    log = folder / "pulseaudio.log"
    env = {
        **os.environ,
        "HOME": str(folder),  # its cookie and state stay here, not in the user's ~/.config
        "XDG_RUNTIME_DIR": str(folder),
        "XDG_CONFIG_HOME": str(folder),
    }
    env.pop("PULSE_SERVER", None)
    cmd = [
        binary,
        "-n",  # no default.pa: only the modules below
        "--daemonize=no",
        "--exit-idle-time=-1",
        "--use-pid-file=no",
        "--disable-shm=yes",
        "-L",
        f"module-null-sink sink_name={SINK} rate={SR} channels=1",
        "-L",
        f"module-native-protocol-unix auth-anonymous=1 socket={sock}",
    ]
    # As root it warns "not intended to be run as root" and runs; --system is not wanted.
    with log.open("wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
    pulse = Pulse(proc, folder, f"unix:{sock}", log)
    deadline = time.monotonic() + PULSE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"pulseaudio exited at start: {log.read_text()[-1500:]}")
        if sock.exists():
            pulse.keep_busy()
            return pulse
        time.sleep(0.02)
    pulse.stop()
    pytest.skip(f"pulseaudio did not open its socket in {PULSE_START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def pulse_daemon() -> Iterator[Pulse]:
    pulse = start_pulse()
    try:
        yield pulse
    finally:
        pulse.stop()
        shutil.rmtree(pulse.folder, ignore_errors=True)


@pytest.fixture
def pulse(pulse_daemon, monkeypatch) -> Pulse:
    if not pulse_daemon.alive():
        pytest.fail(f"the test PulseAudio died: {pulse_daemon.log.read_text()[-1500:]}")
    monkeypatch.setenv("PULSE_SERVER", pulse_daemon.server)
    return pulse_daemon


# ---- recording the sink ----------------------------------------------------------------------
@dataclass
class Recording:
    """Mono float samples of the sink's monitor; `times[k]` local clock when sample k was heard."""

    blocks: list[tuple[float, bytes]] = field(default_factory=list)
    x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def finish(self) -> None:
        self.x = np.frombuffer(b"".join(b for _, b in self.blocks), "<i2") / 32768.0
        # A block's last sample arrived by its callback time, and wake-ups jitter late: sample k
        # of the stream was heard at offset + k / SR with offset the least-late block's. Under
        # load the capture can drop samples (an overrun), which shifts the offset later from
        # there on, so the least-late offset is taken over a sliding 0.5 s, not the whole run.
        lens = np.array([len(b) // 2 for _, b in self.blocks])
        ends = np.cumsum(lens)
        t_cb = np.array([t for t, _ in self.blocks])
        offset = minimum_filter1d(t_cb - ends / SR, size=51, mode="nearest")
        self.times = np.repeat(offset, lens) + np.arange(1, len(self.x) + 1) / SR

    def at(self, t0: float, t1: float) -> np.ndarray:
        return self.x[(self.times >= t0) & (self.times < t1)]

    def amp(self, t0: float, t1: float) -> float:
        """Sine amplitude (sqrt(2) RMS) heard in [t0, t1); nan where the capture has less than
        half of it (a capture overrun or a late capture start on a loaded machine)."""
        x = self.at(t0, t1)
        if len(x) < 0.5 * (t1 - t0) * SR:
            return float("nan")
        return float(np.sqrt(2 * np.mean(x**2)))


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    import miniaudio

    monitor = next(
        d
        for d in miniaudio.Devices([miniaudio.Backend.PULSEAUDIO]).get_captures()
        if "monitor" in d["name"].lower()
    )
    rec = Recording()

    def gen():
        while True:
            data = yield
            rec.blocks.append((pylsl.local_clock(), bytes(data)))

    g = gen()
    next(g)
    dev = miniaudio.CaptureDevice(
        input_format=miniaudio.SampleFormat.SIGNED16,
        nchannels=1,
        sample_rate=SR,
        buffersize_msec=10,
        device_id=monitor["id"],
        backends=[miniaudio.Backend.PULSEAUDIO],
    )
    dev.start(g)
    try:
        time.sleep(0.2)  # let the capture stream settle
        yield rec
        time.sleep(0.3)  # the tail still in the playback buffer
    finally:
        dev.close()
    rec.finish()


def band(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return sosfiltfilt(butter(4, (lo, hi), "bandpass", fs=SR, output="sos"), x)


def dominant_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SR)[np.argmax(spec)])


def onsets(x: np.ndarray, times: np.ndarray, level: float, quiet_s: float) -> np.ndarray:
    """Local times where |x| first exceeds `level` after at least `quiet_s` below it."""
    loud = np.flatnonzero(np.abs(x) > level)
    if len(loud) == 0:
        return np.zeros(0)
    first = loud[np.r_[True, np.diff(loud) > quiet_s * SR]]
    return times[first]


def run_scores(fb: Feedback, score: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Push one update per UPDATE_S in real time (drift-free); returns their local times."""
    t_push = np.zeros(len(score))
    t_next = pylsl.local_clock()
    for k, (s, tg) in enumerate(zip(score.tolist(), target.tolist(), strict=True)):
        delay = t_next - pylsl.local_clock()
        if delay > 0:
            time.sleep(delay)
        t_push[k] = pylsl.local_clock()
        fb.push(t_push[k], s, tg)
        t_next += UPDATE_S
    return t_push


def feedback_settings(**audio) -> FeedbackSettings:
    audio = {"output": "device", "sample_rate_hz": SR, **audio}
    return FeedbackSettings(enabled=True, publish_lsl=False, smoothing_s=0.0, audio=audio)


# ---- tests -----------------------------------------------------------------------------------
def test_auto_picks_the_device_and_names_select_it(pulse, tmp_path):
    names = audio_outputs()
    assert names == ["Null Output (pulseaudio)"]
    sink = open_feedback_audio(AudioSettings(sample_rate_hz=SR), tmp_path)
    try:
        assert isinstance(sink, DeviceFeedbackAudio)
        assert sink.backend == "PulseAudio"
    finally:
        sink.close()
    sink = open_feedback_audio(
        AudioSettings(device="NULL out", sample_rate_hz=SR, period_ms=40), tmp_path
    )
    time.sleep(0.5)
    sink.close()
    assert isinstance(sink, DeviceFeedbackAudio)
    # the period reaches the device: 40 ms of frames per callback
    assert sink.n_callbacks >= 5
    assert sink.n_frames / sink.n_callbacks == pytest.approx(0.04 * SR, rel=0.1)
    # a name that matches nothing: 'device' refuses, 'auto' falls back to the WAV file
    with pytest.raises(AudioError, match="no audio output matching 'speakers'"):
        open_feedback_audio(AudioSettings(output="device", device="speakers"), tmp_path)
    sink = open_feedback_audio(AudioSettings(device="speakers"), tmp_path)
    sink.close()
    assert isinstance(sink, WavFeedbackAudio)


def test_no_server_means_wav_and_a_clear_device_error(pulse_daemon, monkeypatch, tmp_path):
    # a server address where nothing listens: as on a headless machine
    monkeypatch.setenv("PULSE_SERVER", f"unix:{pulse_daemon.folder / 'nothing.sock'}")
    if Path("/dev/snd").is_dir():
        pytest.skip("this machine has an ALSA sound card: 'no device' cannot be staged")
    assert audio_outputs() == []
    sink = open_feedback_audio(AudioSettings(), tmp_path)
    sink.close()
    assert isinstance(sink, WavFeedbackAudio)
    with pytest.raises(AudioError, match="no audio output"):
        open_feedback_audio(AudioSettings(output="device"), tmp_path)


@pytest.mark.timeout(60)
def test_device_tone_follows_the_score_on_the_sink(pulse, tmp_path):
    n = 500  # 5 s of updates
    t = np.arange(n) * UPDATE_S
    score = 1.8 * np.sin(2 * np.pi * 0.4 * t)  # slow: several full swings of the volume
    fb = Feedback.from_settings(feedback_settings(chime={"enabled": False}), tmp_path)
    assert isinstance(fb.audio, DeviceFeedbackAudio)
    fb.start()
    with recording() as rec:
        t_push = run_scores(fb, score, np.zeros(n, bool))
        time.sleep(0.1)
        summary = fb.close()
    assert summary["audio"] == "device"
    device = summary["audio_device"]
    assert device["backend"] == "PulseAudio"
    assert device["error"] is None
    # no stall; a few dropouts are allowed: with the 2 cores overloaded by other work a late
    # callback loses its block (seen: 4.6 of 5.3 s played at load 5.7)
    assert device["played_s"] > 0.75 * device["open_s"]
    assert device["played_s"] < device["open_s"] + 0.05

    # pitch: the configured 220 Hz
    mid = rec.at(t_push[100], t_push[400])
    assert dominant_hz(mid) == pytest.approx(220.0, abs=2.0)
    # envelope (RMS amplitude per 50 ms) against the expected level 0.3 * clip((s + 2) / 4),
    # at the lag that fits best: that lag is the score-to-sound latency
    win = 0.05
    edges = t_push[0] + np.arange(0, (n - 1) * UPDATE_S - 0.3, win)
    expected = 0.3 * np.clip((np.interp(edges + win / 2, t_push, score) + 2) / 4, 0, 1)
    best = (-1.0, 0.0)
    for lag in np.arange(0.0, 0.3, 0.005):
        amp = np.array([rec.amp(a + lag, a + lag + win) for a in edges])
        ok = np.isfinite(amp)
        r = float(np.corrcoef(amp[ok], expected[ok])[0, 1])
        if r > best[0]:
            best = (r, lag, amp)
    r, lag, amp = best
    ok = np.isfinite(amp)
    assert ok.mean() > 0.8, f"the capture missed {np.count_nonzero(~ok)} of {len(ok)} windows"
    amp, expected = amp[ok], expected[ok]
    print(
        f"device envelope-score r={r:.4f} at lag {lag * 1e3:.0f} ms; "
        f"render latency {device['render_latency_ms']}"
    )
    assert r > 0.95, f"envelope-score correlation {r:.3f}"
    assert lag < 0.25
    # the level is the mapping, too; an overloaded 2-core machine drops blocks here and there
    # (seen: 2 of 94 windows 0.037 low at load 4; 8 of 89 in a row at load 6), hence the median
    # decides and 15 % may miss
    off = np.abs(amp - expected) > 0.03
    assert off.mean() <= 0.15, f"{off.sum()} of {len(off)} windows off the mapped level"
    assert np.median(np.abs(amp - expected)) < 0.01
    assert device["render_latency_ms"]["n"] > 0.8 * n  # nearly every update rendered


@pytest.mark.timeout(60)
def test_device_chime_follows_each_target_entry(pulse, tmp_path):
    n = 450
    target = np.zeros(n, bool)
    entries = np.array([40, 130, 220, 310, 400])  # 0.9 s apart; the chime lasts 0.6 s
    for e in entries:
        target[e : e + 30] = True
    fb = Feedback.from_settings(feedback_settings(tone={"enabled": False}), tmp_path).start()
    with recording() as rec:
        t_push = run_scores(fb, np.zeros(n), target)
        time.sleep(0.1)
        summary = fb.close()
    assert summary["chimes"] == len(entries) == summary["target_entries"]
    x = band(rec.x, 700, 1100)  # the 880 Hz fundamental only
    heard = onsets(x, rec.times, 0.05, quiet_s=0.3)
    lat_ms = (heard - t_push[entries]) * 1e3
    print(f"chime onset latency ms (score pushed -> heard on the monitor): {np.round(lat_ms, 1)}")
    assert len(heard) == len(entries), f"heard {len(heard)} chimes at {heard - t_push[0]}"
    assert np.all(lat_ms > 0)
    assert np.all(lat_ms < 250)
    # the chime's fundamental (5 Hz bins; a dropout on a loaded machine smears it: seen 873)
    assert dominant_hz(rec.at(heard[0], heard[0] + 0.2)) == pytest.approx(880.0, abs=15.0)


def open_marker_inlet(source_id: str) -> pylsl.StreamInlet:
    infos = pylsl.resolve_byprop("source_id", source_id, timeout=5.0)
    assert infos, "guided-audio marker stream not found"
    inlet = pylsl.StreamInlet(infos[0])
    inlet.open_stream(timeout=5.0)
    return inlet


@pytest.mark.lsl
@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", [OGG, MP3], ids=["ogg", "mp3"])
def test_guided_recording_plays_on_the_device_with_its_markers(pulse, path, unique_name):
    bus = EventBus()
    sub = bus.subscribe("t", kinds={"guided_audio"})
    guided = GuidedAudio(
        GuidedAudioSettings(path=path, marker_stream=unique_name), unique_name, emit=bus.emit
    )
    assert guided.device
    inlet = open_marker_inlet(unique_name)
    with recording() as rec:
        guided.start()
        time.sleep(0.4)
        guided.pause()
        time.sleep(0.5)
        guided.resume()
        assert guided.wait_end(timeout=5.0)
        time.sleep(0.2)
    guided.close()
    markers = []
    deadline = pylsl.local_clock() + 5.0
    while len(markers) < 4 and pylsl.local_clock() < deadline:
        sample, ts = inlet.pull_sample(timeout=0.1)
        if sample is not None:
            markers.append((ts, json.loads(sample[0])))
    inlet.close_stream()
    assert [m["guided_audio"] for _, m in markers] == ["start", "pause", "resume", "end"]
    assert markers[0][1]["device"] is True
    events = [e.payload["action"] for e in sub.drain()]
    assert events == ["start", "pause", "resume", "end"]  # no 'no_device'
    ts = {m["guided_audio"]: t for t, m in markers}

    # what the sink got: both tones (left 440, right 660, mixed to mono), sounding while the
    # markers say playing, silent while paused
    loud = np.abs(band(rec.x, 300, 800)) > 0.05
    sounding = rec.times[loud]
    assert len(sounding) > 0, "nothing reached the sink"
    first, last = sounding[0], sounding[-1]
    paused = rec.at(ts["pause"] + 0.15, ts["resume"])
    print(
        f"{path.suffix}: first sound {1e3 * (first - ts['start']):.0f} ms after start marker, "
        f"last {1e3 * (last - ts['end']):.0f} ms after end marker"
    )
    assert 0.0 < first - ts["start"] < 0.3
    assert -0.1 < last - ts["end"] < 0.3
    assert np.abs(paused).max() < 0.01, "sound while paused"
    played = rec.at(first + 0.05, ts["pause"])
    spec = np.abs(np.fft.rfft(played * np.hanning(len(played))))
    freqs = np.fft.rfftfreq(len(played), 1 / SR)
    peaks = freqs[np.argsort(spec)[-40:]]  # the 40 strongest bins
    assert np.any(np.abs(peaks - 440) < 8)
    assert np.any(np.abs(peaks - 660) < 8)
    # the sound lasted what the recording lasts (pause excluded): 10 ms RMS above -26 dBFS
    w = round(0.01 * SR)
    x = band(rec.x, 300, 800)
    rms = np.sqrt(np.mean(x[: len(x) // w * w].reshape(-1, w) ** 2, axis=1))
    heard_s = np.count_nonzero(rms > 0.05) * w / SR
    assert heard_s == pytest.approx(guided.duration_s, abs=0.15)


@pytest.mark.timeout(60)
def test_device_feedback_survives_the_server_dying(pulse_daemon, monkeypatch, tmp_path):
    """A sound server lost mid-session: the feedback, its trace and close() carry on."""
    own = start_pulse()  # a daemon of its own: this test kills it
    try:
        monkeypatch.setenv("PULSE_SERVER", own.server)
        fb = Feedback.from_settings(feedback_settings(), tmp_path).start()
        assert isinstance(fb.audio, DeviceFeedbackAudio)
        run_scores(fb, np.linspace(-2, 2, 50), np.zeros(50, bool))
        own.proc.kill()
        own.proc.wait(5.0)
        done = threading.Event()

        def rest():
            run_scores(fb, np.linspace(2, -2, 50), np.r_[np.zeros(25, bool), np.ones(25, bool)])
            done.set()

        th = threading.Thread(target=rest)
        th.start()
        th.join(10.0)
        assert done.is_set()
        summary = fb.close()
    finally:
        own.stop()
        shutil.rmtree(own.folder, ignore_errors=True)
    assert summary["updates"] == 100
    assert summary["chimes"] == 1
    record = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert record["audio"] == "device"
    # the loss shows in the record: the output stopped playing when the server went
    device = record["audio_device"]
    print(f"after the server died: {device}")
    assert device["open_s"] > 0.9
    assert device["played_s"] < device["open_s"] - 0.4


def _pactl(pulse: Pulse, *args: str) -> str:
    out = subprocess.run(
        ["pactl", "--server", pulse.server, *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return out.stdout


def _wait_for(pred, timeout_s: float, what: str) -> float:
    """Poll `pred` every 20 ms; return the seconds it took (fails after `timeout_s`)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"{what} not within {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.mark.timeout(90)
def test_a_removed_sink_is_reported_lost_and_reopened_when_it_comes_back(
    pulse_daemon, monkeypatch, tmp_path
):
    """The participant's output goes away mid-session and comes back: 'audio_device' events
    say open -> lost -> reopened, the feedback goes on meanwhile, and sound flows again."""
    if shutil.which("pactl") is None:
        pytest.skip("pactl not installed (pulseaudio-utils): cannot remove a sink")
    from closedloop.participant.audio import DEVICE_LOST_AFTER_S, DEVICE_REOPEN_EVERY_S

    own = start_pulse()  # a daemon of its own: this test removes its sink
    bus = EventBus()
    sub = bus.subscribe("test", kinds={"audio_device"})
    seen: list[dict] = []

    def states() -> list[str]:
        seen.extend(dict(e.payload) for e in sub.drain())
        return [e["state"] for e in seen]

    stop = threading.Event()
    try:
        monkeypatch.setenv("PULSE_SERVER", own.server)
        fb = Feedback.from_settings(feedback_settings(), tmp_path, bus).start()
        assert isinstance(fb.audio, DeviceFeedbackAudio)
        pushed = [0]

        def updates() -> None:  # the session's decisions, on regardless of the audio
            while not stop.is_set():
                fb.push(pylsl.local_clock(), 0.5, False)
                pushed[0] += 1
                time.sleep(UPDATE_S)

        th = threading.Thread(target=updates)
        th.start()
        _wait_for(lambda: fb.audio.n_callbacks > 5, 5.0, "first callbacks")
        assert states() == ["open"]
        sink = next(
            line.split()[0]
            for line in _pactl(own, "list", "short", "modules").splitlines()
            if "module-null-sink" in line
        )
        _pactl(own, "unload-module", sink)
        t_lost = _wait_for(lambda: "lost" in states(), DEVICE_LOST_AFTER_S + 3.0, "lost event")
        assert t_lost >= DEVICE_LOST_AFTER_S - 0.5  # after the stall, not a false alarm before
        assert fb.audio.device_state == "lost"
        n_before = pushed[0]
        time.sleep(2 * DEVICE_REOPEN_EVERY_S)  # no output: retries fail quietly
        assert states() == ["open", "lost"]
        assert pushed[0] > n_before + 50  # the feedback (and the session) went on
        _pactl(own, "load-module", "module-null-sink", f"sink_name={SINK}", f"rate={SR}")
        t_back = _wait_for(
            lambda: "reopened" in states(), DEVICE_REOPEN_EVERY_S + 3.0, "reopened event"
        )
        print(f"sink removed -> lost {t_lost:.2f} s; sink back -> reopened {t_back:.2f} s")
        if own.keepalive is not None:
            own.keepalive.close()
        own.keep_busy()  # the new sink at low latency (an idle null sink renders in 2 s blocks)
        n_cb = fb.audio.n_callbacks
        _wait_for(lambda: fb.audio.n_callbacks > n_cb + 10, 5.0, "callbacks after reopening")
        stop.set()
        th.join(5.0)
        summary = fb.close()
    finally:
        stop.set()
        own.stop()
        shutil.rmtree(own.folder, ignore_errors=True)
    assert states() == ["open", "lost", "reopened"]
    assert seen[1]["backend"] == "PulseAudio"
    assert "no audio callback" in seen[1]["detail"]
    assert summary["updates"] == pushed[0]
    device = summary["audio_device"]
    assert (device["losses"], device["reopens"]) == (1, 1)
    assert device["error"] is None


@pytest.mark.timeout(60)
def test_sham_feedback_is_what_the_device_plays(pulse, tmp_path):
    """Sham: the sink gets the earlier session's trace, not the live score."""
    n = 300
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    old = Feedback.from_settings(
        FeedbackSettings(
            enabled=True, publish_lsl=False, smoothing_s=0.0, audio={"enabled": False}
        ),
        earlier,
    ).start()
    old_score = np.where((np.arange(n) // 75) % 2 == 1, 2.0, -2.0)  # 0.75 s off / on blocks
    for k, s in enumerate(old_score.tolist()):
        old.push(1000.0 + k * UPDATE_S, s, False)
    old.close()

    settings = FeedbackSettings(
        enabled=True,
        publish_lsl=False,
        smoothing_s=0.0,
        mode="sham",
        sham={"source": earlier},
        audio={"output": "device", "sample_rate_hz": SR, "chime": {"enabled": False}},
    )
    now = tmp_path / "now"
    now.mkdir()
    fb = Feedback.from_settings(settings, now).start()
    with recording() as rec:
        live_score = np.full(n, 2.0)  # live would be loud all the time
        t_push = run_scores(fb, live_score, np.zeros(n, bool))
        time.sleep(0.1)
        summary = fb.close()
    assert summary["mode"] == "sham"
    lag = 0.03
    for block in range(4):
        a = t_push[block * 75 + 15] + lag
        # amplitude per 50 ms window, median over the block: a dropped block on a loaded
        # machine (seen: the whole-block RMS 0.272) does not decide it
        amp = [rec.amp(w, w + 0.05) for w in a + np.arange(11) * 0.05]
        level = float(np.nanmedian(amp))
        # earlier score 2 -> value 1 (0.3), -2 -> value 0 (silence); the live score would be
        # 0.3 throughout. Silence is exact; the loud level is a floor, because on a loaded
        # machine the device sink drops frames (seen: median 0.255 with 8 tests running).
        if block % 2 == 1:
            assert 0.2 <= level <= 0.32, f"block {block}: {level:.3f}"
        else:
            assert level <= 0.02, f"block {block}: {level:.3f}"


@pytest.mark.lsl
def test_guided_with_an_unknown_output_name_is_silent_and_says_so(pulse, unique_name):
    bus = EventBus()
    sub = bus.subscribe("t", kinds={"guided_audio"})
    guided = GuidedAudio(
        GuidedAudioSettings(path=OGG, marker_stream=unique_name),
        unique_name,
        emit=bus.emit,
        device="speakers",
    )
    assert not guided.device
    guided.start()
    guided.close()
    events = {e.payload["action"]: e.payload for e in sub.drain()}
    assert "matching 'speakers'" in events["no_device"]["detail"]
    assert list(events) == ["start", "no_device", "stop"]


@pytest.mark.gui
@pytest.mark.lsl
@pytest.mark.timeout(150)
def test_console_shows_the_participant_audio_lost_and_reopened(
    pulse_daemon, monkeypatch, tmp_path, unique_name, looping_replayer, qtbot
):
    """A live session in the console's child process, its feedback on a sink that is removed
    and brought back: the health panel says open, LOST, reopened; the session runs on."""
    pytest.importorskip("pytestqt")
    if shutil.which("pactl") is None:
        pytest.skip("pactl not installed (pulseaudio-utils): cannot remove a sink")
    from closedloop.config import apply_overrides
    from gui.window import ConsoleWindow
    from tests.test_gui_console import CONNECT_TIMEOUT_MS, _config

    own = start_pulse()
    monkeypatch.setenv("PULSE_SERVER", own.server)  # the session process inherits it
    config = apply_overrides(
        _config(unique_name),
        {
            "feedback.enabled": True,
            "feedback.publish_lsl": False,
            "feedback.audio.output": "device",
            "feedback.audio.sample_rate_hz": SR,
        },
    )
    win = ConsoleWindow(config, out_root=tmp_path, list_streams=lambda _t: [])
    qtbot.addWidget(win)
    win.show()
    try:
        runner = win.start_session()
        qtbot.waitUntil(lambda: runner.scope is not None, timeout=CONNECT_TIMEOUT_MS)

        def health() -> str:
            return win.health_label.text()

        qtbot.waitUntil(lambda: "participant audio <b" in health(), timeout=5000)
        assert ">open<" in health()
        assert win.snapshot.audio_device == "open"
        sink = next(
            line.split()[0]
            for line in _pactl(own, "list", "short", "modules").splitlines()
            if "module-null-sink" in line
        )
        _pactl(own, "unload-module", sink)
        qtbot.waitUntil(lambda: "LOST" in health(), timeout=8000)
        assert win.snapshot.audio_device == "lost"
        n_samples = runner.scope.n_samples
        qtbot.wait(1000)
        assert runner.running
        assert runner.scope.n_samples > n_samples  # the session goes on without its sound
        _pactl(own, "load-module", "module-null-sink", f"sink_name={SINK}", f"rate={SR}")
        qtbot.waitUntil(lambda: ">reopened<" in health(), timeout=8000)
        assert "lost 1x, reopened 1x" in health()
        assert win.snapshot.audio_device == "reopened"
        win.close()
        assert not runner.running
    finally:
        if win.runner is not None and win.runner.running:
            win.close()
        own.stop()
        shutil.rmtree(own.folder, ignore_errors=True)
    folder = Path(runner.session.folder)
    events = [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines() if x]
    states = [e["state"] for e in events if e.get("kind") == "audio_device"]
    assert states == ["open", "lost", "reopened"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["feedback"]["audio_device"]["losses"] == 1
    assert summary["feedback"]["audio_device"]["reopens"] == 1

"""Participant window (offscreen): the shape follows a scripted score; frame latency is measured."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from PySide6.QtGui import QColor

from closedloop.participant.feedback import Feedback
from closedloop.participant.settings import DisplaySettings, FeedbackSettings
from features.types import Label, State
from gui.participant import ParticipantWindow, shape_colour

pytestmark = pytest.mark.gui


def make_feedback(tmp_path, **display) -> Feedback:
    settings = FeedbackSettings(
        enabled=True, publish_lsl=False, smoothing_s=0.0, audio={"enabled": False}, display=display
    )
    return Feedback.from_settings(settings, tmp_path)


def push(fb: Feedback, t: float, score: float, target: bool = False) -> None:
    fb.tap(None, State(t, Label.TARGET if target else Label.NON_TARGET, score, 0.0))


def test_circle_follows_scripted_score(qtbot, tmp_path):
    fb = make_feedback(tmp_path)
    win = ParticipantWindow(fb, fb.settings.display)
    qtbot.addWidget(win)
    win.timer.stop()  # the test drives refresh() itself
    win.resize(400, 300)
    win.show()
    qtbot.waitExposed(win)
    side = min(win.view.viewport().width(), win.view.viewport().height())

    assert not win.refresh()  # nothing pushed yet
    assert win.shape.brush().color() == QColor(fb.settings.display.idle_colour)

    scores = [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 0.5, math.nan]
    diameters, brightness = [], []
    for k, s in enumerate(scores):
        push(fb, 10.0 + 0.01 * k, s)
        assert win.refresh()
        assert not win.refresh()  # no new update: no redraw
        r = win.shape.rect()
        assert r.width() == pytest.approx(r.height())
        assert r.center().x() == pytest.approx(win.scene.sceneRect().center().x())
        diameters.append(r.width() / side)
        brightness.append(win.shape.brush().color().valueF())
    lo, hi = fb.settings.display.size_range
    expected = [lo + (hi - lo) * min(1, max(0, (s + 2) / 4)) for s in scores[:-1]]
    np.testing.assert_allclose(diameters[:-1], expected, atol=2e-3)
    assert diameters[-1] == pytest.approx(lo, abs=2e-3)  # nan: idle, smallest
    assert win.shape.brush().color() == QColor(fb.settings.display.idle_colour)
    assert brightness[1] < brightness[3] < brightness[5]  # brighter with the score
    fb.close()


def test_colour_changes_in_target_state(qtbot, tmp_path):
    fb = make_feedback(
        tmp_path, colour="#3050A0", target_colour="#30C060", brightness_follows=False
    )
    win = ParticipantWindow(fb, fb.settings.display)
    qtbot.addWidget(win)
    win.timer.stop()
    push(fb, 1.0, 1.0, target=False)
    win.refresh()
    assert win.shape.brush().color() == QColor("#3050A0")
    push(fb, 1.01, 1.0, target=True)
    win.refresh()
    assert win.shape.brush().color() == QColor("#30C060")
    assert win.target
    fb.close()


def test_bar_height_follows_score_from_the_bottom(qtbot, tmp_path):
    fb = make_feedback(tmp_path, kind="bar", size_range=(0.1, 0.9))
    win = ParticipantWindow(fb, fb.settings.display)
    qtbot.addWidget(win)
    win.timer.stop()
    win.resize(300, 500)
    win.show()
    qtbot.waitExposed(win)
    h = win.view.viewport().height()
    heights = []
    for k, s in enumerate([-2.0, 0.0, 2.0]):
        push(fb, float(k), s)
        win.refresh()
        r = win.shape.rect()
        assert r.bottom() == pytest.approx(h)
        heights.append(r.height() / h)
    np.testing.assert_allclose(heights, [0.1, 0.5, 0.9], atol=3e-3)
    fb.close()


def test_shape_colour_brightness_mapping():
    s = DisplaySettings(colour="#4080C0", min_brightness=0.25)
    full = shape_colour(s, 1.0, False)
    zero = shape_colour(s, 0.0, False)
    assert full.name() == QColor("#4080C0").name()
    assert zero.valueF() == pytest.approx(0.25 * QColor("#4080C0").valueF(), abs=0.01)
    assert zero.hueF() == pytest.approx(full.hueF(), abs=0.01)


@pytest.mark.timeout(60)
def test_timer_driven_updates_measure_score_to_frame_latency(qtbot, tmp_path):
    """A thread pushes at 100 Hz (like the acquisition thread); the window's QTimer redraws."""
    fb = make_feedback(tmp_path, refresh_hz=60.0)
    win = ParticipantWindow(fb, fb.settings.display)
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    stop = threading.Event()

    def producer():
        k = 0
        while not stop.is_set():
            push(fb, 0.01 * k, 2 * math.sin(k / 50))
            k += 1
            time.sleep(0.01)

    th = threading.Thread(target=producer, daemon=True)
    th.start()
    try:
        qtbot.waitUntil(lambda: fb.n_frames >= 60, timeout=20_000)
    finally:
        stop.set()
        th.join()
    lat = fb.frame_latency_ms()
    print(
        f"score->frame latency: p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
        f"max {lat['max']:.2f} ms over {lat['n']} frames"
    )
    assert lat["n"] >= 60
    assert 0.0 < lat["p50"] <= lat["p99"] <= lat["max"]
    # the shown value is one the producer pushed (read back from the scene)
    assert 0.0 <= win.value <= 1.0
    summary = fb.close()
    assert summary["frame_latency_ms"]["n"] >= 60


def test_fullscreen_on_the_last_screen(qtbot, tmp_path):
    fb = make_feedback(tmp_path, fullscreen=True)
    win = ParticipantWindow(fb, fb.settings.display)
    qtbot.addWidget(win)
    win.show_on_screen()
    qtbot.waitExposed(win)
    assert win.isFullScreen()
    fb.close()


def test_window_without_source_is_idle_until_attached(qtbot, tmp_path):
    win = ParticipantWindow(None)
    qtbot.addWidget(win)
    win.timer.stop()
    assert not win.refresh()
    assert win.shape.brush().color() == QColor(DisplaySettings().idle_colour)
    fb = make_feedback(tmp_path)
    push(fb, 1.0, 2.0)
    win.set_source(fb)
    assert win.refresh()
    assert win.value == 1.0
    fb.close()

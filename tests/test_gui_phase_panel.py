"""The console's phase panel (offscreen Qt): target, SNR, the rose of fired phases; and the
console window shows it only in phase mode."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from closedloop.session import SessionSnapshot
from gui.phase_panel import PhasePanel, rose_xy
from gui.window import ConsoleWindow
from tests.phase_helpers import phase_config
from tests.session_helpers import fast_config

pytestmark = [pytest.mark.gui]


def test_rose_sector_radii_are_the_shares_of_pulses():
    x, y = rose_xy(np.array([180.0, 175.0, -178.0, 10.0]))
    r = np.hypot(x, y)
    ang = np.degrees(np.arctan2(y, x))
    finite = np.isfinite(r) & (r > 0)
    # 180 and -178 fall in the -180..-150 sector (half the pulses), 175 in 150..180, 10 in 0..30
    assert math.isclose(r[finite & (ang > -175) & (ang < -155)].max(), 0.5, rel_tol=1e-9)
    assert math.isclose(r[finite & (ang > 155) & (ang < 175)].max(), 0.25, rel_tol=1e-9)
    assert math.isclose(r[finite & (ang > 0) & (ang < 30)].max(), 0.25, rel_tol=1e-9)
    assert r[np.isfinite(r)].max() <= 0.5 + 1e-12


def test_phase_panel_shows_target_snr_and_the_fired_phases(qtbot):
    panel = PhasePanel(phase_config())
    box = panel.build()
    qtbot.addWidget(box)
    snap = SessionSnapshot(
        phase_estimator="echt",
        phase_target_deg=180.0,
        phase_snr_db=7.25,
        phase_errors_deg=(-10.0, 5.0, 20.0, float("nan")),
    )
    panel.update(SimpleNamespace(snapshot=snap, slow=True))
    text = panel.label.text()
    assert "target 180°" in text
    assert "echt" in text
    assert "7.2 dB" in text
    assert "3 pulses" in text
    assert "within ±45° 100%" in text
    x, y = panel.rose.getData()
    assert x is not None
    assert np.isfinite(x).sum() > 0
    ang = np.degrees(np.arctan2(y[np.isfinite(y)], x[np.isfinite(x)]))
    r = np.hypot(x[np.isfinite(x)], y[np.isfinite(y)])
    assert np.all(np.abs(ang[r > 1e-9]) >= 150.0)  # every wedge around the trough
    # phase mode off: nothing changes
    panel.update(SimpleNamespace(snapshot=SessionSnapshot(), slow=True))
    assert panel.label.text() == text


@pytest.mark.parametrize("enabled", [True, False])
def test_the_console_has_the_phase_panel_only_in_phase_mode(qtbot, enabled):
    config = phase_config() if enabled else fast_config()
    win = ConsoleWindow(config)
    qtbot.addWidget(win)
    assert (win.phase_panel is not None) is enabled
    assert (win.phase_panel in win.panels) is enabled
    win.close()

"""The console's 'Session report' button: enabled once a session has ended, writes the report
off the GUI thread (the window keeps ticking) and opens it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("pytestqt")

from acquisition.file_source import FileSource
from closedloop.export.report import read_report_data
from closedloop.session import Session
from gui.window import ConsoleWindow
from tests.session_helpers import REPLAY_DATA, fast_config

pytestmark = [pytest.mark.gui]


@pytest.mark.timeout(120)
def test_report_button_after_the_session_ended(qtbot, tmp_path):
    session = Session(
        fast_config(),
        FileSource(REPLAY_DATA / "sim_32ch_500hz.fif"),
        live=False,
        out_root=tmp_path,
        arm_action="offline_run",
    )
    summary = session.run()
    win = ConsoleWindow(fast_config(), out_root=tmp_path)
    opened = []
    win.open_url = opened.append
    qtbot.addWidget(win)
    win.show()
    assert not win.report_button.isEnabled()  # no session yet
    # an ended session, as the window sees it after its runner finished
    ended = SimpleNamespace(error=None, scope=None, running=False, started=True, session=session)
    win._note_session_end(ended)
    assert win.report_button.isEnabled()
    ticks = win._tick_count
    win.report_button.click()
    assert not win.report_button.isEnabled()  # one report at a time
    qtbot.waitUntil(lambda: bool(opened), timeout=60_000)
    assert win._tick_count > ticks + 2  # the window kept ticking while the report was written
    assert opened == [session.folder / "report.html"]
    assert read_report_data(opened[0])["pulses"] == summary["pulses"]
    assert "report:" in win.status_line.text()
    assert win.report_button.isEnabled()
    win.close()

"""The participant window: a calm shape driven by the feedback value, nothing else.

Meant for a second screen (full-screen option), separate from the operator console. It never owns
data: a QTimer at `refresh_hz` reads `Feedback.latest()` (the newest row the acquisition thread
wrote) and redraws only when a new update arrived. After each repaint showing a new update it
reports score-computed -> frame-painted latency to `Feedback.note_frame` (the offscreen/backing
store paint; a real display adds its vsync and scan-out on top).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

from pylsl import local_clock
from PySide6.QtCore import QRectF, Qt, QTimer
from PySide6.QtGui import QBrush, QColor, QGuiApplication, QKeyEvent, QPainter, QPen
from PySide6.QtWidgets import (
    QGraphicsEllipseItem,
    QGraphicsRectItem,
    QGraphicsScene,
    QGraphicsView,
    QVBoxLayout,
    QWidget,
)

from closedloop.participant.settings import DisplaySettings

BAR_WIDTH_FRACTION = 0.2  # bar width, fraction of the window width


class FeedbackSource(Protocol):
    def latest(self) -> tuple[float, bool, float, int]: ...
    def note_frame(self, latency_s: float) -> None: ...


class _View(QGraphicsView):
    """Reports the end of each paint to its owner (frame latency)."""

    def __init__(self, scene: QGraphicsScene, on_painted: Callable[[], None]) -> None:
        super().__init__(scene)
        self._on_painted = on_painted

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().paintEvent(event)
        self._on_painted()


def shape_colour(settings: DisplaySettings, value: float, target: bool) -> QColor:
    """Idle colour for nan; else (target) colour scaled in brightness by the value."""
    if not math.isfinite(value):
        return QColor(settings.idle_colour)
    base = QColor(settings.target_colour if target else settings.colour)
    if not settings.brightness_follows:
        return base
    h, s, v, _ = base.getHsvF()
    b = settings.min_brightness + (1.0 - settings.min_brightness) * value
    return QColor.fromHsvF(max(h, 0.0), s, v * b).toRgb()


class ParticipantWindow(QWidget):
    """A single shape on a plain background; size (and brightness) follow the feedback value."""

    def __init__(
        self,
        source: FeedbackSource | None,
        settings: DisplaySettings | None = None,
        clock: Callable[[], float] = local_clock,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.source = source
        self.settings = settings or DisplaySettings()
        self.clock = clock
        self.setWindowTitle("closedloop - participant")
        self.scene = QGraphicsScene(self)
        self.scene.setBackgroundBrush(QColor(self.settings.background))
        self.view = _View(self.scene, self._painted)
        self.view.setRenderHint(QPainter.RenderHint.Antialiasing)
        self.view.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.view.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.view.setFrameShape(QGraphicsView.Shape.NoFrame)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.view)
        item_cls = QGraphicsEllipseItem if self.settings.kind == "circle" else QGraphicsRectItem
        self.shape = item_cls()
        self.shape.setPen(QPen(Qt.PenStyle.NoPen))
        self.scene.addItem(self.shape)
        self.value = math.nan  # value and target currently drawn
        self.target = False
        self.n_shown = 0  # update count of the drawn value
        self._pending_t_local = math.nan  # tap time of a drawn-but-not-yet-painted update
        self._apply(math.nan, False)
        self.timer = QTimer(self)
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.timeout.connect(self.refresh)
        self.timer.start(max(1, round(1000.0 / self.settings.refresh_hz)))
        self.resize(800, 600)

    def set_source(self, source: FeedbackSource | None) -> None:
        """Attach the session's Feedback once it exists (None: idle shape)."""
        self.source = source
        self.n_shown = 0
        self._apply(math.nan, False)

    # ---- drawing ---------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Timer slot: redraw if a new update arrived. Returns True when it redrew."""
        if self.source is None:
            return False
        value, target, t_local, n = self.source.latest()
        if n == self.n_shown:
            return False
        self.n_shown = n
        self._apply(value, target)
        self._pending_t_local = t_local
        self.view.viewport().update()
        return True

    def _apply(self, value: float, target: bool) -> None:
        self.value, self.target = value, target
        w = max(1.0, float(self.view.viewport().width()))
        h = max(1.0, float(self.view.viewport().height()))
        self.scene.setSceneRect(QRectF(0.0, 0.0, w, h))
        lo, hi = self.settings.size_range
        frac = lo + (hi - lo) * value if math.isfinite(value) else lo
        if self.settings.kind == "circle":
            d = frac * min(w, h)
            self.shape.setRect(QRectF((w - d) / 2, (h - d) / 2, d, d))
        else:
            bw, bh = BAR_WIDTH_FRACTION * w, frac * h
            self.shape.setRect(QRectF((w - bw) / 2, h - bh, bw, bh))
        self.shape.setBrush(QBrush(shape_colour(self.settings, value, target)))

    def _painted(self) -> None:
        if self.source is not None and math.isfinite(self._pending_t_local):
            self.source.note_frame(self.clock() - self._pending_t_local)
            self._pending_t_local = math.nan

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._apply(self.value, self.target)

    # ---- placement -------------------------------------------------------------------------
    def show_on_screen(self) -> None:
        """Show on the configured screen (default: the last one), full-screen if configured."""
        screens = QGuiApplication.screens()
        if screens:
            idx = self.settings.screen if self.settings.screen is not None else len(screens) - 1
            screen = screens[min(idx, len(screens) - 1)]
            self.setScreen(screen)
            self.move(screen.geometry().topLeft())
        if self.settings.fullscreen:
            self.setCursor(Qt.CursorShape.BlankCursor)
            self.showFullScreen()
        else:
            self.show()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        # F11 toggles full screen, Esc leaves it; nothing else (the participant has no controls)
        if event.key() == Qt.Key.Key_F11:
            self.showNormal() if self.isFullScreen() else self.showFullScreen()
        elif event.key() == Qt.Key.Key_Escape and self.isFullScreen():
            self.showNormal()
        else:
            super().keyPressEvent(event)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.timer.stop()
        super().closeEvent(event)

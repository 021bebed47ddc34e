"""Guard against a PySide6 refcount bug that kills long-running windows on CPython < 3.12.

Measured here (PySide6 6.12.0, CPython 3.11.7): every call of a Qt method that returns void
(QPainter.setPen, drawLine, save, ...) lowers `sys.getrefcount(None)` by one. pyqtgraph makes
thousands of such calls per frame, so None's count reaches zero within seconds and CPython aborts
with "Fatal Python error: none_dealloc: deallocating None". From CPython 3.12 on None is
immortal and the bug is harmless; with PySide6 < 6.12 it does not occur.

`guard_none_refcount()` probes for the leak once and, only when it is there, adds 2**60 to None's
reference count (as immortality does in 3.12): at one leaked reference per call that lasts
longer than any session. True and False get the same boost: at interpreter exit the same
binding also released one reference to a bool too many ("bool_dealloc: deallocating True or
False", seen after a 40 s console run).
"""

from __future__ import annotations

import ctypes
import sys

from PySide6 import QtCore

PROBE_CALLS = 200
NONE_REFCOUNT_BOOST = 2**60

_state = {"guarded": False}


def none_leak_per_call() -> float:
    """References to None lost per void Qt call (0.0 on a healthy binding)."""
    point = QtCore.QPointF(0.0, 0.0)
    before = sys.getrefcount(None)
    for _ in range(PROBE_CALLS):
        point.setX(1.0)  # returns void
    return (before - sys.getrefcount(None)) / PROBE_CALLS


def guard_none_refcount() -> bool:
    """Make None, True and False effectively immortal if the leak is there; True if applied."""
    if _state["guarded"] or sys.version_info >= (3, 12):
        return _state["guarded"]
    if none_leak_per_call() <= 0.5:
        return False
    for singleton in (None, True, False):
        refcnt = ctypes.c_ssize_t.from_address(id(singleton))  # ob_refcnt is the first field
        refcnt.value += NONE_REFCOUNT_BOOST
    _state["guarded"] = True
    return True

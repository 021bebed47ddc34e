"""closedloop: wires acquisition, features and triggers into sessions (CLI, config, bus, recording).

`closedloop.load_session(folder)` reads a session folder back (EEG as mne Raw, pulses annotated).
"""

from __future__ import annotations

__all__ = ["load_session"]


def __getattr__(name: str):
    # lazy: `closedloop --help` should not pay for importing mne
    if name == "load_session":
        from closedloop.load import load_session

        return load_session
    raise AttributeError(f"module 'closedloop' has no attribute {name!r}")

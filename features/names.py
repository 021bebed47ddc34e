"""Channel names as files and streams write them: 'FCz', 'Fcz', 'FCZ', 'Fcz.', 'EEG FCz', 'FCz-REF'.

Config names match stream names case-insensitively once decorations are removed (trailing dots as
in PhysioNet EDF, an 'EEG ' prefix and '-REF' / '-LE' / '-A1A2' reference suffixes as in clinical
EDF), so a config written with 10-20 / 10-10 spellings works on any of them. An exact match wins;
a normalised match must be unique.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

_PREFIX = re.compile(r"^(eeg)[\s_\-:]+", re.I)
_SUFFIX = re.compile(r"[\s_\-]+(ref|le|re|ar|avg|a1|a2|a1a2|m1|m2|cz)$", re.I)
# Shown in full up to this many names; the rest on request (check-config --channels).
HAVE_SHOWN = 40


def normalize(name: str) -> str:
    """'EEG Fcz.-REF ' -> 'fcz': the comparable core of a channel name."""
    s = name.strip().strip(".").strip()
    s = _PREFIX.sub("", s)
    s = _SUFFIX.sub("", s).strip().strip(".")
    return s.lower()


def resolve(name: str, ch_names: Sequence[str]) -> str | None:
    """The stream's channel that `name` means (exact, else one normalised match), or None."""
    if name in ch_names:
        return name
    key = normalize(name)
    hits = [c for c in ch_names if normalize(c) == key]
    return hits[0] if len(hits) == 1 else None


def resolve_all(names: Sequence[str], ch_names: Sequence[str]) -> list[str]:
    """Each name that resolves, as the stream spells it (unresolved ones dropped)."""
    out = []
    for n in names:
        r = resolve(n, ch_names)
        if r is not None and r not in out:
            out.append(r)
    return out


def suggest(name: str, ch_names: Sequence[str], n: int = 3) -> list[str]:
    """Closest stream names by their normalised spelling ('Po7' -> 'PO7' before 'P7')."""
    by_norm: dict[str, str] = {}
    for c in ch_names:
        by_norm.setdefault(normalize(c), c)
    close = difflib.get_close_matches(normalize(name), list(by_norm), n=n, cutoff=0.5)
    return [by_norm[c] for c in close]


def missing_channel_msg(path: str, name: str, ch_names: Sequence[str]) -> str:
    """'path: channel 'X' not in stream (have: ...); did you mean 'Y'?'"""
    shown = ", ".join(ch_names[:HAVE_SHOWN])
    more = len(ch_names) - HAVE_SHOWN
    if more > 0:
        shown += f" ... and {more} more: closedloop check-config CONFIG --recording REC --channels"
    hints = suggest(name, ch_names, n=1)
    hint = f"; did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
    return f"{path}: channel '{name}' not in stream (have: {shown}){hint}"

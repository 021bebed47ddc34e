"""A session's decision fingerprint: one SHA-256 chained over every decision it made.

Each decision adds one line, `first_sample,end_sample,label,score,outcome;` (samples counted from
the session's first sample, end exclusive; the score rounded to SCORE_DECIMALS decimals; the
outcome empty without a pulse request, else `fired|reason`). Two runs that decided the same
things on the same samples give the same hex digest, so a developer can assert that a change did
not alter behaviour on a recording (`closedloop offline REC --fingerprint-only`), and two
sessions can be compared at a glance. Offline blocks decide on the chunk grid, so a run in blocks
and one fed single chunks of that size share a fingerprint. Live sessions with the built-in rule
decide on the chunks the stream delivers, so their fingerprint is a record of that session, not
of the recording; with a decider plugin they decide on the same `chunk_size` grid of samples as
offline (the interlock's outcomes, on the live clock, may still differ).

Cost: one string format and one `sha256.update` per decision, 1.2 µs (timeit, this machine).
"""

from __future__ import annotations

import hashlib
import math

SCORE_DECIMALS = 6  # the score is a z-sum of order 1-10: 1e-6 is far below any threshold's grain


class DecisionFingerprint:
    """The running digest; `add` once per decision, in order."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.n_decisions = 0

    def add(self, first: int, end: int, label: str, score: float, outcome: str) -> None:
        """first / end: the decision's samples [first, end); outcome: '' or 'fired|reason'."""
        score_text = f"{score:.{SCORE_DECIMALS}f}" if math.isfinite(score) else "nan"
        if score_text == f"-{0:.{SCORE_DECIMALS}f}":  # -0.0000001 and 0.0 are the same here
            score_text = score_text[1:]
        self._hash.update(f"{first},{end},{label},{score_text},{outcome};".encode())
        self.n_decisions += 1

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def summary(self) -> dict[str, object]:
        """What the session summary holds under `fingerprint`."""
        return {
            "sha256": self.hexdigest,
            "decisions": self.n_decisions,
            "score_decimals": SCORE_DECIMALS,
        }

"""Phase of each pulse of a finished session against the acausal reference of the whole
recording (`features.phase.reference_phase`: zero-phase band-pass + Hilbert, averaged over five
equivalent filters). `SessionRecord.pulse_phases()` (closedloop.load) calls this.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from closedloop.phase_monitor import phase_at
from features.phase import phase_error_stats, reference_phase, spatial_weights
from triggers.phase_gate import PhaseSettings


def pulse_phases(rec) -> dict[str, Any]:
    """{'pulses': [{attempt, t_pulse, reference_deg, error_deg, reference_spread_deg}],
    'stats': bias / circular SD / PLV / within 30, 45 deg} for the fired phase-mode pulses of
    `rec` (a closedloop.load.SessionRecord with EEG). ValueError when there is no EEG or the
    session did not run in phase mode."""
    cfg = (rec.config or {}).get("phase") or {}
    if not cfg.get("enabled"):
        raise ValueError(f"{rec.folder}: the session did not run in phase mode")
    if rec.raw is None:
        raise ValueError(f"{rec.folder}: no EEG recorded, no reference phase")
    ph = PhaseSettings(**cfg)
    raw = rec.raw
    w = spatial_weights(
        raw.ch_names, ph.channels[0] if ph.spatial != "mean" else ph.channels, ph.spatial,
        ph.neighbours,
    )  # fmt: skip
    x = w @ raw.get_data()
    sfreq = float(raw.info["sfreq"])
    ref, _, spread = reference_phase(x, sfreq, tuple(ph.band))
    times = rec.t0_stream + raw.times
    target = math.radians(ph.target_deg)
    out = []
    for a in rec.audit:
        p = a.get("phase") or {}
        if a.get("event") != "attempt" or not a.get("fired") or "t_pulse" not in p:
            continue
        r = phase_at(times, ref, float(p["t_pulse"]))
        k = int(np.clip(np.searchsorted(times, p["t_pulse"]), 0, times.size - 1))
        out.append(
            {
                "attempt": a.get("attempt"),
                "t_pulse": p["t_pulse"],
                "reference_deg": math.degrees(r),
                "error_deg": math.degrees(math.remainder(r - target, 2 * math.pi)),
                "reference_spread_deg": math.degrees(float(spread[k])),
            }
        )
    errors = np.radians([o["error_deg"] for o in out])
    return {"pulses": out, "stats": phase_error_stats(errors)}

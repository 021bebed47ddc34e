"""Free disk space at session start: enough for the recording, or a warning that says so.

Figures: LabRecorder writes each EEG sample as float32 per channel plus a 9-byte time stamp, so
64 channels at 1 kHz take 1000 x (64 x 4 + 9) B/s = 0.95 GB/h, 32 channels at 500 Hz 0.24 GB/h,
and the largest amplifiers labs use here (256 channels at 2 kHz) 7.4 GB/h; the audit and event
logs add about 1 MB/h. NeuroSimo warns at 100 and 50 GiB because it keeps raw TMS-EEG at 5 kHz
and more; at our rates 10 GiB is about 10 h of 64 x 1 kHz and over 1 h of the largest stream,
and 2 GiB barely covers a 2 h session at 64 x 1 kHz.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

GIB = 1024**3
DISK_WARN_BYTES = 10 * GIB  # warn below this, or below DISK_WARN_HOURS of this stream
DISK_CRITICAL_BYTES = 2 * GIB  # "critical" below this, or below DISK_CRITICAL_HOURS
DISK_WARN_HOURS = 4.0  # a long session with its breaks
DISK_CRITICAL_HOURS = 1.0
XDF_STAMP_BYTES = 9  # per sample: 1 length byte + an 8-byte double time stamp


def recording_bytes_per_hour(n_channels: int, sfreq: float) -> float:
    """XDF bytes per hour of one float32 EEG stream (the bulk of a session folder)."""
    return 3600.0 * sfreq * (4 * n_channels + XDF_STAMP_BYTES)


def check_disk(folder: Path, n_channels: int, sfreq: float) -> dict[str, Any]:
    """Free space at `folder` and what it means for this stream.

    Returns {'free_gib', 'hours_at_stream_rate', 'level' ('ok', 'warn', 'critical'),
    'message'} ('message' is "" when level is 'ok').
    """
    free = shutil.disk_usage(folder).free
    rate = recording_bytes_per_hour(n_channels, sfreq)
    hours = free / rate if rate > 0 else math.inf
    if free < DISK_CRITICAL_BYTES or hours < DISK_CRITICAL_HOURS:
        level = "critical"
    elif free < DISK_WARN_BYTES or hours < DISK_WARN_HOURS:
        level = "warn"
    else:
        level = "ok"
    message = (
        ""
        if level == "ok"
        else (
            f"low disk space ({level}): {free / GIB:.2f} GiB free at {folder}, about "
            f"{hours:.1f} h of recording at {n_channels} ch x {sfreq:g} Hz "
            f"(warn below {DISK_WARN_BYTES / GIB:g} GiB or {DISK_WARN_HOURS:g} h); an audit "
            "write that fails disarms the session"
        )
    )
    return {
        "free_gib": round(free / GIB, 3),
        "hours_at_stream_rate": round(hours, 2) if math.isfinite(hours) else None,
        "level": level,
        "message": message,
    }

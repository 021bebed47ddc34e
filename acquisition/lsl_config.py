"""liblsl's own configuration: keep its log quiet on the console unless asked.

liblsl prints INFO lines ("Loaded default config", its git hash) on every start and an ERR line
("Stream transmission broke off") at the end of every replay, on stderr, in every process that
loads it. closedloop reports stream loss itself (a HealthEvent, the interlock disarms), so those
lines only hide the status line. liblsl reads `[log] level` from the file named by the
`LSLAPICFG` environment variable when its first API call runs (so this works after `import
pylsl`, and child processes inherit it). A lab's own `lsl_api.cfg` (KnownPeers, multicast
settings) is kept: it is copied with the log level added, unless it sets a level itself.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

# loguru verbosities as liblsl reads them: 0 INFO, -1 WARNING, -2 ERROR, -3 FATAL
QUIET_LEVEL = -3
DEBUG_LEVEL = 0


def _user_config() -> Path | None:
    """The file liblsl would read, in its search order (env, cwd, home, /etc)."""
    candidates = [
        os.environ.get("LSLAPICFG", ""),
        "lsl_api.cfg",
        str(Path.home() / "lsl_api" / "lsl_api.cfg"),
        "/etc/lsl_api/lsl_api.cfg",
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def configure_liblsl_log(debug: bool = False) -> Path | None:
    """Point liblsl (this process and its children) at a config with a log level.

    Returns the config file written, or None when the user's own config sets a level (then it
    is left alone). Call before the first LSL stream is made.
    """
    user = _user_config()
    text = user.read_text(encoding="utf-8", errors="replace") if user is not None else ""
    if user is not None and "[log]" in text.replace(" ", "").lower():
        return None  # the lab chose its own log settings
    level = DEBUG_LEVEL if debug else QUIET_LEVEL
    uid = os.getuid() if hasattr(os, "getuid") else 0
    folder = Path(tempfile.gettempdir()) / f"closedloop-lsl-{uid}"
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = folder / f"lsl_api_{'debug' if debug else 'quiet'}_{digest}.cfg"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(f"{text.rstrip()}\n\n[log]\nlevel = {level}\n".lstrip(), encoding="utf-8")
        tmp.replace(path)  # atomic: parallel processes may write the same file
    os.environ["LSLAPICFG"] = str(path)
    return path

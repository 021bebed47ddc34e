"""What a session's timing was: percentile tables with bootstrap intervals, and code provenance.

Read from the audit log alone (one line per attempt), so a session folder of any age gives its
table again: `timing_from_audit(read_audit(folder / "audit.jsonl"))`. The session summary carries
the same table (`summary["timing"]`, written by `Session._build_summary`) and the code version
that ran (`summary["code"]`).

Quantities (ms), each over the fired pulses:
- decision latency: the audit's `latency_ms` (live: the deciding chunk's arrival to the last
  output returning; offline: the request to the last output returning),
- sample age at firing (live only): the local clock at firing minus the stream time of the
  deciding sample (both on the LSL clock after `time_correction`): how old the EEG that decided
  was when the pulse went out,
- output latency: each output's `fire()` duration (`output_ms`), one row per output,
- phase error, where the audit records it (`phase_error_deg`, phase-targeted pulses).
"""

from __future__ import annotations

import functools
import hashlib
import math
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

QUANTILES = {"median": 50.0, "p95": 95.0, "p99": 99.0}
BOOTSTRAP_RESAMPLES = 2000  # 2000 resamples: the 95 % interval ends move < 1 % between seeds
CONFIDENCE = 0.95
SAMPLE_AGE_FUTURE_MS = 5.0  # a deciding sample this far ahead of the local clock: not one clock
ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("acquisition", "features", "triggers", "closedloop", "gui")


def percentile_table(
    values: Iterable[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> dict[str, Any]:
    """n, median, p95, p99 and max of `values` (finite ones only), each quantile with a
    percentile-bootstrap confidence interval `[lo, hi]`.

    The max has no interval: resampling never goes above the largest value seen, so a bootstrap
    interval for it would only repeat the sample. Deterministic for a given `seed`.
    Returns {"n": int, "median": float, "median_ci": [lo, hi], ..., "max": float}; nan
    (JSON null) where there are no values, and nan intervals below 2 values.
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    out: dict[str, Any] = {"n": int(x.size)}
    if x.size == 0:
        for name in QUANTILES:
            out[name], out[f"{name}_ci"] = math.nan, [math.nan, math.nan]
        out["max"] = math.nan
        return out
    qs = np.array(list(QUANTILES.values()))
    point = np.percentile(x, qs)
    if x.size >= 2:
        rng = np.random.default_rng(seed)
        boot = np.empty((resamples, qs.size))
        batch = max(1, 2_000_000 // x.size)  # bounded memory: at most ~16 MB of resampled values
        for a in range(0, resamples, batch):
            b = min(resamples, a + batch)
            idx = rng.integers(0, x.size, size=(b - a, x.size))
            boot[a:b] = np.percentile(x[idx], qs, axis=1).T
        alpha = 100.0 * (1.0 - confidence) / 2.0
        lo, hi = np.percentile(boot, [alpha, 100.0 - alpha], axis=0)
    else:
        lo = hi = np.full(qs.size, math.nan)
    for i, name in enumerate(QUANTILES):
        out[name] = float(point[i])
        out[f"{name}_ci"] = [float(lo[i]), float(hi[i])]
    out["max"] = float(x.max())
    return out


def timing_samples(audit: Sequence[dict[str, Any]], live: bool | None = None) -> dict[str, list]:
    """The timing quantities (ms) of the fired pulses of an audit log, by row name.

    live: whether the session ran live (sample age is only meaningful then); None: live when
    the pulses' local and stream clocks agree within an hour (offline stream time starts at 0).
    """
    fired = [a for a in audit if a.get("event") == "attempt" and a.get("fired")]
    rows: dict[str, list] = {"decision_latency_ms": [a.get("latency_ms") for a in fired]}
    if live is None:
        live = bool(fired) and all(
            _num(a.get("t_local")) - _num(a.get("t_stream")) < 3600.0 for a in fired
        )
    if live:
        ages = [1000.0 * (_num(a.get("t_local")) - _num(a.get("t_stream"))) for a in fired]
        # a sample cannot come from the future on one clock: stream times ahead of the local
        # clock (a replay faster than real time, an amplifier clock not on LSL's) make the age
        # meaningless, so the row is left out (5 ms: time_correction noise, measured < 1 ms)
        if not any(age < -SAMPLE_AGE_FUTURE_MS for age in ages):
            rows["sample_age_ms"] = ages
    names = sorted({k for a in fired for k in (a.get("output_ms") or {})})
    for name in names:
        rows[f"output_ms:{name}"] = [(a.get("output_ms") or {}).get(name) for a in fired]
    if any(a.get("phase_error_deg") is not None for a in fired):
        rows["phase_error_deg"] = [a.get("phase_error_deg") for a in fired]
    return rows


def timing_from_audit(
    audit: Sequence[dict[str, Any]], live: bool | None = None
) -> dict[str, dict[str, Any]]:
    """Row name -> percentile_table over the fired pulses (see the module docstring)."""
    return {k: percentile_table(v) for k, v in timing_samples(audit, live).items()}


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


# ------------------------------------------------------------------------------ provenance


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_sha256(root: Path = ROOT, packages: Sequence[str] = CODE_PACKAGES) -> str:
    """One sha256 over the project's Python sources (relative path and bytes, sorted by path):
    the same code gives the same hash on any machine (~20 ms for the whole project)."""
    h = hashlib.sha256()
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(b"\0")
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def git_describe(root: Path = ROOT) -> str | None:
    """`git describe --always --dirty --tags` of the checkout, None outside git (a wheel)."""
    try:
        res = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() or None


@functools.lru_cache(maxsize=1)
def _code_version() -> tuple[tuple[str, Any], ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("closedloop")
    except PackageNotFoundError:
        pkg = None
    return (
        ("git_describe", git_describe()),
        ("package_version", pkg),
        ("source_sha256", source_sha256()),
    )


def code_version() -> dict[str, Any]:
    """What code is running: git describe (when a checkout), package version, source hash.
    Computed once per process (~30 ms: a git call and hashing the sources): tuning runs
    hundreds of sessions in one process, all on the same code."""
    return dict(_code_version())


def session_timing(folder: Path | None, live: bool) -> dict[str, Any]:
    """The summary's additions (Session._build_summary): timing table and code version."""
    from triggers.audit import read_audit

    out: dict[str, Any] = {"code": code_version()}
    audit_path = folder / "audit.jsonl" if folder is not None else None
    if audit_path is not None and audit_path.exists():
        out["timing"] = timing_from_audit(read_audit(audit_path), live=live)
    return out

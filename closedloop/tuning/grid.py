"""The tuner's grid and objective: `--grid KEY=VALUES` parsed into settings (checked against
the config before any run), `--objective` / `--require` parsed, and settings ranked."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from closedloop.config import OPEN_MAPPINGS, SessionConfig, apply_overrides, validate_for_stream
from closedloop.errors import ConfigError, UserError
from closedloop.tuning.scoring import (
    METRICS,
    PHASE_METRICS,
    PULSE_SETS,
)

if TYPE_CHECKING:
    pass

MAX_GRID_VALUES = 10_000  # values one range may expand to (a typo like 0:100:0.0001 stops here)
MAX_SETTINGS = 100_000  # combinations in one grid
TUNER_OVERRIDES: dict[str, Any] = {
    # never drive hardware or open LSL outlets from a tuner; decisions do not depend on either
    "outputs.outputs": [{"kind": "simulated"}],
    "session.publish_lsl": False,
    "feedback.enabled": False,  # participant feedback is a tap after the decision: no effect
}
DEFAULT_REQUIRE = ("hit_rate>=0.8",)
_RANGE = re.compile(r"^\s*([-+0-9.eE]+)\s*:\s*([-+0-9.eE]+)\s*:\s*([-+0-9.eE]+)\s*$")
_REQUIRE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([-+0-9.eE]+%?)\s*$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: '1,[8,12],3' -> ['1', '[8,12]', '3']."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_values(text: str, key: str = "?") -> list[Any]:
    """Grid values: 'a:b:step' (inclusive range), 'v1,v2,...' (YAML scalars), or one value."""
    m = _RANGE.match(text)
    if m:
        try:
            start, stop, step = (float(g) for g in m.groups())
        except ValueError:
            raise UserError(f"--grid {key}={text}: range must be START:STOP:STEP numbers") from None
        if not (math.isfinite(start) and math.isfinite(stop) and math.isfinite(step)):
            raise UserError(f"--grid {key}={text}: range bounds must be finite")
        if step <= 0:
            raise UserError(f"--grid {key}={text}: step must be > 0 (got {step:g})")
        if stop < start:
            raise UserError(f"--grid {key}={text}: stop ({stop:g}) is below start ({start:g})")
        n = math.floor((stop - start) / step + 1e-9) + 1
        if n > MAX_GRID_VALUES:
            raise UserError(f"--grid {key}={text}: {n} values (limit {MAX_GRID_VALUES})")
        values = [round(start + i * step, 10) for i in range(n)]
        all_int = (
            all(float(g).is_integer() for g in (start, step))
            and "." not in text
            and "e" not in text.lower()
        )
        return [int(v) for v in values] if all_int else values
    parts = _split_top_level(text)
    if any(not p.strip() for p in parts):
        raise UserError(f"--grid {key}={text}: empty value in the list")
    out = []
    for p in parts:
        try:
            out.append(yaml.safe_load(p))
        except yaml.YAMLError as exc:
            raise UserError(f"--grid {key}={text}: cannot read value {p!r}: {exc}") from None
    return out


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """['state.enter=0.5:2.5:0.25', 'trigger.dwell_s=0.5,1,2'] -> {key: values} (order kept)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise UserError(f"--grid {item!r}: expected KEY=VALUES, e.g. state.enter=0.5:2.5:0.25")
        if key in grid:
            raise UserError(f"--grid {key}: given twice")
        values = parse_values(text.strip(), key)
        if len(set(map(repr, values))) != len(values):
            raise UserError(f"--grid {key}={text}: repeated values")
        grid[key] = values
    return grid


def check_keys(base: SessionConfig, keys: Sequence[str]) -> None:
    """Unknown keys as one ConfigError (with "did you mean" from apply_overrides)."""
    errors = []
    data = base.model_dump(mode="json")
    for key in keys:
        node: Any = data
        ok = True
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                ok = (
                    isinstance(node, dict)
                    and tuple(parts[:i]) in OPEN_MAPPINGS
                    and i == len(parts) - 1
                )
                break
            node = node[part]
        if not ok:
            try:
                apply_overrides(base, {key: node})
            except ConfigError as exc:
                errors += exc.errors
            else:  # pragma: no cover - apply_overrides refuses what the walk refused
                errors.append(f"{key}: unknown key")
    if errors:
        raise ConfigError("--grid", errors)


@dataclass
class Grid:
    """Validated settings: `settings[i]` is the overrides of setting i, `configs[i]` its config."""

    keys: list[str]
    settings: list[dict[str, Any]]
    configs: list[SessionConfig]
    skipped: list[tuple[dict[str, Any], str]] = field(default_factory=list)


def build_grid(
    base: SessionConfig,
    grid: dict[str, list[Any]],
    streams: Sequence[tuple[str, list[str], float]] = (),
) -> Grid:
    """Every combination validated (config and, per recording, against its channels and rate).

    A value that is invalid in every combination it appears in is an error (ConfigError listing
    all of them); combinations that fail only together (e.g. state.enter <= state.leave) are
    skipped and listed in `skipped`. streams: (name, ch_names, sfreq) per recording.
    """
    keys = list(grid)
    check_keys(base, keys)
    n = math.prod(len(v) for v in grid.values()) if grid else 1
    if n > MAX_SETTINGS:
        raise UserError(f"--grid: {n} combinations (limit {MAX_SETTINGS}); use coarser ranges")
    ok_values: dict[str, set[int]] = {k: set() for k in keys}
    first_error: dict[tuple[str, int], str] = {}
    settings, configs, skipped = [], [], []
    for combo in itertools.product(*(range(len(grid[k])) for k in keys)):
        overrides = {k: grid[k][i] for k, i in zip(keys, combo, strict=True)}
        try:
            config = apply_overrides(base, {**overrides, **TUNER_OVERRIDES})
            for name, ch_names, sfreq in streams:
                try:
                    validate_for_stream(config, ch_names, sfreq)
                except ConfigError as exc:
                    raise ConfigError(f"{name}", exc.errors) from None
        except ConfigError as exc:
            msg = "; ".join(exc.errors)
            skipped.append((overrides, msg))
            for k, i in zip(keys, combo, strict=True):
                first_error.setdefault((k, i), msg)
            continue
        for k, i in zip(keys, combo, strict=True):
            ok_values[k].add(i)
        settings.append(overrides)
        configs.append(config)
    errors = [
        f"{k}={grid[k][i]!r}: invalid in every combination ({first_error[(k, i)]})"
        for k in keys
        for i in range(len(grid[k]))
        if i not in ok_values[k]
    ]
    if not keys and skipped:
        errors = [skipped[0][1]]
    if errors:
        raise ConfigError("--grid", errors)
    return Grid(keys, settings, configs, skipped)


# ------------------------------------------------------------------------------ the objective


@dataclass(frozen=True)
class Objective:
    """Best `metric` (max or min) among settings meeting every (metric, op, value) constraint."""

    metric: str
    maximize: bool = True
    constraints: tuple[tuple[str, str, float], ...] = ()

    def describe(self) -> str:
        goal = f"{'highest' if self.maximize else 'lowest'} {self.metric}"
        if not self.constraints:
            return goal
        return goal + " with " + " and ".join(f"{m} {op} {v:g}" for m, op, v in self.constraints)


_OPS = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}
EXTRA_COLUMNS = ("time_in_state_s", "time_in_state_frac", "epochs", *PHASE_METRICS)


def metric_column(name: str) -> str:
    """'precision' -> 'precision_fired' (what really fired is the default); full names pass."""
    if name in EXTRA_COLUMNS or any(name == f"{m}_{s}" for m in METRICS for s in PULSE_SETS):
        return name
    if name in METRICS:
        return f"{name}_fired"
    known = [*METRICS, *(f"{m}_{s}" for m in METRICS for s in PULSE_SETS), *EXTRA_COLUMNS]
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
    raise UserError(f"unknown metric {name!r}{hint}")


def parse_objective(
    maximize: str | None, minimize: str | None, require: Sequence[str]
) -> Objective:
    if maximize and minimize:
        raise UserError("give --maximize or --minimize, not both")
    metric = metric_column(minimize or maximize or "precision")
    constraints = []
    for text in require:
        m = _REQUIRE.match(text)
        if not m:
            raise UserError(f"--require {text!r}: expected METRIC OP VALUE, e.g. hit_rate>=0.8")
        name, op, value = m.groups()
        v = float(value[:-1]) / 100.0 if value.endswith("%") else float(value)
        constraints.append((metric_column(name), op, v))
    return Objective(metric, not minimize, tuple(constraints))


def _sort_value(row: dict[str, float], column: str, higher_better: bool) -> float:
    v = row.get(column, math.nan)
    if v is None or not math.isfinite(v):
        return math.inf  # undefined sorts last
    return -v if higher_better else v


def rank(rows: Sequence[dict[str, float]], objective: Objective) -> tuple[list[int], list[bool]]:
    """Indices best first, and whether each row meets every constraint (nan never does).

    Order: meets all constraints, then fewer constraints missed, then the objective, then
    higher hit rate, fewer false pulses per minute, shorter median delay, then grid order.
    """
    feasible = []
    missed = []
    for row in rows:
        bad = 0
        for col, op, value in objective.constraints:
            v = row.get(col, math.nan)
            if v is None or not math.isfinite(v) or not _OPS[op](v, value):
                bad += 1
        missed.append(bad)
        feasible.append(bad == 0)
    order = sorted(
        range(len(rows)),
        key=lambda i: (
            missed[i],
            _sort_value(rows[i], objective.metric, objective.maximize),
            _sort_value(rows[i], "hit_rate_fired", True),
            _sort_value(rows[i], "false_per_min_fired", False),
            _sort_value(rows[i], "delay_median_s_fired", False),
            i,
        ),
    )
    return order, feasible

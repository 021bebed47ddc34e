"""The session config: one YAML file, validated in full before anything starts.

Each package owns the settings of its stage (features/settings.py, triggers/settings.py, ...);
this module composes them into `SessionConfig` sections and turns pydantic errors into
'path: message' lines, all at once, with "did you mean" for unknown keys.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from closedloop.errors import ConfigError, UserError
from closedloop.participant.settings import FeedbackSettings
from closedloop.telemetry.settings import MqttSettings
from features.settings import (
    DEFAULT_GROUPS,
    ArtifactSettings,
    BandPowerSettings,
    PreprocessSettings,
    StateSettings,
)
from features.strict import StrictNumbersModel
from triggers.phase_gate import PhaseSettings
from triggers.settings import OutputSettings, PolicySettings, SafetySettings


class _Strict(StrictNumbersModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSettings(_Strict):
    """Where EEG comes from during `closedloop run`."""

    kind: Literal["lsl", "file", "brainflow"] = Field(
        "lsl",
        description="'lsl': a live stream; 'file': the recording at `path`, played in real time "
        "over LSL and read through the live path by `closedloop run` (health checks, clock "
        "model, XDF) as if it were an amplifier; 'brainflow': the BrainFlow `board`, "
        "republished over LSL and read the same way",
    )
    board: str | None = Field(
        None,
        description="kind=brainflow: the board, by BrainFlow name (CYTON_BOARD, GANGLION_BOARD, "
        "MUSE_2_BOARD, UNICORN_BOARD, SYNTHETIC_BOARD; 'cyton' works too) or numeric id",
    )
    board_params: dict[str, str | int | float] = Field(
        default_factory=dict,
        description="kind=brainflow: BrainFlowInputParams as BrainFlow takes them, e.g. "
        "{serial_port: /dev/ttyUSB0} or {mac_address: ..., ip_address: ..., ip_port: ...}",
    )
    name: str | None = Field(None, description="LSL stream name to resolve")
    stype: str | None = Field("EEG", description="LSL stream type to resolve")
    source_id: str | None = Field(None, description="LSL source_id to resolve")
    path: Path | None = Field(None, description="recording path when kind=file")
    resolve_timeout_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="seconds to wait for the stream (a session may start before the "
        "amplifier: `run` says 'waiting for stream ...' every second meanwhile)",
    )
    stale_after_s: float = Field(0.5, gt=0, le=10, description="no sample this long = stale fault")
    chunk_size: int = Field(
        10,
        ge=1,
        le=10_000,
        description="samples per chunk (file source): one decision each; live with a decider "
        "plugin, it decides every chunk_size samples of the session, as offline",
    )
    offline_block_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="offline: seconds of data per feature-chain call (decisions stay on the "
        "chunk_size grid: the same pulses as single chunks, about 2x faster)",
    )
    counter_channel: str | None = Field("counter", description="sample-counter channel, if any")
    jitter_tolerance_ms: float = Field(
        20.0,
        gt=0,
        le=1000,
        description="how far a chunk's timestamps may lie from the stream's clock model before "
        "it counts as samples lost (late, two chunks running) or a clock reset (early); at "
        "least 2 sample periods. Push-time stamps, USB jitter and 16 ms FTDI bursts stay "
        "within it (measured); a lost 10-sample chunk at 250 Hz is 40 ms",
    )
    missing_unit: str = Field(
        "microvolts",
        description="unit assumed for EEG channels whose stream gives none (the LSL / XDF "
        "convention); the session summary says when it was assumed",
    )
    expected_sfreq: float | None = Field(None, gt=0, description="refuse a stream at another rate")
    expected_n_channels: int | None = Field(
        None, gt=0, description="refuse a stream with another channel count"
    )

    @field_validator("missing_unit")
    @classmethod
    def _a_voltage(cls, value: str) -> str:
        from acquisition.lsl_source import unit_scale

        if unit_scale(value) is None:
            raise ValueError(f"{value!r} is not a voltage unit (e.g. microvolts, uV, mV, volts)")
        return value

    @model_validator(mode="after")
    def _file_needs_path(self) -> SourceSettings:
        if self.kind == "file" and self.path is None:
            raise ValueError("source.path is required when source.kind is 'file'")
        if self.kind == "brainflow" and not self.board:
            raise ValueError("source.board is required when source.kind is 'brainflow'")
        return self


class SessionSettings(_Strict):
    """Session-level behaviour."""

    name: str = Field("session", pattern=r"^[A-Za-z0-9_.-]+$", description="folder name prefix")
    out_dir: Path = Field(Path("sessions"), description="where session folders are written")
    duration_s: float | None = Field(
        None, gt=0, description="stop after this long (None: until Ctrl-C)"
    )
    publish_lsl: bool = Field(True, description="publish features and state as LSL streams")


class RecordingSettings(_Strict):
    """What the session folder holds besides config, audit log, events and summary."""

    xdf: bool = Field(True, description="record every stream to XDF through LabRecorder")
    xdf_required: bool = Field(False, description="refuse to run when LabRecorder cannot start")


class SessionConfig(_Strict):
    """A whole session: every section has defaults so the demo needs no file."""

    source: SourceSettings = SourceSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    bandpower: BandPowerSettings = BandPowerSettings()
    artifacts: ArtifactSettings = ArtifactSettings()
    state: StateSettings = StateSettings()
    trigger: PolicySettings = PolicySettings()
    safety: SafetySettings = SafetySettings()
    outputs: OutputSettings = OutputSettings()
    session: SessionSettings = SessionSettings()
    recording: RecordingSettings = RecordingSettings()
    mqtt: MqttSettings = MqttSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    phase: PhaseSettings = PhaseSettings()


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of `loc` (for "did you mean")."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
        # unwrap Optional[X] / X | None
        args = getattr(current, "__args__", None)
        if args:
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            current = models[0] if models else current
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_errors(exc: ValidationError, model: type[BaseModel] = SessionConfig) -> list[str]:
    """One 'path: message' line per pydantic error, with suggestions for unknown keys."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _loc_to_path(loc)
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            known = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            allowed = f" (known keys: {', '.join(known)})" if known and not close else ""
            lines.append(f"{path}: unknown key{hint}{allowed}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "value_error":
                path, msg = _key_path(model, loc, path, msg)
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
            lines.append(f"{path}: {msg}{shown}")
    return lines


_MSG_KEY_RE = re.compile(r"([A-Za-z_]\w*)((?:\.[\w-]+|\[\d+\])*): (.+)", re.DOTALL)


def _key_path(model: type[BaseModel], loc: tuple[Any, ...], path: str, msg: str) -> tuple[str, str]:
    """(path, message) of a validator's error, with the key it names moved into the path:
    'groups.frontal: ...' raised at `bandpower` reads 'bandpower.groups.frontal: ...' (also
    'bands.alpha: ...' raised at `bandpower.bands`, and 'enter (1.0) must ...' at `state`)."""
    owner = _model_at(model, loc)
    m = _MSG_KEY_RE.fullmatch(msg)
    if m is not None:
        first, rest, text = m.groups()
        if owner is not None and first in owner.model_fields:
            return f"{path}.{first}{rest}" if loc else f"{first}{rest}", text
        if loc and str(loc[-1]) == first:
            return f"{path}{rest}", text
    # 'enter (nan) must be above leave (0.0)' raised at `state`: the key is its first word
    word = re.match(r"[A-Za-z_]\w*(?= \()", msg)
    if owner is not None and word is not None and word.group() in owner.model_fields:
        return (f"{path}.{word.group()}" if loc else word.group()), msg
    return path, msg


def parse_config(data: dict[str, Any] | None, source: str = "<config>") -> SessionConfig:
    """Validate a config mapping; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            source, [f"<root>: expected a mapping of sections, got {type(data).__name__}"]
        )
    try:
        config = SessionConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_errors(exc)) from None
    if config.source.expected_sfreq is not None:
        # the rate is known: what depends on it (bands at or above Nyquist, welch segments in
        # samples) is checked now, as at session start, with every channel the config names
        errors = _feature_errors(config, _channels_named(config), config.source.expected_sfreq)
        if errors:
            raise ConfigError(source, [f"{e} (rate from source.expected_sfreq)" for e in errors])
    return config


def _channels_named(config: SessionConfig) -> list[str]:
    """Every channel the config names, and the default groups' (a stand-in stream layout)."""
    names = [c for chans in DEFAULT_GROUPS.values() for c in chans]
    names += [c for chans in (config.bandpower.groups or {}).values() for c in chans]
    names += list(config.artifacts.channels or [])
    if isinstance(config.preprocess.reference, list):
        names += config.preprocess.reference
    return list(dict.fromkeys(names))


def _feature_errors(config: SessionConfig, ch_names: list[str], sfreq: float) -> list[str]:
    found = [
        *config.preprocess.validate_for(ch_names, sfreq),
        *config.bandpower.validate_for(ch_names, sfreq),
        *config.artifacts.validate_for(ch_names, sfreq),
        # the state's features name groups and bands: check them against the bandpower section
        *config.state.validate_for(ch_names, sfreq, bandpower=config.bandpower),
    ]
    return list(dict.fromkeys(found))  # the same problem seen by two sections: report once


def load_config(path: str | Path | None) -> SessionConfig:
    """Read and validate a YAML session config (None: all defaults)."""
    if path is None:
        return SessionConfig()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"<file>: cannot read ({exc.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError(str(path), [f"<yaml>: not valid YAML at {where}: {exc}"]) from None
    return parse_config(data, str(path))


def validate_for_stream(
    config: SessionConfig, ch_names: list[str], sfreq: float, where: str = "config vs stream"
) -> None:
    """Check what depends on the stream (channels, Nyquist); raise ConfigError with all problems."""
    errors = _feature_errors(config, ch_names, sfreq)
    src = config.source
    if src.expected_sfreq is not None and abs(src.expected_sfreq - sfreq) > 1e-6:
        errors.append(
            f"source.expected_sfreq: stream runs at {sfreq:g} Hz, "
            f"config expects {src.expected_sfreq:g} Hz"
        )
    if src.expected_n_channels is not None and src.expected_n_channels != len(ch_names):
        errors.append(
            f"source.expected_n_channels: stream has {len(ch_names)} channels, "
            f"config expects {src.expected_n_channels}"
        )
    errors += _phase_errors(config, ch_names, sfreq)
    if errors:
        raise ConfigError(where, errors)


def _phase_errors(config: SessionConfig, ch_names: list[str], sfreq: float) -> list[str]:
    """phase.* against the stream: its channels, and its band below Nyquist."""
    ph = config.phase
    if not ph.enabled:
        return []
    from features.phase import spatial_weights

    errors = []
    try:
        spatial_weights(
            ch_names, ph.channels[0] if ph.spatial != "mean" else ph.channels, ph.spatial,
            ph.neighbours,
        )  # fmt: skip
    except ValueError as exc:
        errors.append(f"phase.channels: {exc}")
    if not ph.band[1] < sfreq / 2.0:
        errors.append(f"phase.band: {list(ph.band)} must lie below Nyquist ({sfreq / 2:g} Hz)")
    return errors


def dump_config(config: SessionConfig) -> str:
    """YAML snapshot of the effective config (for the session folder)."""
    # libyaml's dumper when present: 5 ms instead of 45 ms per session (offline tuning runs
    # hundreds of sessions)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(config.model_dump(mode="json"), Dumper=dumper, sort_keys=False)


# mappings whose keys are not ours to know: a decider's settings (its own Settings model
# validates them when the config is parsed), so `--set` and `tune --grid` may add keys there
OPEN_MAPPINGS = frozenset({("state", "decider_settings")})


def apply_overrides(config: SessionConfig, overrides: dict[str, Any]) -> SessionConfig:
    """Return a copy with dotted-key overrides applied ('state.enter': 1.5), validated in full."""
    data = config.model_dump(mode="json")
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError("overrides", [f"{key}: unknown key '{part}'"])
            node = node[part]
        if not isinstance(node, dict) or (
            parts[-1] not in node and tuple(parts[:-1]) not in OPEN_MAPPINGS
        ):
            owner = _model_at(SessionConfig, tuple(parts[:-1]))
            known = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(parts[-1], known, n=1)
            hint = f"; did you mean '{'.'.join([*parts[:-1], close[0]])}'?" if close else ""
            raise ConfigError("overrides", [f"{key}: unknown key{hint}"])
        node[parts[-1]] = value
    return parse_config(data, "overrides")


def commented_yaml(config: BaseModel, indent: int = 0) -> str:
    """YAML of `config` with each field's description as a trailing comment (configs/*.yaml)."""
    pad = "  " * indent
    lines: list[str] = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        comment = f"  # {field.description}" if field.description else ""
        if isinstance(value, BaseModel):
            if indent == 0 and lines:
                lines.append("")
            doc = (type(value).__doc__ or "").strip().splitlines()
            lines.append(f"{pad}{name}:{'  # ' + doc[0] if doc and indent == 0 else comment}")
            lines.append(commented_yaml(value, indent + 1))
            continue
        dumped = yaml.safe_dump(
            _jsonable(value), default_flow_style=True, width=10_000, sort_keys=False
        )
        dumped = dumped.strip().removesuffix("...").strip()  # scalars end with a document marker
        lines.append(f"{pad}{name}: {dumped}{comment}")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and not isinstance(value, int | float | str):
        return value.value
    return value


DEFAULT_HEADER = """\
# closedloop session config: the built-in defaults, every key with its meaning.
# Generated by `closedloop check-config --write-defaults configs/default.yaml` from the settings
# models (a test keeps it in sync). Copy it, change what your session needs, and check it with
#   closedloop check-config my_session.yaml [--recording a_recording.fif]
# Unknown keys, wrong types, values out of range and limits above the safety ceilings are errors.
"""


def default_yaml() -> str:
    return DEFAULT_HEADER + "\n" + commented_yaml(SessionConfig()) + "\n"


def config_from_args(args) -> SessionConfig:
    """The config a command runs: `--config` (or the default) with each `--set KEY=VALUE` applied
    (VALUE read as YAML)."""
    config = load_config(getattr(args, "config", None))
    overrides = {}
    for item in getattr(args, "set", []) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        import yaml

        overrides[key.strip()] = yaml.safe_load(value)
    return apply_overrides(config, overrides) if overrides else config

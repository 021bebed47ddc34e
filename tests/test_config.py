"""Config: validated in full before anything starts; every error with its path, all at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from closedloop.cli import main
from closedloop.config import (
    SessionConfig,
    apply_overrides,
    default_yaml,
    load_config,
    parse_config,
    validate_for_stream,
)
from closedloop.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_need_no_file():
    assert load_config(None) == SessionConfig()


def test_default_yaml_is_in_sync_with_the_models():
    assert (ROOT / "configs" / "default.yaml").read_text(encoding="utf-8") == default_yaml(), (
        "configs/default.yaml is stale: "
        "run closedloop check-config --write-defaults configs/default.yaml"
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid_and_commented(path):
    load_config(path)
    parents: list[tuple[int, bool]] = []  # (indent, commented) of the enclosing keys
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(stripped)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        commented = "#" in line
        # every key carries a comment, or sits inside a commented key (entries of a mapping)
        inside_commented = any(c for _, c in parents[1:]) if parents else False
        if not stripped.endswith(":") or commented:
            assert commented or inside_commented, (
                f"{path.name}:{n}: key without a comment: {line!r}"
            )
        parents.append((indent, commented))


def _errors(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    return info.value.errors


def test_unknown_key_suggests_the_close_one():
    errors = _errors({"state": {"entr": 1.0}})
    assert errors == ["state.entr: unknown key; did you mean 'enter'?"]


def test_unknown_section_lists_the_sections():
    (err,) = _errors({"stat": {"enter": 1.0}})
    assert err.startswith("stat: unknown key; did you mean 'state'?")


def test_all_errors_reported_at_once_with_paths():
    errors = _errors(
        {
            "source": {"chunk_size": "ten"},
            "bandpower": {"bands": {"alpha": [13.0, 8.0]}},
            "safety": {"min_interval_s": 0.5},
            "session": {"colour": "red"},
        }
    )
    joined = "\n".join(errors)
    assert len(errors) == 4, joined
    assert any(e.startswith("source.chunk_size:") for e in errors)
    assert any(e.startswith("bandpower.bands") for e in errors)
    assert any(e.startswith("safety.min_interval_s:") and "1.0" in e for e in errors)
    assert any(e.startswith("session.colour: unknown key") for e in errors)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("safety", "min_interval_s", 0.99),
        ("safety", "max_per_minute", 61),
        ("safety", "session_cap", 1801),
    ],
)
def test_limits_above_the_safety_ceilings_are_errors_not_clamps(section, key, value):
    (err,) = _errors({section: {key: value}})
    assert err.startswith(f"{section}.{key}:")


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("state:\n  enter: [1.0\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "line" in info.value.errors[0]
    assert str(bad) in str(info.value)


def test_stream_checks_name_missing_channels_and_nyquist():
    config = parse_config(
        {
            "bandpower": {"groups": {"posterior": ["O1", "Oz"]}, "bands": {"gamma": [30.0, 70.0]}},
            "state": {"features": [{"group": "posterior", "band": "gamma", "weight": 1.0}]},
        },
    )
    with pytest.raises(ConfigError) as info:
        validate_for_stream(config, ["Fz", "O1", "O2"], 128.0)
    joined = "\n".join(info.value.errors)
    assert "Oz" in joined
    assert "bandpower.groups.posterior" in joined
    assert "Nyquist" in joined or "64" in joined


def test_overrides_are_validated_and_suggest_keys():
    config = apply_overrides(SessionConfig(), {"state.enter": 1.5, "trigger.dwell_s": 2})
    assert config.state.enter == 1.5
    assert config.trigger.dwell_s == 2
    with pytest.raises(ConfigError, match=r"did you mean 'state.enter'"):
        apply_overrides(SessionConfig(), {"state.entr": 1.0})
    with pytest.raises(ConfigError, match=r"safety\.min_interval_s"):
        apply_overrides(SessionConfig(), {"safety.min_interval_s": 0.2})


def test_check_config_cli_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"state": {"enter": 1.0, "leave": 0.0}}), encoding="utf-8")
    assert main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"state": {"enter": "high"}, "safety": {"session_cap": 5000}}),
        encoding="utf-8",
    )
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "state.enter" in err
    assert "safety.session_cap" in err
    assert "Traceback" not in err


@pytest.mark.timeout(60)
def test_check_config_subprocess_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("safety:\n  min_interval_s: 0.1\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "closedloop.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "safety.min_interval_s" in proc.stderr
    assert "Traceback" not in proc.stderr

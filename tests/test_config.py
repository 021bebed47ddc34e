"""Config: validated in full before anything starts; every error with its path, all at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from closedloop.app.cli import main
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
        [sys.executable, "-m", "closedloop.app.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "safety.min_interval_s" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- issue 14, item 10: strictness -------------------------------------------------------------


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize(
    "where",
    [
        "state:\n  enter: {v}\n",
        "state:\n  leave: {v}\n",
        "state:\n  features:\n    - {{group: posterior, band: alpha, weight: {v}}}\n",
        "safety:\n  latency_budget_ms: {v}\n",
        "artifacts:\n  amplitude_uv: {v}\n",
        "bandpower:\n  bands:\n    alpha: [8.0, {v}]\n",
    ],
)
def test_nan_and_infinite_thresholds_and_weights_are_errors(tmp_path, where, bad):
    path = tmp_path / "c.yaml"
    path.write_text(where.format(v=bad), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (err,) = info.value.errors
    assert "finite" in err


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"safety": {"min_interval_s": True}}, "safety.min_interval_s"),
        ({"safety": {"session_cap": True}}, "safety.session_cap"),
        ({"safety": {"max_per_minute": False}}, "safety.max_per_minute"),
        ({"trigger": {"dwell_s": True}}, "trigger.dwell_s"),
        ({"state": {"enter": True, "leave": False}}, "state.enter"),
        ({"state": {"features": [{"group": "a", "band": "b", "weight": True}]}}, "state.features"),
        ({"bandpower": {"bands": {"alpha": [True, 13.0]}}}, "bandpower.bands"),
        ({"artifacts": {"rail_uv": True}}, "artifacts.rail_uv"),
        ({"source": {"expected_sfreq": True}}, "source.expected_sfreq"),
        ({"outputs": {"outputs": [{"kind": "serial", "port": "x", "baudrate": True}]}}, "outputs"),
    ],
)
def test_booleans_where_numbers_are_meant_are_errors(data, path):
    errors = _errors(data)
    assert any(e.startswith(path) and "boolean" in e for e in errors), errors


def test_integers_stay_numbers_and_booleans_stay_booleans():
    config = parse_config(
        {
            "safety": {"min_interval_s": 2, "latency_budget_ms": 100, "require_calibration": False},
            "state": {"enter": 2, "leave": 0},
            "bandpower": {"bands": {"alpha": [8, 13]}, "individual_alpha": True},
            "artifacts": {"enabled": False, "rail_uv": 200000},
        }
    )
    assert config.safety.min_interval_s == 2.0
    assert config.state.enter == 2.0
    assert config.bandpower.bands["alpha"] == (8.0, 13.0)
    assert config.bandpower.individual_alpha is True
    assert config.safety.require_calibration is False


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("stale_after_s", 2.0, True),
        ("stale_after_s", 2.01, False),
        ("latency_budget_ms", 1000.0, True),
        ("latency_budget_ms", 1000.5, False),
    ],
)
def test_sample_age_limits_are_bounded(key, value, ok):
    if ok:
        assert getattr(parse_config({"safety": {key: value}}).safety, key) == value
    else:
        (err,) = _errors({"safety": {key: value}})
        assert err.startswith(f"safety.{key}:")


def test_bands_at_or_above_nyquist_are_errors_when_the_rate_is_known():
    data = {
        "source": {"expected_sfreq": 100.0},
        "preprocess": {"notch_hz": None},
        "bandpower": {"bands": {"beta": [13.0, 30.0], "gamma": [30.0, 50.0]}},
    }
    errors = _errors(data)
    assert errors == [
        "bandpower.bands.gamma: 50 Hz above Nyquist (50 Hz) (rate from source.expected_sfreq)"
    ]
    data["bandpower"]["bands"]["gamma"] = [30.0, 49.0]
    assert parse_config(data).source.expected_sfreq == 100.0
    del data["source"]  # rate unknown: checked at session start instead (validate_for_stream)
    data["bandpower"]["bands"]["gamma"] = [30.0, 50.0]
    config = parse_config(data)
    with pytest.raises(ConfigError, match=r"bandpower\.bands\.gamma"):
        validate_for_stream(config, ["Fz", "Pz", "O1"], 100.0)


def test_remote_arm_needs_tls_and_a_login(tmp_path):
    for mqtt in (
        {"allow_remote_arm": True},
        {"allow_remote_arm": True, "tls": {"enabled": True}},
        {"allow_remote_arm": True, "username": "op", "password": "pw"},
        {"allow_remote_arm": True, "tls": {"enabled": True}, "username": "op"},
    ):
        (err,) = _errors({"mqtt": mqtt})
        assert err.startswith("mqtt.allow_remote_arm: needs tls.enabled and a login"), err
    ok = {"allow_remote_arm": True, "tls": {"enabled": True}, "username": "op"}
    assert parse_config({"mqtt": {**ok, "password": "pw"}}).mqtt.allow_remote_arm
    assert parse_config({"mqtt": {**ok, "password_env": "CL_PW"}}).mqtt.allow_remote_arm


def test_check_config_prints_key_paths_for_validator_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "bandpower:\n  groups:\n    frontal: []\n"
        "state:\n  enter: 0.5\n  leave: 1.0\n"
        "trigger:\n  dwell_s: true\n",
        encoding="utf-8",
    )
    assert main(["check-config", str(bad)]) == 2
    lines = [ln.strip() for ln in capsys.readouterr().err.splitlines()]
    assert "- bandpower.groups.frontal: empty channel list" in lines
    assert "- state.enter: enter (0.5) must be above leave (1.0)" in lines
    assert any(ln.startswith("- trigger.dwell_s: expected a number, got a boolean") for ln in lines)

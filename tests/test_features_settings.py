"""Feature settings: defaults on real montages, clear errors with key paths, the YAML config."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from acquisition.simulator import montage_channels
from closedloop.config import load_config
from features.chain import FeatureChain
from features.settings import (
    ArtifactSettings,
    BandPowerSettings,
    FeatureConfigError,
    PreprocessSettings,
    StateSettings,
    validate_feature_settings,
)

ROOT = Path(__file__).resolve().parents[1]
STD32 = list(montage_channels("standard_32"))
CONSUMER4 = list(montage_channels("consumer_4"))


def _all_defaults():
    return PreprocessSettings(), BandPowerSettings(), ArtifactSettings(), StateSettings()


def test_defaults_work_on_32_channel_montage():
    pre, bp, art, st = _all_defaults()
    validate_feature_settings([*STD32, "counter"], 500.0, pre, bp, art, st)
    chain = FeatureChain(pre, bp, art, st, [*STD32, "counter"], 500.0)
    assert chain.groups == {"frontal_midline": ["Fz", "FCz"], "posterior": ["Pz", "O1", "Oz", "O2"]}
    assert chain.feature_names == ("theta@frontal_midline", "alpha@posterior")
    assert "counter" not in chain.eeg_names


def test_default_groups_keep_existing_channels():
    names = ["Fp1", "Fp2", "C3", "C4", "P7", "P8", "O1", "O2"]  # OpenBCI Cyton default
    bp = BandPowerSettings()
    assert bp.resolved_groups(names) == {"posterior": ["O1", "O2"]}
    st = StateSettings()
    assert [f.name for f in st.resolved_features(bp.resolved_groups(names))] == ["alpha@posterior"]
    assert st.validate_for(names, 250.0, bp) == []


def test_defaults_on_consumer_montage_are_a_clear_error():
    pre, bp, art, st = _all_defaults()
    with pytest.raises(FeatureConfigError) as exc:
        FeatureChain(pre, bp, art, st, [*CONSUMER4, "counter"], 256.0)
    msg = str(exc.value)
    assert "bandpower.groups: none of the default group channels" in msg
    assert "state.features" in msg


def test_missing_channel_error_has_key_path_and_suggestion():
    bp = BandPowerSettings(groups={"posterior": ["Pz", "Oz", "O3"]})
    errors = bp.validate_for(["Fz", "Pz", "O1", "O2"], 500.0)
    assert len(errors) == 2
    assert errors[0].startswith("bandpower.groups.posterior: channel 'Oz' not in stream (have: Fz")
    assert errors[1].endswith("did you mean 'O2'?")  # difflib's closest


def test_band_above_nyquist():
    errors = BandPowerSettings().validate_for(STD32, 80.0)
    assert "bandpower.bands.gamma: 45 Hz above Nyquist (40 Hz)" in errors
    assert PreprocessSettings(notch_hz=50).validate_for(STD32, 80.0) == [
        "preprocess.notch_hz: 50 Hz at or above Nyquist (40 Hz)"
    ]


def test_every_error_is_reported_at_once():
    with pytest.raises(FeatureConfigError) as exc:
        validate_feature_settings(
            ["Fz", "Cz"],
            64.0,
            PreprocessSettings(reference=["M1"]),
            BandPowerSettings(groups={"g": ["Pz"]}),
            ArtifactSettings(channels=["Oz"]),
            StateSettings(features=[{"group": "x", "band": "mu"}]),
        )
    paths = [e.split(":")[0] for e in exc.value.errors]
    assert paths == [
        "preprocess.reference[0]",
        "preprocess.notch_hz",
        "bandpower.bands.gamma",
        "bandpower.groups.g",
        "artifacts.channels[0]",
        "artifacts.muscle_band_hz",
        "artifacts.broadband_hz",
        "state.features[0].group",
        "state.features[0].band",
    ]
    assert "bandpower.groups.g: channel 'Pz' not in stream (have: Fz, Cz)" in str(exc.value)


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (BandPowerSettings, {"bands": {"alpha": (13, 8)}}, "lo .* must be below hi"),
        (BandPowerSettings, {"groups": {"g": []}}, "groups.g: empty channel list"),
        (BandPowerSettings, {"window_s": 1.0, "segment_s": 2.0}, "segment_s"),
        (BandPowerSettings, {"method": "fft"}, "iir"),
        (StateSettings, {"enter": 0.5, "leave": 0.5}, "enter .* must be above leave"),
        (StateSettings, {"features": []}, "empty list"),
        (StateSettings, {"calibration_s": 2.0}, "greater than or equal to 5"),
        (PreprocessSettings, {"notch_hz": 55}, "50"),
        (PreprocessSettings, {"bogus": 1}, "Extra inputs"),
    ],
)
def test_model_validation(model, kwargs, match):
    with pytest.raises(ValidationError, match=match):
        model(**kwargs)


def test_eyes_closed_config_loads_and_fits_openbci():
    cfg = load_config(ROOT / "configs" / "eyes_closed_alpha.yaml")
    pre, bp, art, st = cfg.preprocess, cfg.bandpower, cfg.artifacts, cfg.state
    names = ["Fp1", "Fp2", "C3", "C4", "P7", "P8", "O1", "O2", "sample_index"]
    chain = FeatureChain(pre, bp, art, st, names, 250.0)
    assert chain.feature_names == ("alpha@occipital",)
    assert pre.notch_freqs(250.0) == [60.0, 120.0]
    assert st.target_name == "eyes_closed_alpha"


def test_every_yaml_key_is_commented():
    text = (ROOT / "configs" / "eyes_closed_alpha.yaml").read_text(encoding="utf-8")
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        head = stripped.split("#")[0]
        if stripped.endswith(":") or (":" in head and not stripped.startswith("-")):
            key = stripped.split(":")[0]
            if key in {"delta", "theta", "alpha", "beta", "gamma", "occipital", "frontal"}:
                continue  # band / group entries, named by their section comment
            assert "#" in line, f"uncommented key: {line!r}"

"""Scoring (pure functions), grid parsing and validation, and the objective of `closedloop tune`."""

from __future__ import annotations

import math

import mne
import numpy as np
import pytest

from closedloop.config import SessionConfig, apply_overrides
from closedloop.errors import ConfigError, UserError
from closedloop.tuning.grid import build_grid, parse_grid, parse_objective, parse_values, rank
from closedloop.tuning.scoring import Counts, count, metrics, score_table, target_epochs

EPOCHS = np.array([[10.0, 30.0], [50.0, 70.0], [90.0, 95.0]])


def test_target_epochs_picks_label_sorted():
    ann = mne.Annotations(
        [50, 10, 20, 5], [20, 20, 1, 2], ["meditation", "meditation", "blink", "mind_wandering"]
    )
    ep = target_epochs(ann, "meditation")
    np.testing.assert_allclose(ep, [[10, 30], [50, 70]])
    assert target_epochs(ann, "nothing").shape == (0, 2)


def test_count_hits_precision_delays_by_hand():
    pulses = [
        12.0,
        13.0,
        40.0,
        55.5,
        94.0,
    ]  # 2 in epoch 1, 1 false, 1 in epoch 2, 1 in short epoch 3
    c = count(pulses, EPOCHS, (0.0, 100.0), min_epoch_s=10.0)
    assert c.n_epochs == 2  # epoch 3 (5 s) is not scored, but its pulse counts as inside
    assert c.n_hit == 2
    assert c.n_pulses == 5
    assert c.n_inside == 4
    assert c.delays_s == (2.0, 5.5)
    assert c.outside_s == pytest.approx(100 - 45)
    m = metrics(c)
    assert m["hit_rate"] == 1.0
    assert m["precision"] == pytest.approx(0.8)
    assert m["false_per_min"] == pytest.approx(1 / (55 / 60))
    assert m["delay_median_s"] == pytest.approx(3.75)
    assert m["delay_p90_s"] == pytest.approx(2.0 + 0.9 * 3.5)
    assert m["pulses_per_min"] == pytest.approx(5 / (100 / 60))


def test_count_window_excludes_calibration_epochs_and_early_pulses():
    # window starts at 20 s (armed): epoch 1 began before it -> not scored; pulse at 12 s is out
    c = count([12.0, 25.0, 80.0], EPOCHS, (20.0, 100.0), min_epoch_s=1.0)
    assert c.n_epochs == 2  # epochs 2 and 3
    assert c.n_hit == 0
    assert c.n_pulses == 2
    assert c.n_inside == 1  # 25 s is inside epoch 1 (true pulse though epoch 1 is unscored)
    assert c.outside_s == pytest.approx(80 - (10 + 20 + 5))
    m = metrics(c)
    assert m["hit_rate"] == 0.0
    assert math.isnan(m["delay_median_s"])


def test_count_epoch_clipped_at_end_and_overlaps():
    ep = np.array([[10.0, 40.0], [30.0, 50.0], [95.0, 120.0]])
    c = count([], ep, (0.0, 100.0), min_epoch_s=6.0)
    assert c.outside_s == pytest.approx(100 - 40 - 5)  # union 10-50 and 95-100
    assert c.n_epochs == 2  # the one clipped to 5 s is not scored
    m = metrics(c)
    assert math.isnan(m["precision"])
    assert m["hit_rate"] == 0.0
    assert m["pulses_per_min"] == 0.0


def test_pooling_adds_counts():
    a = count([12.0], EPOCHS, (0.0, 100.0), 1.0)
    b = count([41.0, 60.0], EPOCHS, (0.0, 100.0), 1.0)
    pooled = a + b
    assert pooled.n_pulses == 3
    assert pooled.n_inside == 2
    assert pooled.n_epochs == 6
    assert pooled.n_hit == 2
    table = score_table(
        [{"fired": a, "requested": pooled}, {"fired": b, "requested": Counts()}], 30.0, 200.0
    )
    assert table["precision_fired"] == pytest.approx(2 / 3)
    assert table["n_pulses_requested"] == 3
    assert table["time_in_state_frac"] == pytest.approx(0.15)


def test_parse_values_ranges_and_lists():
    assert parse_values("0.5:2.5:0.25") == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5]
    assert parse_values("0.1:0.3:0.1") == [0.1, 0.2, 0.3]  # no float drift, stop included
    assert parse_values("1:5:2") == [1, 3, 5]
    assert all(isinstance(v, int) for v in parse_values("1:5:2"))
    assert parse_values("0.5,1,2") == [0.5, 1, 2]
    assert parse_values("repeat,dwell_once") == ["repeat", "dwell_once"]
    assert parse_values("[8,12],[9,13]") == [[8, 12], [9, 13]]
    assert parse_values("null") == [None]
    for bad in ("1:0:0.5", "0:1:0", "0:1:-1", "1,,2"):
        with pytest.raises(UserError):
            parse_values(bad, "k")


def test_parse_grid_errors():
    assert parse_grid(["state.enter=1,2", "trigger.dwell_s=0.5"]) == {
        "state.enter": [1, 2],
        "trigger.dwell_s": [0.5],
    }
    for bad in (["state.enter"], ["=1,2"], ["state.enter=1", "state.enter=2"], ["state.enter=1,1"]):
        with pytest.raises(UserError):
            parse_grid(bad)


def test_build_grid_unknown_key_is_an_error_with_hint():
    with pytest.raises(ConfigError) as exc:
        build_grid(SessionConfig(), parse_grid(["state.entre=1,2", "state.enter=1,2"]))
    assert "state.enter" in str(exc.value)  # did you mean
    with pytest.raises(ConfigError):
        build_grid(SessionConfig(), parse_grid(["nosection.x=1"]))


def test_build_grid_invalid_value_is_an_error_before_work():
    with pytest.raises(ConfigError) as exc:
        build_grid(SessionConfig(), parse_grid(["safety.min_interval_s=0.5,2", "state.enter=1,2"]))
    msg = str(exc.value)
    assert "safety.min_interval_s=0.5" in msg
    assert "HARD_MIN_INTERVAL_S" in msg
    with pytest.raises(ConfigError):
        build_grid(SessionConfig(), parse_grid(["trigger.mode=sometimes"]))


def test_build_grid_skips_combinations_invalid_only_together():
    g = build_grid(SessionConfig(), parse_grid(["state.enter=1:2:0.5", "state.leave=0.5,1,1.5"]))
    # every value is valid somewhere; enter <= leave combinations are skipped, not run
    assert [(s["state.enter"], s["state.leave"]) for s in g.settings] == [
        (1.0, 0.5),
        (1.5, 0.5),
        (1.5, 1),
        (2.0, 0.5),
        (2.0, 1),
        (2.0, 1.5),
    ]
    assert len(g.skipped) == 3
    assert "must be above leave" in g.skipped[0][1]
    assert all(c.outputs.outputs[0].kind == "simulated" for c in g.configs)
    assert g.configs[5].state.leave == 1.5
    # a value invalid in every combination is an error, not a silent skip
    with pytest.raises(ConfigError, match=r"state.enter=0.5: invalid in every combination"):
        build_grid(SessionConfig(), parse_grid(["state.enter=0.5:1.5:0.5", "state.leave=0.5"]))


def test_build_grid_checks_against_the_stream():
    with pytest.raises(ConfigError) as exc:
        build_grid(
            SessionConfig(),
            parse_grid(["bandpower.bands.gamma=[30,45],[30,140]"]),
            [("rec.fif", ["Fz", "Pz", "Oz"], 256.0)],
        )
    assert "Nyquist" in str(exc.value)


def test_objective_parse_and_rank():
    obj = parse_objective(None, None, ["hit_rate>=80%"])
    assert obj.metric == "precision_fired"
    assert obj.constraints == (("hit_rate_fired", ">=", 0.8),)
    with pytest.raises(UserError, match="did you mean"):
        parse_objective("precison", None, [])
    with pytest.raises(UserError):
        parse_objective(None, None, ["hit_rate=>0.8"])
    rows = [
        {"precision_fired": 0.99, "hit_rate_fired": 0.5},
        {"precision_fired": 0.90, "hit_rate_fired": 0.8},
        {"precision_fired": 0.95, "hit_rate_fired": 0.85},
        {"precision_fired": math.nan, "hit_rate_fired": 1.0},
    ]
    order, feasible = rank(rows, obj)
    assert order[0] == 2
    assert feasible == [False, True, True, True]
    order, _ = rank(rows, parse_objective(None, "false_per_min", []))
    assert order[0] == 3  # no such column anywhere: falls back to hit rate tie-break
    order, feasible = rank(rows, parse_objective(None, None, ["hit_rate>=0.99"]))
    assert feasible == [False, False, False, True]
    assert order[0] == 3  # the only feasible one, though its precision is undefined


def test_grid_sweeps_a_deciders_own_settings_even_when_the_base_config_omits_them():
    """`state.decider_settings.<key>` is the plugin's to define: the grid may add it, and the
    plugin's Settings still validate every value."""
    base = apply_overrides(SessionConfig(), {"state.decider": "tests.test_decider:Echo"})
    assert base.state.decider_settings == {}
    g = build_grid(base, parse_grid(["state.decider_settings.weight=0.5,2"]))
    assert [c.state.decider_settings for c in g.configs] == [{"weight": 0.5}, {"weight": 2.0}]
    with pytest.raises(ConfigError, match=r"weight.*valid number"):
        build_grid(base, parse_grid(["state.decider_settings.weight=heavy"]))
    with pytest.raises(ConfigError, match=r"decider_settings\.colour: Extra inputs"):
        build_grid(base, parse_grid(["state.decider_settings.colour=1"]))
    with pytest.raises(ConfigError, match=r"state\.decider_settings\.weight\.x: unknown key"):
        build_grid(base, parse_grid(["state.decider_settings.weight.x=1"]))

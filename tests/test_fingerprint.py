"""The decision fingerprint: equal decisions give equal digests, any changed decision changes it."""

from __future__ import annotations

import json
import re

import pytest

from acquisition.file_source import FileSource
from closedloop.app.cli import main
from closedloop.config import apply_overrides, load_config
from closedloop.fingerprint import DecisionFingerprint
from closedloop.session import Session
from tests.session_helpers import REPLAY_DATA, SingleChunks, bundled_recording

pytestmark = pytest.mark.timeout(120)


def _digest(lines):
    fp = DecisionFingerprint()
    for line in lines:
        fp.add(*line)
    return fp.hexdigest


def test_digest_follows_every_field_and_the_order():
    base = [(0, 10, "calibrating", float("nan"), ""), (10, 20, "target", 2.5, "1|fired")]
    ref = _digest(base)
    assert _digest(base) == ref
    assert _digest(base[::-1]) != ref
    for changed in (
        (10, 21, "target", 2.5, "1|fired"),  # sample range
        (10, 20, "non_target", 2.5, "1|fired"),  # label
        (10, 20, "target", 2.50001, "1|fired"),  # score, above the rounding
        (10, 20, "target", 2.5, "0|refractory"),  # outcome
        (10, 20, "target", 2.5, ""),  # no request at all
    ):
        assert _digest([base[0], changed]) != ref, changed
    # below the stated precision (6 decimals) the score does not matter, nor the sign of zero
    assert _digest([base[0], (10, 20, "target", 2.5 + 1e-9, "1|fired")]) == ref
    assert _digest([(0, 1, "x", -1e-9, "")]) == _digest([(0, 1, "x", 0.0, "")])


def _run(tmp_path, source, **overrides):
    config = apply_overrides(load_config("configs/default.yaml"), overrides)
    session = Session(config, source, live=False, out_root=tmp_path, arm_action="offline_run")
    summary = session.run()
    on_disk = json.loads((session.folder / "summary.json").read_text())
    assert on_disk["fingerprint"] == summary["fingerprint"]
    return summary


def test_same_recording_same_fingerprint_blocks_or_chunks_and_a_new_threshold_changes_it(
    tmp_path,
):
    path = bundled_recording()
    first = _run(tmp_path / "a", FileSource(path, chunk_size=10))
    again = _run(tmp_path / "b", FileSource(path, chunk_size=10))
    single = _run(tmp_path / "c", SingleChunks(FileSource(path, chunk_size=10)))
    higher = _run(tmp_path / "d", FileSource(path, chunk_size=10), **{"state.enter": 3.5})
    fp = first["fingerprint"]
    assert fp["decisions"] == first["samples"] // 10
    assert first["pulses"] > 0
    assert again["fingerprint"] == fp
    assert single["fingerprint"] == fp  # offline blocks decide on the same grid
    assert higher["fingerprint"]["sha256"] != fp["sha256"]
    assert higher["fingerprint"]["decisions"] == fp["decisions"]


def test_cli_fingerprint_only_prints_the_digest_and_keeps_no_folder(tmp_path, capsys):
    path = str(REPLAY_DATA / "sim_32ch_500hz.fif")
    out = tmp_path / "sessions"
    assert main(["offline", path, "--fingerprint-only", "--out", str(out)]) == 0
    digest = capsys.readouterr().out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert not out.exists()
    assert main(["offline", path, "--out", str(out)]) == 0
    summary = json.loads(next(out.glob("*/summary.json")).read_text())
    assert summary["fingerprint"]["sha256"] == digest  # the tuner's overrides change no decision
    assert main(["offline", path, "--fingerprint-only", "--set", "state.enter=3.5"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] != digest

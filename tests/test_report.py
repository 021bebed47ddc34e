"""`closedloop report`: the page of a live (real LSL replay) and an offline session, its numbers
checked against the audit log; the summary's timing table; the bootstrap table itself."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from acquisition.file_source import FileSource
from acquisition.lsl_source import LslSource
from closedloop.app.cli import main
from closedloop.config import SessionConfig, apply_overrides, load_config
from closedloop.export.report import DISCLAIMER, collect, read_report_data, write_report
from closedloop.load import read_jsonl
from closedloop.session import Session
from closedloop.timing import percentile_table, timing_from_audit, timing_samples
from tests.session_helpers import REPLAY_DATA, fast_config

CONFIGS = REPLAY_DATA.parent / "configs"


def fired_of(folder) -> list[dict]:
    return [a for a in read_jsonl(folder / "audit.jsonl") if a.get("event") == "attempt"]


def check_page_against_audit(folder, html_path) -> dict:
    """The page's numbers equal the audit log's; returns the embedded data."""
    attempts = fired_of(folder)
    fired = [a for a in attempts if a["fired"]]
    data = read_report_data(html_path)
    text = html_path.read_text(encoding="utf-8")
    assert data["pulses"] == len(fired)
    assert re.search(rf"<span id='pulses'>{len(fired)}</span>", text)
    vetoes: dict[str, int] = {}
    for a in attempts:
        if not a["fired"]:
            vetoes[a["reason"]] = vetoes.get(a["reason"], 0) + 1
    assert data["vetoes_by_reason"] == vetoes
    lat = [a["latency_ms"] for a in fired]
    row = data["timing"]["decision_latency_ms"]
    assert row["n"] == len(fired)
    assert row["median"] == pytest.approx(float(np.median(lat)), rel=1e-12)
    assert row["p99"] == pytest.approx(float(np.percentile(lat, 99)), rel=1e-12)
    assert row["max"] == pytest.approx(max(lat), rel=1e-12)
    assert row["median_ci"][0] <= row["median"] <= row["median_ci"][1]
    # the table's median is printed on the page as shown
    assert f"<td>{row['median']:.3f} [" in text
    t = np.sort([a["t_stream"] for a in fired])
    assert data["limits"]["min_interval_s"] == pytest.approx(float(np.diff(t).min()))
    assert data["limits"]["min_interval_s"] >= 1.0
    assert text.count("data:image/png;base64,") == 3  # self-contained: every figure embedded
    assert DISCLAIMER in text
    for name in ("config.yaml", "audit.jsonl"):
        assert data["hashes"][name] in text
    assert data["hashes"]["code"]["source_sha256"]
    return data


@pytest.mark.timeout(120)
def test_offline_report_matches_audit_and_recomputes_the_sessions_scores(tmp_path):
    config = fast_config(**{"state.enter": 1.2})  # one key off the defaults besides the helper's
    session = Session(
        config,
        FileSource(REPLAY_DATA / "sim_32ch_500hz.fif"),
        live=False,
        out_root=tmp_path,
        arm_action="offline_run",
    )
    summary = session.run()
    assert summary["pulses"] >= 3
    out = tmp_path / "page" / "r.html"
    assert main(["report", str(session.folder), "--out", str(out)]) == 0
    data = check_page_against_audit(session.folder, out)
    for k in ("trace", "health", "limits"):
        assert (tmp_path / "page" / f"r_{k}.png").stat().st_size > 10_000
    assert not data["live"]
    assert "sample_age_ms" not in data["timing"]  # no local clock offline
    assert ["state.enter", SessionConfig().state.enter, 1.2] in data["config_diff"]
    assert ["recording.xdf", True, False] in data["config_diff"]
    # the clean baseline + limit learning + settling + artifacts
    assert data["calibration"]["duration_s"] > SessionConfig().state.calibration_s
    assert len(data["calibration"]["baseline"]) == 10  # 5 bands x 2 groups
    assert 0.0 <= data["calibration"]["flagged_share"] < 0.5
    assert data["hashes"]["eeg_raw.fif"]

    # offline the recomputed trace is the session's own: the score at every attempt equals the
    # audit's, to the bit
    _data, rec, trace = collect(session.folder)
    for a in fired_of(session.folder):
        i = int(np.argmin(np.abs(trace.t - (a["t_stream"] - rec.t0_stream))))
        assert trace.t[i] == pytest.approx(a["t_stream"] - rec.t0_stream, abs=1e-9)
        assert trace.score[i] == a["score"]
        assert trace.label[i] == a["label"]

    # the summary carries the same timing table, so the folder alone rebuilds it
    on_disk = read_jsonl(session.folder / "audit.jsonl")
    assert summary["timing"] == timing_from_audit(on_disk, live=False)
    assert summary["code"]["source_sha256"] == data["hashes"]["code"]["source_sha256"]
    assert data["hashes"]["code"]["recorded"].startswith("by the session")
    assert not [n for n in data["notes"] if "not recomputed" in n]


def test_report_of_an_old_folder_without_timing_or_eeg(tmp_path):
    """A folder from before the summary carried timing and code, and without its EEG record:
    the page still has the timing table (from the audit log) and says what it could not show."""
    session = Session(
        fast_config(),
        FileSource(REPLAY_DATA / "sim_32ch_500hz.fif"),
        live=False,
        out_root=tmp_path,
        arm_action="offline_run",
    )
    session.run()
    folder = session.folder
    summary = json.loads((folder / "summary.json").read_text())
    del summary["timing"], summary["code"]
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "eeg_raw.fif").unlink()
    data = read_report_data(write_report(folder))
    fired = [a for a in fired_of(folder) if a["fired"]]
    assert data["pulses"] == len(fired) == summary["pulses"]
    assert data["timing"]["decision_latency_ms"]["n"] == len(fired)
    assert data["hashes"]["code"]["recorded"].startswith("at report time")
    assert any("no EEG" in n for n in data["notes"])


@pytest.mark.lsl
@pytest.mark.timeout(180)
def test_live_report_from_a_real_replay(looping_replayer, unique_name, tmp_path):
    """The bundled 4-channel file looped over LSL; a config that asks for a pulse every second
    (score always above a very low enter threshold) so that 20 s give a dozen attempts."""
    config = apply_overrides(
        load_config(CONFIGS / "consumer_4ch.yaml"),
        {
            "session.name": unique_name,
            "session.duration_s": 22.0,
            "recording.xdf": True,
            "state.calibration_s": 6.0,
            "artifacts.learn_s": 2.0,  # the default 10 s of limit learning would fill the 22 s
            "state.enter": -50.0,
            "state.leave": -100.0,
            "trigger.mode": "repeat",
            "trigger.dwell_s": 0.2,
            "trigger.repeat_interval_s": 1.0,
            "safety.min_interval_s": 1.0,
            "safety.max_per_minute": 60,
        },
    )
    source = LslSource(name=unique_name, source_id=unique_name, stype=None, resolve_timeout_s=20)
    session = Session(config, source, live=True, out_root=tmp_path, arm_action="test_arm")
    summary = session.run()
    assert summary["pulses"] >= 5, summary
    html_path = write_report(session.folder)
    assert html_path == session.folder / "report.html"
    data = check_page_against_audit(session.folder, html_path)
    assert data["live"]
    fired = [a for a in fired_of(session.folder) if a["fired"]]
    age = data["timing"]["sample_age_ms"]
    expected = [1000 * (a["t_local"] - a["t_stream"]) for a in fired]
    assert age["median"] == pytest.approx(float(np.median(expected)), rel=1e-12)
    assert 0.0 < age["median"] < 50.0  # the latency budget: older samples would be vetoed
    assert data["timing"]["output_ms:simulated"]["n"] == len(fired)
    assert data["hashes"]["session.xdf"]
    # health from the 1 s health events: the effective rate near the nominal 256 Hz
    rate = np.array([r for r in data["health"]["rate"] if r is not None], dtype=float)
    assert rate.size >= 10
    assert np.median(rate) == pytest.approx(256.0, rel=0.05)
    assert summary["timing"]["decision_latency_ms"]["n"] == len(fired)
    # the trace recomputed from the XDF's EEG, from the session's first sample, follows the
    # live scores: exactly where a live decision fell on the recompute's 10-sample grid, else
    # within the change of a smoothed score over one chunk
    _data, rec, trace = collect(session.folder)
    for a in fired:
        t = a["t_stream"] - rec.t0_stream
        i = int(np.argmin(np.abs(trace.t - t)))
        assert abs(trace.t[i] - t) <= 10 / 256 + 1e-6
        if abs(trace.t[i] - t) < 1e-6:
            assert trace.score[i] == pytest.approx(a["score"], rel=1e-9)
        else:
            assert trace.score[i] == pytest.approx(a["score"], abs=0.2)


def test_percentile_table_bootstrap_interval_covers_and_is_deterministic():
    rng = np.random.default_rng(3)
    x = rng.exponential(1.0, 400)
    t = percentile_table(x)
    assert t["n"] == 400
    assert t["median"] == pytest.approx(np.median(x))
    assert t["max"] == x.max()
    lo, hi = t["median_ci"]
    assert lo < math.log(2) < hi  # the true median of Exp(1), inside the 95 % interval
    assert hi - lo < 0.3
    assert t == percentile_table(x)  # same seed, same interval
    empty = percentile_table([None, float("nan")])
    assert empty["n"] == 0
    assert math.isnan(empty["median"])
    one = percentile_table([2.0])
    assert one["median"] == 2.0
    assert math.isnan(one["median_ci"][0])


def test_sample_age_only_where_stream_and_local_clock_agree():
    def attempt(t_stream, t_local):
        return {"event": "attempt", "fired": True, "latency_ms": 0.5, "output_ms": {"serial": 0.03},
                "t_stream": t_stream, "t_local": t_local}  # fmt: skip

    same_clock = [attempt(100.0, 100.002), attempt(105.0, 105.0031)]
    rows = timing_samples(same_clock, live=True)
    assert rows["sample_age_ms"] == pytest.approx([2.0, 3.1])
    assert rows["output_ms:serial"] == [0.03, 0.03]
    # replayed 3x faster than real time: stream time runs ahead of the local clock
    ahead = [attempt(100.0, 100.002), attempt(115.0, 105.0)]
    assert "sample_age_ms" not in timing_samples(ahead, live=True)
    assert "sample_age_ms" not in timing_samples(same_clock, live=False)

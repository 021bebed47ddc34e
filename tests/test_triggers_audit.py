"""AuditLog: one durable JSON line per record; a killed writer leaves a readable log."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from tests.kill_helpers import sigkill_after
from triggers.audit import AuditLog, read_audit


def test_records_round_trip_with_non_finite_as_null(tmp_path):
    path = tmp_path / "sub" / "audit.jsonl"
    with AuditLog(path) as log:
        log.write({"n": 1, "score": math.nan, "features": {"a": math.inf, "b": 1.5}})
        log.write({"n": 2, "reason": "refractory", "list": (1.0, -math.inf)})
        assert log.n_written == 2
    recs = read_audit(path)
    assert recs == [
        {"n": 1, "score": None, "features": {"a": None, "b": 1.5}},
        {"n": 2, "reason": "refractory", "list": [1.0, None]},
    ]
    for line in path.read_text().splitlines():
        json.loads(line)  # strict JSON, one record per line


def test_appends_to_an_existing_log_and_close_is_idempotent(tmp_path):
    path = tmp_path / "a.jsonl"
    for n in range(3):
        log = AuditLog(path)
        log.write({"n": n})
        log.close()
        log.close()
    assert [r["n"] for r in read_audit(path)] == [0, 1, 2]
    with pytest.raises(ValueError, match="closed"):
        log.write({"n": 9})


def test_torn_last_line_is_skipped_but_corruption_inside_is_an_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"n":0}\n{"n":1}\n{"n":2,"rea')
    assert [r["n"] for r in read_audit(path)] == [0, 1]
    path.write_text('{"n":0}\n{"n":1}')  # complete record without its newline
    assert [r["n"] for r in read_audit(path)] == [0, 1]
    path.write_text('{"n":0}\n{"n":1,\n{"n":2}\n')
    with pytest.raises(ValueError, match=":2: corrupt"):
        read_audit(path)


@pytest.mark.timeout(60)
def test_sigkill_leaves_a_complete_log(tmp_path):
    """A writer killed mid-session: every attempt it reported as written is in the log, in order,
    and every line is whole (at most a torn last line, which read_audit skips)."""
    path = tmp_path / "audit.jsonl"
    child = textwrap.dedent(
        f"""
        import sys
        from triggers.audit import AuditLog
        log = AuditLog({str(path)!r})
        n = 0
        while True:
            log.write({{"attempt": n, "fired": n % 3 == 0, "reason": "x" * (n % 200),
                        "features": {{f"f{{i}}": i * 0.5 for i in range(20)}}}})
            sys.stdout.write(f"{{n}}\\n")
            sys.stdout.flush()
            n += 1
        """
    )
    last_reported = sigkill_after(child, 300)
    recs = read_audit(path)
    numbers = [r["attempt"] for r in recs]
    assert numbers == list(range(len(numbers)))  # nothing missing, nothing reordered
    assert numbers[-1] >= last_reported  # the child kept writing until the kill
    assert all(len(r["features"]) == 20 for r in recs)

"""bench/sessions.py's tables and resumed runs, without a model."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import evalkit  # noqa: E402
import sessions  # noqa: E402


def rows_for(length: int) -> list:
    rows = []
    for i in range(8):
        common = {"length": length, "doc": i // 4, "needle": i % 4, "depth": 10.0 * i, "setup": "s"}
        rows.append({**common, "arm": "session", "budget": "1/8", "score": float(i < 7), "seconds": 2.0,
                     "read_seconds": 60.0, "tier_bytes": 100 << 20, "full_kv_bytes": 100 << 20, "recall_ms": 1500,
                     "peak_rss_mib": 400.0 + i})
        rows.append({**common, "arm": "ask", "budget": "1/8", "score": float(i < 6), "seconds": 60.0})
        # the full cache reads the document for its first question only (prefix reuse)
        rows.append({**common, "arm": "full", "budget": None, "score": 1.0, "seconds": 90.0 if i % 4 == 0 else 1.0})
    return rows


def test_the_tables_give_counts_intervals_and_the_follow_up_speed_up():
    result = {"suite": "sessions", "model": "fake", "config": {"budget": "1/8"}, "rows": rows_for(7936)}
    speed = sessions.speed_table(result)
    assert speed == [{"length": 7936, "session_s": 2.0, "ask_s": 60.0, "full_s": 1.0, "full_first_s": 90.0,
                      "read_s": 60.0, "tier_mib": 100.0, "full_kv_mib": 100.0, "peak_rss_mib": 407.0,
                      "recall_ms": 1500, "speedup": 30.0}]
    table = sessions.markdown(result)
    lo, hi = evalkit.wilson(7, 8)
    assert f"87.5 [{round(100 * lo, 1)}–{round(100 * hi, 1)}], n=8" in table
    assert "| 7936 | 60.0 | 2.0 | 60.0 | 30.0× | 90.0, 1.0 |" in table


def test_a_rerun_skips_the_answers_a_sitting_wrote(tmp_path):
    rows = rows_for(4096)
    partial = tmp_path / "sessions-x.partial.jsonl"
    partial.write_text("\n".join(json.dumps(r) for r in rows[:5]) + '\n{"arm": "ses')  # torn last line
    done = evalkit.load_partial(partial, key=sessions.row_key)
    assert len(done) == 5
    # the answer's own fields (seconds, recall) do not change its key; a label does
    again = {**rows[0], "seconds": 9.9, "recall_ms": 1}
    assert sessions.row_key(again) in done
    assert sessions.row_key({**rows[0], "needle": 3, "doc": 7}) not in done


def test_the_arms_are_checked():
    import pytest

    with pytest.raises(SystemExit):
        sessions.parse_args(["--arms", "session,bogus"])
    assert sessions.parse_args(["--arms", "session"]).arms == "session"

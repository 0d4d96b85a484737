"""The accuracy suites' bookkeeping (bench/evalkit.py, bench/merge.py), without a model: Wilson
intervals, runs that resume where a sitting stopped, and merges that refuse to mix answers."""

import json
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import evalkit  # noqa: E402
import merge  # noqa: E402


def test_wilson_interval_matches_known_values():
    # 7 of 10: the textbook Wilson interval is 0.3968..0.8922
    lo, hi = evalkit.wilson(7, 10)
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    assert evalkit.wilson(0, 18)[0] == 0.0 and evalkit.wilson(18, 18)[1] == 1.0
    assert evalkit.wilson(0, 0) == (0.0, 1.0)


def test_summary_carries_counts_and_intervals_and_wins_need_separate_intervals():
    rows = [{"arm": "a", "budget": None, "score": float(i < 17)} for i in range(18)]
    rows += [{"arm": "b", "budget": None, "score": float(i < 3)} for i in range(18)]
    rows += [{"arm": "c", "budget": None, "score": float(i < 12)} for i in range(18)]
    s = {r["arm"]: r for r in evalkit.summarize({"rows": rows})}
    assert s["a"]["n"] == 18 and s["a"]["lo"] < s["a"]["accuracy"] < s["a"]["hi"]
    assert evalkit.clearly_above(s["a"], s["b"])
    assert not evalkit.clearly_above(s["a"], s["c"])  # 94% against 67% at n=18: the intervals overlap
    assert "95% interval" in evalkit.markdown({"rows": rows})


def args_for(tag):
    return types.SimpleNamespace(model="fake", tag=tag, arms="restkv,shift", budgets="1/8", layout="after",
                                 queries="tail", n_batch=512, n_keep=64, max_tokens=8, seed=1)


class FakeLlama:
    def kv_stats(self):
        return {"budget": 128, "scoring_ms": 1.0}

    def close(self):
        pass


def test_a_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(evalkit, "RESULTS", tmp_path)
    monkeypatch.setattr(evalkit, "model_path", lambda name: name)
    monkeypatch.setattr(evalkit, "open_arm", lambda *a: FakeLlama())
    samples = [{"depth": d, "n_tokens": 1024, "document": "x", "question": "q", "answers": [f"d{d}"]}
               for d in (0, 50, 100)]
    asked = []

    def ask(llm, arm, document, question, args):
        if len(asked) == 4:
            raise KeyboardInterrupt  # the sitting ends after four answers
        asked.append((arm, question))
        return "d50"

    monkeypatch.setattr(evalkit, "ask", ask)
    score = lambda answer, s: float(s["answers"][0] in answer)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        evalkit.run_grid(samples, args_for("t"), "niah", score)
    partial = tmp_path / "niah-t.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 4
    with open(partial, "a") as f:
        f.write('{"torn": ')  # a line cut short by the stop is dropped

    asked.clear()
    result = evalkit.run_grid(samples, args_for("t"), "niah", score)
    assert len(asked) == 2  # only the two answers not yet given
    assert len(result["rows"]) == 6
    assert sorted(r["score"] for r in result["rows"]) == [0, 0, 0, 0, 1, 1]
    lines = partial.read_text().splitlines()  # the answers after the torn line went on lines of their own
    assert lines[4] == '{"torn": ' and all(json.loads(x) for x in lines[:4] + lines[5:])

    # the same labels on another document (another expected answer) are asked again
    asked.clear()
    samples[0]["answers"] = ["d0-other"]
    result = evalkit.run_grid(samples, args_for("t"), "niah", score)
    assert len(asked) == 2 and {r["expected"][0] for r in result["rows"]} >= {"d0-other"}

    # other settings are other answers: nothing is reused
    asked.clear()
    other = args_for("t")
    other.max_tokens = 16
    monkeypatch.setattr(evalkit, "ask", lambda *a: asked.append(1) or "0")
    evalkit.run_grid(samples, other, "niah", score)
    assert len(asked) == 6


def test_merge_joins_runs_and_refuses_disagreeing_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(evalkit, "RESULTS", tmp_path)
    row = {"depth": 0, "n_tokens": 1024, "arm": "restkv", "budget": "1/8", "setup": "s", "score": 1.0}
    a = {"suite": "niah", "model": "m", "rows": [row], "command": "python bench/niah.py --arms restkv"}
    b = {"suite": "niah", "model": "m", "rows": [dict(row, arm="shift", score=0.0), row], "command": "python x"}
    for name, r in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    merge.main(["niah-m", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    out = json.loads((tmp_path / "niah-m.json").read_text())
    assert len(out["rows"]) == 2 and out["merged_from"] == [a["command"], b["command"]]
    assert out["command"].startswith("python ") and (tmp_path / "niah-m.md").exists()
    # merged again with a third run: the output names the three runs, not the first merge
    c = {"suite": "niah", "model": "m", "rows": [dict(row, arm="snapkv")], "command": "python y"}
    (tmp_path / "c.json").write_text(json.dumps(c))
    merge.main(["niah-m", str(tmp_path / "niah-m.json"), str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "niah-m.json").read_text())["merged_from"] == [a["command"], b["command"], "python y"]

    bad = dict(b, rows=[dict(row, score=0.0)])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="disagree"):
        merge.main(["x", str(tmp_path / "a.json"), str(tmp_path / "bad.json")])
    (tmp_path / "other.json").write_text(json.dumps(dict(a, suite="ruler")))
    with pytest.raises(SystemExit, match="different suites"):
        merge.main(["x", str(tmp_path / "a.json"), str(tmp_path / "other.json")])


def test_merge_replace_takes_a_rerun_arm_from_the_last_input_only(tmp_path, monkeypatch):
    monkeypatch.setattr(evalkit, "RESULTS", tmp_path)
    row = {"depth": 0, "n_tokens": 1024, "arm": "restkv:session", "budget": "1/8", "setup": "s", "score": 0.0}
    first = {"suite": "ruler", "model": "m", "command": "python a",
             "rows": [row, dict(row, depth=50), dict(row, arm="shift", score=1.0)]}
    rerun = {"suite": "ruler", "model": "m", "command": "python b", "rows": [dict(row, score=1.0)]}
    for name, r in (("first", first), ("rerun", rerun)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    inputs = [str(tmp_path / "first.json"), str(tmp_path / "rerun.json")]
    with pytest.raises(SystemExit, match="disagree"):
        merge.main(["ruler-m", *inputs])
    merge.main(["ruler-m", *inputs, "--replace", "restkv:session"])
    out = json.loads((tmp_path / "ruler-m.json").read_text())
    # the rerun's answer alone: the first run's answer at depth 50 is not kept beside it
    assert sorted((r["arm"], r["depth"], r["score"]) for r in out["rows"]) == [
        ("restkv:session", 0, 1.0), ("shift", 0, 1.0)]
    assert "--replace restkv:session" in out["command"]
    with pytest.raises(SystemExit, match="no input holds"):
        merge.main(["ruler-m", *inputs, "--replace", "snapkv"])


def test_arms_parse_blind_and_session_variants_and_refuse_the_ones_that_cannot_be():
    assert evalkit.parse_arms("full,restkv:blind,restkv:session,streaming:session") == [
        "full", "restkv:blind", "restkv:session", "streaming:session"]
    for bad, message in (("shift:session", "keeps kv_budget cells"), ("streaming:blind", "does not score"),
                         ("restkv:fast", "suffixes are"), ("nope", "unknown policy")):
        with pytest.raises(SystemExit, match=message):
            evalkit.parse_arms(bad)
    # a session needs the question after the document: refused when the arms are parsed, not at the
    # first answer, after the haystacks are built and the model loaded
    with pytest.raises(SystemExit, match="--layout after"):
        evalkit.parse_arms("full,restkv:session", layout="both")
    assert evalkit.parse_arms("full,restkv", layout="both") == ["full", "restkv"]


def test_a_row_records_its_own_answer_s_scoring_time_beside_the_arm_s_running_total(tmp_path, monkeypatch):
    class ScoringLlama(FakeLlama):
        scoring_ms = 0.0

        def kv_stats(self):
            return {"budget": 128, "scoring_ms": self.scoring_ms}

    monkeypatch.setattr(evalkit, "RESULTS", tmp_path)
    monkeypatch.setattr(evalkit, "model_path", lambda name: name)
    monkeypatch.setattr(evalkit, "open_arm", lambda *a: ScoringLlama())
    samples = [{"depth": d, "n_tokens": 1024, "document": "x", "question": "q", "answers": ["a"]} for d in (0, 50, 100)]

    def ask(llm, arm, document, question, args):
        llm.scoring_ms += 10.0  # one Llama answers all of an arm's samples: its total grows
        return "a"

    monkeypatch.setattr(evalkit, "ask", ask)
    result = evalkit.run_grid(samples, args_for("t"), "niah", lambda answer, s: 1.0)
    for arm in ("restkv", "shift"):
        rows = [r for r in result["rows"] if r["arm"] == arm]
        assert [r["scoring_ms"] for r in rows] == [10.0, 20.0, 30.0]
        assert [r["scoring_ms_answer"] for r in rows] == [10.0, 10.0, 10.0]

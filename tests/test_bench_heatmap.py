"""The NIAH depth x length report (bench/heatmap.py, and its wiring in evalkit, niah, merge and
report), without a model: synthetic answers with known hits, the plots written, the cells not run
told from those that cannot run, and a grid run over several sittings or in parts ending in the
same table."""

import json
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import evalkit  # noqa: E402
import heatmap  # noqa: E402
import merge  # noqa: E402
import niah  # noqa: E402
import report  # noqa: E402

KINDS, DEPTHS = ("number", "distractor"), (0.0, 50.0, 100.0)
CONFIG = {"arms": "full,shift,restkv", "budgets": "1/8", "kinds": "number,distractor", "lengths": "4096,16128,32512",
          "depths": "0,50,100", "max_tokens": 32}


def synthetic_result() -> dict:
    """A SmolLM2-like grid (n_ctx_train 8192): the full cache hits everything at 4096 and cannot
    read the longer documents; restkv misses only the 50% depth; shift hits only the 0% depth and
    has answered the number needles alone at 16128; nobody has run 32512 yet."""
    rows = []
    for arm, budget in (("full", None), ("shift", "1/8"), ("restkv", "1/8")):
        for length in (4096, 16128):
            if arm == "full" and length == 16128:
                continue
            for kind in KINDS:
                if arm == "shift" and length == 16128 and kind == "distractor":
                    continue
                for i, depth in enumerate(DEPTHS):
                    hit = {"full": True, "restkv": depth != 50.0, "shift": depth == 0.0}[arm]
                    rows.append({"kind": kind, "length": length, "depth": depth, "n_tokens": length, "arm": arm,
                                 "budget": budget, "score": float(hit), "seconds": 1.0,
                                 "tok_s": {"full": 100.0, "shift": 400.0, "restkv": 300.0}[arm] + 10 * i})
    return {"suite": "niah", "model": "smollm2", "config": dict(CONFIG), "rows": rows, "n_ctx_train": 8192,
            "command": "python bench/niah.py --grid heatmap --model smollm2"}


def test_cells_and_the_accuracy_table_count_hits_over_samples():
    result = synthetic_result()
    cells = heatmap.cells(result)
    assert cells[("restkv", "1/8", 4096, 50.0)] == (0.0, 2)
    assert cells[("restkv", "1/8", 16128, 100.0)] == (2.0, 2)
    assert cells[("shift", "1/8", 16128, 0.0)] == (1.0, 1)  # the number needle only
    assert cells[("full", None, 16128, 0.0)] == (0.0, 0)
    assert cells[("restkv", "1/8", 32512, 0.0)] == (0.0, 0)  # in the command's grid, not run yet

    acc = heatmap.accuracy_by_length(result)
    assert (acc[("restkv", "1/8", 4096)]["k"], acc[("restkv", "1/8", 4096)]["n"]) == (4.0, 6)
    lo, hi = evalkit.wilson(4, 6)
    assert (acc[("restkv", "1/8", 4096)]["lo"], acc[("restkv", "1/8", 4096)]["hi"]) == (round(100 * lo, 1),
                                                                                    round(100 * hi, 1))
    table = heatmap.accuracy_table(result).splitlines()
    assert table[0] == "| arm | 4096 tokens | 16128 tokens | 32512 tokens |"
    assert table[2] == "| full cache | 100.0 [61.0–100.0], 6/6 | cannot run | cannot run |"
    assert table[3] == "| shift 1/8 | 33.3 [9.7–70.0], 2/6 | 33.3 [6.1–79.2], 1/3 | not run |"
    assert table[4] == "| restkv 1/8 | 66.7 [30.0–90.3], 4/6 | 66.7 [30.0–90.3], 4/6 | not run |"


def test_wins_are_called_only_where_the_intervals_separate():
    result = synthetic_result()
    # 18 restkv hits of 18 against 0 of 18 for shift: separate intervals; 4/6 against 2/6 are not
    for depth in DEPTHS:
        for kind in KINDS:
            for i in range(3):
                result["rows"].append({"kind": kind, "length": 2048, "depth": depth, "n_tokens": 2048, "arm": "restkv",
                                       "budget": "1/8", "score": 1.0, "seed": i})
                result["rows"].append({"kind": kind, "length": 2048, "depth": depth, "n_tokens": 2048, "arm": "shift",
                                       "budget": "1/8", "score": 0.0, "seed": i})
    wins = heatmap.wins_by_length(result)
    assert "2048 tokens: restkv 1/8 beats shift 1/8 and loses to none beyond chance" in wins
    assert "4096 tokens: restkv 1/8 beats none and loses to none beyond chance" in wins


def test_not_run_and_cannot_run_are_listed_apart():
    result = synthetic_result()
    found = heatmap.missing(result)
    assert found[heatmap.CANNOT_RUN] == {("full", None, 16128): 6, ("full", None, 32512): 6}
    assert found[heatmap.NOT_RUN] == {("shift", "1/8", 16128): 3, ("shift", "1/8", 32512): 6,
                                      ("restkv", "1/8", 32512): 6}
    assert heatmap.missing_lines(result) == [
        "not run: shift 1/8 at 16128 (3 of 6), 32512; restkv 1/8 at 32512",
        "cannot run (the document does not fit the training context, 8192 tokens): full cache at 16128, 32512",
    ]
    # without a known training context nothing is "cannot run": the full cache is simply not run there
    del result["n_ctx_train"]
    assert heatmap.missing(result)[heatmap.CANNOT_RUN] == {}
    assert heatmap.missing_lines(result)[0].startswith("not run: full cache at 16128, 32512; shift 1/8")


def test_the_full_cache_fits_only_within_the_training_context():
    # the document, the answer (max_tokens) and 64 tokens of template and question
    assert evalkit.full_n_ctx(7936, 32) == 8032
    assert evalkit.full_fits(7936, 32, 8192) and evalkit.full_fits(32512, 32, 32768)
    assert not evalkit.full_fits(8192, 32, 8192) and not evalkit.full_fits(16128, 32, 8192)
    assert evalkit.full_fits(10**6, 32, None)
    # the preset's lengths: SmolLM2 reads 4k and 8k with the full cache, Gemma-3 every one
    lengths = [int(n) for n in niah.GRIDS["heatmap"]["lengths"].split(",")]
    assert [evalkit.full_fits(n, 32, 8192) for n in lengths] == [True, True, False, False]
    assert all(evalkit.full_fits(n, 32, 32768) for n in lengths)


def test_speed_is_the_median_with_the_interquartile_range():
    result = {"suite": "niah", "model": "m", "rows": [
        {"arm": "restkv", "budget": "1/8", "length": 4096, "depth": 0.0, "kind": "number", "n_tokens": 4096,
         "score": 1.0, "tok_s": v} for v in (100.0, 200.0, 300.0, 400.0)]}
    result["rows"].append({"arm": "full", "budget": None, "length": 4096, "depth": 0.0, "kind": "number",
                           "n_tokens": 4096, "score": 1.0, "seconds": 16.0})  # before tok_s was recorded
    speed = heatmap.speed_by_length(result)
    assert speed[("restkv", "1/8", 4096)] == {"median": 250.0, "q1": 175.0, "q3": 325.0, "n": 4}
    assert speed[("full", None, 4096)] == {"median": 256.0, "q1": 256.0, "q3": 256.0, "n": 1}
    assert "| restkv 1/8 | 250.0 [175.0–325.0], n=4 |" in heatmap.speed_table(result)
    assert "1 of 5 answers predate the tok_s field" in heatmap.markdown(result)


def test_the_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    made = heatmap.write(synthetic_result(), "niah-t", tmp_path)
    assert made == [tmp_path / "niah-t-heatmap.png", tmp_path / "niah-t-speed.png"]
    for png in made:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_write_adds_the_heatmap_only_over_several_lengths(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(evalkit, "RESULTS", tmp_path)
    evalkit.write(synthetic_result(), "niah-many")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["niah-many-heatmap.png", "niah-many-speed.png", "niah-many.json", "niah-many.md",
                     "niah-many.png"]
    md = (tmp_path / "niah-many.md").read_text()
    assert md.startswith("`python bench/niah.py --grid heatmap --model smollm2`")
    assert "| restkv 1/8 | 66.7 [30.0–90.3], 4/6 |" in md and "- cannot run (the document" in md

    one = synthetic_result()
    one["rows"] = [r for r in one["rows"] if r["length"] == 4096]
    evalkit.write(one, "niah-one")
    assert not (tmp_path / "niah-one-heatmap.png").exists() and (tmp_path / "niah-one.png").exists()


def test_the_heatmap_preset_and_flags_beside_it():
    args = niah.parse_args(niah.parser(), ["--grid", "heatmap", "--model", "smollm2"])
    assert args.arms == "full,shift,restkv,restkv:blind,snapkv,streaming"
    assert (args.budgets, args.kinds, args.depths) == ("1/8", "number,distractor", "0,25,50,75,100")
    assert args.lengths == "4096,7936,16128,32512" and args.tag == "smollm2-heatmap-grid"
    args = niah.parse_args(niah.parser(), ["--grid", "heatmap", "--arms", "restkv", "--tag", "part"])
    assert (args.arms, args.tag, args.kinds) == ("restkv", "part", "number,distractor")
    args = niah.parse_args(niah.parser(), [])
    assert (args.arms, args.lengths, args.tag) == ("full,shift,restkv,snapkv", niah.LENGTHS, None)


class FakeLlama:
    def kv_stats(self):
        return {"budget": 128, "scoring_ms": 1.0}

    def close(self):
        pass


def grid_args(tag, arms):
    return types.SimpleNamespace(model="fake", tag=tag, arms=arms, budgets="1/8", layout="after", queries="tail",
                                 n_batch=512, n_keep=64, max_tokens=32, seed=1, kinds="number,distractor",
                                 lengths="4096,16128", depths="0,50,100")


def grid_samples():
    return [{"kind": kind, "length": n, "depth": d, "n_tokens": n, "document": "x", "question": f"{kind} {n} {d}",
             "answers": [f"{kind} {n} {d}"]} for kind in KINDS for n in (4096, 16128) for d in DEPTHS]


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """run_grid with a stand-in for the model: restkv answers every needle, shift only those at 0%;
    `asked` records every answer given, `stop_after` ends the sitting after that many."""
    monkeypatch.setattr(evalkit, "RESULTS", tmp_path)
    monkeypatch.setattr(evalkit, "model_path", lambda name: name)
    monkeypatch.setattr(evalkit, "open_arm", lambda *a: FakeLlama())
    state = types.SimpleNamespace(asked=[], stop_after=None)

    def ask(llm, arm, document, question, args):
        if state.stop_after is not None and len(state.asked) == state.stop_after:
            raise KeyboardInterrupt
        state.asked.append((arm, question))
        return question if arm in ("restkv", "full") or question.endswith(" 0.0") else "no idea"

    monkeypatch.setattr(evalkit, "ask", ask)
    return state


def score(answer, sample):
    return float(answer == sample["answers"][0])


def test_the_full_arm_is_not_asked_beyond_the_training_context(fake_model):
    result = evalkit.run_grid(grid_samples(), grid_args("ctx", "full,restkv"), "niah", score, n_ctx_train=8192)
    assert {q.split()[1] for arm, q in fake_model.asked if arm == "full"} == {"4096"}
    assert len([r for r in result["rows"] if r["arm"] == "full"]) == 6 and len(result["rows"]) == 18
    assert result["n_ctx_train"] == 8192
    assert heatmap.missing(result) == {heatmap.NOT_RUN: {}, heatmap.CANNOT_RUN: {("full", None, 16128): 6}}


def test_an_interrupted_run_resumed_or_run_in_parts_and_merged_gives_the_same_table(fake_model, tmp_path):
    samples, arms = grid_samples(), "full,shift,restkv"
    whole = evalkit.run_grid(samples, grid_args("whole", arms), "niah", score, n_ctx_train=8192)
    assert len(fake_model.asked) == 30  # full at 4096 only: 6 + 12 + 12

    fake_model.asked.clear()
    fake_model.stop_after = 11  # the first sitting ends mid-grid
    with pytest.raises(KeyboardInterrupt):
        evalkit.run_grid(samples, grid_args("sittings", arms), "niah", score, n_ctx_train=8192)
    fake_model.asked.clear()
    fake_model.stop_after = None
    resumed = evalkit.run_grid(samples, grid_args("sittings", arms), "niah", score, n_ctx_train=8192)
    assert len(fake_model.asked) == 19  # only what the first sitting had not answered

    parts = [evalkit.run_grid(samples, grid_args(f"part-{a}", a), "niah", score, n_ctx_train=8192)
             for a in ("full,shift", "restkv")]
    for i, part in enumerate(parts):
        part["command"] = f"python bench/niah.py --arms part{i}"
        (tmp_path / f"part{i}.json").write_text(json.dumps(part))
    merge.main(["niah-merged", str(tmp_path / "part0.json"), str(tmp_path / "part1.json")])
    merged = json.loads((tmp_path / "niah-merged.json").read_text())
    assert merged["n_ctx_train"] == 8192

    expected = ["| arm | 4096 tokens | 16128 tokens |", "|---|---|---|",
                "| full cache | 100.0 [61.0–100.0], 6/6 | cannot run |",
                "| shift 1/8 | 33.3 [9.7–70.0], 2/6 | 33.3 [9.7–70.0], 2/6 |",
                "| restkv 1/8 | 100.0 [61.0–100.0], 6/6 | 100.0 [61.0–100.0], 6/6 |"]
    for result in (whole, resumed, merged):
        assert heatmap.accuracy_table(result).splitlines() == expected
        assert heatmap.missing_lines(result) == [
            "cannot run (the document does not fit the training context, 8192 tokens): full cache at 16128"]
        assert heatmap.cells(result) == heatmap.cells(whole)


def test_report_shows_the_heatmap_what_was_not_run_and_compares_each_pair_on_the_samples_both_answered(
        tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    result = synthetic_result()
    result["merged_from"] = ["python bench/niah.py --grid heatmap --arms full", "python bench/niah.py --arms x"]
    (tmp_path / "niah-smollm2-heatmap.json").write_text(json.dumps(result))
    for name in ("niah-smollm2-heatmap.png", "niah-smollm2-heatmap-heatmap.png", "niah-smollm2-heatmap-speed.png"):
        (tmp_path / name).write_bytes(b"png")
    text = report.section()
    assert "`python bench/niah.py --grid heatmap --model smollm2`" in text
    assert "merged from: `python bench/niah.py --grid heatmap --arms full`; `python bench/niah.py --arms x`" in text
    assert "![niah-smollm2-heatmap-heatmap](bench/results/niah-smollm2-heatmap-heatmap.png)" in text
    assert "![niah-smollm2-heatmap-speed](bench/results/niah-smollm2-heatmap-speed.png)" in text
    assert "- not run: shift 1/8 at 16128 (3 of 6), 32512; restkv 1/8 at 32512" in text
    # against the full cache at 4096 only, where it ran: restkv 4/6 against 6/6
    assert "restkv keeps 67% of the full cache's accuracy at 4096 tokens (66.7 [30.0–90.3], n=6 against 100.0" in text
    # against shift also beyond the training context, but on the number needles alone at 16128, the
    # only ones shift answered there: restkv 4/6 + 2/3, shift 2/6 + 1/3, a difference of 1/3 (not
    # the +33.4 of the rounded 66.7 - 33.3)
    assert "- restkv - shift = +33.3 points at 4096, 16128 tokens (66.7 [" in text
    assert "n=9 against 33.3 [" in text and "n=12" not in text


def test_the_heatmap_grid_s_files_do_not_overwrite_a_plain_run_s_heatmap():
    # a plain run over several lengths, niah-gemma3.json, draws niah-gemma3-heatmap.png: the grid's
    # own stem must not be niah-gemma3-heatmap, whose accuracy plot would have that very name
    args = niah.parse_args(niah.parser(), ["--grid", "heatmap", "--model", "gemma3"])
    assert args.tag == "gemma3-heatmap-grid"
    plain_heatmap = "niah-gemma3-heatmap.png"
    assert f"niah-{args.tag}.png" != plain_heatmap and f"niah-{args.tag}-heatmap.png" != plain_heatmap


def test_a_part_of_the_preset_grid_lists_the_preset_s_other_lengths_and_arms_as_not_run():
    rows = [{"kind": kind, "length": 4096, "depth": d, "n_tokens": 4096, "arm": "restkv", "budget": "1/8",
             "score": 1.0, "seconds": 1.0, "tok_s": 100.0} for kind in ("number", "distractor")
            for d in (0.0, 25.0, 50.0, 75.0, 100.0)]
    config = {"grid": "heatmap", "arms": "restkv", "budgets": "1/8", "kinds": "number,distractor",
              "depths": "0,25,50,75,100", "lengths": "4096", "max_tokens": 32}
    result = {"suite": "niah", "model": "smollm2", "config": config, "rows": rows, "n_ctx_train": 8192}
    assert evalkit.has_lengths(result)  # one length, but a part of a grid: it gets the heatmap
    lines = heatmap.missing_lines(result)
    assert lines[0].startswith("not run: ") and "restkv 1/8 at 7936, 16128, 32512" in lines[0]
    assert "shift 1/8 at 4096, 7936, 16128, 32512" in lines[0]
    assert lines[1].startswith("cannot run") and "full cache at 16128, 32512" in lines[1]

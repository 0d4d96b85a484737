"""The baseline policies (SnapKV, H2O, TOVA, StreamingLLM, truncate) and `Llama.ask`, on the real model.

The attention the baselines rank by comes from the same scoring pass as ReST-KV (patches/0006); it is
held to the NumPy reference (pyrestkv/reference.py) for every row weighting and both kernels."""

import numpy as np
import pytest

import pyrestkv
from conftest import open_llama
from pyrestkv import _binding as B
from pyrestkv import reference as R
from pyrestkv.haystack import make_document
from pyrestkv.policies import H2OPolicy, CacheView
from pyrestkv.qa import qa_messages, read_document, resolve_budget

from test_restkv_exactness import ALPHA, LAYERS, N_HEAD_KV, D, read_layer, relative_error, scored_model

MARIGOLD = "Important note: the rescue ship was called the Marigold."


@pytest.mark.parametrize("kernel", ["fused", "composed"])
@pytest.mark.parametrize("rows", ["ema", "mean", "last"])
def test_attention_output_matches_reference(model_path, rows, kernel):
    llm, ctx = scored_model(model_path)
    B.set_score_kernel(ctx, kernel)
    B.set_score_output(ctx, "attention", rows)
    pos, att, _ = B.seq_score(ctx, llm._mem, ALPHA, 0)
    errors = []
    for il in LAYERS:
        q, qpos, k, _, kpos = read_layer(ctx, il)
        ref = R.window_attention(q, qpos, k, kpos, N_HEAD_KV, D**-0.5, rows, ALPHA)
        errors.append(relative_error(att[il], ref))
        if rows == "last":  # one row: a distribution over the cells it sees
            np.testing.assert_allclose(att[il].sum(axis=1), 1.0, rtol=2e-3)
    print(f"\nattention, rows={rows}, {kernel}: relative errors {errors}")
    assert max(errors) <= 1e-3
    # back to ReST-KV's score: the same pass, another output
    B.set_score_output(ctx, "restkv", "ema")
    _, scores, _ = B.seq_score(ctx, llm._mem, ALPHA, 0)
    assert not np.allclose(scores, att)
    llm.close()


def test_score_output_rejects_bad_values(model_path):
    llm, ctx = scored_model(model_path, tokens=64)
    with pytest.raises(ValueError, match="score output"):
        B.set_score_output(ctx, "logits")
    with pytest.raises(ValueError, match="score rows"):
        B.set_score_output(ctx, "attention", "median")
    llm.close()


def test_h2o_accumulates_over_passes():
    pol = H2OPolicy(budget=40, window=4, sink=0)
    first = np.ones((1, 1, 6), dtype=np.float32)
    pos = np.arange(6, dtype=np.int32)
    assert np.array_equal(pol.accumulate(pos, first), first)
    pol.evicted(pos, np.array([1, 3]))  # keeps positions 0, 2, 4, 5
    pos2 = np.array([0, 2, 4, 5, 6, 7], dtype=np.int32)
    acc = pol.accumulate(pos2, np.full((1, 1, 6), 0.5, dtype=np.float32))
    np.testing.assert_allclose(acc[0, 0], [1.5, 1.5, 1.5, 1.5, 0.5, 0.5])
    # renumbered from outside: the sums start again rather than land on the wrong cells
    pol.evicted(pos2, np.array([], dtype=np.int64))
    acc = pol.accumulate(np.arange(6, dtype=np.int32), np.full((1, 1, 6), 0.5, dtype=np.float32))
    np.testing.assert_allclose(acc, 0.5)


@pytest.mark.parametrize("policy", ["streaming", "truncate"])
def test_unscored_baselines_keep_what_they_promise(model_path, policy):
    llm = open_llama(model_path, kv_policy=policy, kv_budget=128, n_batch=64)
    llm.eval(llm.tokenize(make_document(llm, 700, [], seed=2).encode())[:600])
    pos, _ = llm.kv_cells()
    assert len(pos) <= 128 + 64 and llm.kv_stats()["evictions"] > 0
    assert "scoring_passes" not in llm.kv_stats()
    head = 4 if policy == "streaming" else 64
    # the head of the text, then nothing but the most recent tokens
    assert np.array_equal(pos[:head], np.arange(head))
    tail = pos[head:]
    assert np.array_equal(tail, np.arange(tail[0], tail[0] + len(tail)))
    assert tail[-1] == 599
    llm.close()


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova"])
def test_scored_baselines_read_past_the_cache(model_path, policy):
    llm = open_llama(model_path, kv_policy=policy, kv_budget=128, n_batch=128)
    llm.eval(llm.tokenize(make_document(llm, 700, [], seed=2).encode())[:600])
    stats = llm.kv_stats()
    assert stats["policy"] == policy and stats["scoring_passes"] > 0 and stats["cells_used"] <= 128 + 128
    assert "kv_alpha" not in stats
    pos, _ = llm.kv_cells()
    assert np.array_equal(pos[:4], np.arange(4))  # sink tokens
    assert pos[-1] == 599
    llm.close()


def test_baseline_policies_reject_bad_parameters(model_path):
    with pytest.raises(ValueError, match="kv_budget"):
        pyrestkv.Llama(model_path, kv_policy="snapkv", kv_budget=8, verbose=False)
    with pytest.raises(ValueError, match="unknown kv_policy"):
        pyrestkv.Llama(model_path, kv_policy="lru", verbose=False)
    with pytest.raises(ValueError, match="kv_kernel"):
        pyrestkv.Llama(model_path, kv_policy="h2o", kv_kernel=0, verbose=False)


def test_ask_answers_and_returns_stats(model_path, tmp_path):
    # question-blind as built; ask() makes it question-aware for its call only
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256, kv_query="none")
    doc = make_document(llm, 1500, [(0.4, MARIGOLD)], seed=5)
    pieces = []
    result = llm.ask(doc, "What was the rescue ship called?", max_tokens=16, stream=pieces.append,
                     question_queries="question")
    assert "Marigold" in result.answer
    assert "".join(pieces).strip() == result.answer
    stats = result.kv_stats
    assert stats["policy"] == "restkv" and stats["evictions"] > 0 and stats["probe_tokens"] > 0
    assert result.tokens_read > 1500 and result.answer_tokens > 0 and result.seconds > 0
    assert llm.kv_policy.query == "none"  # ask() puts back the query it borrowed
    # the same document from a file, question-blind this time
    path = tmp_path / "doc.txt"
    path.write_text(doc)
    result = llm.ask(str(path), "What was the rescue ship called?", max_tokens=16, question_queries="none")
    # the leading tokens still cached where they were first read are reused, the rest read again
    assert 1000 < result.tokens_read < 1500 + 50 and result.kv_stats["probe_tokens"] == stats["probe_tokens"]
    llm.close()


def test_ask_rejects_bad_input(model_path, tmp_path):
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256)
    with pytest.raises(ValueError, match="document is empty"):
        llm.ask("   ", "q?")
    with pytest.raises(ValueError, match="question is empty"):
        llm.ask("some text", " ")
    with pytest.raises(ValueError, match="layout"):
        llm.ask("some text", "q?", layout="middle")
    with pytest.raises(ValueError, match="question_queries"):
        llm.ask("some text", "q?", question_queries="all")
    with pytest.raises(ValueError, match="max_tokens"):
        llm.ask("some text", "q?", max_tokens=0)
    with pytest.raises(TypeError, match="stream"):
        llm.ask("some text", "q?", stream=True)
    with pytest.raises(ValueError, match="not a directory"):
        read_document(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_document(tmp_path / "missing.txt")
    llm.close()


def test_prompt_layouts_and_budgets():
    after, before, both = (qa_messages("DOC", "Q?", layout)[0]["content"] for layout in ("after", "before", "both"))
    assert after.index("DOC") < after.index("Q?")
    assert before.index("Q?") < before.index("DOC")
    assert both.count("Q?") == 2
    assert resolve_budget(1024, 8000) == 1024
    assert resolve_budget("1/8", 8000) == 1000
    assert resolve_budget(0.125, 8000) == 1000
    assert resolve_budget("1/8", 100) == 64  # never below the window and sink tokens
    for bad in ("0", "1/0", "abc", 1.5, 0.0, -3):
        with pytest.raises(ValueError):
            resolve_budget(bad, 8000)

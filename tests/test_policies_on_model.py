"""The budget policies end to end on the real model: restkv (bounded memory, generation, needles,
fidelity, the question probe, positions, the scoring options, a sliding-window model) and the
baselines (snapkv, h2o, tova, streaming, truncate)."""

import time

import llama_cpp
import numpy as np
import pytest

from helpers import N_HEAD, D, N_HEAD_KV, greedy_chat, open_llama
from pyrestkv import _binding
from pyrestkv.haystack import NEEDLE_CASES, make_document, needle_prompt
from pyrestkv.policies import RestKVPolicy


@pytest.mark.slow
def test_bounded_memory_on_a_long_document(model_path):
    """9,000 tokens through kv_budget=512: never more than n_ctx = budget + one chunk cells, and
    positions are compacted before they pass SmolLM2's 8,192-token training context."""
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=512, n_batch=512)
    tokens = llm.tokenize(make_document(llm, 9800, [], seed=21).encode())
    assert len(tokens) >= 9000
    t0 = time.perf_counter()
    llm.eval(tokens)
    wall_ms = (time.perf_counter() - t0) * 1e3
    stats = llm.kv_stats()
    print(f"\n{ {k: v for k, v in stats.items() if k != 'layer_scores'} }")
    assert stats["n_ctx"] == llm.n_ctx() == 1024 and stats["budget"] == 512
    assert stats["cells_peak"] <= stats["n_ctx"]
    assert stats["cells_used"] <= stats["n_ctx"]
    assert stats["tokens_seen"] == len(tokens)
    assert stats["tokens_evicted"] == len(tokens) - stats["cells_used"]
    # chunks of 512: the first onto an empty cache, every later one onto the 512 cells of the budget
    chunks = [512] * (len(tokens) // 512) + [len(tokens) % 512] * (len(tokens) % 512 > 0)
    assert stats["cells_attended"] == sum(n * (512 if i else 0) + n * (n + 1) // 2 for i, n in enumerate(chunks))
    assert stats["scoring_passes"] >= (len(tokens) - 1024) // 512
    assert stats["compactions"] >= 1 and stats["pos_next"] <= llm._model.n_ctx_train()
    assert len(stats["layer_scores"]) == 30
    # where the read's time went: forward passes, scoring and eviction, apart and within the read
    assert stats["decode_ms"] > 0 and stats["scoring_ms"] > 0 and stats["evict_ms"] > 0
    assert stats["decode_ms"] + stats["scoring_ms"] + stats["evict_ms"] <= wall_ms
    # the CPU's f16 cache is scored by the fused op, every layer
    assert stats["score_kernel"] == "auto" and stats["scoring_fused_layers"] == 30
    # the recent window is always kept
    positions, cached = llm.kv_cells()
    assert list(cached[-32:]) == tokens[-32:]
    llm.close()


@pytest.mark.slow
def test_generation_evicts_in_bulk(model_path):
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=128)
    n_ctx = llm.n_ctx()  # 256 + 128, which llama.cpp rounds up to a multiple of 256
    out = llm.create_completion("Count from one to one thousand: one, two, three,", max_tokens=1100,
                                temperature=0.0, logit_bias={llm.token_eos(): -1e9})
    stats = llm.kv_stats()
    assert out["usage"]["completion_tokens"] == 1100
    assert stats["cells_peak"] <= n_ctx == 512
    # a full cache goes back down to the budget: one scoring pass per n_ctx - budget = 256 tokens,
    # not one per token
    total = out["usage"]["total_tokens"]
    assert stats["scoring_passes"] == stats["evictions"] == (total - n_ctx) // 256 + 1
    assert stats["cells_used"] <= n_ctx
    llm.close()


@pytest.mark.slow
def test_needles_restkv_beats_shift(model_path):
    """Needle cases the full cache answers; restkv at kv_budget=512 keeps at least 5 of 6 or more,
    and shift with the same n_ctx keeps fewer."""
    hits = {"full": [], "restkv": [], "shift": []}
    for i, case in enumerate(NEEDLE_CASES):
        configs = {
            "full": dict(kv_policy="full", n_ctx=3500),
            "restkv": dict(kv_policy="restkv", kv_budget=512),
            "shift": dict(kv_policy="shift", n_ctx=1024, n_keep=32),
        }
        for name, kwargs in configs.items():
            llm = open_llama(model_path, n_batch=512, **kwargs)
            doc = make_document(llm, 3000, [(case.depth, case.fact)], seed=100 + i)
            answer = greedy_chat(llm, needle_prompt(doc, case.question))
            hits[name].append(case.answer.lower() in answer.lower())
            llm.close()
    usable = [i for i, hit in enumerate(hits["full"]) if hit]
    restkv = sum(hits["restkv"][i] for i in usable)
    shift = sum(hits["shift"][i] for i in usable)
    print(f"\nneedles answered by the full cache: {len(usable)}/{len(NEEDLE_CASES)}; "
          f"restkv (kv_budget=512): {restkv}; shift (n_ctx=1024): {shift}")
    assert len(usable) >= 6
    assert restkv >= 5 and restkv >= len(usable) - 1
    assert shift < restkv


def teacher_forced_top1(model_path, tokens, n_prefix, **kwargs):
    llm = open_llama(model_path, logits_all=True, n_batch=512, **kwargs)
    llm.eval(tokens)
    predicted = np.argmax(llm.scores[n_prefix - 1 : len(tokens) - 1], axis=1)
    llm.close()
    return predicted


@pytest.mark.slow
def test_fidelity_restkv_above_shift(model_path):
    """Teacher-force 200 tokens after a 2,000-token text with kv_budget=512: restkv's next-token
    predictions agree with the full cache's more often than shift's do."""
    llm = open_llama(model_path, n_ctx=512)
    tokens = llm.tokenize(make_document(llm, 2300, [], seed=31).encode())[:2200]
    llm.close()
    full = teacher_forced_top1(model_path, tokens, 2000, kv_policy="full", n_ctx=2304)
    agreement = {}
    for name, kwargs in {
        "restkv": dict(kv_policy="restkv", kv_budget=512, kv_query="none"),
        "shift": dict(kv_policy="shift", n_ctx=1024),
    }.items():
        agreement[name] = float(np.mean(teacher_forced_top1(model_path, tokens, 2000, **kwargs) == full))
    print(f"\ntop-1 agreement with the full cache: {agreement}")
    assert agreement["restkv"] > agreement["shift"]


class PinnedRowsWatch(RestKVPolicy):
    """restkv that notes, at every scoring pass, how many pinned (probe) rows the pass scores with."""

    def rate(self, view):
        rows, _ = _binding.debug_tensor(self.ctx, 0, _binding.DEBUG_Q_PINNED)
        self.pinned_rows.append(len(rows) // (N_HEAD * D))
        return super().rate(view)


def pinned_rows(llm) -> int:
    rows, _ = _binding.debug_tensor(llm._ctx_ptr, 0, _binding.DEBUG_Q_PINNED)
    return len(rows) // (N_HEAD * D)


def test_prompt_aware_probe_is_pinned_then_dropped(model_path):
    policy = PinnedRowsWatch(budget=256)
    policy.pinned_rows = []
    llm = open_llama(model_path, kv_policy=policy, n_batch=256)
    policy.ctx = llm._ctx_ptr
    doc = make_document(llm, 1200, [], seed=41)
    llm.create_completion(needle_prompt(doc, "What was repaired first?"), max_tokens=4, temperature=0.0)
    stats = llm.kv_stats()
    assert stats["probe_tokens"] == 32
    assert stats["scoring_passes"] >= 3
    # while the prompt is read, every pass scores with the prompt's tail pinned (32 rows); the pass
    # after its last chunk, when the tail is really in the cache and in the window, without them
    n = stats["scoring_passes"]
    assert policy.pinned_rows == [32] * (n - 1) + [0]
    # after the prompt the pinned rows are gone: scoring uses the real window only
    assert pinned_rows(llm) == 0
    llm.close()


def test_question_blind_mode_does_not_probe(model_path):
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256, kv_query="none")
    llm.eval(llm.tokenize(make_document(llm, 800, [], seed=42).encode()))
    assert llm.kv_stats()["probe_tokens"] == 0
    llm.close()


def test_compact_positions_mode(model_path):
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256, kv_positions="compact")
    llm.eval(llm.tokenize(make_document(llm, 1000, [], seed=43).encode()))
    positions, _ = llm.kv_cells()
    assert np.array_equal(positions, np.arange(len(positions)))
    keep = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256, kv_positions="keep")
    keep.eval(keep.tokenize(make_document(keep, 1000, [], seed=43).encode()))
    kept, _ = keep.kv_cells()
    assert kept[-1] > len(kept)  # original positions, with holes
    llm.close()
    keep.close()


def test_composed_scoring_kernel_on_request(model_path):
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256, kv_score_kernel="composed")
    llm.eval(llm.tokenize(make_document(llm, 900, [], seed=8).encode())[:800])
    stats = llm.kv_stats()
    assert stats["scoring_passes"] >= 1 and stats["scoring_fused_layers"] == 0
    llm.close()


def test_explicit_question_text(model_path):
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256,
                     kv_query="What is the password of the archive room?")
    llm.eval(llm.tokenize(make_document(llm, 700, [], seed=44).encode()))
    stats = llm.kv_stats()
    assert 5 <= stats["probe_tokens"] <= 32 and stats["kv_query"] == "What is the password of the archive room?"
    llm.close()


def test_score_shape_matches_the_model(model_path):
    # scores come per layer and query head: SmolLM2 has 30 layers, 9 query heads over 3 KV heads
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256)

    assert _binding.score_shape(llm._ctx_ptr) == (30, N_HEAD)
    assert llm.kv_policy.model.n_head_kv == N_HEAD_KV
    llm.close()


@pytest.mark.slow
def test_gemma3_sliding_window_model():
    """Gemma-3 mixes sliding-window and full-attention layers (an iSWA cache): restkv captures the
    queries of the full-attention layers only, scores their cache and keeps memory bounded.
    (Gemma-3-270m does not answer our needle prompts even with the full cache, so this test checks
    the mechanics, not the answer.)"""
    from pyrestkv.models import gemma3_model_path

    llm = open_llama(gemma3_model_path(), kv_policy="restkv", kv_budget=512, n_batch=512)
    layers, heads = _binding.score_shape(llm._ctx_ptr)
    tokens = llm.tokenize(make_document(llm, 3000, [], seed=100).encode())
    llm.eval(tokens)
    stats = llm.kv_stats()
    print(f"\ngemma3: {layers} of {llama_cpp.llama_model_n_layer(llm.model)} layers scored, {heads} query heads")
    assert 0 < layers < llama_cpp.llama_model_n_layer(llm.model)  # only the full-attention layers
    assert stats["cells_peak"] <= stats["n_ctx"] == 1024
    assert stats["scoring_passes"] >= (len(tokens) - 1024) // 512
    assert stats["cells_used"] <= 1024 and stats["tokens_seen"] == len(tokens)
    positions, cached = llm.kv_cells()
    assert list(cached[-32:]) == tokens[-32:]
    # the last pass scored exactly the full-attention layers, with ReST-KV's scores (odds times a
    # distance: non-negative, and positive somewhere in every layer)
    summary = stats["layer_scores"]
    assert [x["layer"] for x in summary] == list(range(layers))
    assert all(0.0 <= x["mean"] <= x["max"] and x["max"] > 0.0 for x in summary)
    llm.close()


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

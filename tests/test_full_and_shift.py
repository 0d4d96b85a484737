"""The policies without a budget, on the real model: "full" is llama-cpp-python itself, "shift" is
llama.cpp's context shift (keep n_keep tokens, drop half of the rest, re-position)."""

import llama_cpp
import numpy as np
import pytest

import pyrestkv
from helpers import greedy_chat, open_llama
from pyrestkv.haystack import make_document

PROMPT = "The three primary colours of light are red, green and"


def test_full_policy_matches_llama_cpp(model_path):
    """kv_policy='full' is llama-cpp-python: same greedy text, also when the prefix is reused."""
    prompts = [PROMPT, PROMPT + " blue. Mixing all three gives", "Once upon a time, in a small village,"]
    outputs = {}
    for cls in (llama_cpp.Llama, pyrestkv.Llama):
        llm = open_llama(model_path, cls=cls, n_ctx=512)
        outputs[cls] = [
            llm.create_completion(p, max_tokens=32, temperature=0.0)["choices"][0]["text"] for p in prompts
        ]
        llm.close()
    assert outputs[pyrestkv.Llama] == outputs[llama_cpp.Llama]
    assert all(len(t) > 0 for t in outputs[llama_cpp.Llama])


def test_full_policy_rejects_prompt_longer_than_cache(model_path):
    llm = open_llama(model_path, n_ctx=256)
    with pytest.raises(ValueError, match="exceed context window"):
        llm.create_completion("word " * 400, max_tokens=4)
    llm.close()


@pytest.mark.slow
def test_shift_reads_past_the_cache(model_path):
    """n_ctx=1024 cells read a 3,000+ token document; the question is about its last part.
    n_keep=16 keeps the chat template's header: without it (the server's default n_keep=0) the
    first shift cuts the turn's opening and SmolLM2 answers with noise."""
    llm = open_llama(model_path, kv_policy="shift", n_ctx=1024, n_batch=256, n_keep=16)
    fact = "The keeper of the lighthouse in the final chapter is named Ottoline Varga."
    doc = make_document(llm, 3200, [(0.97, fact)], seed=1)
    n_doc = len(llm.tokenize(doc.encode()))
    assert n_doc >= 3000

    answer = greedy_chat(llm, f"{doc}\n\nQuestion: What is the name of the keeper of the lighthouse?")
    stats = llm.kv_stats()
    print(f"\nshift answer: {answer!r}\nstats: {stats}")

    assert "Ottoline" in answer or "Varga" in answer
    assert stats["cells_peak"] <= stats["n_ctx"] == llm.n_ctx()
    assert stats["evictions"] >= 2 and stats["tokens_evicted"] > n_doc - 1024
    # every token decoded is counted, and the books match the cache
    assert stats["tokens_seen"] == llm.n_tokens > n_doc
    assert stats["cells_used"] == stats["tokens_seen"] - stats["tokens_evicted"]
    positions, _ = llm.kv_cells()
    assert np.array_equal(positions, np.arange(len(positions)))  # shift keeps positions dense
    llm.close()


def test_shift_keeps_the_first_n_keep_tokens(model_path):
    llm = open_llama(model_path, kv_policy="shift", n_ctx=256, n_batch=64, n_keep=10)
    tokens = llm.tokenize(make_document(llm, 700, [], seed=2).encode())
    llm.eval(tokens)
    _, cached = llm.kv_cells()
    # the first n_keep tokens are never discarded (plus a BOS token, which SmolLM2 does not add)
    assert list(cached[:10]) == tokens[:10]
    assert cached[10] != tokens[10]
    assert list(cached[-50:]) == tokens[-50:]
    assert llm.kv_stats()["cells_peak"] <= 256
    llm.close()


def test_shift_generation_runs_past_the_cache(model_path):
    llm = open_llama(model_path, kv_policy="shift", n_ctx=256, n_batch=64)
    # the end of text is banned: the generation must run past the cache, wherever the model would stop
    out = llm.create_completion("Count from one to one thousand: one, two, three,", max_tokens=400, temperature=0.0,
                                logit_bias={llm.token_eos(): -1e9})
    stats = llm.kv_stats()
    assert out["usage"]["completion_tokens"] == 400
    assert stats["cells_peak"] <= 256 and stats["evictions"] >= 1
    llm.close()


def test_prefix_reuse_after_eviction_is_correct(model_path):
    """A second call must not reuse cache entries that eviction changed."""
    question = "\n\nQuestion: What colour is the door of the observatory?"
    fact = "The door of the observatory is painted bright orange."
    ref = open_llama(model_path, kv_policy="shift", n_ctx=512, n_batch=128)
    doc = make_document(ref, 1200, [(0.95, fact)], seed=3)
    first = ref.create_completion(doc + question, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    # same prompt again: the cache was shifted, so this must equal a fresh run
    again = ref.create_completion(doc + question, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    fresh_llm = open_llama(model_path, kv_policy="shift", n_ctx=512, n_batch=128)
    fresh = fresh_llm.create_completion(doc + question, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    assert first == again == fresh
    ref.close()
    fresh_llm.close()

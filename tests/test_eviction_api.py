"""The cache API under the policies: Llama.kv_cells, kv_evict (which packs the cells)
and kv_compact, on the real model."""

import ctypes

import llama_cpp
import numpy as np
import pytest

from helpers import open_llama
from pyrestkv.haystack import make_document


def test_evict_scattered_positions_and_continue(model_path):
    llm = open_llama(model_path, n_ctx=512)
    tokens = llm.tokenize(make_document(llm, 200, [], seed=4).encode())[:200]
    llm.eval(tokens)
    positions, cached = llm.kv_cells()
    assert np.array_equal(positions, np.arange(200)) and list(cached) == tokens

    drop = [3, 17, 50, 51, 52, 53, 120, 121, 180]
    assert llm.kv_evict(drop) == len(drop)
    assert llm.kv_evict([17, 50]) == 0  # already gone
    positions, cached = llm.kv_cells()
    keep = [p for p in range(200) if p not in drop]
    assert np.array_equal(positions, keep)
    assert list(cached) == [tokens[p] for p in keep]

    # decoding continues at the next position; freed cells are reused
    more = llm.tokenize(b" The end of the story is", add_bos=False)
    llm.eval(more)
    positions, cached = llm.kv_cells()
    assert np.array_equal(positions, keep + list(range(200, 200 + len(more))))
    assert list(cached[-len(more):]) == more
    token = llm.sample(temp=0.0)
    assert 0 <= token < llm.n_vocab()
    assert llm.kv_stats()["cells_used"] == 200 - len(drop) + len(more)
    llm.close()


def _last_logits(llm):
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def test_eviction_packs_cells_and_the_output_stays(model_path):
    """kv_evict moves the cells above the freed ones down into the holes, so that
    attention spans only as many cells as are used. The reference for the packed cache is llama.cpp's
    own: the same removal with llama_memory_seq_rm, then the sequence's state saved and restored into
    a fresh context (restoring writes the cells contiguously). The next tokens' logits must agree."""
    drop = list(range(10, 130, 2))  # 60 cells low in the cache: the top 60 must move

    def prefilled():
        llm = open_llama(model_path, n_ctx=512, n_batch=128)
        llm.eval(llm.tokenize(make_document(llm, 300, [], seed=5).encode())[:300])
        return llm

    llm = prefilled()
    more = llm.tokenize(b" And so the story", add_bos=False)
    assert llm.kv_evict(drop) == len(drop)
    assert llm.kv_stats()["cells_used"] == 240
    llm.eval(more)
    packed = _last_logits(llm)
    llm.close()

    llm = prefilled()
    mem = llama_cpp.llama_get_memory(llm.ctx)
    for p in drop:
        assert llama_cpp.llama_memory_seq_rm(mem, 0, p, p + 1)
    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    state = (ctypes.c_uint8 * size)()
    size = llama_cpp.llama_state_seq_get_data(llm.ctx, state, size, 0)
    fresh = open_llama(model_path, n_ctx=512, n_batch=128)
    assert llama_cpp.llama_state_seq_set_data(fresh.ctx, state, size, 0) == size
    batch = llama_cpp.llama_batch_init(len(more), 0, 1)
    for i, t in enumerate(more):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, 300 + i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == len(more) - 1
    batch.n_tokens = len(more)
    assert llama_cpp.llama_decode(fresh.ctx, batch) == 0
    restored = _last_logits(fresh)
    llama_cpp.llama_batch_free(batch)
    fresh.close()
    llm.close()

    diff = float(np.abs(packed - restored).max())
    print(f"\nlargest logit difference, kv_evict (packed) vs llama.cpp state restore: {diff:.2e}")
    assert diff <= 1e-4


def test_compact_makes_positions_dense_and_keeps_order(model_path):
    llm = open_llama(model_path, n_ctx=512)
    tokens = llm.tokenize(make_document(llm, 150, [], seed=5).encode())[:150]
    llm.eval(tokens)
    drop = list(range(10, 40)) + [77, 99, 100]
    llm.kv_evict(drop)
    n = llm.kv_compact()
    positions, cached = llm.kv_cells()
    kept = [t for p, t in enumerate(tokens) if p not in drop]
    assert n == len(kept)
    assert np.array_equal(positions, np.arange(len(kept)))
    assert list(cached) == kept

    # the next token goes right after the compacted cells, and the K-shift runs without error
    llm.eval(llm.tokenize(b" And then", add_bos=False))
    positions, _ = llm.kv_cells()
    assert np.array_equal(positions, np.arange(len(kept) + len(llm.tokenize(b" And then", add_bos=False))))
    assert llm.kv_stats()["compactions"] == 1
    llm.close()


def _code_logprob(llm, answer: str) -> float:
    """Teacher-forced log-probability of the digits of `answer`, from what the cache holds now."""
    total = 0.0
    for t in llm.tokenize(answer.encode(), add_bos=False):
        logits = _last_logits(llm).astype(np.float64)
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        if llm.detokenize([t]).decode(errors="replace").strip().isdigit():
            total += float(logp[t])
        llm.eval([t])
    return total


def test_evicted_tokens_are_really_gone(model_path):
    """The model reads back a code it was told; once the code's tokens are evicted, it cannot. Measured
    as the teacher-forced log-probability of the code in the answer, not a greedy continuation, whose
    wording varies with the CPU's arithmetic."""
    content = "Remember this: the secret code is 4917. It opens the blue safe. What is the secret code?"
    prompt = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    logprob = {}
    for evict in (False, True):
        llm = open_llama(model_path, n_ctx=512)
        tokens = llm.tokenize(prompt.encode(), special=True)
        pieces = [llm.detokenize([t]).decode(errors="replace") for t in tokens]
        # the code's digit tokens: the first run of digits in the prompt
        code = [i for i, piece in enumerate(pieces) if piece.strip().isdigit()]
        code = [i for i in code if i - code[0] < 4]
        assert "".join(pieces[i] for i in code).strip() == "4917"

        llm.eval(tokens[:-1])
        if evict:
            assert llm.kv_evict(code) == len(code)
        llm.eval(tokens[-1:])  # the answer's logits come from what is cached now
        logprob[evict] = _code_logprob(llm, "The secret code is 4917.")
        llm.close()
    print(f"\nlog P(code digits): cached {logprob[False]:.2f}, after evicting them {logprob[True]:.2f}")
    assert logprob[False] >= np.log(0.5)  # the model copies the code it can see
    assert logprob[True] <= logprob[False] - 6.0  # and is 400 times less sure once it is gone


def test_bad_evict_arguments(model_path):
    llm = open_llama(model_path, n_ctx=256)
    llm.eval(llm.tokenize(b"Hello there, general."))
    with pytest.raises(ValueError, match="positions must lie in"):
        llm.kv_evict([10_000])
    with pytest.raises(ValueError, match="positions must lie in"):
        llm.kv_evict([-1])
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        llm.kv_evict([[1, 2]])
    llm.close()


def test_kv_bytes_are_the_allocated_cache(model_path):
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x (K + V) x f16 per cell
    llm = open_llama(model_path, n_ctx=512)
    assert llm.kv_stats()["kv_bytes"] == 512 * 30 * 3 * 64 * 2 * 2
    llm.close()

"""The foundation: the patched build, the full and shift policies, the evict/compact API and the
errors, all on the real SmolLM2-135M model."""

import ctypes
import os
import subprocess
import sys

import llama_cpp
import numpy as np
import pytest

import pyrestkv
from conftest import greedy_chat, open_llama
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
    out = llm.create_completion("Count from one to one thousand: one, two, three,", max_tokens=400, temperature=0.0)
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
    """kv_evict moves the cells above the freed ones down into the holes (patches/0005), so that
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


def _greedy_continue(llm, n: int) -> str:
    out = []
    for _ in range(n):
        token = llm.sample(temp=0.0)
        out.append(token)
        llm.eval([token])
    return llm.detokenize(out).decode(errors="replace")


def test_evicted_tokens_are_really_gone(model_path):
    """The model reads back a code it was told; once the code's tokens are evicted, it cannot."""
    content = "Remember this: the secret code is 4917. It opens the blue safe. What is the secret code?"
    prompt = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    results = {}
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
        results[evict] = _greedy_continue(llm, 10)
        llm.close()
    print(f"\nanswer with the code cached: {results[False]!r}; after evicting it: {results[True]!r}")
    assert "4917" in results[False]
    assert "4917" not in results[True]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"kv_policy": "lru"}, ValueError, "unknown kv_policy"),
        ({"kv_policy": "shift", "n_ctx": 256, "n_keep": 256}, ValueError, "n_keep=256 must be smaller than n_ctx=256"),
        ({"kv_policy": "shift", "n_keep": -1}, ValueError, "n_keep must be >= 0"),
        ({"kv_policy": "shift", "n_discard": -3}, ValueError, "n_discard must be >= 0"),
        ({"n_ctx": -1}, ValueError, "n_ctx must be >= 0"),
        ({"n_batch": 0}, ValueError, "n_batch must be positive"),
        ({"n_ubatch": -8}, ValueError, "n_ubatch must be positive"),
        ({"n_ctx": "big"}, TypeError, "n_ctx must be an integer"),
    ],
)
def test_bad_arguments(model_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        open_llama(model_path, **kwargs)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        pyrestkv.Llama(model_path=str(tmp_path / "nope.gguf"))


def test_non_gguf_model_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ValueError, match="not a GGUF model file"):
        pyrestkv.Llama(model_path=str(bogus))
    with pytest.raises(ValueError, match="directory"):
        pyrestkv.Llama(model_path=str(tmp_path))


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


def test_import_refuses_a_foreign_libllama(tmp_path):
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", "import pyrestkv"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "LLAMA_CPP_LIB_PATH" in proc.stderr and "Unset LLAMA_CPP_LIB_PATH" in proc.stderr


def test_import_after_llama_cpp_with_other_libs_fails(tmp_path):
    # llama_cpp bound to another library directory first: pyrestkv must refuse, not corrupt memory
    code = (
        "import os, sys, llama_cpp.llama_cpp as m\n"
        f"m._base_path = {str(tmp_path)!r}\n"
        "import pyrestkv\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "import pyrestkv before llama_cpp" in proc.stderr


def test_default_model_path_points_at_smollm2():
    path = pyrestkv.default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.getsize(path) > 50_000_000


def test_kv_bytes_are_the_allocated_cache(model_path):
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x (K + V) x f16 per cell
    llm = open_llama(model_path, n_ctx=512)
    assert llm.kv_stats()["kv_bytes"] == 512 * 30 * 3 * 64 * 2 * 2
    llm.close()

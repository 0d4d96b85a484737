"""The Llama subclass itself: its arguments and errors, how kv_policy (a name with kv_* keywords, or a
policy instance) reaches the policy, the model file checks and the import order."""

import os
import subprocess
import sys

import numpy as np
import pytest

import pyrestkv
from helpers import N_HEAD_KV, open_llama
from pyrestkv.haystack import make_document
from pyrestkv.policies import RestKVPolicy, SnapKVPolicy


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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kv_budget=30, kv_window=32, kv_sink=4), "kv_budget=30 must be at least kv_window \\+ kv_sink = 36"),
        (dict(kv_window=64, n_batch=32), "kv_window=64 is larger than n_ubatch=32"),
        (dict(kv_window=0), "kv_window must be >= 1"),
        (dict(kv_window=300, n_batch=512), "kv_window must be <= 256"),
        (dict(kv_sink=-1), "kv_sink must be >= 0"),
        (dict(kv_alpha=0.0), "kv_alpha must be in"),
        (dict(kv_beta=-1.0), "kv_beta must be positive"),
        (dict(kv_kernel=0), "kv_kernel \\(smoothing_width\\) must be >= 1"),
        (dict(kv_positions="sometimes"), "kv_positions must be"),
        (dict(kv_aggregate="median"), "kv_aggregate must be one of"),
        (dict(kv_score_kernel="gpu"), "kv_score_kernel \\(scoring_op\\) must be one of"),
        (dict(kv_query=3.5), "kv_query must be"),
        (dict(kv_budget=512, n_ctx=520), "n_ctx=520 leaves no room"),
    ],
)
def test_restkv_bad_arguments(model_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        open_llama(model_path, kv_policy="restkv", **kwargs)


def test_baseline_policies_reject_bad_parameters(model_path):
    with pytest.raises(ValueError, match="kv_budget"):
        pyrestkv.Llama(model_path, kv_policy="snapkv", kv_budget=8, verbose=False)
    with pytest.raises(ValueError, match="unknown kv_policy"):
        pyrestkv.Llama(model_path, kv_policy="lru", verbose=False)
    with pytest.raises(ValueError, match="kv_kernel"):
        pyrestkv.Llama(model_path, kv_policy="h2o", kv_kernel=0, verbose=False)


@pytest.mark.parametrize("policy, keyword", [
    ("streaming", "kv_alpha"), ("truncate", "kv_query"), ("shift", "kv_budget"), ("full", "kv_aggregate"),
    ("snapkv", "kv_beta"),
])
def test_a_policy_rejects_the_keywords_it_does_not_take(model_path, policy, keyword):
    # before today's classes, streaming and truncate took restkv's whole constructor and ignored these
    with pytest.raises(ValueError, match=f"kv_policy='{policy}' does not take {keyword}; it takes "):
        open_llama(model_path, kv_policy=policy, **{keyword: "tail" if keyword == "kv_query" else 1})


def test_a_policy_instance_is_the_whole_configuration(model_path):
    policy = RestKVPolicy(budget=256, query="none", smoothing_width=5, scoring_op="composed")
    llm = open_llama(model_path, kv_policy=policy, n_batch=256)
    assert llm.kv_policy is policy and policy.model.n_head_kv == N_HEAD_KV and policy.model.n_ctx == 512
    llm.eval(llm.tokenize(make_document(llm, 700, [], seed=9).encode())[:600])
    stats = llm.kv_stats()
    assert stats["n_ctx"] == 512 and stats["budget"] == 256 and stats["cells_used"] <= 512
    assert stats["kv_query"] == "none" and stats["probe_tokens"] == 0 and stats["kv_kernel"] == 5
    assert stats["score_kernel"] == "composed" and stats["scoring_passes"] > 0 and stats["scoring_fused_layers"] == 0
    # the same configuration by name gives the same policy
    same = open_llama(model_path, kv_policy="restkv", kv_budget=256, kv_query="none", kv_kernel=5,
                      kv_score_kernel="composed", n_batch=256)
    assert same.kv_policy == policy
    same.close()
    # one Llama per instance (h2o keeps per-cache sums); the error comes before the model loads
    with pytest.raises(ValueError, match="already serves another Llama"):
        open_llama(model_path, kv_policy=policy)
    llm.close()


def test_kv_keywords_with_a_policy_instance_are_an_error(model_path):
    with pytest.raises(ValueError, match="SnapKVPolicy instance, which is its whole configuration: give kv_budget, "
                                         "kv_window to SnapKVPolicy"):
        open_llama(model_path, kv_policy=SnapKVPolicy(), kv_budget=256, kv_window=16)
    with pytest.raises(TypeError, match="not the class"):
        open_llama(model_path, kv_policy=SnapKVPolicy)


def test_logits_all_keeps_the_last_n_ctx_rows_under_eviction(model_path):
    """logits_all=True keeps a row of logits per token; an evicting policy keeps the last n_ctx rows
    only, so a document longer than the cache does not grow them, and logprobs still work."""
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256, logits_all=True)
    n_ctx, n_vocab = llm.n_ctx(), llm.n_vocab()
    prompt = make_document(llm, 3000, [(0.5, "Important note: the rescue ship was called the Marigold.")], seed=4)
    prompt += "\n\nQuestion: What was the rescue ship called?\nAnswer: The rescue ship was called the"
    out = llm.create_completion(prompt, max_tokens=6, temperature=0.0, logprobs=3)
    assert llm.n_tokens > 5 * n_ctx and llm.kv_stats()["evictions"] > 0
    # as much as llama-cpp-python allocates for n_ctx tokens, whatever the document's length
    assert llm.scores.shape == (n_ctx, n_vocab) and llm.scores.nbytes == n_ctx * n_vocab * 4
    logprobs = out["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == out["usage"]["completion_tokens"] == 6
    # llm.scores is still indexed by token: the greedy tokens are the argmax of the rows before them
    n_prompt = llm.n_tokens - 5  # the sixth token was not decoded
    assert np.array_equal(np.argmax(llm.scores[n_prompt - 1 : n_prompt + 4], axis=1), llm.input_ids[n_prompt : n_prompt + 5])
    # greedy: each token is the top one of its row, so its logprob is the largest: the rows read are its own
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert logprob <= 0 and logprob == pytest.approx(max(top.values()), abs=1e-4), (token, logprob, top)
    # the same through a stream, which reads one row per token (the document is read again: evictions,
    # and so the logits, may differ from the first read's)
    chunks = [c["choices"][0]["logprobs"] for c in llm.create_completion(prompt, max_tokens=6, temperature=0.0,
                                                                         logprobs=3, stream=True)]
    streamed = [(value, top) for chunk in chunks if chunk
                for value, top in zip(chunk["token_logprobs"], chunk["top_logprobs"])]
    assert len(streamed) == 6
    for logprob, top in streamed:
        assert logprob <= 0 and logprob == pytest.approx(max(top.values()), abs=1e-4), (logprob, top)
    # rows older than the ring are gone, and saying so beats reading another token's logits
    with pytest.raises(IndexError, match="logits of token 5 are no longer kept.*kv_policy='full'"):
        llm._scores[5]
    state = llm.save_state()
    last = llm._scores[-1].copy()
    llm.load_state(state)
    assert np.array_equal(llm._scores[-1], last)
    llm.close()


def test_logits_all_with_the_full_policy_is_llama_cpp_pythons(model_path):
    """kv_policy="full" keeps every row, as llama-cpp-python does; on a prompt that does not evict,
    restkv's ring gives the same logprobs, the prompt's included (echo)."""
    prompt = "The rescue ship was called the Marigold. The rescue ship was called the"
    outs = []
    for policy in ("full", "restkv"):
        llm = open_llama(model_path, kv_policy=policy, n_ctx=512, logits_all=True,
                         **({"kv_budget": 256, "n_batch": 256} if policy == "restkv" else {}))
        outs.append(llm.create_completion(prompt, max_tokens=4, temperature=0.0, logprobs=2, echo=True))
        if policy == "full":
            assert type(llm._scores) is np.ndarray and llm._scores.shape == (llm.n_tokens, llm.n_vocab())
        llm.close()
    full, ring = (out["choices"][0]["logprobs"] for out in outs)
    assert full["tokens"] == ring["tokens"] and len(full["tokens"]) > 10
    assert full["token_logprobs"][0] is None is ring["token_logprobs"][0]
    assert full["token_logprobs"][1:] == pytest.approx(ring["token_logprobs"][1:], abs=1e-3)


def test_a_prompt_that_continues_the_history_reads_only_its_new_tokens(model_path):
    """A prompt that starts with the previous prompt and its answer goes on from the evicted cache;
    one that only shares a prefix (a new question after the same document) is read again past the
    leading tokens still in place."""
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256)
    doc = make_document(llm, 900, [], seed=4)
    first = llm.create_completion(doc + "\nQuestion: which town is this?\nAnswer:", max_tokens=6, temperature=0)
    assert llm.kv_stats()["tokens_evicted"] > 0
    seen = llm.kv_stats()["tokens_seen"]
    turn = "\nQuestion: and which year?\nAnswer:"
    n_turn = len(llm.tokenize(turn.encode(), add_bos=False))
    continued = doc + "\nQuestion: which town is this?\nAnswer:" + first["choices"][0]["text"] + turn
    out = llm.create_completion(continued, max_tokens=4, temperature=0)
    read = llm.kv_stats()["tokens_seen"] - seen
    assert out["usage"]["prompt_tokens"] > 900 and read <= n_turn + 2 + 4  # the new turn, a token or two, the answer
    # the positions our books keep are still the cache's
    positions, _ = llm.kv_cells()
    books = llm._token_pos[: llm._n_logical]
    assert sorted(positions.tolist()) == sorted(books[books >= 0].tolist())
    seen = llm.kv_stats()["tokens_seen"]
    llm.create_completion(doc + "\nQuestion: who was there?\nAnswer:", max_tokens=4, temperature=0)
    assert llm.kv_stats()["tokens_seen"] - seen > 600  # a new question: the document is read again
    llm.close()

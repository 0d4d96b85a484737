"""The native scoring pass (native/llama/src/llama-kv-score.cpp) against the NumPy reference (pyrestkv/reference.py),
on Q/K/V taken from the real model's cache for a real prompt and W_O read from the GGUF file. Both
implementations are held to it: the fused op (GGML_OP_RESTKV_SCORE, native/ggml, the CPU code that
the CUDA and Metal kernels mirror) and the composed graph of ordinary ggml ops; so is the attention
output the baselines rank by, for every row weighting."""

import llama_cpp
import numpy as np
import pytest

from gguf_reader import GGUF
from helpers import N_HEAD, N_HEAD_KV, D, open_llama, relative_error
from pyrestkv import _binding as B
from pyrestkv import reference as R
from pyrestkv.haystack import make_document

LAYERS = (0, 11, 29)
ALPHA = 0.3


@pytest.fixture(scope="module")
def gguf(model_path):
    return GGUF(model_path)


def gram_from_gguf(gguf, il):
    wo = gguf.tensor(f"blk.{il}.attn_output.weight")  # [n_embd, n_head*d]
    return np.stack([wo[:, h * D:(h + 1) * D].T @ wo[:, h * D:(h + 1) * D] for h in range(N_HEAD)])


def read_layer(ctx, il):
    k, kpos = B.debug_tensor(ctx, il, B.DEBUG_K)
    v, _ = B.debug_tensor(ctx, il, B.DEBUG_V)
    q, qpos = B.debug_tensor(ctx, il, B.DEBUG_Q_WINDOW)
    k = k.reshape(-1, N_HEAD_KV, D)
    return q.reshape(-1, N_HEAD, D), qpos[: len(q) // (N_HEAD * D)], k, v.reshape(-1, N_HEAD_KV, D), kpos[: len(k)]


def scored_model(model_path, tokens=600, **kwargs):
    llm = open_llama(model_path, n_ctx=1024, n_batch=256, **kwargs)
    ctx = B.pointer(llm.ctx)
    B.set_query_window(ctx, 32)
    llm.eval(llm.tokenize(make_document(llm, tokens, [], seed=11).encode())[:tokens])
    return llm, ctx


def test_gram_matrices_are_the_output_projection(model_path, gguf):
    llm, ctx = scored_model(model_path, tokens=64)
    for il in LAYERS:
        gram, _ = B.debug_tensor(ctx, il, B.DEBUG_GRAM)
        np.testing.assert_allclose(gram.reshape(N_HEAD, D, D), gram_from_gguf(gguf, il), rtol=1e-4, atol=1e-5)
    llm.close()


def float_cache_errors(llm, ctx, gguf, kernel):
    """The relative error of each of LAYERS' scores against the reference, for an f16 or f32 cache."""
    B.set_score_kernel(ctx, kernel)
    pos, scores, _ = B.seq_score(ctx, llm._mem, ALPHA, 0)
    assert B.score_n_fused(ctx) == (30 if kernel == "fused" else 0)
    errors = []
    for il in LAYERS:
        q, qpos, k, v, kpos = read_layer(ctx, il)
        assert np.array_equal(kpos, pos)
        ref = R.restkv_scores(q, qpos, k, v, kpos, gram_from_gguf(gguf, il), N_HEAD_KV, D**-0.5, ALPHA, qpos[0])
        errors.append(relative_error(scores[il], ref))
    return errors


@pytest.mark.parametrize("kernel", ["fused", "composed"])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_f16_cache_matches_reference(model_path, gguf, flash_attn, kernel):
    # flash attention off stores V transposed: the fused op reads it through a permuted view
    llm, ctx = scored_model(model_path, flash_attn=flash_attn)
    errors = float_cache_errors(llm, ctx, gguf, kernel)
    print(f"\nf16 cache, flash_attn={flash_attn}, {kernel}: relative errors {errors}")
    assert max(errors) <= 1e-3
    llm.close()


@pytest.mark.parametrize("kernel", ["fused", "composed"])
def test_f32_cache_with_transposed_v_matches_reference(model_path, gguf, kernel):
    """An f32 cache with flash attention off stores V transposed in f32: the debug read converts it by
    its type (it once read it as f16 and overran its buffer), and both paths score it."""
    f32 = llama_cpp.GGML_TYPE_F32
    llm, ctx = scored_model(model_path, flash_attn=False, type_k=f32, type_v=f32)
    # layer 0's values depend on the tokens alone: the f16 cache holds the same numbers, rounded
    f16_llm, f16_ctx = scored_model(model_path, flash_attn=False)
    v32, _ = B.debug_tensor(ctx, 0, B.DEBUG_V)
    v16, _ = B.debug_tensor(f16_ctx, 0, B.DEBUG_V)
    f16_llm.close()
    assert v32.shape == v16.shape and np.abs(v32).max() > 0
    np.testing.assert_allclose(v32, v16, rtol=2e-3, atol=2e-3)
    errors = float_cache_errors(llm, ctx, gguf, kernel)
    print(f"\nf32 cache, V transposed, {kernel}: relative errors {errors}")
    assert max(errors) <= 1e-3
    llm.close()


# q8_0/q4_0 caches: llama.cpp stores Hadamard-rotated K/V, and mul_mat quantizes the queries to the
# cache's dot-product type (q8_0 for both), so scores differ from the float reference computed on the
# same dequantized K/V by that rounding alone. Stated bound for both: relative error <= 3e-2 and
# correlation >= 0.9995 (measured on 600-token prompts: 2.7e-3 to 1.5e-2, correlation > 0.99998).
@pytest.mark.parametrize(
    "cache_type, bound, min_corr",
    [(llama_cpp.GGML_TYPE_Q8_0, 3e-2, 0.9995), (llama_cpp.GGML_TYPE_Q4_0, 3e-2, 0.9995)],
    ids=["q8_0", "q4_0"],
)
def test_quantized_cache_within_stated_bound(model_path, cache_type, bound, min_corr):
    llm, ctx = scored_model(model_path, flash_attn=True, type_k=cache_type, type_v=cache_type)
    pos, scores, _ = B.seq_score(ctx, llm._mem, ALPHA, 0)
    assert B.score_n_fused(ctx) == 0  # the fused op reads f16/f32 caches; these take the composed graph
    errors, corrs = [], []
    for il in LAYERS:
        q, qpos, k, v, kpos = read_layer(ctx, il)
        # the cache is stored rotated; the Gram matrices scoring uses are rotated the same way
        gram, _ = B.debug_tensor(ctx, il, B.DEBUG_GRAM)
        ref = R.restkv_scores(q, qpos, k, v, kpos, gram.reshape(N_HEAD, D, D), N_HEAD_KV, D**-0.5, ALPHA, qpos[0])
        errors.append(relative_error(scores[il], ref))
        corrs.append(float(np.corrcoef(scores[il].ravel(), ref.ravel())[0, 1]))
    print(f"\ncache type {cache_type}: relative errors {errors}, correlations {corrs}")
    assert max(errors) <= bound and min(corrs) >= min_corr
    llm.close()


# The mean position of each row's n_select most attended cells (ReST-KV's adaptive smoothing reads
# t = front - rear). The composed graph sorts (ggml_top_k); the fused op uses two histograms, exact up
# to cells whose weights agree within 1/64 of an octave, whose share it estimates: bound 1% of the cells.
@pytest.mark.parametrize("kernel", ["fused", "composed"])
def test_top_positions_match_reference(model_path, kernel):
    llm, ctx = scored_model(model_path, tokens=900)
    B.set_score_kernel(ctx, kernel)
    n_select = 300
    pos, _, tpos = B.seq_score(ctx, llm._mem, ALPHA, n_select)
    worst_pos, worst_t = 0.0, 0.0
    for il in LAYERS:
        q, qpos, k, _, kpos = read_layer(ctx, il)
        ref = R.top_positions(q, qpos, k, kpos, N_HEAD_KV, D**-0.5, n_select)
        worst_pos = max(worst_pos, float(np.abs(tpos[il] - ref).max()))
        worst_t = max(worst_t, float(np.abs((tpos[il, :, 0] - tpos[il, :, 1]) - (ref[:, 0] - ref[:, 1])).max()))
    print(f"\n{kernel}: largest error of a mean top position {worst_pos:.3f}, of t {worst_t:.3f} ({len(pos)} cells)")
    assert worst_pos <= 0.01 * len(pos) and worst_t <= 0.01 * len(pos)
    # without n_select the statistic is not computed
    _, _, none = B.seq_score(ctx, llm._mem, ALPHA, 0)
    assert np.isnan(none).all()
    llm.close()


def test_fused_equals_composed_on_a_full_pass(model_path):
    """Both implementations on the same cache, all 30 layers: scores and top positions agree."""
    llm, ctx = scored_model(model_path, tokens=900)
    B.seq_score(ctx, llm._mem, ALPHA, 300)
    assert B.score_n_fused(ctx) == 30  # by default the CPU cache is scored by the fused op
    out = {}
    for kernel in ("composed", "fused"):
        B.set_score_kernel(ctx, kernel)
        out[kernel] = B.seq_score(ctx, llm._mem, ALPHA, 300)
    (pos_c, sc_c, tp_c), (pos_f, sc_f, tp_f) = out["composed"], out["fused"]
    assert np.array_equal(pos_c, pos_f)
    err = relative_error(sc_f, sc_c)
    print(f"\nfused vs composed, 30 layers: relative error {err:.2e}, top positions within {np.abs(tp_f - tp_c).max():.2f}")
    assert err <= 1e-3
    assert np.abs(tp_f - tp_c).max() <= 0.01 * len(pos_c)
    with pytest.raises(ValueError):
        B.set_score_kernel(ctx, "fastest")
    llm.close()


def test_pinned_queries_are_rerotated(model_path, gguf):
    """The question's queries, captured once at other positions, score as if asked right after the cache."""
    llm = open_llama(model_path, n_ctx=1024, n_batch=256)
    ctx = B.pointer(llm.ctx)
    B.set_query_window(ctx, 32)
    question = llm.tokenize(b"Question: what is the password of the archive room?", add_bos=False)
    # capture the question at positions 0.., pin it, take it out of the cache
    llm.eval(question)
    assert B.pin_query_window(ctx, True) == len(question)
    llm.reset()
    B.reset_query_window(ctx)
    llm.eval(llm.tokenize(make_document(llm, 500, [], seed=12).encode())[:500])

    pos, scores, _ = B.seq_score(ctx, llm._mem, ALPHA, 0)
    freq_base = float(llm.metadata["llama.rope.freq_base"])
    errors = []
    for il in LAYERS:
        q, qpos, k, v, kpos = read_layer(ctx, il)
        qp, ppos = B.debug_tensor(ctx, il, B.DEBUG_Q_PINNED)
        qp = qp.reshape(-1, N_HEAD, D)
        ppos = ppos[: len(qp)]
        assert np.array_equal(ppos, np.arange(len(question)))
        target = kpos[-1] + 1 + np.arange(len(qp))
        qp_rot = R.rope_rotate(qp, target - ppos, freq_base, D)
        rows = np.concatenate([q, qp_rot])
        row_pos = np.concatenate([qpos, target])
        ref = R.restkv_scores(rows, row_pos, k, v, kpos, gram_from_gguf(gguf, il), N_HEAD_KV, D**-0.5, ALPHA, qpos[0])
        errors.append(relative_error(scores[il], ref))
    print(f"\npinned rows: relative errors {errors}")
    assert max(errors) <= 1e-3
    # the pinned rows matter: without them the scores change
    B.pin_query_window(ctx, False)
    _, unpinned, _ = B.seq_score(ctx, llm._mem, ALPHA, 0)
    assert relative_error(unpinned, scores) > 0.1
    llm.close()


def test_rerotation_equals_decoding_at_the_target_positions(model_path):
    """Rotating captured queries by d positions gives the queries the model computes d positions later."""
    llm = open_llama(model_path, n_ctx=2048, n_batch=256)
    ctx = B.pointer(llm.ctx)
    B.set_query_window(ctx, 32)
    text = llm.tokenize(b"The quick brown fox jumps over the lazy dog near the river bank.", add_bos=False)
    llm.eval(text)
    q0, p0 = B.debug_tensor(ctx, 5, B.DEBUG_Q_WINDOW)
    # the same tokens alone in the cache, 1000 positions later: llama_cpp decodes at position
    # n_tokens, so shift the cache to start there
    llm.reset()
    llm._sync_truncation()  # empty the cache now, then continue at position 1000
    B.reset_query_window(ctx)
    llm._pos_next = 1000
    llm.eval(text)
    q1, p1 = B.debug_tensor(ctx, 5, B.DEBUG_Q_WINDOW)
    n = len(text)
    q0 = q0.reshape(-1, N_HEAD, D)[:n]
    q1 = q1.reshape(-1, N_HEAD, D)[:n]
    assert np.array_equal(p1[:n], p0[:n] + 1000)
    rotated = R.rope_rotate(q0, np.full(n, 1000), float(llm.metadata["llama.rope.freq_base"]), D)
    np.testing.assert_allclose(rotated, q1, rtol=0, atol=2e-2 * np.abs(q1).max())
    llm.close()


@pytest.mark.parametrize("kernel", ["fused", "composed"])
@pytest.mark.parametrize("rows", ["ema", "mean", "last"])
def test_attention_output_matches_reference(model_path, gguf, rows, kernel):
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
    # back to ReST-KV's score: the same pass, another output, again the reference's
    B.set_score_output(ctx, "restkv", "ema")
    _, scores, _ = B.seq_score(ctx, llm._mem, ALPHA, 0)
    for il in LAYERS:
        q, qpos, k, v, kpos = read_layer(ctx, il)
        ref = R.restkv_scores(q, qpos, k, v, kpos, gram_from_gguf(gguf, il), N_HEAD_KV, D**-0.5, ALPHA, qpos[0])
        assert relative_error(scores[il], ref) <= 1e-3
    llm.close()


def test_score_output_rejects_bad_values(model_path):
    llm, ctx = scored_model(model_path, tokens=64)
    with pytest.raises(ValueError, match="score output"):
        B.set_score_output(ctx, "logits")
    with pytest.raises(ValueError, match="score rows"):
        B.set_score_output(ctx, "attention", "median")
    llm.close()

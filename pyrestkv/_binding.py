"""Thin cffi binding to our C API: the KV eviction functions our patch adds to libllama, and the
policy steps in libpyrestkv_native. Errors come back as negative codes and are raised here."""

from __future__ import annotations

import ctypes

import cffi
import numpy as np

from ._loader import LIB_DIR, shared_library_name

ffi = cffi.FFI()
ffi.cdef(
    """
    // libllama, patches/0001 (llama_memory_t is an opaque pointer)
    int32_t llama_kv_seq_n_cells  (void * mem, int32_t seq_id);
    int32_t llama_kv_seq_cells    (void * mem, int32_t seq_id, int32_t * out_pos, int32_t * out_tok, int32_t n_max);
    int32_t llama_kv_seq_evict    (void * mem, int32_t seq_id, const int32_t * pos, int32_t n_pos);
    int32_t llama_kv_seq_compact  (void * mem, int32_t seq_id);
    int64_t llama_kv_size_bytes   (void * mem);

    // libllama, patches/0002 (struct llama_context * as an opaque pointer)
    int32_t llama_kv_set_query_window  (void * ctx, int32_t n_window);
    int32_t llama_kv_pin_query_window  (void * ctx, bool pin);
    int32_t llama_kv_reset_query_window(void * ctx);
    int32_t llama_kv_score_n_layer     (void * ctx);
    int32_t llama_kv_score_n_head      (void * ctx);
    int32_t llama_kv_seq_score         (void * ctx, int32_t seq_id, float alpha, int32_t n_select,
                                        int32_t * out_pos, float * out_score, float * out_tpos, int32_t n_max);
    int64_t llama_kv_debug_tensor      (void * ctx, int32_t il_kv, int32_t what, float * out, int64_t n_max,
                                        int32_t * out_pos, int32_t n_pos_max);

    // libllama, patches/0004: the fused scoring op (GGML_OP_RESTKV_SCORE, patches/0003 + native/ggml)
    int32_t llama_kv_set_score_kernel  (void * ctx, int32_t kernel);
    int32_t llama_kv_score_n_fused     (void * ctx);
    int32_t llama_kv_set_score_output  (void * ctx, int32_t output, int32_t rows);

    // libpyrestkv_native, native/restkv_policy.h
    int32_t restkv_aws_params  (double t, int32_t kernel_min, double beta, int32_t * kernel, int32_t * shift);
    int32_t restkv_aws_smooth  (const float * in, int32_t n, int32_t kernel, int32_t shift, float * out);
    int32_t restkv_max_rank    (const float * scores, int32_t n_layer, int32_t n, float * out);
    int32_t restkv_select_evict(const float * score, const uint8_t * keep_always, int32_t n, int32_t n_keep,
                                int32_t * out_evict);
    int32_t restkv_cell_scores (const float * scores, const float * tpos, int32_t n_layer, int32_t n_head,
                                int32_t n_head_kv, int32_t n, int32_t kernel_min, double beta, int32_t aggregate,
                                float * out, int32_t * kernels, int32_t * shifts);
    """
)

# the same file llama_cpp loaded (dlopen returns the already-loaded library)
llama = ffi.dlopen(str(LIB_DIR / shared_library_name("llama")))
native = ffi.dlopen(str(LIB_DIR / shared_library_name("pyrestkv_native")))

KV_ERRORS = {
    -1: "the context has no KV memory",
    -2: "this model's memory type cannot evict tokens (recurrent, hybrid or MLA/DSA caches)",
    -3: "sequence id out of range",
    -4: "bad argument",
    -5: "this model's KV cache cannot shift positions (M-RoPE or per-layer RoPE)",
    -6: "a KV cell is shared with another sequence",
    -7: "no query window: call llama_kv_set_query_window and decode first",
    -8: "the scoring graph could not be built or run",
}
KV_ERR_UNSUPPORTED = -2
KV_ERR_CANNOT_SHIFT = -5


class KVCacheError(RuntimeError):
    """A KV eviction call failed; .code is the LLAMA_KV_ERR_* value."""

    def __init__(self, func: str, code: int):
        self.code = code
        super().__init__(f"{func} failed: {KV_ERRORS.get(code, 'unknown error')} (code {code})")


def _check(func: str, ret: int) -> int:
    if ret < 0:
        raise KVCacheError(func, ret)
    return ret


def pointer(handle) -> "ffi.CData":
    """A cffi pointer for a handle that llama_cpp's ctypes binding returned (context, memory)."""
    addr = handle if isinstance(handle, int) else ctypes.cast(handle, ctypes.c_void_p).value
    if not addr:
        raise ValueError("null llama.cpp handle")
    return ffi.cast("void *", addr)


def memory_handle(llama_memory) -> "ffi.CData":
    """A cffi pointer for the llama_memory_t that llama_cpp's ctypes binding returned."""
    addr = ctypes.cast(llama_memory, ctypes.c_void_p).value if not isinstance(llama_memory, int) else llama_memory
    if not addr:
        raise KVCacheError("llama_get_memory", -1)
    return ffi.cast("void *", addr)


def kv_seq_n_cells(mem, seq_id: int = 0) -> int:
    return _check("llama_kv_seq_n_cells", llama.llama_kv_seq_n_cells(mem, seq_id))


def kv_seq_cells(mem, seq_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(positions, tokens) of the sequence's cells, in ascending position order."""
    n = kv_seq_n_cells(mem, seq_id)
    pos = np.empty(n, dtype=np.int32)
    tok = np.empty(n, dtype=np.int32)
    got = _check(
        "llama_kv_seq_cells",
        llama.llama_kv_seq_cells(mem, seq_id, ffi.from_buffer("int32_t[]", pos), ffi.from_buffer("int32_t[]", tok), n),
    )
    return pos[: min(got, n)], tok[: min(got, n)]


def kv_seq_positions(mem, seq_id: int = 0) -> np.ndarray:
    n = kv_seq_n_cells(mem, seq_id)
    pos = np.empty(n, dtype=np.int32)
    got = _check(
        "llama_kv_seq_cells",
        llama.llama_kv_seq_cells(mem, seq_id, ffi.from_buffer("int32_t[]", pos), ffi.NULL, n),
    )
    return pos[: min(got, n)]


def kv_seq_evict(mem, positions, seq_id: int = 0) -> int:
    pos = np.ascontiguousarray(positions, dtype=np.int32)
    return _check(
        "llama_kv_seq_evict",
        llama.llama_kv_seq_evict(mem, seq_id, ffi.from_buffer("int32_t[]", pos), len(pos)),
    )


def kv_seq_compact(mem, seq_id: int = 0) -> int:
    return _check("llama_kv_seq_compact", llama.llama_kv_seq_compact(mem, seq_id))


def kv_size_bytes(mem) -> int:
    return _check("llama_kv_size_bytes", llama.llama_kv_size_bytes(mem))


def _native_check(func: str, ret: int) -> int:
    if ret < 0:
        raise ValueError(f"{func}: bad argument")
    return ret


def aws_params(t: float, kernel_min: int, beta: float) -> tuple[int, int]:
    kernel = ffi.new("int32_t *")
    shift = ffi.new("int32_t *")
    _native_check("restkv_aws_params", native.restkv_aws_params(t, kernel_min, beta, kernel, shift))
    return int(kernel[0]), int(shift[0])


def aws_smooth(scores, kernel: int, shift: int) -> np.ndarray:
    x = np.ascontiguousarray(scores, dtype=np.float32)
    out = np.empty_like(x)
    _native_check(
        "restkv_aws_smooth",
        native.restkv_aws_smooth(ffi.from_buffer("float[]", x), len(x), kernel, shift, ffi.from_buffer("float[]", out)),
    )
    return out


def max_rank(scores) -> np.ndarray:
    s = np.ascontiguousarray(scores, dtype=np.float32)
    if s.ndim != 2:
        raise ValueError("max_rank expects per-layer scores of shape [n_layer, n]")
    out = np.empty(s.shape[1], dtype=np.float32)
    _native_check(
        "restkv_max_rank",
        native.restkv_max_rank(ffi.from_buffer("float[]", s), s.shape[0], s.shape[1], ffi.from_buffer("float[]", out)),
    )
    return out


AGGREGATES = {"max_rank": 0, "mean": 1}


def cell_scores(scores, tpos, n_head_kv: int, kernel_min: int, beta: float, aggregate: str = "max_rank"):
    """Per-cell scores from per-head scores [n_layer, n_head, n] and AWS statistics [n_layer, n_head, 2];
    also returns the AWS kernels and shifts [n_layer, n_head]."""
    s = np.ascontiguousarray(scores, dtype=np.float32)
    t = np.ascontiguousarray(tpos, dtype=np.float32)
    if s.ndim != 3 or t.shape != (s.shape[0], s.shape[1], 2):
        raise ValueError("cell_scores expects scores [n_layer, n_head, n] and tpos [n_layer, n_head, 2]")
    n_layer, n_head, n = s.shape
    out = np.empty(n, dtype=np.float32)
    kernels = np.empty((n_layer, n_head), dtype=np.int32)
    shifts = np.empty((n_layer, n_head), dtype=np.int32)
    _native_check(
        "restkv_cell_scores",
        native.restkv_cell_scores(
            ffi.from_buffer("float[]", s), ffi.from_buffer("float[]", t), n_layer, n_head, n_head_kv, n,
            kernel_min, beta, AGGREGATES[aggregate], ffi.from_buffer("float[]", out), ffi.from_buffer("int32_t[]", kernels),
            ffi.from_buffer("int32_t[]", shifts),
        ),
    )
    return out, kernels, shifts


def select_evict(scores, n_keep: int, keep_always=None) -> np.ndarray:
    s = np.ascontiguousarray(scores, dtype=np.float32)
    out = np.empty(len(s), dtype=np.int32)
    keep = ffi.NULL
    if keep_always is not None:
        keep_arr = np.ascontiguousarray(keep_always, dtype=np.uint8)
        if len(keep_arr) != len(s):
            raise ValueError("keep_always must have one entry per score")
        keep = ffi.from_buffer("uint8_t[]", keep_arr)
    n = _native_check(
        "restkv_select_evict",
        native.restkv_select_evict(ffi.from_buffer("float[]", s), keep, len(s), n_keep, ffi.from_buffer("int32_t[]", out)),
    )
    return out[:n]


#
# ReST-KV scoring pass (patches/0002)
#

DEBUG_K, DEBUG_V, DEBUG_Q_WINDOW, DEBUG_Q_PINNED, DEBUG_GRAM = range(5)


def set_query_window(ctx, n_window: int) -> None:
    _check("llama_kv_set_query_window", llama.llama_kv_set_query_window(ctx, n_window))


def pin_query_window(ctx, pin: bool = True) -> int:
    return _check("llama_kv_pin_query_window", llama.llama_kv_pin_query_window(ctx, pin))


def reset_query_window(ctx) -> None:
    _check("llama_kv_reset_query_window", llama.llama_kv_reset_query_window(ctx))


def score_shape(ctx) -> tuple[int, int]:
    return (
        _check("llama_kv_score_n_layer", llama.llama_kv_score_n_layer(ctx)),
        _check("llama_kv_score_n_head", llama.llama_kv_score_n_head(ctx)),
    )


def seq_score(ctx, mem, alpha: float, n_select: int, seq_id: int = 0):
    """One scoring pass: (positions [n], scores [n_layer, n_head, n], tpos [n_layer, n_head, 2])."""
    n_layer, n_head = score_shape(ctx)
    n = kv_seq_n_cells(mem, seq_id)
    pos = np.empty(max(n, 1), dtype=np.int32)
    scores = np.empty((n_layer, n_head, max(n, 1)), dtype=np.float32)
    tpos = np.full((n_layer, n_head, 2), np.nan, dtype=np.float32)
    got = _check(
        "llama_kv_seq_score",
        llama.llama_kv_seq_score(
            ctx, seq_id, alpha, n_select, ffi.from_buffer("int32_t[]", pos), ffi.from_buffer("float[]", scores),
            ffi.from_buffer("float[]", tpos), n,
        ),
    )
    if got != n:
        raise KVCacheError("llama_kv_seq_score", -4)
    return pos[:n], scores[:, :, :n], tpos


# how the scoring pass runs: the fused op where the cache's device has it, else ordinary ggml ops
SCORE_KERNELS = {"auto": 0, "composed": 1, "fused": 2}


def set_score_kernel(ctx, kernel: str) -> None:
    """'auto' (fused op where supported), 'composed' (ordinary ggml ops) or 'fused'."""
    if kernel not in SCORE_KERNELS:
        raise ValueError(f"score kernel must be one of {sorted(SCORE_KERNELS)}, not {kernel!r}")
    _check("llama_kv_set_score_kernel", llama.llama_kv_set_score_kernel(ctx, SCORE_KERNELS[kernel]))


# what a scoring pass returns (LLAMA_KV_SCORE_OUT_*), and how it averages its rows (LLAMA_KV_SCORE_ROWS_*)
SCORE_OUTPUTS = {"restkv": 0, "attention": 1}
SCORE_ROWS = {"ema": 0, "mean": 1, "last": 2}


def set_score_output(ctx, output: str, rows: str = "ema") -> None:
    """'restkv' (ReST-KV's score) or 'attention' (the rows' averaged attention); rows 'ema', 'mean' or 'last'."""
    if output not in SCORE_OUTPUTS:
        raise ValueError(f"score output must be one of {sorted(SCORE_OUTPUTS)}, not {output!r}")
    if rows not in SCORE_ROWS:
        raise ValueError(f"score rows must be one of {sorted(SCORE_ROWS)}, not {rows!r}")
    _check("llama_kv_set_score_output", llama.llama_kv_set_score_output(ctx, SCORE_OUTPUTS[output], SCORE_ROWS[rows]))


def score_n_fused(ctx) -> int:
    """Layers that the last scoring pass scored with the fused op."""
    return _check("llama_kv_score_n_fused", llama.llama_kv_score_n_fused(ctx))


def debug_tensor(ctx, il_kv: int, what: int):
    """A layer's tensor as f32 rows, and the positions of the rows where they have one."""
    n = _check("llama_kv_debug_tensor", llama.llama_kv_debug_tensor(ctx, il_kv, what, ffi.NULL, 0, ffi.NULL, 0))
    out = np.empty(max(n, 1), dtype=np.float32)
    pos = np.full(max(n, 1), -1, dtype=np.int32)
    _check(
        "llama_kv_debug_tensor",
        llama.llama_kv_debug_tensor(ctx, il_kv, what, ffi.from_buffer("float[]", out), n, ffi.from_buffer("int32_t[]", pos), len(pos)),
    )
    return out[:n], pos

"""Thin cffi binding to our C API: the KV eviction and scoring functions that native/llama adds to
libllama (include/llama-restkv.h), and the policy steps of libpyrestkv_native (restkv_policy.h).
The declarations and constants are read from those headers, installed beside the libraries; errors
come back as negative codes, explained by the library, and are raised here."""

from __future__ import annotations

import ctypes
import re

import cffi
import numpy as np

from ._loader import LIB_DIR, shared_library_name

# the llama.h types our headers use (llama_memory_t and struct llama_context are opaque here)
_LLAMA_TYPES = """
typedef int32_t llama_pos;
typedef int32_t llama_token;
typedef int32_t llama_seq_id;
typedef struct llama_memory_i * llama_memory_t;
struct llama_context;
"""


def _header_declarations(name: str) -> str:
    """A header of ours as cffi reads it: comments, preprocessor lines, the extern "C" guard and
    LLAMA_API dropped (the headers keep to enums and flat declarations for this)."""
    text = (LIB_DIR / name).read_text()
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return text.replace("LLAMA_API", "")


ffi = cffi.FFI()
ffi.cdef(_LLAMA_TYPES)
for _header in ("llama-restkv.h", "llama-restkv-debug.h", "restkv_policy.h"):
    ffi.cdef(_header_declarations(_header))

# the same file llama_cpp loaded (dlopen returns the already-loaded library)
llama = ffi.dlopen(str(LIB_DIR / shared_library_name("llama")))
native = ffi.dlopen(str(LIB_DIR / shared_library_name("pyrestkv_native")))


def _enum_choices(enum: str, prefix: str) -> dict:
    """{"auto": 0, ...} for the C enum's members, named without their prefix, in lower case."""
    return {name[len(prefix):].lower(): value for value, name in sorted(ffi.typeof(enum).elements.items())}


class KVCacheError(RuntimeError):
    """A KV eviction or scoring call failed; .code is the llama_kv_err value."""

    def __init__(self, func: str, code: int):
        self.code = code
        message = ffi.string(llama.llama_kv_strerror(code)).decode()
        super().__init__(f"{func} failed: {message} (code {code})")


def _check(func: str, ret: int) -> int:
    if ret < 0:
        raise KVCacheError(func, ret)
    return ret


def pointer(handle, what: str = "llama.cpp handle") -> "ffi.CData":
    """A cffi pointer for a handle that llama_cpp's ctypes binding returned (context, memory)."""
    addr = handle if isinstance(handle, int) else ctypes.cast(handle, ctypes.c_void_p).value
    if not addr:
        if what == "memory":
            raise KVCacheError("llama_get_memory", llama.LLAMA_KV_ERR_NO_MEMORY)
        raise ValueError(f"null {what}")
    return ffi.cast("void *", addr)


def memory_handle(llama_memory) -> "ffi.CData":
    """A cffi pointer for the llama_memory_t that llama_cpp's ctypes binding returned."""
    return pointer(llama_memory, "memory")


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


AGGREGATES = _enum_choices("enum restkv_aggregate", "RESTKV_AGG_")


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
# ReST-KV scoring pass (native/llama/src/llama-kv-score.cpp)
#

# what llama_kv_debug_tensor reads (tests only: include/llama-restkv-debug.h)
DEBUG_K = llama.LLAMA_KV_DEBUG_K
DEBUG_V = llama.LLAMA_KV_DEBUG_V
DEBUG_Q_WINDOW = llama.LLAMA_KV_DEBUG_Q_WINDOW
DEBUG_Q_PINNED = llama.LLAMA_KV_DEBUG_Q_PINNED
DEBUG_GRAM = llama.LLAMA_KV_DEBUG_GRAM


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
        raise KVCacheError("llama_kv_seq_score", llama.LLAMA_KV_ERR_BAD_ARG)
    return pos[:n], scores[:, :, :n], tpos


# how the scoring pass runs: the fused op where the cache's device has it, else ordinary ggml ops
SCORE_KERNELS = _enum_choices("enum llama_kv_score_kernel", "LLAMA_KV_SCORE_KERNEL_")


def set_score_kernel(ctx, kernel: str) -> None:
    """'auto' (fused op where supported), 'composed' (ordinary ggml ops) or 'fused'."""
    if kernel not in SCORE_KERNELS:
        raise ValueError(f"score kernel must be one of {sorted(SCORE_KERNELS)}, not {kernel!r}")
    _check("llama_kv_set_score_kernel", llama.llama_kv_set_score_kernel(ctx, SCORE_KERNELS[kernel]))


# what a scoring pass returns, and how it averages its rows
SCORE_OUTPUTS = _enum_choices("enum llama_kv_score_output", "LLAMA_KV_SCORE_OUTPUT_")
SCORE_ROWS = _enum_choices("enum llama_kv_score_rows", "LLAMA_KV_SCORE_ROWS_")


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


#
# Document tier (native/llama/src/llama-kv-tier.cpp): cells' K/V out of the cache and back in
#

PART_SCORED = llama.LLAMA_KV_PART_SCORED  # the plain cache, or the full-attention half of an iSWA cache
PART_SWA = llama.LLAMA_KV_PART_SWA  # the sliding-window half of an iSWA cache


def part_layout(ctx, part: int) -> list:
    """Per layer of a part: (k_type, k_row_bytes, v_type, v_row_bytes); [] where the part does not exist."""
    n = _check("llama_kv_part_n_layer", llama.llama_kv_part_n_layer(ctx, part))
    return [
        (_check("llama_kv_part_layer_type", llama.llama_kv_part_layer_type(ctx, part, il, False)),
         _check("llama_kv_part_row_size", llama.llama_kv_part_row_size(ctx, part, il, False)),
         _check("llama_kv_part_layer_type", llama.llama_kv_part_layer_type(ctx, part, il, True)),
         _check("llama_kv_part_row_size", llama.llama_kv_part_row_size(ctx, part, il, True)))
        for il in range(n)
    ]


def part_seq_positions(ctx, part: int, seq_id: int = 0) -> np.ndarray:
    """The positions of the sequence's cells in a part, ascending (empty where the part does not exist)."""
    n = _check("llama_kv_part_seq_positions", llama.llama_kv_part_seq_positions(ctx, part, seq_id, ffi.NULL, 0))
    pos = np.empty(max(n, 1), dtype=np.int32)
    got = _check("llama_kv_part_seq_positions",
                 llama.llama_kv_part_seq_positions(ctx, part, seq_id, ffi.from_buffer("int32_t[]", pos), n))
    return pos[: min(got, n)]


def seq_get_kv(ctx, part: int, positions, n_bytes: int, seq_id: int = 0) -> np.ndarray:
    """The K/V of the cells at these positions, as bytes: per layer, the key rows then the value rows."""
    pos = np.ascontiguousarray(positions, dtype=np.int32)
    out = np.empty(n_bytes, dtype=np.uint8)
    got = _check("llama_kv_seq_get_kv", llama.llama_kv_seq_get_kv(
        ctx, part, seq_id, ffi.from_buffer("int32_t[]", pos), len(pos), ffi.from_buffer("uint8_t[]", out), n_bytes))
    if got != n_bytes:
        raise KVCacheError("llama_kv_seq_get_kv", llama.LLAMA_KV_ERR_BAD_ARG)
    return out


def seq_put_kv(ctx, part: int, positions, pos_rot, tokens, kv_bytes, seq_id: int = 0) -> int:
    """Put cells into an empty sequence: positions, the positions their keys were rotated at, tokens,
    and their K/V in seq_get_kv's layout."""
    pos = np.ascontiguousarray(positions, dtype=np.int32)
    rot = np.ascontiguousarray(pos_rot, dtype=np.int32)
    tok = np.ascontiguousarray(tokens, dtype=np.int32)
    src = np.ascontiguousarray(kv_bytes, dtype=np.uint8)
    if not len(pos) == len(rot) == len(tok):
        raise ValueError("positions, pos_rot and tokens must have one entry per cell")
    return _check("llama_kv_seq_put_kv", llama.llama_kv_seq_put_kv(
        ctx, part, seq_id, ffi.from_buffer("int32_t[]", pos), ffi.from_buffer("int32_t[]", rot),
        ffi.from_buffer("int32_t[]", tok), len(pos), ffi.from_buffer("uint8_t[]", src), len(src)))


def score_cells(ctx, il_kv: int, positions, keys, values, pos_rows: int, alpha: float, n_select: int, n_head: int):
    """Score cells that are not in the cache (one layer of a tier) with the pinned rows:
    (scores [n_head, n], tpos [n_head, 2])."""
    pos = np.ascontiguousarray(positions, dtype=np.int32)
    k = np.ascontiguousarray(keys, dtype=np.uint8)
    v = np.ascontiguousarray(values, dtype=np.uint8)
    n = len(pos)
    scores = np.empty((n_head, n), dtype=np.float32)
    tpos = np.full((n_head, 2), np.nan, dtype=np.float32)
    _check("llama_kv_score_cells", llama.llama_kv_score_cells(
        ctx, il_kv, n, ffi.from_buffer("int32_t[]", pos), ffi.from_buffer("uint8_t[]", k),
        ffi.from_buffer("uint8_t[]", v), pos_rows, alpha, n_select, ffi.from_buffer("float[]", scores),
        ffi.from_buffer("float[]", tpos)))
    return scores, tpos

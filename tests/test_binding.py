"""The binding reads our C API from its installed headers: the declarations, the enums behind the
Python choice lists, and the error messages from the library itself."""

import pytest

from pyrestkv import _binding as B


def test_choice_lists_come_from_the_header_enums():
    assert B.SCORE_KERNELS == {"auto": 0, "composed": 1, "fused": 2}
    assert B.SCORE_OUTPUTS == {"restkv": 0, "attention": 1}
    assert B.SCORE_ROWS == {"ema": 0, "mean": 1, "last": 2}
    assert B.AGGREGATES == {"max_rank": 0, "mean": 1}
    # each value is the C enum's member, not a copy
    assert B.SCORE_KERNELS["fused"] == B.llama.LLAMA_KV_SCORE_KERNEL_FUSED
    assert B.AGGREGATES["mean"] == B.native.RESTKV_AGG_MEAN
    assert (B.DEBUG_K, B.DEBUG_V, B.DEBUG_Q_WINDOW, B.DEBUG_Q_PINNED, B.DEBUG_GRAM) == (0, 1, 2, 3, 4)


@pytest.mark.parametrize(
    "code, words",
    [
        (-1, "no KV memory"),
        (-2, "cannot evict or score"),
        (-5, "cannot shift positions"),
        (-6, "shared with another sequence"),
        (-7, "no query window"),
        (-8, "scoring graph"),
        (-99, "unknown error"),
    ],
)
def test_errors_are_explained_by_the_library(code, words):
    err = B.KVCacheError("llama_kv_seq_evict", code)
    assert err.code == code
    assert words in str(err) and f"(code {code})" in str(err) and str(err).startswith("llama_kv_seq_evict failed")


def test_every_declared_function_is_exported():
    # cffi resolves a symbol on first use: a declaration the library lacks fails here, not in the field
    for name in ("llama_kv_strerror", "llama_kv_seq_n_cells", "llama_kv_seq_cells", "llama_kv_seq_evict",
                 "llama_kv_seq_compact", "llama_kv_size_bytes", "llama_kv_set_query_window",
                 "llama_kv_pin_query_window", "llama_kv_reset_query_window", "llama_kv_set_score_kernel",
                 "llama_kv_set_score_output", "llama_kv_score_n_layer", "llama_kv_score_n_head",
                 "llama_kv_seq_score", "llama_kv_score_n_fused", "llama_kv_debug_tensor"):
        assert callable(getattr(B.llama, name)), name
    for name in ("restkv_aws_params", "restkv_aws_smooth", "restkv_max_rank", "restkv_cell_scores",
                 "restkv_select_evict"):
        assert callable(getattr(B.native, name)), name


def test_null_handles_are_refused():
    with pytest.raises(B.KVCacheError, match="no KV memory"):
        B.memory_handle(0)
    with pytest.raises(ValueError, match="null"):
        B.pointer(0, "context")

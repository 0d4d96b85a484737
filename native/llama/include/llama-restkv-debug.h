// Tests and debugging only: read the tensors the ReST-KV scoring pass works on, so that the tests can
// hold the native scores to a NumPy reference computed from the same numbers. Not a stable API.
//
// Read by pyrestkv's binding (cffi) like llama-restkv.h: enums and flat declarations only.

#pragma once

#include "llama-restkv.h"

#ifdef __cplusplus
extern "C" {
#endif

    enum llama_kv_debug_tensor_kind {
        LLAMA_KV_DEBUG_K        = 0, // keys   [cell][n_embd_k_gqa], cells of seq 0 in position order
        LLAMA_KV_DEBUG_V        = 1, // values [cell][n_embd_v_gqa], likewise
        LLAMA_KV_DEBUG_Q_WINDOW = 2, // the query window [row][n_embd_q], oldest first
        LLAMA_KV_DEBUG_Q_PINNED = 3, // the pinned rows  [row][n_embd_q], oldest first
        LLAMA_KV_DEBUG_GRAM     = 4, // the Gram matrices W_O^h^T W_O^h [head][d][d] as scoring uses them
    };

    // The scored layer il_kv's tensor `kind` (an llama_kv_debug_tensor_kind) as f32 rows: writes at
    // most n_max floats to out, and the rows' positions, where they have one, to out_pos (at most
    // n_pos_max). Returns the number of floats, or < 0 on error
    LLAMA_API int64_t llama_kv_debug_tensor(
            struct llama_context * ctx,
                         int32_t   il_kv,
                         int32_t   kind,
                           float * out,
                         int64_t   n_max,
                       llama_pos * out_pos,
                         int32_t   n_pos_max);

#ifdef __cplusplus
}
#endif

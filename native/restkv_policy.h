// ReST-KV eviction policy: the host-side steps that follow the scoring pass.
//
//   per-layer scores [n_layer][n]  (one row per layer, cells in position order)
//     -> restkv_aws_smooth   adaptive-window spatial smoothing of each row
//     -> restkv_max_rank     one score per cell: max over layers of the per-layer rank
//     -> restkv_select_evict keep the top cells, never evict protected ones
//
// Plain C API with sized integer types; every function returns RESTKV_OK or a negative error.
// pyrestkv's binding (cffi) reads this header: keep it to enums and flat declarations.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum restkv_status {
    RESTKV_OK          =  0,
    RESTKV_ERR_BAD_ARG = -1, // a NULL pointer, a negative size, or a parameter out of range
};

// Kernel width and offset of adaptive-window spatial smoothing (AWS) for one head, exactly as the
// official code computes them (its quirks included: t == 0 gives shift +1, and t == -m*beta gives
// shift 1 - m):
//   kernel = max(kernel_min, 2*floor(|t|/beta) + 1)
//   shift  = t > 0 ? floor(t/beta) : floor(t/beta) + 1
// t is the mean top-k key index under the first half of the window minus that under the second.
int32_t restkv_aws_params(double t, int32_t kernel_min, double beta, int32_t * kernel, int32_t * shift);

// out[i] = mean of in[clamp(i + shift - kernel/2 + j, 0, n - 1)] for j in [0, kernel):
// a box mean centred at i + shift with edge-replicate padding. in and out may not alias.
int32_t restkv_aws_smooth(const float * in, int32_t n, int32_t kernel, int32_t shift, float * out);

// One score per cell from per-layer scores [n_layer][n]: out[i] = max over layers of
// rank(scores[l][i]) / (n - 1), ranks ascending within each layer (ties broken by index), so that a
// cell that any one layer ranks highly survives even if the other layers ignore it.
int32_t restkv_max_rank(const float * scores, int32_t n_layer, int32_t n, float * out);

// The whole host side of one scoring pass: per-cell scores from the per-head scores of every layer.
//   scores [n_layer][n_head][n]: a/(1-a) * ||W_O^h (o_h - v)||, cells in position order
//   tpos   [n_layer][n_head][2]: mean position of the top keys under the first and the second half of
//                                the window rows; NaN where not computed (then kernel_min, shift 0)
// For each head: AWS smoothing (restkv_aws_params, restkv_aws_smooth); then the mean over the query
// heads of each KV head, summed over the KV heads: one score per cell and layer (a bound on how much
// the layer's output moves); then across layers, by `aggregate`: RESTKV_AGG_MAX_RANK (the max over
// layers of the per-layer rank) or RESTKV_AGG_MEAN (the mean over layers of the scores normalized to
// sum 1 per layer). out [n]; kernels/shifts may be NULL, else they receive each head's AWS parameters
// [n_layer][n_head].
enum restkv_aggregate {
    RESTKV_AGG_MAX_RANK = 0,
    RESTKV_AGG_MEAN     = 1,
};
int32_t restkv_cell_scores(const float * scores, const float * tpos, int32_t n_layer, int32_t n_head,
                           int32_t n_head_kv, int32_t n, int32_t kernel_min, double beta, int32_t aggregate,
                           float * out, int32_t * kernels, int32_t * shifts);

// Indices of the cells to evict so that n_keep remain: all but the n_keep highest scores, where
// cells with keep_always[i] != 0 come first whatever their score and are never evicted (so more
// than n_keep remain when more than n_keep cells are protected). keep_always may be NULL.
// Writes the indices in ascending order to out_evict (room for n) and returns their count (>= 0).
int32_t restkv_select_evict(const float * score, const uint8_t * keep_always, int32_t n, int32_t n_keep,
                            int32_t * out_evict);

#ifdef __cplusplus
}
#endif

// ReST-KV fused scoring op (GGML_OP_RESTKV_SCORE): the per-key arithmetic shared by the CPU
// implementation (ggml-cpu/restkv-score.cpp), the CUDA kernel (ggml-cuda/restkv-score.cu) and the
// Metal kernel (ggml-metal/kernels/restkv-score.metal). The CPU tests check this arithmetic; the
// kernels call the same functions, so they compute the same numbers.
//
// The op scores every cell of one layer. Inputs (see ggml_restkv_score in ggml.h):
//   q     f32 [d, n_row, n_head]       query rows: the window, oldest first, then pinned rows
//   k     f16|f32 [d, n_kv, n_head_kv] the cache's keys (any strides)
//   v     f16|f32 [dv, n_kv, n_head_kv] the cache's values (any strides, so transposed V works)
//   gram  f32 [dv, dv, n_head]         G_h = W_O^h^T W_O^h (symmetric)
//   cpos  i32 [n_kv]                   position of each cell, or -1 where the cell does not count
//   rpos  i32 [n_row]                  position of each query row
//   ema   f32 [n_row]                  EMA weight of each row (they sum to 1)
//   params: scale (f32), pos_window (i32), n_select (i32)
//
// For query head h (reading KV head h/(n_head/n_head_kv)), row r and cell c:
//   a[r,c]  = softmax over the cells row r sees (0 <= cpos[c] <= rpos[r]) of scale*q[r].k[c]
//   abar[c] = sum_r ema[r]*a[r,c], clamped to [0, 1 - 1e-6]
//   o       = sum over prefix cells (cpos < pos_window) of abar[c]*v[c]
//   score   = abar/(1 - abar) * sqrt(max(v'Gv - 2 (Go).v + o'Go, 0))      (= odds * ||W_O^h (o - v)||)
// and, when n_select > 0, the mean position of the n_select cells each row attends most, averaged
// over the first n_row/2 rows (front) and the others (rear): ReST-KV's adaptive smoothing reads
// t = front - rear. The top cells are found with two histograms per row instead of a sort: the
// first bins a[r,c] by octave (the float's exponent), the second splits the one octave that holds the
// n_select-th cell into 64 sub-bins (the top six mantissa bits). All cells above that sub-bin count
// whole and the sub-bin itself is scaled to the cells still needed, so the mean is exact up to cells
// whose weights agree to within 1/64 of an octave (about 1%; the reference sorts fp16 weights).
//
// Output dst f32 [RESTKV_ROW_SIZE(n_kv, n_row, dv), n_head]; per head h the row holds:
//   [0, n_kv)                      score of each cell (0 where cpos < 0)
//   n_kv + 0, n_kv + 1             front and rear mean top-n_select position (NAN if n_select == 0)
//   then scratch that the kernels use (abar, row max and sum, o, G o, o'Go, the histogram), so that
//   no backend needs memory beyond dst: the op's memory is O(n_kv * n_head), never n_kv*n_row*n_head.

#ifndef RESTKV_SCORE_COMMON_H
#define RESTKV_SCORE_COMMON_H

#if defined(__METAL_VERSION__)
#    define RESTKV_FN      static inline
#    define RESTKV_GLOBAL  device
#elif defined(__CUDACC__)
#    include <stdint.h>
#    define RESTKV_FN      static __host__ __device__ __forceinline__ // host too: the GPU check's reference
#    define RESTKV_GLOBAL
#else
#    include <math.h>
#    include <stdint.h>
#    include <string.h>
#    define RESTKV_FN      static inline
#    define RESTKV_GLOBAL
#endif

#define RESTKV_HIST_BINS    64         // octaves: a >= 2^-63 has a bin of its own; sub-bins likewise 64
#define RESTKV_ABAR_MAX     (1.0f - 1e-6f) // a cell holding all the attention would have infinite odds

// layout of one head's row of dst (offsets in floats)
#define RESTKV_OFF_TPOS(n_kv)                  (n_kv)
#define RESTKV_OFF_ABAR(n_kv)                  ((n_kv) + 2)
#define RESTKV_OFF_ROWMAX(n_kv)                (2*(n_kv) + 2)
#define RESTKV_OFF_ROWSUM(n_kv, n_row)         (2*(n_kv) + 2 + (n_row))
#define RESTKV_OFF_O(n_kv, n_row)              (2*(n_kv) + 2 + 2*(n_row))
#define RESTKV_OFF_GO(n_kv, n_row, dv)         (2*(n_kv) + 2 + 2*(n_row) + (dv))
#define RESTKV_OFF_OGO(n_kv, n_row, dv)        (2*(n_kv) + 2 + 2*(n_row) + 2*(dv))
// histograms: per row, RESTKV_HIST_BINS x {count, position sum low 32 bits, high 32 bits} as uint32;
// first the octaves, then the sub-bins of each row's boundary octave
#define RESTKV_OFF_HIST(n_kv, n_row, dv)       (2*(n_kv) + 3 + 2*(n_row) + 2*(dv))
#define RESTKV_OFF_HIST2(n_kv, n_row, dv)      (RESTKV_OFF_HIST(n_kv, n_row, dv) + 3*RESTKV_HIST_BINS*(n_row))
#define RESTKV_ROW_SIZE(n_kv, n_row, dv)       (RESTKV_OFF_HIST2(n_kv, n_row, dv) + 3*RESTKV_HIST_BINS*(n_row))

// does query row at position rpos see the cell at position cpos
RESTKV_FN bool restkv_visible(int cpos, int rpos) {
    return cpos >= 0 && cpos <= rpos;
}

// histogram bin of an attention weight a in [0, 1] (its float bits): its octave, 0 for a = 1, 1 for
// [1/2, 1), ...; monotone (a larger a never gets a larger bin)
RESTKV_FN int restkv_hist_bin(uint32_t a_bits) {
    const int key = 127 - (int) (a_bits >> 23); // 127: the exponent field of 1.0f
    return key < 0 ? 0 : (key > RESTKV_HIST_BINS - 1 ? RESTKV_HIST_BINS - 1 : key);
}

// sub-bin of a weight within its octave: the top six mantissa bits, largest first
RESTKV_FN int restkv_hist_sub_bin(uint32_t a_bits) {
    return 63 - (int) ((a_bits >> 17) & 63);
}

// add one cell (position cpos) to a histogram bin {count, sum lo, sum hi}; non-atomic form (CPU)
RESTKV_FN void restkv_hist_add(RESTKV_GLOBAL uint32_t * bin, uint32_t cpos) {
    const uint32_t lo = bin[1] + cpos;
    bin[0] += 1;
    bin[2] += lo < cpos ? 1 : 0; // carry
    bin[1]  = lo;
}

// the octave holding a row's n_select-th largest weight (RESTKV_HIST_BINS if the row has fewer cells)
RESTKV_FN int restkv_hist_boundary(const RESTKV_GLOBAL uint32_t * hist, int n_select) {
    int taken = 0;
    int b = 0;
    for (; b < RESTKV_HIST_BINS; ++b) {
        const int cnt = (int) hist[3*b + 0];
        if (taken + cnt >= n_select) {
            break;
        }
        taken += cnt;
    }
    return b;
}

// mean position of the n_select cells with the largest weights, from a row's octaves (hist) and the
// sub-bins of its boundary octave (hist2, filled with the cells of that octave only)
RESTKV_FN float restkv_hist_topk_mean2(const RESTKV_GLOBAL uint32_t * hist, const RESTKV_GLOBAL uint32_t * hist2,
                                       int n_select) {
    const int b_star = restkv_hist_boundary(hist, n_select);
    float total = 0.0f;
    int   taken = 0;
    for (int b = 0; b < b_star; ++b) {
        total += (float) hist[3*b + 2]*4294967296.0f + (float) hist[3*b + 1];
        taken += (int) hist[3*b + 0];
    }
    for (int s = 0; b_star < RESTKV_HIST_BINS && s < RESTKV_HIST_BINS && taken < n_select; ++s) {
        const int   cnt = (int) hist2[3*s + 0];
        const float sum = (float) hist2[3*s + 2]*4294967296.0f + (float) hist2[3*s + 1];
        if (cnt == 0) {
            continue;
        }
        const int need = n_select - taken;
        total += cnt <= need ? sum : sum*((float) need/(float) cnt);
        taken += cnt <= need ? cnt : need;
    }
    return taken > 0 ? total/(float) taken : 0.0f;
}

// the EMA'd attention of a cell, clamped so that its odds stay finite
RESTKV_FN float restkv_abar_clamp(float abar) {
    return abar < 0.0f ? 0.0f : (abar > RESTKV_ABAR_MAX ? RESTKV_ABAR_MAX : abar);
}

// score of a cell: odds of its EMA'd attention times the output-space distance ||W_O^h (o - v)||,
// from v'Gv, (Go).v and o'Go
RESTKV_FN float restkv_cell_score(float abar, float vgv, float gov, float ogo) {
    const float err2 = vgv - 2.0f*gov + ogo;
    const float err  = err2 > 0.0f ? sqrt(err2) : 0.0f;
    return abar/(1.0f - abar)*err;
}

#endif // RESTKV_SCORE_COMMON_H

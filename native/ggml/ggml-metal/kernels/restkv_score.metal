// GGML_OP_RESTKV_SCORE on Metal: the passes of ggml-cuda/restkv-score-kernels.cuh with the same
// names and the same arithmetic (../restkv-score-common.h). Two simplifications, since Metal has no
// float atomics on every device and no memory pool here:
//   - stats runs one threadgroup per (head, row tile) over all cells (one split), so it writes the
//     row max and sum itself and there is no merge pass;
//   - attn runs one threadgroup per (cell tile, head) over all row tiles, and o one per head, so
//     abar and o are plain stores. The histograms use atomic_uint as on CUDA. hist2 (pass 3b, the
//     sub-bins of each row's boundary octave) is attn<TK, true> as on CUDA, with attn's grid.
// One difference in memory: Apple GPUs allow 32 KiB of threadgroup memory, less than the tiles plus
// the histograms (45 KiB, CUDA's layout), so attn's shared histograms reuse the tiles' memory once
// the tile product is done (one more barrier per row tile).
// These kernels are a library of their own, compiled at run time from the text that
// ../restkv-score.cmake embeds (this file with the two quoted includes below inlined), never part
// of ggml's Metal library: see ../restkv-score-metal.h. Hence no "common.h" and nothing from it.

#include <metal_stdlib>

using namespace metal;

#include "restkv-score-metal.h"
#include "restkv-score-common.h"

#define RESTKV_NT    RESTKV_METAL_NT // the host dispatches this many threads per threadgroup
#define RESTKV_TR    32
#define RESTKV_TC    128
#define RESTKV_KC    32
#define RESTKV_AS_LD (RESTKV_TR + 4)
#define RESTKV_BS_LD (RESTKV_TC + 4)
#define RESTKV_TILE_SMEM (RESTKV_KC*(RESTKV_AS_LD + RESTKV_BS_LD))
#define RESTKV_HS_SIZE   (RESTKV_TR*RESTKV_HIST_BINS*3)
// attn's threadgroup memory: the tiles, then (aliased) the histograms of the tile's rows
#define RESTKV_ATTN_SMEM (RESTKV_HS_SIZE > RESTKV_TILE_SMEM ? RESTKV_HS_SIZE : RESTKV_TILE_SMEM)

template <typename T> static inline float restkv_ld(device const char * p) { return (float) *(device const T *) p; }

// restkv_hist_add for many threads at once; the carry out of the low word goes to the high word
template <typename A>
static inline void restkv_hist_add_atomic(A * bin, uint32_t cnt, uint32_t lo, uint32_t hi) {
    atomic_fetch_add_explicit(bin + 0, cnt, memory_order_relaxed);
    const uint32_t old   = atomic_fetch_add_explicit(bin + 1, lo, memory_order_relaxed);
    const uint32_t carry = old + lo < lo ? 1 : 0;
    if (hi + carry != 0) {
        atomic_fetch_add_explicit(bin + 2, hi + carry, memory_order_relaxed);
    }
}

static inline device float * restkv_out(constant ggml_metal_kargs_restkv_score & a, device char * dst, int h) {
    return (device float *) dst + (int64_t) h*RESTKV_ROW_SIZE(a.n_kv, a.n_row, a.dv);
}

// acc[i][j] = a_scale * sum_k A[r0 + 4*ty + i][k] * B[c0 + 4*tx + j][k], as on CUDA
template <typename TB>
static void restkv_tile_product(
        thread float (&acc)[4][4], device const float * A, int lda, int n_a, int r0, float a_scale,
        device const char * B, int64_t nb0, int64_t nb1, int n_b, int c0, int n_i,
        threadgroup float * smem, ushort tid) {
    threadgroup float * as = smem;
    threadgroup float * bs = smem + RESTKV_KC*RESTKV_AS_LD;

    const int  tx = tid % 32;
    const int  ty = tid / 32;
    const bool b_cells_fast = nb1 < nb0;

    for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
            acc[i][j] = 0.0f;
        }
    }

    for (int k0 = 0; k0 < n_i; k0 += RESTKV_KC) {
        for (int idx = tid; idx < RESTKV_KC*RESTKV_TR; idx += RESTKV_NT) {
            const int k = idx % RESTKV_KC;
            const int r = idx / RESTKV_KC;
            const bool ok = r0 + r < n_a && k0 + k < n_i;
            as[k*RESTKV_AS_LD + r] = ok ? a_scale*A[(int64_t) (r0 + r)*lda + k0 + k] : 0.0f;
        }
        for (int idx = tid; idx < RESTKV_KC*RESTKV_TC; idx += RESTKV_NT) {
            const int k = b_cells_fast ? idx / RESTKV_TC : idx % RESTKV_KC;
            const int c = b_cells_fast ? idx % RESTKV_TC : idx / RESTKV_KC;
            const bool ok = c0 + c < n_b && k0 + k < n_i;
            bs[k*RESTKV_BS_LD + c] = ok ? restkv_ld<TB>(B + (c0 + c)*nb1 + (int64_t) (k0 + k)*nb0) : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        for (int k = 0; k < RESTKV_KC; ++k) {
            const float4 a4 = *(threadgroup const float4 *) (as + k*RESTKV_AS_LD + 4*ty);
            const float4 b4 = *(threadgroup const float4 *) (bs + k*RESTKV_BS_LD + 4*tx);
            for (int i = 0; i < 4; ++i) {
                for (int j = 0; j < 4; ++j) {
                    acc[i][j] = fma(a4[i], b4[j], acc[i][j]); // explicit, as on CUDA
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}

// pass 0: zero dst (abar, o and the histograms are summed into)
kernel void kernel_restkv_score_zero(
        constant ggml_metal_kargs_restkv_score & a,
        device char * dst,
        uint tgpig[[threadgroup_position_in_grid]],
        uint tpitg[[thread_position_in_threadgroup]]) {
    const int64_t n = (int64_t) RESTKV_ROW_SIZE(a.n_kv, a.n_row, a.dv)*a.n_head;
    const int64_t i = (int64_t) tgpig*RESTKV_NT + tpitg;
    if (i < n) {
        ((device float *) dst)[i] = 0.0f;
    }
}

// pass 1: per (head, row tile), the softmax max and sum of each row over all cells
template <typename TK>
kernel void kernel_restkv_score_stats(
        constant ggml_metal_kargs_restkv_score & a,
        device const char * q,
        device const char * k,
        device const char * cpos,
        device const char * rpos,
        device       char * dst,
        uint3  tgpig[[threadgroup_position_in_grid]],
        ushort tid[[thread_index_in_threadgroup]]) {
    threadgroup float smem[RESTKV_TILE_SMEM];

    const int h  = tgpig.y;
    const int r0 = tgpig.z*RESTKV_TR;
    const int hk = h/(a.n_head/a.n_head_kv);
    const int tx = tid % 32;
    const int ty = tid / 32;

    device const float   * qh = (device const float *) q + (int64_t) h*a.n_row*a.d;
    device const char    * kh = k + hk*a.nbk2;
    device const int32_t * cp_all = (device const int32_t *) cpos;
    device float * out = restkv_out(a, dst, h);

    int   rp[4];
    float m_run[4];
    float s_run[4];
    for (int i = 0; i < 4; ++i) {
        const int r = r0 + 4*ty + i;
        rp[i]    = r < a.n_row ? ((device const int32_t *) rpos)[r] : -1;
        m_run[i] = -INFINITY;
        s_run[i] = 0.0f;
    }

    for (int c0 = 0; c0 < a.n_kv; c0 += RESTKV_TC) {
        float acc[4][4];
        restkv_tile_product<TK>(acc, qh, a.d, a.n_row, r0, a.scale, kh, a.nbk0, a.nbk1, a.n_kv, c0, a.d, smem, tid);

        int cp[4];
        for (int j = 0; j < 4; ++j) {
            const int c = c0 + 4*tx + j;
            cp[j] = c < a.n_kv ? cp_all[c] : -1;
        }
        for (int i = 0; i < 4; ++i) {
            float tmax = -INFINITY;
            for (int j = 0; j < 4; ++j) {
                if (restkv_visible(cp[j], rp[i])) {
                    tmax = max(tmax, acc[i][j]);
                }
            }
            const float m_new = max(m_run[i], simd_max(tmax));
            float e = 0.0f;
            for (int j = 0; j < 4; ++j) {
                if (restkv_visible(cp[j], rp[i])) {
                    e += exp(acc[i][j] - m_new);
                }
            }
            e = simd_sum(e);
            s_run[i] = (m_run[i] == -INFINITY ? 0.0f : s_run[i]*exp(m_run[i] - m_new)) + e;
            m_run[i] = m_new;
        }
    }

    if (tx == 0) {
        for (int i = 0; i < 4; ++i) {
            const int r = r0 + 4*ty + i;
            if (r < a.n_row) {
                out[RESTKV_OFF_ROWMAX(a.n_kv) + r]         = m_run[i];
                out[RESTKV_OFF_ROWSUM(a.n_kv, a.n_row) + r] = s_run[i];
            }
        }
    }
}

// the attention weight a = exp(s - max)/sum of a visible cell, as on CUDA: passes 3 and 3b both call
// this on the same tile product entry, so a cell lands in the same octave in both
static inline float restkv_attn_weight(float s, float rmax, float rinv) {
    return exp(s - rmax)*rinv;
}

// row r's max and 1/sum for restkv_attn_weight; seen = false if r is out of range or sees no cell
static inline void restkv_row_softmax(constant ggml_metal_kargs_restkv_score & a, device const float * out, int r,
                                      thread bool & seen, thread float & rmax, thread float & rinv) {
    const float sum = r < a.n_row ? out[RESTKV_OFF_ROWSUM(a.n_kv, a.n_row) + r] : 0.0f;
    seen = r < a.n_row && sum > 0.0f;
    rmax = r < a.n_row ? out[RESTKV_OFF_ROWMAX(a.n_kv) + r] : 0.0f;
    rinv = sum > 0.0f ? 1.0f/sum : 0.0f;
}

// pass 3 (L2 = false): per (cell tile, head), over all row tiles: abar of the tile's cells and the
// octave histograms.
// pass 3b (L2 = true, only when n_select > 0, after pass 3): per (cell tile, head), over all row
// tiles: the same weights again; each row's cells in its boundary octave b* go into its sub-bins
// (hist2). Rows with b* == RESTKV_HIST_BINS add nothing; row tiles whose rows all have none are skipped.
template <typename TK, bool L2>
kernel void kernel_restkv_score_attn(
        constant ggml_metal_kargs_restkv_score & a,
        device const char * q,
        device const char * k,
        device const char * cpos,
        device const char * rpos,
        device const char * ema,
        device       char * dst,
        uint3  tgpig[[threadgroup_position_in_grid]],
        ushort tid[[thread_index_in_threadgroup]]) {
    threadgroup float smem[RESTKV_ATTN_SMEM];                   // tiles, then the histograms, then the abar reduction
    threadgroup int   bstar[RESTKV_TR];                          // L2: the rows' boundary octaves
    threadgroup atomic_uint * hs = (threadgroup atomic_uint *) smem; // the row tile's histograms, after its tile product

    const int c0 = tgpig.x*RESTKV_TC;
    const int h  = tgpig.y;
    const int hk = h/(a.n_head/a.n_head_kv);
    const int tx = tid % 32;
    const int ty = tid / 32;

    device const float   * qh = (device const float *) q + (int64_t) h*a.n_row*a.d;
    device const char    * kh = k + hk*a.nbk2;
    device const int32_t * cp_all = (device const int32_t *) cpos;
    device float * out = restkv_out(a, dst, h);
    device atomic_uint * hist = (device atomic_uint *) (out + (L2 ? RESTKV_OFF_HIST2(a.n_kv, a.n_row, a.dv) : RESTKV_OFF_HIST(a.n_kv, a.n_row, a.dv)));
    device const uint32_t * hist1 = (device const uint32_t *) (out + RESTKV_OFF_HIST(a.n_kv, a.n_row, a.dv));

    const bool use_hist = a.n_select > 0;

    int cp[4];
    for (int j = 0; j < 4; ++j) {
        const int c = c0 + 4*tx + j;
        cp[j] = c < a.n_kv ? cp_all[c] : -1;
    }
    float ab[4] = { 0.0f, 0.0f, 0.0f, 0.0f };

    for (int r0 = 0; r0 < a.n_row; r0 += RESTKV_TR) {
        if (L2) {
            // the boundary octave of each row of the tile, from its complete octave histogram (pass 3)
            if (tid < RESTKV_TR) {
                const int r = r0 + tid;
                bstar[tid] = use_hist && r < a.n_row ? restkv_hist_boundary(hist1 + 3*RESTKV_HIST_BINS*r, a.n_select)
                                                     : RESTKV_HIST_BINS;
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            bool any = false;
            for (int i = 0; i < RESTKV_TR; ++i) {
                any = any || bstar[i] < RESTKV_HIST_BINS;
            }
            if (!any) {
                threadgroup_barrier(mem_flags::mem_threadgroup); // bstar is read before the next row tile writes it
                continue; // the whole threadgroup: no row of the tile needs its sub-bins
            }
        }

        int   rp[4];
        int   rb[4]; // L2: the row's boundary octave
        float rmax[4];
        float rinv[4];
        float rw[4];
        for (int i = 0; i < 4; ++i) {
            const int r = r0 + 4*ty + i;
            bool seen;
            restkv_row_softmax(a, out, r, seen, rmax[i], rinv[i]);
            rb[i]   = L2 ? bstar[4*ty + i] : RESTKV_HIST_BINS;
            seen    = seen && (!L2 || rb[i] < RESTKV_HIST_BINS);
            rp[i]   = seen ? ((device const int32_t *) rpos)[r] : -1;
            rw[i]   = r < a.n_row ? ((device const float *) ema)[r] : 0.0f;
        }

        float acc[4][4];
        restkv_tile_product<TK>(acc, qh, a.d, a.n_row, r0, a.scale, kh, a.nbk0, a.nbk1, a.n_kv, c0, a.d, smem, tid);

        // the tiles are done (the product ends with a barrier): their memory holds the histograms now
        if (use_hist) {
            for (int i = tid; i < RESTKV_HS_SIZE; i += RESTKV_NT) {
                atomic_store_explicit(hs + i, 0u, memory_order_relaxed);
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        for (int i = 0; i < 4; ++i) {
            for (int j = 0; j < 4; ++j) {
                if (!restkv_visible(cp[j], rp[i])) {
                    continue;
                }
                const float    p    = restkv_attn_weight(acc[i][j], rmax[i], rinv[i]);
                const uint32_t bits = as_type<uint32_t>(p);
                if (L2) {
                    if (restkv_hist_bin(bits) == rb[i]) {
                        threadgroup atomic_uint * bin = hs + 3*(RESTKV_HIST_BINS*(4*ty + i) + restkv_hist_sub_bin(bits));
                        restkv_hist_add_atomic(bin, 1, (uint32_t) cp[j], 0);
                    }
                    continue;
                }
                ab[j] += rw[i]*p;
                if (use_hist) {
                    threadgroup atomic_uint * bin = hs + 3*(RESTKV_HIST_BINS*(4*ty + i) + restkv_hist_bin(bits));
                    restkv_hist_add_atomic(bin, 1, (uint32_t) cp[j], 0);
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        if (use_hist) {
            for (int i = tid; i < RESTKV_TR*RESTKV_HIST_BINS; i += RESTKV_NT) {
                const int r = r0 + i/RESTKV_HIST_BINS;
                const uint32_t cnt = atomic_load_explicit(hs + 3*i + 0, memory_order_relaxed);
                if (r < a.n_row && cnt != 0) {
                    restkv_hist_add_atomic(hist + 3*(RESTKV_HIST_BINS*r + i%RESTKV_HIST_BINS), cnt,
                        atomic_load_explicit(hs + 3*i + 1, memory_order_relaxed),
                        atomic_load_explicit(hs + 3*i + 2, memory_order_relaxed));
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    if (L2) {
        return;
    }

    // sum the simdgroups' rows per cell: each cell's abar is complete in this threadgroup
    for (int j = 0; j < 4; ++j) {
        smem[ty*RESTKV_TC + 4*tx + j] = ab[j];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid < RESTKV_TC && c0 + tid < a.n_kv) {
        float sum = 0.0f;
        for (int w = 0; w < RESTKV_NT/32; ++w) {
            sum += smem[w*RESTKV_TC + tid];
        }
        out[RESTKV_OFF_ABAR(a.n_kv) + c0 + tid] = restkv_abar_clamp(sum);
    }
}

// pass 4: per head, o = sum over the prefix of abar*v (abar is clamped by attn here)
template <typename TV>
kernel void kernel_restkv_score_o(
        constant ggml_metal_kargs_restkv_score & a,
        device const char * v,
        device const char * cpos,
        device       char * dst,
        uint   tgpig[[threadgroup_position_in_grid]],
        ushort tid[[thread_index_in_threadgroup]]) {
    const int h  = tgpig;
    const int hk = h/(a.n_head/a.n_head_kv);

    device const char    * vh = v + hk*a.nbv2;
    device const int32_t * cp = (device const int32_t *) cpos;
    device float * out  = restkv_out(a, dst, h);
    device float * abar = out + RESTKV_OFF_ABAR(a.n_kv);

    for (int j = tid; j < a.dv; j += RESTKV_NT) {
        float sum = 0.0f;
        for (int c = 0; c < a.n_kv; ++c) {
            if (cp[c] >= 0 && cp[c] < a.pos_window) {
                sum += abar[c]*restkv_ld<TV>(vh + c*a.nbv1 + (int64_t) j*a.nbv0);
            }
        }
        out[RESTKV_OFF_O(a.n_kv, a.n_row) + j] = sum;
    }
}

// pass 5: per head, G o, o'Go and the front/rear top-n_select mean positions
kernel void kernel_restkv_score_head(
        constant ggml_metal_kargs_restkv_score & a,
        device const char * gram,
        device       char * dst,
        uint   tgpig[[threadgroup_position_in_grid]],
        ushort tid[[thread_index_in_threadgroup]],
        ushort sgitg[[simdgroup_index_in_threadgroup]],
        ushort tiisg[[thread_index_in_simdgroup]]) {
    threadgroup float red[3][RESTKV_NT/32];

    const int h = tgpig;

    device float * out = restkv_out(a, dst, h);
    device const float * o  = out + RESTKV_OFF_O(a.n_kv, a.n_row);
    device       float * go = out + RESTKV_OFF_GO(a.n_kv, a.n_row, a.dv);
    device const float * G  = (device const float *) gram + (int64_t) h*a.dv*a.dv;
    device const uint32_t * hist  = (device const uint32_t *) (out + RESTKV_OFF_HIST(a.n_kv, a.n_row, a.dv));
    device const uint32_t * hist2 = (device const uint32_t *) (out + RESTKV_OFF_HIST2(a.n_kv, a.n_row, a.dv));

    const int n_front = a.n_row/2; // rows [0, n_front) are the front (not "half": a type in MSL)

    float ogo   = 0.0f;
    float front = 0.0f;
    float rear  = 0.0f;
    for (int j = tid; j < a.dv; j += RESTKV_NT) {
        float sum = 0.0f;
        for (int i = 0; i < a.dv; ++i) {
            sum += o[i]*G[(int64_t) i*a.dv + j];
        }
        go[j] = sum;
        ogo  += o[j]*sum;
    }
    if (a.n_select > 0) {
        for (int r = tid; r < a.n_row; r += RESTKV_NT) {
            const float m = restkv_hist_topk_mean2(hist + 3*RESTKV_HIST_BINS*r, hist2 + 3*RESTKV_HIST_BINS*r, a.n_select);
            if (r < n_front) {
                front += m;
            } else {
                rear += m;
            }
        }
    }

    ogo   = simd_sum(ogo);
    front = simd_sum(front);
    rear  = simd_sum(rear);
    if (tiisg == 0) {
        red[0][sgitg] = ogo;
        red[1][sgitg] = front;
        red[2][sgitg] = rear;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        ogo   = 0.0f;
        front = 0.0f;
        rear  = 0.0f;
        for (int w = 0; w < RESTKV_NT/32; ++w) {
            ogo   += red[0][w];
            front += red[1][w];
            rear  += red[2][w];
        }
        out[RESTKV_OFF_OGO(a.n_kv, a.n_row, a.dv)] = ogo;
        out[RESTKV_OFF_TPOS(a.n_kv) + 0] = a.n_select > 0 && n_front > 0 ? front/n_front : NAN;
        out[RESTKV_OFF_TPOS(a.n_kv) + 1] = a.n_select > 0 && n_front > 0 ? rear/(a.n_row - n_front) : NAN;
    }
}

// pass 6: per (cell tile, head), X = G v, v'Gv = v.X, (Go).v and the score
template <typename TV>
kernel void kernel_restkv_score_cells(
        constant ggml_metal_kargs_restkv_score & a,
        device const char * v,
        device const char * gram,
        device const char * cpos,
        device       char * dst,
        uint3  tgpig[[threadgroup_position_in_grid]],
        ushort tid[[thread_index_in_threadgroup]]) {
    threadgroup float smem[RESTKV_TILE_SMEM];

    const int c0 = tgpig.x*RESTKV_TC;
    const int h  = tgpig.y;
    const int hk = h/(a.n_head/a.n_head_kv);
    const int tx = tid % 32;
    const int ty = tid / 32;

    device const char  * vh  = v + hk*a.nbv2;
    device const float * G   = (device const float *) gram + (int64_t) h*a.dv*a.dv;
    device float       * out = restkv_out(a, dst, h);
    device const float * go  = out + RESTKV_OFF_GO(a.n_kv, a.n_row, a.dv);

    float vgv[4] = { 0.0f, 0.0f, 0.0f, 0.0f };
    float gov[4] = { 0.0f, 0.0f, 0.0f, 0.0f };

    for (int j0 = 0; j0 < a.dv; j0 += RESTKV_TR) {
        float acc[4][4];
        restkv_tile_product<TV>(acc, G, a.dv, a.dv, j0, 1.0f, vh, a.nbv0, a.nbv1, a.n_kv, c0, a.dv, smem, tid);

        for (int i = 0; i < 4; ++i) {
            const int j = j0 + 4*ty + i;
            if (j >= a.dv) {
                continue;
            }
            const float goj = go[j];
            for (int b = 0; b < 4; ++b) {
                const int c = c0 + 4*tx + b;
                if (c < a.n_kv) {
                    const float vj = restkv_ld<TV>(vh + c*a.nbv1 + (int64_t) j*a.nbv0);
                    vgv[b] += vj*acc[i][b];
                    gov[b] += vj*goj;
                }
            }
        }
    }

    threadgroup float * red = smem;
    for (int b = 0; b < 4; ++b) {
        red[ty*RESTKV_TC + 4*tx + b]                  = vgv[b];
        red[(RESTKV_NT/32 + ty)*RESTKV_TC + 4*tx + b] = gov[b];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int c = c0 + tid;
    if (tid < RESTKV_TC && c < a.n_kv) {
        float s_vgv = 0.0f;
        float s_gov = 0.0f;
        for (int w = 0; w < RESTKV_NT/32; ++w) {
            s_vgv += red[w*RESTKV_TC + tid];
            s_gov += red[(RESTKV_NT/32 + w)*RESTKV_TC + tid];
        }
        const float ogo = out[RESTKV_OFF_OGO(a.n_kv, a.n_row, a.dv)];
        out[c] = ((device const int32_t *) cpos)[c] < 0 ? 0.0f :
            restkv_cell_score(out[RESTKV_OFF_ABAR(a.n_kv) + c], s_vgv, s_gov, ogo);
    }
}

typedef decltype(kernel_restkv_score_stats<half>) kernel_restkv_score_stats_t;
typedef decltype(kernel_restkv_score_attn<half, false>) kernel_restkv_score_attn_t;
typedef decltype(kernel_restkv_score_o<half>)     kernel_restkv_score_o_t;
typedef decltype(kernel_restkv_score_cells<half>) kernel_restkv_score_cells_t;

template [[host_name("kernel_restkv_score_stats_f16")]] kernel kernel_restkv_score_stats_t kernel_restkv_score_stats<half>;
template [[host_name("kernel_restkv_score_stats_f32")]] kernel kernel_restkv_score_stats_t kernel_restkv_score_stats<float>;
template [[host_name("kernel_restkv_score_attn_f16")]]  kernel kernel_restkv_score_attn_t  kernel_restkv_score_attn<half, false>;
template [[host_name("kernel_restkv_score_attn_f32")]]  kernel kernel_restkv_score_attn_t  kernel_restkv_score_attn<float, false>;
template [[host_name("kernel_restkv_score_hist2_f16")]] kernel kernel_restkv_score_attn_t  kernel_restkv_score_attn<half, true>;
template [[host_name("kernel_restkv_score_hist2_f32")]] kernel kernel_restkv_score_attn_t  kernel_restkv_score_attn<float, true>;
template [[host_name("kernel_restkv_score_o_f16")]]     kernel kernel_restkv_score_o_t     kernel_restkv_score_o<half>;
template [[host_name("kernel_restkv_score_o_f32")]]     kernel kernel_restkv_score_o_t     kernel_restkv_score_o<float>;
template [[host_name("kernel_restkv_score_cells_f16")]] kernel kernel_restkv_score_cells_t kernel_restkv_score_cells<half>;
template [[host_name("kernel_restkv_score_cells_f32")]] kernel kernel_restkv_score_cells_t kernel_restkv_score_cells<float>;

// GGML_OP_RESTKV_SCORE on CUDA: the kernels and a launcher on raw device pointers, so that the op
// (restkv-score.cu) and the standalone GPU check (bench/gpu) run the same code. The per-key
// arithmetic is in ../restkv-score-common.h; see its comment for the op's semantics and dst's layout.
// ggml-metal/kernels/restkv_score.metal mirrors these kernels pass for pass.
//
// Passes (one launch each, after zeroing dst):
//   1. stats:  per (cell split, head, row tile): S = scale*q.k for tiles of 32 rows x 128 cells,
//              online softmax max/sum over the split's cells -> partials (max, sum)
//   2. merge:  per (head, row): the partials -> row max and row sum in dst
//   3. attn:   per (cell split, head, row tile): S again, a = exp(S - max)/sum, abar += ema*a
//              (atomic, one add per cell and tile), octave histogram of a per row (shared, then flushed)
//   3b. hist2: only when n_select > 0; per (cell split, head, row tile): each row's boundary octave
//              b* (restkv_hist_boundary on the complete octaves), S and a once more, and the sub-bin
//              histogram of the row's cells whose a lies in octave b* (shared, then flushed)
//   4. o:      per (cell split, head): clamp abar, o += abar*v over the prefix (atomic per split)
//   5. head:   per head: G o, o'Go and the front/rear top-n_select mean positions (both histograms)
//   6. score:  per (cell tile, head): X = G v for the tile's cells, v'Gv, (Go).v and the score
// S is never stored: passes 1, 3 and 3b all compute it (K is read two or three times), so the memory
// beyond dst is only the partials of pass 1, n_head*n_row*n_split*2 floats. Passes 3 and 3b are one
// kernel (restkv_score_attn<TK, L2>) and compute a with one function (restkv_attn_weight) from the
// same tile product, so a cell's weight has the same bits in both: the cells that pass 3 counted in
// octave b* are exactly the cells that pass 3b bins into sub-bins.

#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include "../restkv-score-common.h"

#define RESTKV_CUDA_NT     256 // threads per block: 8 warps
#define RESTKV_CUDA_TR     32  // rows of a tile: 4 per warp
#define RESTKV_CUDA_TC     128 // cells of a tile: 4 per lane
#define RESTKV_CUDA_KC     32  // depth of one shared-memory step of a tile product
#define RESTKV_CUDA_SPLITS 64  // at most this many cell splits per head in passes 1, 3 and 4

// padded shared rows: float4 aligned, and fewer bank conflicts when a warp writes a column
#define RESTKV_CUDA_AS_LD  (RESTKV_CUDA_TR + 4)
#define RESTKV_CUDA_BS_LD  (RESTKV_CUDA_TC + 4)
#define RESTKV_CUDA_TILE_SMEM (RESTKV_CUDA_KC*(RESTKV_CUDA_AS_LD + RESTKV_CUDA_BS_LD))

struct restkv_score_cuda_args {
    const float   * q;        // f32 [d, n_row, n_head], contiguous
    const void    * k;        // f16|f32 [d, n_kv, n_head_kv], strides nbk*
    const void    * v;        // f16|f32 [dv, n_kv, n_head_kv], strides nbv*
    const float   * gram;     // f32 [dv, dv, n_head], contiguous
    const int32_t * cpos;     // [n_kv]
    const int32_t * rpos;     // [n_row]
    const float   * ema;      // [n_row]
    float         * dst;      // f32 [RESTKV_ROW_SIZE(n_kv, n_row, dv), n_head], contiguous
    float         * partials; // restkv_score_cuda_partials_size(...) bytes

    bool    k_f16;
    bool    v_f16;
    int64_t nbk0, nbk1, nbk2; // bytes
    int64_t nbv0, nbv1, nbv2; // bytes

    int d;
    int dv;
    int n_row;
    int n_head;
    int n_head_kv;
    int n_kv;

    float scale;
    int   pos_window;
    int   n_select;
};

static int restkv_score_cuda_n_split(int n_kv) {
    const int n_tiles = (n_kv + RESTKV_CUDA_TC - 1)/RESTKV_CUDA_TC;
    const int n_split = n_tiles < RESTKV_CUDA_SPLITS ? n_tiles : RESTKV_CUDA_SPLITS;
    const int tps     = (n_tiles + n_split - 1)/n_split;
    return (n_tiles + tps - 1)/tps;
}

// device memory the launcher needs besides dst, in bytes
static size_t restkv_score_cuda_partials_size(int n_kv, int n_row, int n_head) {
    return sizeof(float)*2*(size_t) n_head*n_row*restkv_score_cuda_n_split(n_kv > 0 ? n_kv : 1);
}

template <typename T> static __device__ __forceinline__ float restkv_ld(const char * p);
template <> __device__ __forceinline__ float restkv_ld<float>(const char * p) { return *(const float *) p; }
template <> __device__ __forceinline__ float restkv_ld<half> (const char * p) { return __half2float(*(const half *) p); }

// restkv_hist_add for many threads at once (shared or global memory): cnt cells whose positions
// sum to hi:lo. The carry out of the low word goes to the high word as in restkv_hist_add, so the
// 64-bit sums are exact in any order of the adds.
static __device__ __forceinline__ void restkv_hist_add_atomic(uint32_t * bin, uint32_t cnt, uint32_t lo, uint32_t hi) {
    atomicAdd(bin + 0, cnt);
    const uint32_t old   = atomicAdd(bin + 1, lo);
    const uint32_t carry = old + lo < lo ? 1 : 0;
    if (hi + carry != 0) {
        atomicAdd(bin + 2, hi + carry);
    }
}

// acc[a][b] = a_scale * sum_i A[r0 + 4*ty + a][i] * B[c0 + 4*tx + b][i] for i < n_i, where warp ty and
// lane tx own 4 rows and 4 cells of the 32 x 128 tile. A is f32 row-major (lda), B is any-strided
// f16/f32 (element (c, i) at c*nb1 + i*nb0). Rows >= n_a and cells >= n_b read as 0.
template <typename TB>
static __device__ __forceinline__ void restkv_tile_product(
        float acc[4][4], const float * A, int lda, int n_a, int r0, float a_scale,
        const char * B, int64_t nb0, int64_t nb1, int n_b, int c0, int n_i, float * smem) {
    float * as = smem;                                      // [KC][AS_LD]: A transposed
    float * bs = smem + RESTKV_CUDA_KC*RESTKV_CUDA_AS_LD;   // [KC][BS_LD]: B transposed

    const int tid = threadIdx.x;
    const int tx  = tid % 32;
    const int ty  = tid / 32;

    // lanes walk along the contiguous index of B, so that both K and a transposed V load coalesced
    const bool b_cells_fast = nb1 < nb0;

    for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) {
            acc[a][b] = 0.0f;
        }
    }

    for (int i0 = 0; i0 < n_i; i0 += RESTKV_CUDA_KC) {
        for (int idx = tid; idx < RESTKV_CUDA_KC*RESTKV_CUDA_TR; idx += RESTKV_CUDA_NT) {
            const int i = idx % RESTKV_CUDA_KC;
            const int r = idx / RESTKV_CUDA_KC;
            const bool ok = r0 + r < n_a && i0 + i < n_i;
            as[i*RESTKV_CUDA_AS_LD + r] = ok ? a_scale*A[(int64_t) (r0 + r)*lda + i0 + i] : 0.0f;
        }
        for (int idx = tid; idx < RESTKV_CUDA_KC*RESTKV_CUDA_TC; idx += RESTKV_CUDA_NT) {
            const int i = b_cells_fast ? idx / RESTKV_CUDA_TC : idx % RESTKV_CUDA_KC;
            const int c = b_cells_fast ? idx % RESTKV_CUDA_TC : idx / RESTKV_CUDA_KC;
            const bool ok = c0 + c < n_b && i0 + i < n_i;
            bs[i*RESTKV_CUDA_BS_LD + c] = ok ? restkv_ld<TB>(B + (c0 + c)*nb1 + (int64_t) (i0 + i)*nb0) : 0.0f;
        }
        __syncthreads();

#pragma unroll 8
        for (int i = 0; i < RESTKV_CUDA_KC; ++i) {
            const float4 a4 = *(const float4 *) (as + i*RESTKV_CUDA_AS_LD + 4*ty);
            const float4 b4 = *(const float4 *) (bs + i*RESTKV_CUDA_BS_LD + 4*tx);
            const float av[4] = { a4.x, a4.y, a4.z, a4.w };
            const float bv[4] = { b4.x, b4.y, b4.z, b4.w };
            for (int a = 0; a < 4; ++a) {
                for (int b = 0; b < 4; ++b) {
                    acc[a][b] = __fmaf_rn(av[a], bv[b], acc[a][b]); // explicit: same bits whatever -fmad says
                }
            }
        }
        __syncthreads();
    }
}

static __device__ __forceinline__ float restkv_warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) {
        x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    }
    return x;
}

static __device__ __forceinline__ float restkv_warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) {
        x += __shfl_xor_sync(0xffffffff, x, o);
    }
    return x;
}

// the cells [c_begin, c_end) of split blockIdx.x, in whole tiles
static __device__ __forceinline__ void restkv_split_range(int n_kv, int n_split, int & c_begin, int & c_end) {
    const int n_tiles = (n_kv + RESTKV_CUDA_TC - 1)/RESTKV_CUDA_TC;
    const int tps     = (n_tiles + n_split - 1)/n_split;
    c_begin = blockIdx.x*tps*RESTKV_CUDA_TC;
    c_end   = min(n_kv, c_begin + tps*RESTKV_CUDA_TC);
}

// pass 1: per (split, head, row tile), the online softmax max and sum of each row over the split
template <typename TK>
static __global__ void restkv_score_stats(const restkv_score_cuda_args a, int n_split) {
    __shared__ __align__(16) float smem[RESTKV_CUDA_TILE_SMEM];

    const int h  = blockIdx.y;
    const int r0 = blockIdx.z*RESTKV_CUDA_TR;
    const int hk = h/(a.n_head/a.n_head_kv);
    const int tx = threadIdx.x % 32;
    const int ty = threadIdx.x / 32;

    const float * qh = a.q + (int64_t) h*a.n_row*a.d;
    const char  * kh = (const char *) a.k + hk*a.nbk2;

    int c_begin, c_end;
    restkv_split_range(a.n_kv, n_split, c_begin, c_end);

    int   rp[4];
    float m_run[4];
    float s_run[4];
    for (int i = 0; i < 4; ++i) {
        const int r = r0 + 4*ty + i;
        rp[i]    = r < a.n_row ? a.rpos[r] : -1; // -1: sees no cell
        m_run[i] = -INFINITY;
        s_run[i] = 0.0f;
    }

    for (int c0 = c_begin; c0 < c_end; c0 += RESTKV_CUDA_TC) {
        float acc[4][4];
        restkv_tile_product<TK>(acc, qh, a.d, a.n_row, r0, a.scale, kh, a.nbk0, a.nbk1, a.n_kv, c0, a.d, smem);

        int cp[4];
        for (int j = 0; j < 4; ++j) {
            const int c = c0 + 4*tx + j;
            cp[j] = c < a.n_kv ? a.cpos[c] : -1;
        }
        for (int i = 0; i < 4; ++i) {
            float tmax = -INFINITY;
            for (int j = 0; j < 4; ++j) {
                if (restkv_visible(cp[j], rp[i])) {
                    tmax = fmaxf(tmax, acc[i][j]);
                }
            }
            const float m_new = fmaxf(m_run[i], restkv_warp_max(tmax));
            float e = 0.0f;
            for (int j = 0; j < 4; ++j) {
                if (restkv_visible(cp[j], rp[i])) {
                    e += expf(acc[i][j] - m_new); // visible: m_new is finite
                }
            }
            e = restkv_warp_sum(e);
            s_run[i] = (m_run[i] == -INFINITY ? 0.0f : s_run[i]*expf(m_run[i] - m_new)) + e;
            m_run[i] = m_new;
        }
    }

    if (tx == 0) {
        for (int i = 0; i < 4; ++i) {
            const int r = r0 + 4*ty + i;
            if (r < a.n_row) {
                float * p = a.partials + 2*(((int64_t) h*a.n_row + r)*n_split + blockIdx.x);
                p[0] = m_run[i];
                p[1] = s_run[i];
            }
        }
    }
}

// pass 2: per (head, row), merge the splits' partials into the row's max and sum
static __global__ void restkv_score_merge(const restkv_score_cuda_args a, int n_split) {
    const int i = blockIdx.x*blockDim.x + threadIdx.x;
    if (i >= a.n_head*a.n_row) {
        return;
    }
    const int h = i / a.n_row;
    const int r = i % a.n_row;

    const float * p = a.partials + 2*(int64_t) i*n_split;
    float m = -INFINITY;
    for (int s = 0; s < n_split; ++s) {
        m = fmaxf(m, p[2*s + 0]);
    }
    float sum = 0.0f;
    if (m != -INFINITY) {
        for (int s = 0; s < n_split; ++s) {
            if (p[2*s + 0] != -INFINITY) {
                sum += p[2*s + 1]*expf(p[2*s + 0] - m);
            }
        }
    }
    float * out = a.dst + (int64_t) h*RESTKV_ROW_SIZE(a.n_kv, a.n_row, a.dv);
    out[RESTKV_OFF_ROWMAX(a.n_kv) + r]         = m;
    out[RESTKV_OFF_ROWSUM(a.n_kv, a.n_row) + r] = sum;
}

// the attention weight a = exp(s - max)/sum of a visible cell, from its tile product entry s and its
// row's max and 1/sum (restkv_row_softmax). Passes 3 and 3b both call this, on the same s, so a cell
// lands in the same octave in both; the _rn intrinsics keep the compiler from contracting either
// operation into an FMA with the code around it.
static __device__ __forceinline__ float restkv_attn_weight(float s, float rmax, float rinv) {
    return __fmul_rn(expf(__fsub_rn(s, rmax)), rinv);
}

// row r's max and 1/sum for restkv_attn_weight, from dst (pass 2); seen = false if r is out of range or
// the row sees no cell
static __device__ __forceinline__ void restkv_row_softmax(const restkv_score_cuda_args & a, const float * out, int r,
                                                          bool & seen, float & rmax, float & rinv) {
    const float sum = r < a.n_row ? out[RESTKV_OFF_ROWSUM(a.n_kv, a.n_row) + r] : 0.0f;
    seen = r < a.n_row && sum > 0.0f;
    rmax = r < a.n_row ? out[RESTKV_OFF_ROWMAX(a.n_kv) + r] : 0.0f;
    rinv = sum > 0.0f ? 1.0f/sum : 0.0f;
}

// pass 3 (L2 = false): per (split, head, row tile), the attention weights: abar and the rows' octave
// histograms.
// pass 3b (L2 = true, only when n_select > 0, after pass 3 is complete): per (split, head, row tile),
// the same weights again; each row's cells in its boundary octave b* go into its sub-bin histogram
// (hist2). Rows with b* == RESTKV_HIST_BINS (fewer than n_select cells) add nothing, and a block
// whose rows all have none returns at once.
template <typename TK, bool L2>
static __global__ void restkv_score_attn(const restkv_score_cuda_args a, int n_split) {
    __shared__ __align__(16) float    smem[RESTKV_CUDA_TILE_SMEM];                      // tiles, then the abar reduction
    __shared__              uint32_t hs[RESTKV_CUDA_TR*RESTKV_HIST_BINS*3];           // the tile rows' histograms
    __shared__              int      bstar[RESTKV_CUDA_TR];                             // L2: the rows' boundary octaves

    const int h  = blockIdx.y;
    const int r0 = blockIdx.z*RESTKV_CUDA_TR;
    const int hk = h/(a.n_head/a.n_head_kv);
    const int tx = threadIdx.x % 32;
    const int ty = threadIdx.x / 32;

    const float * qh  = a.q + (int64_t) h*a.n_row*a.d;
    const char  * kh  = (const char *) a.k + hk*a.nbk2;
    float       * out = a.dst + (int64_t) h*RESTKV_ROW_SIZE(a.n_kv, a.n_row, a.dv);
    float       * abar = out + RESTKV_OFF_ABAR(a.n_kv);

    const bool use_hist = a.n_select > 0;
    if (use_hist) {
        for (int i = threadIdx.x; i < RESTKV_CUDA_TR*RESTKV_HIST_BINS*3; i += RESTKV_CUDA_NT) {
            hs[i] = 0;
        }
    }
    if (L2) {
        // the boundary octave of each row of the tile, from its complete octave histogram (pass 3)
        const uint32_t * hist = (const uint32_t *) (out + RESTKV_OFF_HIST(a.n_kv, a.n_row, a.dv));
        bool any = false;
        if (threadIdx.x < RESTKV_CUDA_TR) {
            const int r = r0 + threadIdx.x;
            const int b = use_hist && r < a.n_row ? restkv_hist_boundary(hist + 3*RESTKV_HIST_BINS*r, a.n_select)
                                                  : RESTKV_HIST_BINS;
            bstar[threadIdx.x] = b;
            any = b < RESTKV_HIST_BINS;
        }
        if (!__syncthreads_or(any)) {
            return; // the whole block: no row of the tile needs its sub-bins
        }
    }

    int c_begin, c_end;
    restkv_split_range(a.n_kv, n_split, c_begin, c_end);

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
        rp[i]   = seen ? a.rpos[r] : -1; // a row that sees no cell (or, in L2, needs no sub-bins) adds nothing
        rw[i]   = r < a.n_row ? a.ema[r] : 0.0f;
    }

    for (int c0 = c_begin; c0 < c_end; c0 += RESTKV_CUDA_TC) {
        float acc[4][4];
        restkv_tile_product<TK>(acc, qh, a.d, a.n_row, r0, a.scale, kh, a.nbk0, a.nbk1, a.n_kv, c0, a.d, smem);

        int   cp[4];
        float ab[4] = { 0.0f, 0.0f, 0.0f, 0.0f };
        for (int j = 0; j < 4; ++j) {
            const int c = c0 + 4*tx + j;
            cp[j] = c < a.n_kv ? a.cpos[c] : -1;
        }
        for (int i = 0; i < 4; ++i) {
            for (int j = 0; j < 4; ++j) {
                if (!restkv_visible(cp[j], rp[i])) {
                    continue;
                }
                const float    p    = restkv_attn_weight(acc[i][j], rmax[i], rinv[i]);
                const uint32_t bits = __float_as_uint(p);
                if (L2) {
                    if (restkv_hist_bin(bits) == rb[i]) {
                        uint32_t * bin = hs + 3*(RESTKV_HIST_BINS*(4*ty + i) + restkv_hist_sub_bin(bits));
                        restkv_hist_add_atomic(bin, 1, (uint32_t) cp[j], 0);
                    }
                    continue;
                }
                ab[j] += rw[i]*p;
                if (use_hist) {
                    uint32_t * bin = hs + 3*(RESTKV_HIST_BINS*(4*ty + i) + restkv_hist_bin(bits));
                    restkv_hist_add_atomic(bin, 1, (uint32_t) cp[j], 0);
                }
            }
        }

        // sum the warps' rows per cell; the tile's shared memory is free again here (L2 has no abar:
        // the next tile product's barriers order its shared memory)
        if (!L2) {
            for (int j = 0; j < 4; ++j) {
                smem[ty*RESTKV_CUDA_TC + 4*tx + j] = ab[j];
            }
            __syncthreads();
            if (threadIdx.x < RESTKV_CUDA_TC && c0 + (int) threadIdx.x < a.n_kv) {
                float sum = 0.0f;
                for (int w = 0; w < RESTKV_CUDA_NT/32; ++w) {
                    sum += smem[w*RESTKV_CUDA_TC + threadIdx.x];
                }
                atomicAdd(abar + c0 + threadIdx.x, sum);
            }
            __syncthreads();
        }
    }

    if (use_hist) {
        __syncthreads();
        uint32_t * hist = (uint32_t *) (out + (L2 ? RESTKV_OFF_HIST2(a.n_kv, a.n_row, a.dv) : RESTKV_OFF_HIST(a.n_kv, a.n_row, a.dv)));
        for (int i = threadIdx.x; i < RESTKV_CUDA_TR*RESTKV_HIST_BINS; i += RESTKV_CUDA_NT) {
            const int r = r0 + i/RESTKV_HIST_BINS;
            if (r < a.n_row && hs[3*i + 0] != 0) {
                restkv_hist_add_atomic(hist + 3*(RESTKV_HIST_BINS*r + i%RESTKV_HIST_BINS), hs[3*i + 0], hs[3*i + 1], hs[3*i + 2]);
            }
        }
    }
}

// pass 4: per (split, head), clamp abar and add the split's prefix cells into o
template <typename TV>
static __global__ void restkv_score_o(const restkv_score_cuda_args a, int n_split) {
    const int h  = blockIdx.y;
    const int hk = h/(a.n_head/a.n_head_kv);

    const char * vh   = (const char *) a.v + hk*a.nbv2;
    float      * out  = a.dst + (int64_t) h*RESTKV_ROW_SIZE(a.n_kv, a.n_row, a.dv);
    float      * abar = out + RESTKV_OFF_ABAR(a.n_kv);
    float      * o    = out + RESTKV_OFF_O(a.n_kv, a.n_row);

    int c_begin, c_end;
    restkv_split_range(a.n_kv, n_split, c_begin, c_end);

    for (int c = c_begin + threadIdx.x; c < c_end; c += blockDim.x) {
        abar[c] = restkv_abar_clamp(abar[c]);
    }
    __syncthreads();

    for (int j = threadIdx.x; j < a.dv; j += blockDim.x) {
        float sum = 0.0f;
        for (int c = c_begin; c < c_end; ++c) {
            const int cp = a.cpos[c];
            if (cp >= 0 && cp < a.pos_window) {
                sum += abar[c]*restkv_ld<TV>(vh + c*a.nbv1 + (int64_t) j*a.nbv0);
            }
        }
        atomicAdd(o + j, sum);
    }
}

// pass 5: per head, G o, o'Go and the mean top-n_select positions of the front and rear rows
static __global__ void restkv_score_head(const restkv_score_cuda_args a) {
    __shared__ float red[3][RESTKV_CUDA_NT/32];

    const int h = blockIdx.x;

    float * out = a.dst + (int64_t) h*RESTKV_ROW_SIZE(a.n_kv, a.n_row, a.dv);
    const float * o  = out + RESTKV_OFF_O(a.n_kv, a.n_row);
    float       * go = out + RESTKV_OFF_GO(a.n_kv, a.n_row, a.dv);
    const float * G  = a.gram + (int64_t) h*a.dv*a.dv;
    const uint32_t * hist  = (const uint32_t *) (out + RESTKV_OFF_HIST(a.n_kv, a.n_row, a.dv));
    const uint32_t * hist2 = (const uint32_t *) (out + RESTKV_OFF_HIST2(a.n_kv, a.n_row, a.dv));

    const int half = a.n_row/2;

    float ogo   = 0.0f;
    float front = 0.0f;
    float rear  = 0.0f;
    for (int j = threadIdx.x; j < a.dv; j += blockDim.x) {
        float sum = 0.0f;
        for (int i = 0; i < a.dv; ++i) {
            sum += o[i]*G[(int64_t) i*a.dv + j]; // G is symmetric: row i = column i
        }
        go[j] = sum;
        ogo  += o[j]*sum;
    }
    if (a.n_select > 0) {
        for (int r = threadIdx.x; r < a.n_row; r += blockDim.x) {
            const float m = restkv_hist_topk_mean2(hist + 3*RESTKV_HIST_BINS*r, hist2 + 3*RESTKV_HIST_BINS*r, a.n_select);
            if (r < half) {
                front += m;
            } else {
                rear += m;
            }
        }
    }

    ogo   = restkv_warp_sum(ogo);
    front = restkv_warp_sum(front);
    rear  = restkv_warp_sum(rear);
    if (threadIdx.x % 32 == 0) {
        red[0][threadIdx.x/32] = ogo;
        red[1][threadIdx.x/32] = front;
        red[2][threadIdx.x/32] = rear;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        ogo   = 0.0f;
        front = 0.0f;
        rear  = 0.0f;
        for (int w = 0; w < (int) blockDim.x/32; ++w) {
            ogo   += red[0][w];
            front += red[1][w];
            rear  += red[2][w];
        }
        const float nan = __int_as_float(0x7fc00000);
        out[RESTKV_OFF_OGO(a.n_kv, a.n_row, a.dv)] = ogo;
        out[RESTKV_OFF_TPOS(a.n_kv) + 0] = a.n_select > 0 && half > 0 ? front/half : nan;
        out[RESTKV_OFF_TPOS(a.n_kv) + 1] = a.n_select > 0 && half > 0 ? rear/(a.n_row - half) : nan;
    }
}

// pass 6: per (cell tile, head), X = G v for the tile's cells (G's rows in tiles of 32), then
// v'Gv = v.X, (Go).v and the score
template <typename TV>
static __global__ void restkv_score_cells(const restkv_score_cuda_args a) {
    __shared__ __align__(16) float smem[RESTKV_CUDA_TILE_SMEM];

    const int c0 = blockIdx.x*RESTKV_CUDA_TC;
    const int h  = blockIdx.y;
    const int hk = h/(a.n_head/a.n_head_kv);
    const int tx = threadIdx.x % 32;
    const int ty = threadIdx.x / 32;

    const char  * vh  = (const char *) a.v + hk*a.nbv2;
    const float * G   = a.gram + (int64_t) h*a.dv*a.dv;
    float       * out = a.dst + (int64_t) h*RESTKV_ROW_SIZE(a.n_kv, a.n_row, a.dv);
    const float * go  = out + RESTKV_OFF_GO(a.n_kv, a.n_row, a.dv);

    float vgv[4] = { 0.0f, 0.0f, 0.0f, 0.0f };
    float gov[4] = { 0.0f, 0.0f, 0.0f, 0.0f };

    for (int j0 = 0; j0 < a.dv; j0 += RESTKV_CUDA_TR) {
        float acc[4][4];
        restkv_tile_product<TV>(acc, G, a.dv, a.dv, j0, 1.0f, vh, a.nbv0, a.nbv1, a.n_kv, c0, a.dv, smem);

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

    // sum over the warps' rows; smem is free after the last tile product
    float * red = smem;
    for (int b = 0; b < 4; ++b) {
        red[ty*RESTKV_CUDA_TC + 4*tx + b]                                      = vgv[b];
        red[(RESTKV_CUDA_NT/32 + ty)*RESTKV_CUDA_TC + 4*tx + b]               = gov[b];
    }
    __syncthreads();
    const int c = c0 + threadIdx.x;
    if (threadIdx.x < RESTKV_CUDA_TC && c < a.n_kv) {
        float s_vgv = 0.0f;
        float s_gov = 0.0f;
        for (int w = 0; w < RESTKV_CUDA_NT/32; ++w) {
            s_vgv += red[w*RESTKV_CUDA_TC + threadIdx.x];
            s_gov += red[(RESTKV_CUDA_NT/32 + w)*RESTKV_CUDA_TC + threadIdx.x];
        }
        const float ogo = out[RESTKV_OFF_OGO(a.n_kv, a.n_row, a.dv)];
        out[c] = a.cpos[c] < 0 ? 0.0f : restkv_cell_score(out[RESTKV_OFF_ABAR(a.n_kv) + c], s_vgv, s_gov, ogo);
    }
}

// runs the op on stream; the kernels write only dst and a.partials
static void restkv_score_cuda_launch(const restkv_score_cuda_args & a, cudaStream_t stream) {
    const size_t row_size = RESTKV_ROW_SIZE((size_t) a.n_kv, (size_t) a.n_row, (size_t) a.dv);

    // abar, o and the histograms are summed into with atomics
    cudaMemsetAsync(a.dst, 0, sizeof(float)*row_size*a.n_head, stream);
    if (a.n_head == 0 || a.n_row == 0) {
        return;
    }

    const int n_split = restkv_score_cuda_n_split(a.n_kv > 0 ? a.n_kv : 1);
    const int n_rt    = (a.n_row + RESTKV_CUDA_TR - 1)/RESTKV_CUDA_TR;
    const int n_tiles = (a.n_kv + RESTKV_CUDA_TC - 1)/RESTKV_CUDA_TC;

    if (a.n_kv > 0) {
        const dim3 grid(n_split, a.n_head, n_rt);
        if (a.k_f16) {
            restkv_score_stats<half><<<grid, RESTKV_CUDA_NT, 0, stream>>>(a, n_split);
        } else {
            restkv_score_stats<float><<<grid, RESTKV_CUDA_NT, 0, stream>>>(a, n_split);
        }
        const int n_hr = a.n_head*a.n_row;
        restkv_score_merge<<<(n_hr + RESTKV_CUDA_NT - 1)/RESTKV_CUDA_NT, RESTKV_CUDA_NT, 0, stream>>>(a, n_split);
        if (a.k_f16) {
            restkv_score_attn<half, false><<<grid, RESTKV_CUDA_NT, 0, stream>>>(a, n_split);
        } else {
            restkv_score_attn<float, false><<<grid, RESTKV_CUDA_NT, 0, stream>>>(a, n_split);
        }
        if (a.n_select > 0) {
            // pass 3b: the sub-bins of each row's boundary octave, once all octaves are counted
            if (a.k_f16) {
                restkv_score_attn<half, true><<<grid, RESTKV_CUDA_NT, 0, stream>>>(a, n_split);
            } else {
                restkv_score_attn<float, true><<<grid, RESTKV_CUDA_NT, 0, stream>>>(a, n_split);
            }
        }
        const dim3 grid_o(n_split, a.n_head);
        if (a.v_f16) {
            restkv_score_o<half><<<grid_o, 128, 0, stream>>>(a, n_split);
        } else {
            restkv_score_o<float><<<grid_o, 128, 0, stream>>>(a, n_split);
        }
    }
    restkv_score_head<<<a.n_head, RESTKV_CUDA_NT, 0, stream>>>(a);
    if (a.n_kv > 0) {
        const dim3 grid_c(n_tiles, a.n_head);
        if (a.v_f16) {
            restkv_score_cells<half><<<grid_c, RESTKV_CUDA_NT, 0, stream>>>(a);
        } else {
            restkv_score_cells<float><<<grid_c, RESTKV_CUDA_NT, 0, stream>>>(a);
        }
    }
}

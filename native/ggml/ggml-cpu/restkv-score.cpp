// GGML_OP_RESTKV_SCORE on the CPU: the reference the CUDA and Metal kernels mirror. The per-key
// arithmetic is in ../restkv-score-common.h; this file adds the loops. Each query head writes only
// its own row of dst.
//
// Threads split the query heads (a barrier to balance the last step across cells measured slower
// on 2 threads), with the keys and values of the head's KV head converted to f32 once:
//   1. S[r][c] = scale*q[r].k[c] for every row and cell (-inf where the row does not see the cell),
//      row by row over the keys transposed, so that each row's cells are stored contiguously and
//      its maximum is taken on the way
//   2. each row's softmax, added into abar with the row's EMA weight; the row's two histograms
//   3. o = sum over the prefix of abar*v, then G o and o'Go
//   4. per cell: v'Gv (from G's upper triangle: 5/8 of the work of G v, in blocks of 16) and (Go).v, and the score

#include "ops.h"

#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "ggml.h"
#include "simd-mappings.h"
#include "vec.h"

#include "../restkv-score-common.h"

#include <cmath>
#include <cstring>

static int64_t restkv_pad(int64_t n, int64_t to) {
    return (n + to - 1)/to*to;
}

// sizeless vector types (SVE, RISC-V V) cannot form arrays: those take the plain loop
#if defined(GGML_SIMD) && !defined(__ARM_FEATURE_SVE) && !defined(__riscv_v_intrinsic)
#    define RESTKV_CPU_SIMD
#endif

// The two inner products run over blocks of a fixed size, so that the compiler keeps the sums in
// vector registers (a loop of runtime length stores and reloads them at every step). A block is 6
// rows of 2 vectors: 12 sums, which with the 2 vectors of x and a broadcast take 15 of AVX2's 16
// registers (blocks of 16 sums spilled to the stack); NEON's 4-wide vectors make it 29 of its 32.
#if defined(RESTKV_CPU_SIMD) && GGML_F32_EPR > 8
#    define RESTKV_CPU_COLS (2*GGML_F32_EPR) // cells per block of S
#else
#    define RESTKV_CPU_COLS 16
#endif
#define RESTKV_CPU_QROWS 6               // query rows per block of S (and blocks of 2 for the rest)
#define RESTKV_CPU_TRI   RESTKV_CPU_COLS // output dimensions per block of the triangular product U v
#define RESTKV_CPU_CELLS 6               // cells per triangular block: independent FMA chains

// for each of M vectors s_m (s + m*s_stride): out[m*N + 0..N) = sum over j < n of s_m[j]*x[j*stride + 0..N).
// N sums per vector stay in registers, and M vectors at once give the FMA units independent chains.
template <int N, int M>
static inline void restkv_sum_rows(float * out, const float * x, int64_t stride, const float * s, int64_t s_stride, int64_t n) {
#if defined(RESTKV_CPU_SIMD)
    static_assert(N % GGML_F32_EPR == 0, "block size must be a multiple of the vector width");
    constexpr int n_vec = N/GGML_F32_EPR;
    GGML_F32_VEC acc[M][n_vec];
    for (int m = 0; m < M; ++m) {
        for (int v = 0; v < n_vec; ++v) {
            acc[m][v] = GGML_F32_VEC_ZERO;
        }
    }
    for (int64_t j = 0; j < n; ++j) {
        const float * xj = x + j*stride;
        GGML_F32_VEC xv[n_vec];
        for (int v = 0; v < n_vec; ++v) {
            xv[v] = GGML_F32_VEC_LOAD(xj + v*GGML_F32_EPR);
        }
        for (int m = 0; m < M; ++m) {
            const GGML_F32_VEC sj = GGML_F32_VEC_SET1(s[m*s_stride + j]);
            for (int v = 0; v < n_vec; ++v) {
                acc[m][v] = GGML_F32_VEC_FMA(acc[m][v], xv[v], sj);
            }
        }
    }
    for (int m = 0; m < M; ++m) {
        for (int v = 0; v < n_vec; ++v) {
            GGML_F32_VEC_STORE(out + m*N + v*GGML_F32_EPR, acc[m][v]);
        }
    }
#else
    float acc[M][N] = { { 0.0f } };
    for (int64_t j = 0; j < n; ++j) {
        for (int m = 0; m < M; ++m) {
            for (int i = 0; i < N; ++i) {
                acc[m][i] += s[m*s_stride + j]*x[j*stride + i];
            }
        }
    }
    memcpy(out, acc, sizeof(acc));
#endif
}

// per-thread scratch, in floats
static size_t restkv_score_scratch(int64_t n_kv, int64_t n_row, int64_t d, int64_t dv) {
    return (size_t) n_kv*(d + dv)                  // keys and values of one KV head, f32
         + (size_t) d*restkv_pad(n_kv, RESTKV_CPU_COLS) // the keys transposed, zero-padded
         + (size_t) n_row*n_kv                     // S, then the softmax rows
         + (size_t) d*n_row                        // the head's queries, scaled
         + (size_t) n_row                          // the maximum of each row of S
         + (size_t) RESTKV_CPU_CELLS*dv            // U v of a block of cells
         + (size_t) dv*dv                          // U: G's upper triangle, off-diagonal doubled
         + (size_t) n_kv/sizeof(float) + 1         // the octave of each cell, one byte each
         + 16;                                      // so that each thread's part can start on a cache line
}

size_t ggml_restkv_score_work_size(const struct ggml_tensor * dst, int n_threads) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    return sizeof(float)*restkv_score_scratch(k->ne[1], q->ne[1], q->ne[0], v->ne[0])*n_threads;
}

// a histogram counted in locals, stored as restkv_hist_add would have left it: {count, sum lo, sum hi}
static void restkv_hist_store(uint32_t * hist, const uint32_t * cnt, const uint64_t * sum) {
    for (int b = 0; b < RESTKV_HIST_BINS; ++b) {
        hist[3*b + 0] = cnt[b];
        hist[3*b + 1] = (uint32_t) (sum[b] & 0xffffffffu);
        hist[3*b + 2] = (uint32_t) (sum[b] >> 32);
    }
}

static float restkv_load_f32(const ggml_tensor * t, const char * p) {
    return t->type == GGML_TYPE_F32 ? *(const float *) p : GGML_CPU_FP16_TO_FP32(*(const ggml_fp16_t *) p);
}

// cells [0, n_kv) of head i2 of a [ne0, cells, n_head_kv] view, as f32 rows out[c*ne0 + i], whatever the
// strides: rows of a plain cache convert as rows; a transposed V cache (cells contiguous, channels a
// cache size apart) is read channel by channel over tiles of cells, since walking one cell's channels
// touches ne0 lines that map to a few cache sets and thrash
static void restkv_slice_to_f32(const ggml_tensor * t, int64_t i2, int64_t n_kv, float * out) {
    const char * base = (const char *) t->data + i2*t->nb[2];
    const int64_t ne0 = t->ne[0];
    if (t->nb[0] <= t->nb[1]) {
        for (int64_t c = 0; c < n_kv; ++c) {
            const char * row = base + c*t->nb[1];
            if (t->type == GGML_TYPE_F16 && t->nb[0] == sizeof(ggml_fp16_t)) {
                ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) row, out + c*ne0, ne0); // SIMD conversion
            } else {
                for (int64_t i = 0; i < ne0; ++i) {
                    out[c*ne0 + i] = restkv_load_f32(t, row + i*t->nb[0]);
                }
            }
        }
        return;
    }
    const int64_t tile = 64;
    for (int64_t c0 = 0; c0 < n_kv; c0 += tile) {
        const int64_t c1 = c0 + tile < n_kv ? c0 + tile : n_kv;
        for (int64_t i = 0; i < ne0; ++i) {
            const char * run = base + i*t->nb[0];
            for (int64_t c = c0; c < c1; ++c) {
                out[c*ne0 + i] = restkv_load_f32(t, run + c*t->nb[1]);
            }
        }
    }
}

void ggml_compute_forward_restkv_score(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * gram = dst->src[3];
    const ggml_tensor * cpos = dst->src[4];
    const ggml_tensor * rpos = dst->src[5];
    const ggml_tensor * ema  = dst->src[6];

    const int64_t d      = q->ne[0];
    const int64_t n_row  = q->ne[1];
    const int64_t n_head = q->ne[2];
    const int64_t n_kv   = k->ne[1];
    const int64_t n_hkv  = k->ne[2];
    const int64_t dv     = v->ne[0];
    const int64_t g      = n_head/n_hkv;

    float   scale;
    int32_t pos_window;
    int32_t n_select;
    memcpy(&scale,      (const float   *) dst->op_params + 0, sizeof(float));
    memcpy(&pos_window, (const int32_t *) dst->op_params + 1, sizeof(int32_t));
    memcpy(&n_select,   (const int32_t *) dst->op_params + 2, sizeof(int32_t));

    const int32_t * cp = (const int32_t *) cpos->data;
    const int32_t * rp = (const int32_t *) rpos->data;
    const float   * ew = (const float   *) ema->data;

    const size_t scratch = restkv_score_scratch(n_kv, n_row, d, dv);
    const int64_t n_kv_pad = restkv_pad(n_kv, RESTKV_CPU_COLS);

    float * kf  = (float *) params->wdata + scratch*params->ith;
    float * vf  = kf + n_kv*d;
    float * kt  = vf + n_kv*dv;
    float * S   = kt + d*n_kv_pad;
    float * qs  = S + n_row*n_kv;
    float * smax = qs + d*n_row;
    float * uv  = smax + n_row;
    float * U   = uv + RESTKV_CPU_CELLS*dv;
    uint8_t * octave = (uint8_t *) (U + dv*dv);

    const int64_t half = n_row/2;

    int64_t hk_loaded = -1;
    for (int64_t h = params->ith; h < n_head; h += params->nth) {
        const int64_t hk = h/g;
        float * out = (float *) ((char *) dst->data + h*dst->nb[1]);

        if (hk != hk_loaded) { // query heads of one group share their keys and values
            restkv_slice_to_f32(k, hk, n_kv, kf);
            restkv_slice_to_f32(v, hk, n_kv, vf);
            for (int64_t c0 = 0; c0 < n_kv_pad; c0 += RESTKV_CPU_COLS) { // in tiles, to stay in cache
                for (int64_t i = 0; i < d; ++i) {
                    for (int64_t c = c0; c < c0 + RESTKV_CPU_COLS; ++c) {
                        kt[i*n_kv_pad + c] = c < n_kv ? kf[c*d + i] : 0.0f;
                    }
                }
            }
            hk_loaded = hk;
        }
        const float * qh = (const float *) ((const char *) q->data + h*q->nb[2]);
        for (int64_t r = 0; r < n_row; ++r) {
            const float * qr = (const float *) ((const char *) qh + r*q->nb[1]);
            for (int64_t i = 0; i < d; ++i) {
                qs[r*d + i] = qr[i]*scale;
            }
        }

        // 1. S: a block of rows times a block of cells at once, as a sum of d key-channel vectors
        for (int64_t r0 = 0; r0 < n_row; ) {
            const int64_t n_left = n_row - r0;
            const int64_t n_r = n_left >= RESTKV_CPU_QROWS ? RESTKV_CPU_QROWS : (n_left >= 2 ? 2 : 1);
            float lane_max[RESTKV_CPU_QROWS][RESTKV_CPU_COLS];
            for (int64_t m = 0; m < n_r; ++m) {
                for (int64_t j = 0; j < RESTKV_CPU_COLS; ++j) {
                    lane_max[m][j] = -INFINITY;
                }
            }
            for (int64_t c0 = 0; c0 < n_kv; c0 += RESTKV_CPU_COLS) {
                float acc[RESTKV_CPU_QROWS*RESTKV_CPU_COLS];
                if (n_r == RESTKV_CPU_QROWS) {
                    restkv_sum_rows<RESTKV_CPU_COLS, RESTKV_CPU_QROWS>(acc, kt + c0, n_kv_pad, qs + r0*d, d, d);
                } else if (n_r == 2) {
                    restkv_sum_rows<RESTKV_CPU_COLS, 2>(acc, kt + c0, n_kv_pad, qs + r0*d, d, d);
                } else {
                    restkv_sum_rows<RESTKV_CPU_COLS, 1>(acc, kt + c0, n_kv_pad, qs + r0*d, d, d);
                }
                const int64_t n_j = n_kv - c0 < RESTKV_CPU_COLS ? n_kv - c0 : RESTKV_CPU_COLS;
                for (int64_t m = 0; m < n_r; ++m) {
                    const int32_t rpos_m = rp[r0 + m];
                    float * srow = S + (r0 + m)*n_kv + c0;
                    for (int64_t j = 0; j < n_j; ++j) {
                        // -inf where the row does not see the cell (later, a hole, another sequence)
                        const float sj = restkv_visible(cp[c0 + j], rpos_m) ? acc[m*RESTKV_CPU_COLS + j] : -INFINITY;
                        srow[j] = sj;
                        lane_max[m][j] = sj > lane_max[m][j] ? sj : lane_max[m][j];
                    }
                }
            }
            for (int64_t m = 0; m < n_r; ++m) {
                float mx = -INFINITY;
                for (int64_t j = 0; j < RESTKV_CPU_COLS; ++j) {
                    mx = lane_max[m][j] > mx ? lane_max[m][j] : mx;
                }
                smax[r0 + m] = mx;
            }
            r0 += n_r;
        }

        // 2. softmax rows into abar; histograms of the rows
        float    * abar = out + RESTKV_OFF_ABAR(n_kv);
        uint32_t * hist  = (uint32_t *) (out + RESTKV_OFF_HIST(n_kv, n_row, dv));
        uint32_t * hist2 = (uint32_t *) (out + RESTKV_OFF_HIST2(n_kv, n_row, dv));
        memset(abar, 0, n_kv*sizeof(float));
        memset(hist,  0, 3*RESTKV_HIST_BINS*n_row*sizeof(uint32_t));
        memset(hist2, 0, 3*RESTKV_HIST_BINS*n_row*sizeof(uint32_t));
        for (int64_t r = 0; r < n_row; ++r) {
            float * srow = S + r*n_kv;
            const float max = smax[r];
            if (max == -INFINITY) {
                continue; // the row sees no cell
            }
            const ggml_float sum = ggml_vec_soft_max_f32((int) n_kv, srow, srow, max);
            const float inv = (float) (1.0/sum);
            ggml_vec_scale_f32((int) n_kv, srow, inv);
            out[RESTKV_OFF_ROWMAX(n_kv) + r] = max;
            out[RESTKV_OFF_ROWSUM(n_kv, n_row) + r] = (float) sum;
            ggml_vec_mad_f32((int) n_kv, abar, srow, ew[r]);
            if (n_select > 0) {
                // octaves, then the sub-bins of the octave that holds the n_select-th cell; counted in
                // 64-bit locals (the same integers restkv_hist_add keeps in dst), the octave of each
                // cell kept so that the second scan reads a byte instead of recomputing it. The first
                // scan counts even and odd cells apart: neighbours mostly share a bin, and one set of
                // counters would chain every add on the previous one's store. (Four sets, and a
                // branch-free second scan, measured slower.)
                uint32_t * hr  = hist  + 3*RESTKV_HIST_BINS*r;
                uint32_t * hr2 = hist2 + 3*RESTKV_HIST_BINS*r;
                uint32_t cnt2[2][RESTKV_HIST_BINS + 1] = { { 0 } };
                uint64_t sum2[2][RESTKV_HIST_BINS + 1] = { { 0 } };
                for (int64_t c = 0; c < n_kv; ++c) {
                    uint32_t bits;
                    memcpy(&bits, srow + c, sizeof(bits));
                    // bin RESTKV_HIST_BINS: not seen by this row
                    const uint8_t b = restkv_visible(cp[c], rp[r]) ? (uint8_t) restkv_hist_bin(bits) : RESTKV_HIST_BINS;
                    cnt2[c & 1][b] += 1;
                    sum2[c & 1][b] += (uint32_t) cp[c];
                    octave[c] = b;
                }
                uint32_t cnt[RESTKV_HIST_BINS];
                uint64_t sum[RESTKV_HIST_BINS];
                for (int bin = 0; bin < RESTKV_HIST_BINS; ++bin) {
                    cnt[bin] = cnt2[0][bin] + cnt2[1][bin];
                    sum[bin] = sum2[0][bin] + sum2[1][bin];
                }
                restkv_hist_store(hr, cnt, sum);
                const int boundary = restkv_hist_boundary(hr, n_select);
                if (boundary < RESTKV_HIST_BINS) {
                    memset(cnt, 0, sizeof(cnt));
                    memset(sum, 0, sizeof(sum));
                    for (int64_t c = 0; c < n_kv; ++c) {
                        if (octave[c] == boundary) {
                            uint32_t bits;
                            memcpy(&bits, srow + c, sizeof(bits));
                            const int sb = restkv_hist_sub_bin(bits);
                            cnt[sb] += 1;
                            sum[sb] += (uint32_t) cp[c];
                        }
                    }
                    restkv_hist_store(hr2, cnt, sum);
                }
            }
        }
        if (n_select > 0) {
            float front = 0.0f;
            float rear  = 0.0f;
            for (int64_t r = 0; r < n_row; ++r) {
                const float m = restkv_hist_topk_mean2(hist + 3*RESTKV_HIST_BINS*r, hist2 + 3*RESTKV_HIST_BINS*r, n_select);
                if (r < half) {
                    front += m;
                } else {
                    rear += m;
                }
            }
            out[RESTKV_OFF_TPOS(n_kv) + 0] = half > 0 ? front/half : NAN;
            out[RESTKV_OFF_TPOS(n_kv) + 1] = half > 0 ? rear/(n_row - half) : NAN;
        } else {
            out[RESTKV_OFF_TPOS(n_kv) + 0] = NAN;
            out[RESTKV_OFF_TPOS(n_kv) + 1] = NAN;
        }

        // 3. head output over the prefix, G o and o'Go
        float * o  = out + RESTKV_OFF_O(n_kv, n_row);
        float * go = out + RESTKV_OFF_GO(n_kv, n_row, dv);
        const float * G = (const float *) ((const char *) gram->data + h*gram->nb[2]);
        memset(o,  0, dv*sizeof(float));
        memset(go, 0, dv*sizeof(float));
        for (int64_t c = 0; c < n_kv; ++c) {
            abar[c] = restkv_abar_clamp(abar[c]);
            if (cp[c] >= 0 && cp[c] < pos_window) {
                ggml_vec_mad_f32((int) dv, o, vf + c*dv, abar[c]);
            }
        }
        for (int64_t j = 0; j < dv; ++j) {
            ggml_vec_mad_f32((int) dv, go, G + j*dv, o[j]); // G is symmetric: column j = row j
        }
        float ogo = 0.0f;
        ggml_vec_dot_f32((int) dv, &ogo, 0, o, 0, go, 0, 1);
        out[RESTKV_OFF_OGO(n_kv, n_row, dv)] = ogo;


        // 4. per cell: v'Gv, (Go).v and the score. v'Gv = v'U v with U the upper triangle of G, its
        // off-diagonal doubled: rows i0.. of U v need only v[i0..], so blocks of U v cost 5/8 of G v
        for (int64_t j = 0; j < dv; ++j) {
            for (int64_t i = 0; i < dv; ++i) {
                U[j*dv + i] = i < j ? 2.0f*G[j*dv + i] : (i == j ? G[j*dv + i] : 0.0f); // U[j*dv + i] = U_ij
            }
        }
        const bool tri_blocks = dv % RESTKV_CPU_TRI == 0;
        for (int64_t c = 0; c < n_kv; ) {
            const int64_t n_c = n_kv - c >= RESTKV_CPU_CELLS ? RESTKV_CPU_CELLS : 1;
            const float * vc = vf + c*dv;
            if (tri_blocks) {
                for (int64_t i0 = 0; i0 < dv; i0 += RESTKV_CPU_TRI) {
                    float acc[RESTKV_CPU_CELLS*RESTKV_CPU_TRI];
                    if (n_c == RESTKV_CPU_CELLS) {
                        restkv_sum_rows<RESTKV_CPU_TRI, RESTKV_CPU_CELLS>(acc, U + i0*dv + i0, dv, vc + i0, dv, dv - i0);
                    } else {
                        restkv_sum_rows<RESTKV_CPU_TRI, 1>(acc, U + i0*dv + i0, dv, vc + i0, dv, dv - i0);
                    }
                    for (int64_t m = 0; m < n_c; ++m) {
                        memcpy(uv + m*dv + i0, acc + m*RESTKV_CPU_TRI, RESTKV_CPU_TRI*sizeof(float));
                    }
                }
            } else {
                for (int64_t m = 0; m < n_c; ++m) {
                    for (int64_t i = 0; i < dv; ++i) {
                        float a = 0.0f;
                        for (int64_t j = i; j < dv; ++j) {
                            a += U[j*dv + i]*vc[m*dv + j];
                        }
                        uv[m*dv + i] = a;
                    }
                }
            }
            for (int64_t m = 0; m < n_c; ++m) {
                const int64_t cc = c + m;
                if (cp[cc] < 0) {
                    out[cc] = 0.0f;
                    continue;
                }
                const float * vcm = vf + cc*dv;
                float vgv = 0.0f;
                float gov = 0.0f;
                ggml_vec_dot_f32((int) dv, &vgv, 0, vcm, 0, uv + m*dv, 0, 1);
                ggml_vec_dot_f32((int) dv, &gov, 0, vcm, 0, go, 0, 1);
                out[cc] = restkv_cell_score(abar[cc], vgv, gov, ogo);
            }
            c += n_c;
        }
    }
}

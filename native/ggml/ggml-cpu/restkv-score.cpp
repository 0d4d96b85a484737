// GGML_OP_RESTKV_SCORE on the CPU: the reference the CUDA and Metal kernels mirror. The per-key
// arithmetic is in ../restkv-score-common.h; this file adds the loops. Threads split the query
// heads; each head is independent and writes only its own row of dst, so no barrier is needed.
//
// Per head, with the keys and values of its KV head converted to f32 once:
//   1. S[r][c] = scale*q[r].k[c] for every row and cell (-inf where the row does not see the cell)
//   2. each row's softmax, added into abar with the row's EMA weight; the row's two histograms
//   3. o = sum over the prefix of abar*v, then G o and o'Go
//   4. per cell: v'Gv and (Go).v, and the score

#include "ops.h"

#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "ggml.h"
#include "simd-mappings.h"
#include "vec.h"

#include "../restkv-score-common.h"

#include <cmath>
#include <cstring>

// The two inner products run over blocks of a fixed size, so that the compiler keeps the sums in
// vector registers (a loop of runtime length stores and reloads them at every step).
#define RESTKV_CPU_ROWS 32 // query rows per block of S
#define RESTKV_CPU_DIMS 64 // output dimensions per block of G v

static int64_t restkv_pad(int64_t n, int64_t to) {
    return (n + to - 1)/to*to;
}

// sizeless vector types (SVE, RISC-V V) cannot form arrays: those take the plain loop
#if defined(GGML_SIMD) && !defined(__ARM_FEATURE_SVE) && !defined(__riscv_v_intrinsic)
#    define RESTKV_CPU_SIMD
#endif

// out[0..N) = sum over j < n of s[j]*x[j*stride + 0..N): N sums kept in registers
template <int N>
static inline void restkv_sum_rows(float * out, const float * x, int64_t stride, const float * s, int64_t n) {
#if defined(RESTKV_CPU_SIMD)
    static_assert(N % GGML_F32_EPR == 0, "block size must be a multiple of the vector width");
    constexpr int n_vec = N/GGML_F32_EPR;
    GGML_F32_VEC acc[n_vec];
    for (int v = 0; v < n_vec; ++v) {
        acc[v] = GGML_F32_VEC_ZERO;
    }
    for (int64_t j = 0; j < n; ++j) {
        const GGML_F32_VEC sj = GGML_F32_VEC_SET1(s[j]);
        const float * xj = x + j*stride;
        for (int v = 0; v < n_vec; ++v) {
            acc[v] = GGML_F32_VEC_FMA(acc[v], GGML_F32_VEC_LOAD(xj + v*GGML_F32_EPR), sj);
        }
    }
    for (int v = 0; v < n_vec; ++v) {
        GGML_F32_VEC_STORE(out + v*GGML_F32_EPR, acc[v]);
    }
#else
    float acc[N] = { 0.0f };
    for (int64_t j = 0; j < n; ++j) {
        for (int i = 0; i < N; ++i) {
            acc[i] += s[j]*x[j*stride + i];
        }
    }
    memcpy(out, acc, sizeof(acc));
#endif
}

// per-thread scratch, in floats
static size_t restkv_score_scratch(int64_t n_kv, int64_t n_row, int64_t d, int64_t dv) {
    return (size_t) n_kv*(d + dv)                  // keys and values of one KV head, f32
         + (size_t) n_row*n_kv                     // S, then the softmax rows
         + (size_t) d*restkv_pad(n_row, RESTKV_CPU_ROWS) // the head's queries, transposed, zero-padded
         + (size_t) restkv_pad(dv, RESTKV_CPU_DIMS) // G v
         + 16;                                      // so that each thread's part can start on a cache line
}

size_t ggml_restkv_score_work_size(const struct ggml_tensor * dst, int n_threads) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    return sizeof(float)*restkv_score_scratch(k->ne[1], q->ne[1], q->ne[0], v->ne[0])*n_threads;
}

// row i of a [ne0, ne1, ne2] tensor slice (i1 = cell, i2 = head) to f32, whatever its strides
static void restkv_row_to_f32(const ggml_tensor * t, int64_t i1, int64_t i2, float * out) {
    const char * base = (const char *) t->data + i1*t->nb[1] + i2*t->nb[2];
    const int64_t n = t->ne[0];
    if (t->type == GGML_TYPE_F16 && t->nb[0] == sizeof(ggml_fp16_t)) {
        ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) base, out, n); // contiguous row: SIMD conversion
    } else if (t->type == GGML_TYPE_F32) {
        for (int64_t i = 0; i < n; ++i) {
            out[i] = *(const float *) (base + i*t->nb[0]);
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            out[i] = GGML_CPU_FP16_TO_FP32(*(const ggml_fp16_t *) (base + i*t->nb[0]));
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
    const int64_t n_row_pad = restkv_pad(n_row, RESTKV_CPU_ROWS);

    float * kf  = (float *) params->wdata + scratch*params->ith;
    float * vf  = kf + n_kv*d;
    float * S   = vf + n_kv*dv;
    float * qt  = S + n_row*n_kv;
    float * gv  = qt + d*n_row_pad;

    const int64_t half = n_row/2;

    for (int64_t h = params->ith; h < n_head; h += params->nth) {
        const int64_t hk = h/g;
        float * out = (float *) ((char *) dst->data + h*dst->nb[1]);

        for (int64_t c = 0; c < n_kv; ++c) {
            restkv_row_to_f32(k, c, hk, kf + c*d);
            restkv_row_to_f32(v, c, hk, vf + c*dv);
        }
        const float * qh = (const float *) ((const char *) q->data + h*q->nb[2]);
        memset(qt, 0, d*n_row_pad*sizeof(float));
        for (int64_t r = 0; r < n_row; ++r) {
            const float * qr = (const float *) ((const char *) qh + r*q->nb[1]);
            for (int64_t i = 0; i < d; ++i) {
                qt[i*n_row_pad + r] = qr[i]*scale;
            }
        }

        // 1. S: per cell, a block of rows at once, as a sum of d row vectors
        for (int64_t c = 0; c < n_kv; ++c) {
            if (cp[c] < 0) {
                for (int64_t r = 0; r < n_row; ++r) {
                    S[r*n_kv + c] = -INFINITY; // a hole, or a cell of another sequence
                }
                continue;
            }
            const float * kc = kf + c*d;
            for (int64_t r0 = 0; r0 < n_row; r0 += RESTKV_CPU_ROWS) {
                float acc[RESTKV_CPU_ROWS];
                restkv_sum_rows<RESTKV_CPU_ROWS>(acc, qt + r0, n_row_pad, kc, d);
                for (int64_t r = r0; r < n_row && r < r0 + RESTKV_CPU_ROWS; ++r) {
                    S[r*n_kv + c] = restkv_visible(cp[c], rp[r]) ? acc[r - r0] : -INFINITY;
                }
            }
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
            float max = -INFINITY;
            for (int64_t c = 0; c < n_kv; ++c) {
                max = srow[c] > max ? srow[c] : max;
            }
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
                // octaves, then the sub-bins of the octave that holds the n_select-th cell
                uint32_t * hr  = hist  + 3*RESTKV_HIST_BINS*r;
                uint32_t * hr2 = hist2 + 3*RESTKV_HIST_BINS*r;
                for (int64_t c = 0; c < n_kv; ++c) {
                    if (restkv_visible(cp[c], rp[r])) {
                        uint32_t bits;
                        memcpy(&bits, srow + c, sizeof(bits));
                        restkv_hist_add(hr + 3*restkv_hist_bin(bits), (uint32_t) cp[c]);
                    }
                }
                const int boundary = restkv_hist_boundary(hr, n_select);
                for (int64_t c = 0; c < n_kv && boundary < RESTKV_HIST_BINS; ++c) {
                    uint32_t bits;
                    memcpy(&bits, srow + c, sizeof(bits));
                    if (restkv_visible(cp[c], rp[r]) && restkv_hist_bin(bits) == boundary) {
                        restkv_hist_add(hr2 + 3*restkv_hist_sub_bin(bits), (uint32_t) cp[c]);
                    }
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

        // 4. per cell: v'Gv, (Go).v and the score
        for (int64_t c = 0; c < n_kv; ++c) {
            if (cp[c] < 0) {
                out[c] = 0.0f;
                continue;
            }
            const float * vc = vf + c*dv;
            for (int64_t i0 = 0; i0 < dv; i0 += RESTKV_CPU_DIMS) {
                const int64_t n_i = dv - i0 < RESTKV_CPU_DIMS ? dv - i0 : RESTKV_CPU_DIMS;
                float acc[RESTKV_CPU_DIMS] = { 0.0f };
                if (n_i == RESTKV_CPU_DIMS) {
                    restkv_sum_rows<RESTKV_CPU_DIMS>(acc, G + i0, dv, vc, dv); // G is symmetric: column j = row j
                } else {
                    for (int64_t j = 0; j < dv; ++j) {
                        for (int64_t i = 0; i < n_i; ++i) {
                            acc[i] += G[j*dv + i0 + i]*vc[j];
                        }
                    }
                }
                memcpy(gv + i0, acc, n_i*sizeof(float));
            }
            float vgv = 0.0f;
            float gov = 0.0f;
            ggml_vec_dot_f32((int) dv, &vgv, 0, vc, 0, gv, 0, 1);
            ggml_vec_dot_f32((int) dv, &gov, 0, vc, 0, go, 0, 1);
            out[c] = restkv_cell_score(abar[c], vgv, gov, ogo);
        }
    }
}

// Tests and debugging: the tensors the scoring pass works on, as f32 rows (include/llama-restkv-debug.h).

#include "llama-kv-restkv.h"
#include "llama-restkv-debug.h"

#include "llama-context.h"
#include "llama-kv-cache.h"

#include <cstring>
#include <vector>

// a buffer of n elements of type `type` as f32
static bool llama_kv_debug_to_f32(ggml_type type, const void * src, float * dst, int64_t n) {
    if (type == GGML_TYPE_F32) {
        memcpy(dst, src, n*sizeof(float));
        return true;
    }
    const auto * traits = ggml_get_type_traits(type);
    if (!traits->to_float) {
        return false;
    }
    traits->to_float(src, dst, n);
    return true;
}

int64_t llama_kv_restkv::debug_tensor(llama_kv_cache & kv, llama_context & lctx, int32_t ikv, int32_t kind, float * out,
                                      int64_t n_max, llama_pos * out_pos, int32_t n_pos_max) {
    if (ikv < 0 || ikv >= (int32_t) kv.layers.size() || n_max < 0 || (n_max > 0 && out == nullptr)) {
        return LLAMA_KV_ERR_BAD_ARG;
    }

    const auto & layer = kv.layers[ikv];
    llama_kv_restkv * st = kv.restkv.get();

    // what to read: rows of a tensor, and the positions they stand for
    std::vector<int64_t>   rows;
    std::vector<llama_pos> pos;
    ggml_tensor * t = nullptr;

    switch (kind) {
        case LLAMA_KV_DEBUG_K:
        case LLAMA_KV_DEBUG_V:
            {
                for (const auto & pc : kv.v_cells[0].seq_pos_get(0)) {
                    rows.push_back(pc.second);
                    pos.push_back(pc.first);
                }
                t = kind == LLAMA_KV_DEBUG_K ? layer.k : layer.v;
            } break;
        case LLAMA_KV_DEBUG_Q_WINDOW:
        case LLAMA_KV_DEBUG_Q_PINNED:
            {
                if (st == nullptr || st->n_window == 0) {
                    return LLAMA_KV_ERR_NO_WINDOW;
                }
                const std::vector<int32_t> slots = kind == LLAMA_KV_DEBUG_Q_WINDOW ? st->window_slots() : st->pin_slots;
                for (size_t r = 0; r < slots.size(); ++r) {
                    rows.push_back(slots[r]);
                    pos.push_back(kind == LLAMA_KV_DEBUG_Q_WINDOW ? st->win_pos[slots[r]] : st->pin_pos[r]);
                }
                t = kind == LLAMA_KV_DEBUG_Q_WINDOW ? st->q_win[ikv] : st->q_pin[ikv];
            } break;
        case LLAMA_KV_DEBUG_GRAM:
            {
                if (st == nullptr || st->n_window == 0) {
                    return LLAMA_KV_ERR_NO_WINDOW;
                }
                if (!st->gram_ready && !gram_prepare(kv, lctx)) {
                    return LLAMA_KV_ERR_COMPUTE;
                }
                t = st->gram[ikv];
                for (int64_t r = 0; r < ggml_nrows(t); ++r) {
                    rows.push_back(r);
                }
            } break;
        default:
            return LLAMA_KV_ERR_BAD_ARG;
    }

    for (size_t i = 0; i < pos.size() && (int32_t) i < n_pos_max && out_pos; ++i) {
        out_pos[i] = pos[i];
    }

    // V stored transposed: element (cell, e) at e*kv_size + cell; read it channel by channel
    if (kind == LLAMA_KV_DEBUG_V && kv.v_trans) {
        const int64_t n_embd_v = kv.hparams.n_embd_v_gqa(layer.il);
        const int64_t n        = n_embd_v*(int64_t) rows.size();
        const size_t  col_bytes = ggml_row_size(t->type, kv.get_size());
        std::vector<uint8_t> raw(col_bytes);
        std::vector<float>   col(kv.get_size());
        for (int64_t e = 0; e < n_embd_v; ++e) {
            ggml_backend_tensor_get(t, raw.data(), e*col_bytes, col_bytes);
            if (!llama_kv_debug_to_f32(t->type, raw.data(), col.data(), kv.get_size())) {
                return LLAMA_KV_ERR_UNSUPPORTED;
            }
            for (size_t r = 0; r < rows.size(); ++r) {
                const int64_t i = (int64_t) r*n_embd_v + e;
                if (i < n_max) {
                    out[i] = col[rows[r]];
                }
            }
        }
        return n;
    }

    const int64_t ne0 = t->ne[0];
    const int64_t n   = ne0*(int64_t) rows.size();
    std::vector<uint8_t> raw(t->nb[1]);
    std::vector<float>   row(ne0);
    for (size_t r = 0; r < rows.size(); ++r) {
        ggml_backend_tensor_get(t, raw.data(), rows[r]*t->nb[1], t->nb[1]);
        if (!llama_kv_debug_to_f32(t->type, raw.data(), row.data(), ne0)) {
            return LLAMA_KV_ERR_UNSUPPORTED;
        }
        for (int64_t j = 0; j < ne0; ++j) {
            const int64_t i = (int64_t) r*ne0 + j;
            if (i < n_max) {
                out[i] = row[j];
            }
        }
    }
    return n;
}

int64_t llama_kv_debug_tensor(llama_context * ctx, int32_t il_kv, int32_t kind, float * out, int64_t n_max,
                              llama_pos * out_pos, int32_t n_pos_max) {
    llama_kv_cache * kv = llama_kv_score_cache(ctx);
    if (!kv) {
        return LLAMA_KV_ERR_UNSUPPORTED;
    }
    ctx->synchronize();
    return llama_kv_restkv::debug_tensor(*kv, *ctx, il_kv, kind, out, n_max, out_pos, n_pos_max);
}

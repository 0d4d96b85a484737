// A document tier's side of the cache: copy cells' K/V out as a document is read, and put chosen
// cells back into an empty sequence when a question recalls them (C API in include/llama-restkv.h).
// Scoring the tier's cells is the scoring pass's (llama_kv_restkv::score_cells in llama-kv-score.cpp);
// the tier file itself is pyrestkv's (pyrestkv/tier.py).

#include "llama-kv-restkv.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cstring>
#include <iterator>
#include <vector>

//
// cache side
//

// where one cell's row of t starts in its stream: keys, and values not transposed, hold a row per
// cell; transposed values hold a row per channel (element (cell, c) at c*kv_size + cell)
static size_t llama_kv_tier_stream_offset(const ggml_tensor * t, uint32_t kv_size, uint32_t strm) {
    return (size_t) strm*kv_size*ggml_row_size(t->type, t->ne[0]);
}

// copy the rows of the cells idxs of tensor t to host (to_host) or from host, host holding one row
// per cell in the order of idxs. Consecutive cells move as one block
static void llama_kv_tier_copy_rows(ggml_tensor * t, bool trans, uint32_t kv_size, uint32_t strm,
                                    const std::vector<uint32_t> & idxs, uint8_t * host, bool to_host) {
    const size_t row    = ggml_row_size(t->type, t->ne[0]);
    const size_t base   = llama_kv_tier_stream_offset(t, kv_size, strm);
    const size_t n_idxs = idxs.size();

    size_t j0 = 0;
    while (j0 < n_idxs) {
        size_t j1 = j0 + 1;
        while (j1 < n_idxs && idxs[j1] == idxs[j1 - 1] + 1) {
            j1++;
        }
        const size_t run = j1 - j0;

        if (!trans) {
            const size_t off = base + (size_t) idxs[j0]*row;
            if (to_host) {
                ggml_backend_tensor_get(t, host + j0*row, off, run*row);
            } else {
                ggml_backend_tensor_set(t, host + j0*row, off, run*row);
            }
        } else {
            // transposed values are f16/f32/bf16 (llama.cpp quantizes V only with flash attention,
            // which stores it by row): one element per channel and cell
            const size_t es = ggml_type_size(t->type);
            std::vector<uint8_t> col(run*es);
            for (int64_t c = 0; c < t->ne[0]; ++c) {
                const size_t off = base + ((size_t) c*kv_size + idxs[j0])*es;
                if (to_host) {
                    ggml_backend_tensor_get(t, col.data(), off, col.size());
                    for (size_t j = 0; j < run; ++j) {
                        memcpy(host + (j0 + j)*row + c*es, col.data() + j*es, es);
                    }
                } else {
                    for (size_t j = 0; j < run; ++j) {
                        memcpy(col.data() + j*es, host + (j0 + j)*row + c*es, es);
                    }
                    ggml_backend_tensor_set(t, col.data(), off, col.size());
                }
            }
        }
        j0 = j1;
    }
}

const ggml_tensor * llama_kv_restkv::tier_tensor(const llama_kv_cache & kv, int32_t il, bool is_v) {
    if (il < 0 || il >= (int32_t) kv.layers.size()) {
        return nullptr;
    }
    return is_v ? kv.layers[il].v : kv.layers[il].k;
}

int64_t llama_kv_restkv::tier_bytes(const llama_kv_cache & kv, int32_t n) {
    int64_t total = 0;
    for (const auto & layer : kv.layers) {
        total += (int64_t) n*(int64_t) (ggml_row_size(layer.k->type, layer.k->ne[0]) + ggml_row_size(layer.v->type, layer.v->ne[0]));
    }
    return total;
}

int64_t llama_kv_restkv::tier_get(llama_kv_cache & kv, llama_seq_id seq_id, const llama_pos * pos, int32_t n,
                                  uint8_t * dst) {
    const uint32_t strm  = kv.seq_to_stream[seq_id];
    const auto &   cells = kv.v_cells[strm];
    const auto &   seq_pos = cells.seq_pos_get(seq_id);

    std::vector<uint32_t> idxs(n);
    for (int32_t i = 0; i < n; ++i) {
        auto it = seq_pos.lower_bound({pos[i], 0});
        if (it == seq_pos.end() || it->first != pos[i]) {
            return LLAMA_KV_ERR_BAD_ARG; // not cached
        }
        auto next = std::next(it);
        if (next != seq_pos.end() && next->first == pos[i]) {
            return LLAMA_KV_ERR_BAD_ARG; // shared by several cells (M-RoPE images)
        }
        idxs[i] = it->second;
    }

    uint8_t * out = dst;
    for (const auto & layer : kv.layers) {
        llama_kv_tier_copy_rows(layer.k, false,      kv.get_size(), strm, idxs, out, true);
        out += (size_t) n*ggml_row_size(layer.k->type, layer.k->ne[0]);
        llama_kv_tier_copy_rows(layer.v, kv.v_trans, kv.get_size(), strm, idxs, out, true);
        out += (size_t) n*ggml_row_size(layer.v->type, layer.v->ne[0]);
    }
    return out - dst;
}

int32_t llama_kv_restkv::tier_put(llama_kv_cache & kv, llama_seq_id seq_id, const llama_pos * pos,
                                  const llama_pos * pos_rot, const llama_token * tok, int32_t n, const uint8_t * src) {
    const uint32_t strm  = kv.seq_to_stream[seq_id];
    auto &         cells = kv.v_cells[strm];

    if (!cells.seq_pos_get(seq_id).empty()) {
        return LLAMA_KV_ERR_BAD_ARG; // the sequence must be empty
    }

    // the first n free cells
    std::vector<uint32_t> idxs;
    idxs.reserve(n);
    for (uint32_t c = 0; c < cells.size() && (int32_t) idxs.size() < n; ++c) {
        if (cells.is_empty(c)) {
            idxs.push_back(c);
        }
    }
    if ((int32_t) idxs.size() < n) {
        return LLAMA_KV_ERR_NO_ROOM;
    }

    const uint8_t * in = src;
    for (const auto & layer : kv.layers) {
        llama_kv_tier_copy_rows(layer.k, false,      kv.get_size(), strm, idxs, const_cast<uint8_t *>(in), false);
        in += (size_t) n*ggml_row_size(layer.k->type, layer.k->ne[0]);
        llama_kv_tier_copy_rows(layer.v, kv.v_trans, kv.get_size(), strm, idxs, const_cast<uint8_t *>(in), false);
        in += (size_t) n*ggml_row_size(layer.v->type, layer.v->ne[0]);
    }

    for (int32_t i = 0; i < n; ++i) {
        const uint32_t  idx = idxs[i];
        const llama_pos rot = pos_rot ? pos_rot[i] : pos[i];

        // the keys sit where they were rotated; the shift to pos[i] is applied by the next decode
        cells.pos_set(idx, rot);
        llama_kv_cell_ext ext;
        ext.tok = tok ? tok[i] : LLAMA_TOKEN_NULL;
        cells.ext_set(idx, ext);
        cells.seq_add(idx, seq_id);
        if (pos[i] != rot) {
            cells.pos_add(idx, pos[i] - rot);
        }
    }

    return n;
}

//
// C API
//

// the cache of a part: the scored one (plain cache, or the full-attention half of an iSWA cache), or
// the sliding-window half (nullptr without one)
static llama_kv_cache * llama_kv_part_cache(llama_context * ctx, int32_t part) {
    if (!ctx || !ctx->get_memory()) {
        return nullptr;
    }
    if (part == LLAMA_KV_PART_SCORED) {
        return llama_kv_score_cache(ctx);
    }
    if (auto * kv_iswa = dynamic_cast<llama_kv_cache_iswa *>(ctx->get_memory())) {
        return kv_iswa->get_swa();
    }
    return nullptr;
}

static int32_t llama_kv_part_check(llama_context * ctx, int32_t part, llama_seq_id seq_id, llama_kv_cache ** kv) {
    if (!ctx || !ctx->get_memory()) {
        return LLAMA_KV_ERR_NO_MEMORY;
    }
    if (part != LLAMA_KV_PART_SCORED && part != LLAMA_KV_PART_SWA) {
        return LLAMA_KV_ERR_BAD_ARG;
    }
    *kv = llama_kv_part_cache(ctx, part);
    if (*kv == nullptr) {
        return part == LLAMA_KV_PART_SWA ? 0 : LLAMA_KV_ERR_UNSUPPORTED;
    }
    if (seq_id < 0 || (uint32_t) seq_id >= (*kv)->get_n_seq_max()) {
        return LLAMA_KV_ERR_BAD_SEQ;
    }
    for (int32_t il = 0; il < llama_kv_restkv::score_n_layer(**kv); ++il) {
        if (!llama_kv_restkv::tier_tensor(**kv, il, false) || !llama_kv_restkv::tier_tensor(**kv, il, true)) {
            return LLAMA_KV_ERR_UNSUPPORTED; // MLA: no V
        }
    }
    return 1;
}

int32_t llama_kv_part_n_layer(llama_context * ctx, int32_t part) {
    llama_kv_cache * kv = nullptr;
    const int32_t ok = llama_kv_part_check(ctx, part, 0, &kv);
    return ok <= 0 ? ok : llama_kv_restkv::score_n_layer(*kv);
}

// layer il's keys (is_v false) or values of a part; nullptr with err set on error
static const ggml_tensor * llama_kv_part_tensor(llama_context * ctx, int32_t part, int32_t il, bool is_v, int32_t & err) {
    llama_kv_cache * kv = nullptr;
    const int32_t ok = llama_kv_part_check(ctx, part, 0, &kv);
    const ggml_tensor * t = ok > 0 ? llama_kv_restkv::tier_tensor(*kv, il, is_v) : nullptr;
    err = ok < 0 ? ok : LLAMA_KV_ERR_BAD_ARG;
    return t;
}

int32_t llama_kv_part_layer_type(llama_context * ctx, int32_t part, int32_t il, bool is_v) {
    int32_t err = 0;
    const ggml_tensor * t = llama_kv_part_tensor(ctx, part, il, is_v, err);
    return t ? (int32_t) t->type : err;
}

int64_t llama_kv_part_row_size(llama_context * ctx, int32_t part, int32_t il, bool is_v) {
    int32_t err = 0;
    const ggml_tensor * t = llama_kv_part_tensor(ctx, part, il, is_v, err);
    return t ? (int64_t) ggml_row_size(t->type, t->ne[0]) : err;
}

int32_t llama_kv_part_seq_positions(llama_context * ctx, int32_t part, llama_seq_id seq_id, llama_pos * out_pos,
                                    int32_t n_max) {
    llama_kv_cache * kv = nullptr;
    const int32_t ok = llama_kv_part_check(ctx, part, seq_id, &kv);
    if (ok <= 0) {
        return ok;
    }
    if (n_max < 0 || (n_max > 0 && out_pos == nullptr)) {
        return LLAMA_KV_ERR_BAD_ARG;
    }
    int32_t n = 0;
    for (const auto & pc : kv->get_cells(seq_id).seq_pos_get(seq_id)) {
        if (n < n_max) {
            out_pos[n] = pc.first;
        }
        n++;
    }
    return n;
}

int64_t llama_kv_seq_get_kv(llama_context * ctx, int32_t part, llama_seq_id seq_id, const llama_pos * pos, int32_t n,
                            void * dst, int64_t size) {
    llama_kv_cache * kv = nullptr;
    const int32_t ok = llama_kv_part_check(ctx, part, seq_id, &kv);
    if (ok <= 0) {
        return ok < 0 ? ok : LLAMA_KV_ERR_BAD_ARG;
    }
    if (n < 0 || (n > 0 && (pos == nullptr || dst == nullptr)) || size < llama_kv_restkv::tier_bytes(*kv, n)) {
        return LLAMA_KV_ERR_BAD_ARG;
    }
    ctx->synchronize();
    return llama_kv_restkv::tier_get(*kv, seq_id, pos, n, (uint8_t *) dst);
}

int32_t llama_kv_seq_put_kv(llama_context * ctx, int32_t part, llama_seq_id seq_id, const llama_pos * pos,
                            const llama_pos * pos_rot, const llama_token * tok, int32_t n, const void * src, int64_t size) {
    llama_kv_cache * kv = nullptr;
    const int32_t ok = llama_kv_part_check(ctx, part, seq_id, &kv);
    if (ok <= 0) {
        return ok < 0 ? ok : LLAMA_KV_ERR_BAD_ARG;
    }
    if (n < 0 || (n > 0 && (pos == nullptr || src == nullptr)) || size != llama_kv_restkv::tier_bytes(*kv, n)) {
        return LLAMA_KV_ERR_BAD_ARG;
    }
    for (int32_t i = 0; i < n; ++i) {
        if (pos[i] < 0 || (pos_rot && pos_rot[i] < 0)) {
            return LLAMA_KV_ERR_BAD_ARG;
        }
    }
    if (!ctx->get_memory()->get_can_shift()) {
        for (int32_t i = 0; i < n; ++i) {
            if (pos_rot && pos_rot[i] != pos[i]) {
                return LLAMA_KV_ERR_CANNOT_SHIFT;
            }
        }
    }
    ctx->synchronize();
    const int32_t n_put = llama_kv_restkv::tier_put(*kv, seq_id, pos, pos_rot, tok, n, (const uint8_t *) src);
    if (n_put >= 0 && part == LLAMA_KV_PART_SCORED && kv->restkv) {
        kv->restkv->window_reset(); // the captured queries belonged to other cells
    }
    return n_put;
}

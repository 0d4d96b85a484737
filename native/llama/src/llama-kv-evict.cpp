// KV eviction: remove arbitrary positions of one sequence, pack the cells that remain, and renumber
// positions afterwards (C API in include/llama-restkv.h).

#include "llama-kv-restkv.h"

#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"

#include <algorithm>
#include <cstring>
#include <vector>

//
// cache side
//

int32_t llama_kv_restkv::seq_evict(llama_kv_cache & kv, llama_seq_id seq_id, const llama_pos * pos, int32_t n_pos) {
    // TODO: refactor [TAG_KV_CACHE_SHARE_CELLS]
    if (kv.other) {
        return 0;
    }

    const uint32_t strm = kv.seq_to_stream[seq_id];

    auto & cells = kv.v_cells[strm];
    auto & head  = kv.v_heads[strm];

    // look the cells up first: seq_rm() edits the (pos, cell) set we search in
    const auto & seq_pos = cells.seq_pos_get(seq_id);

    std::vector<uint32_t> idxs;
    idxs.reserve(n_pos);

    for (int32_t i = 0; i < n_pos; ++i) {
        // several cells can share a position (M-RoPE images), take them all
        for (auto it = seq_pos.lower_bound({pos[i], 0}); it != seq_pos.end() && it->first == pos[i]; ++it) {
            idxs.push_back(it->second);
        }
    }

    int32_t  n_removed = 0;
    uint32_t new_head  = cells.size();

    for (const uint32_t idx : idxs) {
        // a position listed twice yields the same cell twice
        if (cells.is_empty(idx) || !cells.seq_has(idx, seq_id)) {
            continue;
        }

        cells.seq_rm(idx, seq_id);
        n_removed++;

        new_head = std::min(new_head, idx);
    }

    // start the next slot search at the first freed cell
    if (new_head != cells.size() && new_head < head) {
        head = new_head;
    }

    if (n_removed > 0) {
        stream_pack(kv, strm);
    }

    return n_removed;
}

// rows [from, from + n) of t copied over rows [to, to + n): memcpy in host memory; elsewhere a copy on
// the device through views, never a round trip through the host
static void llama_kv_copy_rows(ggml_context * ctx, ggml_tensor * t, uint32_t from, uint32_t to, uint32_t n) {
    const ggml_tensor * base = t->view_src ? t->view_src : t;
    if (ggml_backend_buffer_is_host(base->buffer)) {
        const size_t nbytes = (n - 1)*t->nb[1] + ggml_row_size(t->type, t->ne[0]);
        memcpy((char *) t->data + to*t->nb[1], (const char *) t->data + from*t->nb[1], nbytes);
        return;
    }
    ggml_tensor * src = ggml_view_2d(ctx, t, t->ne[0], n, t->nb[1], from*t->nb[1]);
    ggml_tensor * dst = ggml_view_2d(ctx, t, t->ne[0], n, t->nb[1], to*t->nb[1]);
    ggml_backend_view_init(src);
    ggml_backend_view_init(dst);
    ggml_backend_tensor_copy(src, dst);
}

int32_t llama_kv_restkv::stream_pack(llama_kv_cache & kv, uint32_t strm) {
    auto & cells = kv.v_cells[strm];

    // a pending K-shift lives in the cells being moved: pack after it has been applied
    if (cells.get_has_shift()) {
        return 0;
    }
    for (const auto & layer : kv.layers) {
        if (layer.v && kv.v_trans && ggml_blck_size(layer.v->type) != 1) {
            return 0; // a transposed V is moved element by element
        }
    }

    const uint32_t n_used  = cells.get_used();
    const uint32_t kv_size = cells.size();

    // the holes below n_used and the used cells above it, both ascending: cell src[i] moves to dst[i],
    // so that the used cells become [0, n_used) and keep their order
    std::vector<uint32_t> dst;
    std::vector<uint32_t> src;
    for (uint32_t i = 0; i < n_used; ++i) {
        if (cells.is_empty(i)) {
            dst.push_back(i);
        }
    }
    for (uint32_t i = n_used; i < kv_size && src.size() < dst.size(); ++i) {
        if (!cells.is_empty(i)) {
            src.push_back(i);
        }
    }
    if (dst.empty() || src.size() != dst.size()) {
        return 0;
    }

    // runs of moves whose sources and destinations are both consecutive: one copy per run and tensor
    std::vector<std::pair<size_t, uint32_t>> runs; // (first move, length)
    for (size_t i = 0; i < src.size(); ++i) {
        if (!runs.empty() && src[i] == src[i - 1] + 1 && dst[i] == dst[i - 1] + 1) {
            runs.back().second++;
        } else {
            runs.emplace_back(i, 1);
        }
    }

    // views only: a context of tensor headers, reset per tensor
    ggml_init_params params = {
        /*.mem_size   =*/ (2*runs.size() + 1)*ggml_tensor_overhead(),
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ true,
    };
    ggml_context_ptr ctx(ggml_init(params));
    if (!ctx) {
        return 0;
    }

    for (const auto & layer : kv.layers) {
        ggml_tensor * k = layer.k_stream[strm];
        for (const auto & run : runs) {
            llama_kv_copy_rows(ctx.get(), k, src[run.first], dst[run.first], run.second);
        }
        ggml_reset(ctx.get());

        ggml_tensor * v = layer.v ? layer.v_stream[strm] : nullptr;
        if (v == nullptr) {
            continue;
        }
        if (!kv.v_trans) {
            for (const auto & run : runs) {
                llama_kv_copy_rows(ctx.get(), v, src[run.first], dst[run.first], run.second);
            }
            ggml_reset(ctx.get());
        } else {
            // transposed: element (cell, e) at e*kv_size + cell, so a run is a row piece per channel
            const size_t  es       = ggml_type_size(v->type);
            const int64_t n_embd_v = kv.hparams.n_embd_v_gqa(layer.il);
            for (int64_t e = 0; e < n_embd_v; ++e) {
                ggml_tensor * col = ggml_view_2d(ctx.get(), v, 1, kv_size, es, e*kv_size*es); // one cell a row
                for (const auto & run : runs) {
                    llama_kv_copy_rows(ctx.get(), col, src[run.first], dst[run.first], run.second);
                }
                ggml_reset(ctx.get());
            }
        }
    }

    for (size_t i = 0; i < src.size(); ++i) {
        const llama_kv_cells moved = cells.cp(std::vector<uint32_t>{ src[i] });
        cells.rm(src[i]);
        cells.set(std::vector<uint32_t>{ dst[i] }, moved);
    }

    kv.v_heads[strm] = n_used;

    return (int32_t) src.size();
}

// the position delta of a cell at pos under seq_remap()
static llama_pos llama_kv_remap_delta(const std::vector<llama_pos> & pos_old, llama_pos pos_new0, llama_pos pos) {
    const size_t rank = std::lower_bound(pos_old.begin(), pos_old.end(), pos) - pos_old.begin();
    return pos_new0 + (llama_pos) rank - pos;
}

bool llama_kv_restkv::seq_can_remap(const llama_kv_cache & kv, llama_seq_id seq_id, const std::vector<llama_pos> & pos_old, llama_pos pos_new0) {
    // TODO: refactor [TAG_KV_CACHE_SHARE_CELLS]
    if (kv.other) {
        return true;
    }

    const auto & cells = kv.v_cells[kv.seq_to_stream[seq_id]];

    for (const auto & pc : cells.seq_pos_get(seq_id)) {
        if (llama_kv_remap_delta(pos_old, pos_new0, pc.first) != 0 && cells.seq_count(pc.second) > 1) {
            return false;
        }
    }

    return true;
}

void llama_kv_restkv::seq_remap(llama_kv_cache & kv, llama_seq_id seq_id, const std::vector<llama_pos> & pos_old, llama_pos pos_new0) {
    // TODO: refactor [TAG_KV_CACHE_SHARE_CELLS]
    if (kv.other) {
        return;
    }

    const uint32_t strm = kv.seq_to_stream[seq_id];
    auto & cells = kv.v_cells[strm];

    // collect the moves first: pos_add() edits the (pos, cell) set we iterate over
    std::vector<std::pair<uint32_t, llama_pos>> moves;

    for (const auto & pc : cells.seq_pos_get(seq_id)) {
        const llama_pos delta = llama_kv_remap_delta(pos_old, pos_new0, pc.first);
        if (delta != 0) {
            moves.push_back({pc.second, delta});
        }
    }

    for (const auto & mv : moves) {
        cells.pos_add(mv.first, mv.second);
    }

    // holes may now sit anywhere: search from the start next time
    kv.v_heads[strm] = 0;
}

//
// C API
//

const char * llama_kv_strerror(int32_t err) {
    switch (err) {
        case LLAMA_KV_ERR_NO_MEMORY:    return "the context has no KV memory";
        case LLAMA_KV_ERR_UNSUPPORTED:  return "this model's memory type cannot evict or score tokens (recurrent, hybrid or MLA/DSA caches)";
        case LLAMA_KV_ERR_BAD_SEQ:      return "sequence id out of range";
        case LLAMA_KV_ERR_BAD_ARG:      return "bad argument";
        case LLAMA_KV_ERR_CANNOT_SHIFT: return "this model's KV cache cannot shift positions (M-RoPE or per-layer RoPE)";
        case LLAMA_KV_ERR_SHARED_CELL:  return "a KV cell is shared with another sequence";
        case LLAMA_KV_ERR_NO_WINDOW:    return "no query window: call llama_kv_set_query_window and decode first";
        case LLAMA_KV_ERR_COMPUTE:      return "the scoring graph could not be built or run";
        case LLAMA_KV_ERR_NO_ROOM:      return "not enough free KV cells";
    }
    return "unknown error";
}

// the caches of a memory module that eviction applies to: a plain cache, or both halves of an iSWA cache
static int32_t llama_kv_evict_caches(llama_memory_t mem, llama_seq_id seq_id, llama_kv_cache ** base, llama_kv_cache ** swa) {
    if (!mem) {
        return LLAMA_KV_ERR_NO_MEMORY;
    }

    *base = nullptr;
    *swa  = nullptr;

    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        *base = kv;
    } else if (auto * kv_iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        *base = kv_iswa->get_base();
        *swa  = kv_iswa->get_swa();
    } else {
        return LLAMA_KV_ERR_UNSUPPORTED;
    }

    if (seq_id < 0 || (uint32_t) seq_id >= (*base)->get_n_seq_max()) {
        return LLAMA_KV_ERR_BAD_SEQ;
    }

    return 0;
}

int32_t llama_kv_seq_n_cells(llama_memory_t mem, llama_seq_id seq_id) {
    return llama_kv_seq_cells(mem, seq_id, nullptr, nullptr, 0);
}

int32_t llama_kv_seq_cells(llama_memory_t mem, llama_seq_id seq_id, llama_pos * out_pos, llama_token * out_tok, int32_t n_max) {
    llama_kv_cache * base = nullptr;
    llama_kv_cache * swa  = nullptr;

    const int32_t err = llama_kv_evict_caches(mem, seq_id, &base, &swa);
    if (err < 0) {
        return err;
    }

    if (n_max < 0) {
        return LLAMA_KV_ERR_BAD_ARG;
    }

    const auto & cells   = base->get_cells(seq_id);
    const auto & seq_pos = cells.seq_pos_get(seq_id);

    int32_t n = 0;
    for (const auto & pc : seq_pos) {
        if (n < n_max) {
            if (out_pos) {
                out_pos[n] = pc.first;
            }
            if (out_tok) {
                out_tok[n] = cells.ext_get(pc.second).tok;
            }
        }
        n++;
    }

    return n;
}

int32_t llama_kv_seq_evict(llama_memory_t mem, llama_seq_id seq_id, const llama_pos * pos, int32_t n_pos) {
    llama_kv_cache * base = nullptr;
    llama_kv_cache * swa  = nullptr;

    const int32_t err = llama_kv_evict_caches(mem, seq_id, &base, &swa);
    if (err < 0) {
        return err;
    }

    if (n_pos < 0 || (n_pos > 0 && pos == nullptr)) {
        return LLAMA_KV_ERR_BAD_ARG;
    }

    const int32_t n_removed = llama_kv_restkv::seq_evict(*base, seq_id, pos, n_pos);

    // the SWA half holds only recent positions: those it lacks are skipped
    if (swa) {
        llama_kv_restkv::seq_evict(*swa, seq_id, pos, n_pos);
    }

    return n_removed;
}

int32_t llama_kv_seq_compact(llama_memory_t mem, llama_seq_id seq_id) {
    llama_kv_cache * base = nullptr;
    llama_kv_cache * swa  = nullptr;

    const int32_t err = llama_kv_evict_caches(mem, seq_id, &base, &swa);
    if (err < 0) {
        return err;
    }

    if (!mem->get_can_shift()) {
        return LLAMA_KV_ERR_CANNOT_SHIFT;
    }

    std::vector<llama_pos> pos_old;
    for (const auto & pc : base->get_cells(seq_id).seq_pos_get(seq_id)) {
        if (pos_old.empty() || pos_old.back() != pc.first) {
            pos_old.push_back(pc.first);
        }
    }

    if (pos_old.empty()) {
        return 0;
    }

    // both halves of an iSWA cache move by the ranks of the base half, so they stay in step; both are
    // checked before either moves, so that a refusal changes nothing
    if (!llama_kv_restkv::seq_can_remap(*base, seq_id, pos_old, 0) ||
        (swa && !llama_kv_restkv::seq_can_remap(*swa, seq_id, pos_old, 0))) {
        return LLAMA_KV_ERR_SHARED_CELL;
    }

    llama_kv_restkv::seq_remap(*base, seq_id, pos_old, 0);
    if (swa) {
        llama_kv_restkv::seq_remap(*swa, seq_id, pos_old, 0);
    }

    // the captured queries were rotated for the old positions
    if (base->restkv) {
        base->restkv->window_reset();
    }

    return (int32_t) base->get_cells(seq_id).seq_pos_get(seq_id).size();
}

int64_t llama_kv_size_bytes(llama_memory_t mem) {
    if (!mem) {
        return LLAMA_KV_ERR_NO_MEMORY;
    }

    int64_t total = 0;
    for (const auto & buft_size : mem->memory_breakdown()) {
        total += (int64_t) buft_size.second;
    }

    return total;
}

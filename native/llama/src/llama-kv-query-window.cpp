// The ReST-KV query window: the last queries of every scored layer, captured inside the normal graph
// exactly as attention uses them (after RoPE, norms, scaling and the Hadamard rotation), and the
// pinned rows that a scoring pass re-rotates to the end of the cache (C API in include/llama-restkv.h).

#include "llama-kv-restkv.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"

#include <algorithm>
#include <map>

void llama_kv_restkv_free::operator()(llama_kv_restkv * p) const {
    delete p;
}

// the cache's state, created on first use
static llama_kv_restkv & llama_kv_restkv_get(llama_kv_cache & kv) {
    if (!kv.restkv) {
        kv.restkv.reset(new llama_kv_restkv());
    }
    return *kv.restkv;
}

bool llama_kv_restkv::window_init(llama_kv_cache & kv, int32_t n_window) {
    llama_kv_restkv & st = llama_kv_restkv_get(kv);

    st.q_win.clear();
    st.q_pin.clear();
    st.gram.clear();
    st.ctxs_bufs.clear();
    st.gram_ready = false;
    st.n_window   = 0;
    st.win_pos.clear();
    st.win_head = 0;
    st.pin_slots.clear();
    st.pin_pos.clear();
    st.kq_scale.assign(kv.layers.size(), 1.0f);

    if (n_window <= 0) {
        return true;
    }

    // one context per buffer type, so that each layer's rows live next to its K/V
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_map;

    for (const auto & layer : kv.layers) {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(layer.k->buffer);

        auto it = ctx_map.find(buft);
        if (it == ctx_map.end()) {
            ggml_init_params params = {
                /*.mem_size   =*/ 3u*kv.layers.size()*ggml_tensor_overhead(),
                /*.mem_buffer =*/ NULL,
                /*.no_alloc   =*/ true,
            };
            ggml_context * ctx = ggml_init(params);
            if (!ctx) {
                return false;
            }
            st.ctxs_bufs.emplace_back(ggml_context_ptr(ctx), nullptr);
            it = ctx_map.emplace(buft, ctx).first;
        }

        const uint32_t il     = layer.il;
        const int64_t  d      = kv.hparams.n_embd_head_k(il);
        const int64_t  dv     = kv.hparams.n_embd_head_v(il);
        const int64_t  n_head = kv.hparams.n_head(il);

        ggml_tensor * win  = ggml_new_tensor_2d(it->second, GGML_TYPE_F32, d*n_head, n_window);
        ggml_tensor * pin  = ggml_new_tensor_2d(it->second, GGML_TYPE_F32, d*n_head, n_window);
        ggml_tensor * gram = ggml_new_tensor_3d(it->second, GGML_TYPE_F32, dv, dv, n_head);

        ggml_format_name(win,  "restkv_q_win_l%d", il);
        ggml_format_name(pin,  "restkv_q_pin_l%d", il);
        ggml_format_name(gram, "restkv_gram_l%d",  il);

        st.q_win.push_back(win);
        st.q_pin.push_back(pin);
        st.gram.push_back(gram);
    }

    for (auto & [buft, ctx] : ctx_map) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
        if (!buf) {
            LLAMA_LOG_ERROR("%s: failed to allocate the query window\n", __func__);
            st.q_win.clear();
            st.q_pin.clear();
            st.gram.clear();
            st.ctxs_bufs.clear();
            return false;
        }
        ggml_backend_buffer_clear(buf, 0);
        for (auto & cb : st.ctxs_bufs) {
            if (cb.first.get() == ctx) {
                cb.second.reset(buf);
            }
        }
    }

    st.n_window = n_window;
    st.win_pos.assign(n_window, -1);

    return true;
}

void llama_kv_restkv::window_reset() {
    std::fill(win_pos.begin(), win_pos.end(), -1);
    win_head = 0;
}

std::vector<int32_t> llama_kv_restkv::window_slots() const {
    std::vector<int32_t> slots;
    for (int32_t s = 0; s < n_window; ++s) {
        if (win_pos[s] >= 0) {
            slots.push_back(s);
        }
    }
    std::sort(slots.begin(), slots.end(), [this](int32_t a, int32_t b) { return win_pos[a] < win_pos[b]; });
    return slots;
}

int32_t llama_kv_restkv::window_pin(bool pin) {
    pin_slots.clear();
    pin_pos.clear();

    if (!pin || n_window == 0) {
        return 0;
    }

    pin_slots = window_slots();
    for (const int32_t s : pin_slots) {
        pin_pos.push_back(win_pos[s]);
    }

    for (size_t ikv = 0; ikv < q_win.size(); ++ikv) {
        ggml_backend_tensor_copy(q_win[ikv], q_pin[ikv]);
    }

    return (int32_t) pin_slots.size();
}

//
// the graph side of the capture (hooked into llama-graph.cpp)
//

int32_t llama_kv_restkv::window_size(const llama_kv_cache_context * mctx) {
    const llama_kv_restkv * st = mctx->kv->restkv.get();
    return st ? st->n_window : 0;
}

ggml_tensor * llama_kv_restkv::build_input_q_idxs(const llama_kv_cache_context * mctx, ggml_context * ctx, const llama_ubatch & ubatch) {
    const int32_t n_window = window_size(mctx);
    if (n_window == 0) {
        return nullptr;
    }

    ggml_tensor * idxs = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, std::min<int64_t>(n_window, ubatch.n_tokens));
    ggml_set_input(idxs);

    return idxs;
}

void llama_kv_restkv::set_input_q_idxs(const llama_kv_cache_context * mctx, ggml_tensor * dst, const llama_ubatch * ubatch) {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));

    llama_kv_restkv & st = *mctx->kv->restkv;

    const int64_t w = dst->ne[0];
    int64_t * data = (int64_t *) dst->data;

    // the last w tokens of the ubatch go to the next w ring slots
    for (int64_t i = 0; i < w; ++i) {
        const int32_t slot = (st.win_head + (int32_t) i) % st.n_window;
        data[i] = slot;
        st.win_pos[slot] = ubatch->pos[ubatch->n_tokens - w + i];
    }
    st.win_head = (st.win_head + (int32_t) w) % st.n_window;
}

ggml_tensor * llama_kv_restkv::cpy_q(const llama_kv_cache_context * mctx, ggml_context * ctx, ggml_tensor * q_cur,
                                     ggml_tensor * q_idxs, int32_t il, float kq_scale) {
    const llama_kv_cache & kv = *mctx->kv;
    llama_kv_restkv & st = *kv.restkv;

    const int32_t ikv = kv.map_layer_ids.at(il);

    // attention applies this scale to q.k; the scoring pass must use the same
    st.kq_scale[ikv] = kq_scale;

    ggml_tensor * dst = st.q_win[ikv];

    const int64_t n_embd_q = dst->ne[0];
    const int64_t n_tokens = ggml_nelements(q_cur)/n_embd_q;
    const int64_t w        = q_idxs->ne[0];

    ggml_tensor * q = ggml_is_contiguous(q_cur) ? q_cur : ggml_cont(ctx, q_cur);
    q = ggml_reshape_2d(ctx, q, n_embd_q, n_tokens);
    q = ggml_view_2d(ctx, q, n_embd_q, w, q->nb[1], (n_tokens - w)*q->nb[1]);

    return ggml_set_rows(ctx, dst, q, q_idxs);
}

void llama_kv_restkv::reset_graph_reuse(llama_context & lctx) {
    for (auto & res : lctx.gf_res_prev) {
        if (res) {
            res->reset();
        }
    }
    lctx.gf_res_prev_active = nullptr;
}

//
// C API
//

llama_kv_cache * llama_kv_score_cache(llama_context * ctx) {
    if (!ctx) {
        return nullptr;
    }
    if (auto * kv = dynamic_cast<llama_kv_cache *>(ctx->get_memory())) {
        return kv;
    }
    if (auto * kv_iswa = dynamic_cast<llama_kv_cache_iswa *>(ctx->get_memory())) {
        return kv_iswa->get_base();
    }
    return nullptr;
}

int32_t llama_kv_set_query_window(llama_context * ctx, int32_t n_window) {
    llama_kv_cache * kv = llama_kv_score_cache(ctx);
    if (!kv) {
        return ctx && ctx->get_memory() ? LLAMA_KV_ERR_UNSUPPORTED : LLAMA_KV_ERR_NO_MEMORY;
    }
    if (n_window < 0 || n_window > 256) {
        return LLAMA_KV_ERR_BAD_ARG;
    }
    ctx->synchronize();
    if (!llama_kv_restkv::window_init(*kv, n_window)) {
        return LLAMA_KV_ERR_COMPUTE;
    }
    llama_kv_restkv::reset_graph_reuse(*ctx);
    return 0;
}

int32_t llama_kv_pin_query_window(llama_context * ctx, bool pin) {
    llama_kv_cache * kv = llama_kv_score_cache(ctx);
    if (!kv) {
        return LLAMA_KV_ERR_UNSUPPORTED;
    }
    if (!kv->restkv || kv->restkv->n_window == 0) {
        return LLAMA_KV_ERR_NO_WINDOW;
    }
    ctx->synchronize();
    return kv->restkv->window_pin(pin);
}

int32_t llama_kv_reset_query_window(llama_context * ctx) {
    llama_kv_cache * kv = llama_kv_score_cache(ctx);
    if (!kv) {
        return LLAMA_KV_ERR_UNSUPPORTED;
    }
    if (kv->restkv) {
        kv->restkv->window_reset();
    }
    return 0;
}

int32_t llama_kv_set_score_kernel(llama_context * ctx, int32_t kernel) {
    llama_kv_cache * kv = llama_kv_score_cache(ctx);
    if (!kv) {
        return LLAMA_KV_ERR_UNSUPPORTED;
    }
    if (kernel != LLAMA_KV_SCORE_KERNEL_AUTO && kernel != LLAMA_KV_SCORE_KERNEL_COMPOSED && kernel != LLAMA_KV_SCORE_KERNEL_FUSED) {
        return LLAMA_KV_ERR_BAD_ARG;
    }
    llama_kv_restkv_get(*kv).kernel = (llama_kv_score_kernel) kernel;
    return 0;
}

int32_t llama_kv_set_score_output(llama_context * ctx, int32_t output, int32_t rows) {
    llama_kv_cache * kv = llama_kv_score_cache(ctx);
    if (!kv) {
        return LLAMA_KV_ERR_UNSUPPORTED;
    }
    if ((output != LLAMA_KV_SCORE_OUTPUT_RESTKV && output != LLAMA_KV_SCORE_OUTPUT_ATTENTION) ||
        (rows != LLAMA_KV_SCORE_ROWS_EMA && rows != LLAMA_KV_SCORE_ROWS_MEAN && rows != LLAMA_KV_SCORE_ROWS_LAST)) {
        return LLAMA_KV_ERR_BAD_ARG;
    }
    llama_kv_restkv & st = llama_kv_restkv_get(*kv);
    st.output = (llama_kv_score_output) output;
    st.rows   = (llama_kv_score_rows) rows;
    return 0;
}

// The ReST-KV scoring pass: a side graph, run on the devices that hold the cache (as llama.cpp's
// K-shift is), that rates every cell by how much its removal would change each layer's attention
// output (C API in include/llama-restkv.h). In four parts:
//   plan_pass()             which rows score and which cells they see (host)
//   build_rows()            one layer's query rows: the window, and the pinned rows re-rotated
//   build_layer_fused()     one layer as GGML_OP_RESTKV_SCORE (native/ggml), or
//   build_layer_composed()  the same from ordinary ggml ops (quantized caches, other backends)
//   read_layer()            one layer's result back to the caller
//   score_cells()           one layer over cells from outside the cache (a document tier), with the
//                           pinned rows of a question
// The layer builders take the K/V as llama_kv_score_kv views, so they can score any store of cells.

#include "llama-kv-restkv.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-backend.h"

// the layout of the fused op's result, shared with its CPU, CUDA and Metal code
#include "../ggml/src/restkv-score-common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

//
// side graphs
//

// host data of a side graph, copied into its input tensors before it runs
class llm_graph_input_kv_side : public llm_graph_input_i {
public:
    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        for (const auto & in : inputs) {
            if (in.first->buffer) {
                ggml_backend_tensor_set(in.first, in.second.data(), 0, ggml_nbytes(in.first));
            }
        }
        if (k_rot && k_rot->buffer) {
            kv->set_input_k_rot(k_rot);
        }
        if (v_rot && v_rot->buffer) {
            kv->set_input_v_rot(v_rot);
        }
    }

    // a new input tensor whose bytes are taken from host (4-byte elements: F32 or I32)
    ggml_tensor * add(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1, const void * data) {
        ggml_tensor * t = ggml_new_tensor_2d(ctx, type, ne0, ne1);
        ggml_set_input(t);
        std::vector<uint8_t> bytes(ggml_nbytes(t));
        memcpy(bytes.data(), data, bytes.size());
        inputs.emplace_back(t, std::move(bytes));
        return t;
    }

    std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> inputs;

    ggml_tensor * k_rot = nullptr;
    ggml_tensor * v_rot = nullptr;

    const llama_kv_cache * kv = nullptr;
};

// run a graph of the cache kv on the context's scheduler, the way K-shift does:
// build(ctx, gf, inp) adds its nodes to gf and its inputs to inp, which the graph then owns
template <typename F>
static bool llama_kv_run_side_graph(llama_context & lctx, const llama_kv_cache & kv, F build) {
    auto * sched = lctx.get_sched();

    ggml_backend_sched_reset(sched);

    auto * res = lctx.get_gf_res_reserve();
    res->reset();

    ggml_cgraph * gf = res->get_gf();
    auto inp = std::make_unique<llm_graph_input_kv_side>();
    inp->kv = &kv;
    build(res->get_ctx(), gf, *inp);
    res->add_input(std::move(inp));

    bool ok = ggml_backend_sched_alloc_graph(sched, gf);
    if (ok) {
        res->set_inputs(nullptr);
        ok = lctx.graph_compute(gf, false) == GGML_STATUS_SUCCESS;
    }
    if (ok) {
        ggml_backend_sched_synchronize(sched);
    }

    // the scheduler's allocation now belongs to this graph: the kept graphs cannot be reused
    llama_kv_restkv::reset_graph_reuse(lctx);

    return ok;
}

//
// Gram matrices
//

// W_O^h^T W_O^h for every layer and query head, from the dequantized output projection. Weights that
// the CPU backend repacked (Q4_0, Q4_K, ... in an "extra" buffer) support mul_mat and nothing else:
// those are read through mul_mat with an identity matrix, which rounds them like a q8 activation
// (about 1e-3 relative error on G).
bool llama_kv_restkv::gram_prepare(llama_kv_cache & kv, llama_context & lctx) {
    llama_kv_restkv & st = *kv.restkv;

    for (size_t ikv = 0; ikv < kv.layers.size(); ++ikv) {
        const uint32_t il = kv.layers[ikv].il;

        ggml_tensor * wo = kv.model.layers[il].wo;
        if (wo == nullptr) {
            return false;
        }

        const int64_t dv     = kv.hparams.n_embd_head_v(il);
        const int64_t n_head = kv.hparams.n_head(il);
        const int64_t n_in   = wo->ne[0]; // dv*n_head
        const int64_t n_embd = wo->ne[1];
        if (n_in != dv*n_head) {
            return false;
        }

        ggml_backend_buffer_type_t buft = wo->buffer ? ggml_backend_buffer_get_type(wo->buffer) : nullptr;
        ggml_backend_dev_t dev = buft ? ggml_backend_buft_get_device(buft) : nullptr;
        const bool repacked = buft && !ggml_backend_buft_is_host(buft) && dev &&
                              ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;

        std::vector<float> eye;
        if (repacked) {
            eye.assign((size_t) n_in*n_in, 0.0f);
            for (int64_t i = 0; i < n_in; ++i) {
                eye[(size_t) i*n_in + i] = 1.0f;
            }
        }

        const bool ok = llama_kv_run_side_graph(lctx, kv, [&](ggml_context * ctx, ggml_cgraph * gf, llm_graph_input_kv_side & inp) {
            inp.v_rot = kv.build_input_v_rot(ctx);

            // w[c, j] = wo[j, c]: column j = h*dv + e of head h, as [n_embd, dv, n_head]
            ggml_tensor * w;
            if (repacked) {
                w = ggml_mul_mat(ctx, wo, inp.add(ctx, GGML_TYPE_F32, n_in, n_in, eye.data()));
            } else {
                w = ggml_cont(ctx, ggml_transpose(ctx, ggml_cast(ctx, wo, GGML_TYPE_F32)));
            }
            w = ggml_reshape_3d(ctx, w, n_embd, dv, n_head);

            ggml_tensor * gram = ggml_mul_mat(ctx, w, w); // [dv, dv, n_head]
            if (inp.v_rot) {
                // V is stored Hadamard-rotated: score in the rotated space, G' = R G R (G symmetric)
                gram = llama_mul_mat_hadamard(ctx, gram, inp.v_rot);
                gram = llama_mul_mat_hadamard(ctx, ggml_cont(ctx, ggml_transpose(ctx, gram)), inp.v_rot);
            }
            ggml_build_forward_expand(gf, ggml_cpy(ctx, gram, st.gram[ikv]));
        });
        if (!ok) {
            return false;
        }
    }

    st.gram_ready = true;
    return true;
}

//
// the pass, part by part
//

int32_t llama_kv_restkv::score_n_layer(const llama_kv_cache & kv) {
    return (int32_t) kv.layers.size();
}

int32_t llama_kv_restkv::score_n_head(const llama_kv_cache & kv) {
    int32_t n_head = -1;
    for (const auto & layer : kv.layers) {
        const int32_t nh = (int32_t) kv.hparams.n_head(layer.il);
        if (n_head >= 0 && nh != n_head) {
            return -1;
        }
        n_head = nh;
    }
    return n_head;
}

// row weights, oldest first. EMA: the newest weighted alpha, the oldest (1 - alpha)^(R-1)
static void llama_kv_score_row_weights(llama_kv_score_rows rows, float alpha, llama_kv_score_plan & plan) {
    const int32_t n_row = plan.n_row();
    plan.row_weight.resize(n_row);
    for (int32_t r = 0; r < n_row; ++r) {
        switch (rows) {
            case LLAMA_KV_SCORE_ROWS_MEAN: plan.row_weight[r] = 1.0f/n_row;                   break;
            case LLAMA_KV_SCORE_ROWS_LAST: plan.row_weight[r] = r == n_row - 1 ? 1.0f : 0.0f; break;
            case LLAMA_KV_SCORE_ROWS_EMA:
                plan.row_weight[r] = (r == 0 ? 1.0f : alpha) * powf(1.0f - alpha, (float) (n_row - 1 - r));
                break;
        }
    }
}

int32_t llama_kv_restkv::plan_pass(const llama_kv_cache & kv, llama_seq_id seq_id, float alpha, int32_t n_select,
                                   llama_kv_score_plan & plan) {
    const llama_kv_restkv & st = *kv.restkv;

    const auto & cells   = kv.v_cells[kv.seq_to_stream[seq_id]];
    const auto & seq_pos = cells.seq_pos_get(seq_id);
    if (seq_pos.empty()) {
        return 0;
    }

    // rows: the window (oldest first), then the pinned rows re-rotated to just after the cache
    plan.win_slots = st.window_slots();
    plan.n_win     = (int32_t) plan.win_slots.size();
    plan.n_pin     = (int32_t) st.pin_slots.size();

    const int32_t n_row = plan.n_row();
    if (n_row == 0) {
        return LLAMA_KV_ERR_NO_WINDOW;
    }

    const llama_pos pos_end = seq_pos.rbegin()->first + 1;

    plan.row_pos.resize(n_row);
    plan.pin_shift.resize(plan.n_pin);
    for (int32_t r = 0; r < plan.n_win; ++r) {
        plan.row_pos[r] = st.win_pos[plan.win_slots[r]];
    }
    const llama_pos pin_first = std::max(pos_end, plan.n_win > 0 ? plan.row_pos[plan.n_win - 1] + 1 : pos_end);
    for (int32_t r = 0; r < plan.n_pin; ++r) {
        plan.row_pos[plan.n_win + r] = pin_first + r;
        plan.pin_shift[r] = pin_first + r - st.pin_pos[r];
    }

    // cells older than the window: what ReST-KV may evict, and what the head output o sums over
    plan.pos_window = plan.n_win > 0 ? plan.row_pos[0] : pos_end;

    plan.n_kv = (int32_t) cells.used_max_p1();
    plan.cell_pos.assign(plan.n_kv, -1);
    for (int32_t c = 0; c < plan.n_kv; ++c) {
        if (!cells.is_empty(c) && cells.seq_has(c, seq_id)) {
            plan.cell_pos[c] = cells.pos_get(c);
        }
    }

    llama_kv_score_row_weights(st.rows, alpha, plan);

    plan.n_select = n_select > 0 && n_select < plan.n_kv ? n_select : 0;
    plan.output   = st.output;

    return (int32_t) seq_pos.size();
}

// the inputs every layer of the fused op reads
static void llama_kv_score_add_inputs(llm_graph_input_kv_side & inp, ggml_context * ctx, const llama_kv_score_plan & plan,
                                      const llama_kv_restkv & st, llama_kv_score_inputs & in) {
    const int32_t n_row = plan.n_row();

    in.win_slots  = plan.n_win > 0 ? inp.add(ctx, GGML_TYPE_I32, plan.n_win, 1, plan.win_slots.data()) : nullptr;
    in.pin_slots  = plan.n_pin > 0 ? inp.add(ctx, GGML_TYPE_I32, plan.n_pin, 1, st.pin_slots.data())  : nullptr;
    in.pin_shift  = plan.n_pin > 0 ? inp.add(ctx, GGML_TYPE_I32, plan.n_pin, 1, plan.pin_shift.data()) : nullptr;
    in.row_weight = inp.add(ctx, GGML_TYPE_F32, n_row,     1, plan.row_weight.data());
    in.cell_pos   = inp.add(ctx, GGML_TYPE_I32, plan.n_kv, 1, plan.cell_pos.data());
    in.row_pos    = inp.add(ctx, GGML_TYPE_I32, n_row,     1, plan.row_pos.data());
}

// the composed graph's extra inputs: the causal mask is n_kv x rows floats, so only made when needed
static void llama_kv_score_add_composed_inputs(llm_graph_input_kv_side & inp, ggml_context * ctx,
                                               const llama_kv_score_plan & plan, llama_kv_score_inputs & in) {
    if (in.mask != nullptr) {
        return;
    }
    const int32_t n_kv  = plan.n_kv;
    const int32_t n_row = plan.n_row();

    std::vector<float> mask((size_t) n_kv*n_row, -INFINITY);
    std::vector<float> prefix(n_kv, 0.0f);
    std::vector<float> pos_f(n_kv, 0.0f);
    for (int32_t c = 0; c < n_kv; ++c) {
        const llama_pos p = plan.cell_pos[c];
        if (p < 0) {
            continue;
        }
        pos_f[c]  = (float) p;
        prefix[c] = p < plan.pos_window ? 1.0f : 0.0f;
        for (int32_t r = 0; r < n_row; ++r) {
            if (p <= plan.row_pos[r]) {
                mask[(size_t) r*n_kv + c] = 0.0f;
            }
        }
    }

    in.mask       = inp.add(ctx, GGML_TYPE_F32, n_kv, n_row, mask.data());
    in.prefix     = inp.add(ctx, GGML_TYPE_F32, n_kv, 1, prefix.data());
    in.cell_pos_f = plan.n_select > 0 ? inp.add(ctx, GGML_TYPE_F32, 1, n_kv, pos_f.data()) : nullptr;
}

ggml_tensor * llama_kv_restkv::build_rows(const llama_kv_cache & kv, llama_context & lctx, ggml_context * ctx, int32_t ikv,
                                          const llama_kv_score_plan & plan, const llama_kv_score_inputs & in, ggml_tensor * k_rot) {
    const llama_kv_restkv & st = *kv.restkv;

    const uint32_t il       = kv.layers[ikv].il;
    const int64_t  d        = kv.hparams.n_embd_head_k(il);
    const int64_t  n_head   = kv.hparams.n_head(il);
    const int64_t  n_embd_q = d*n_head;

    const auto & cparams = lctx.get_cparams();

    ggml_tensor * q = nullptr;
    if (plan.n_win > 0) {
        q = ggml_get_rows(ctx, st.q_win[ikv], in.win_slots);
    }
    if (plan.n_pin > 0) {
        ggml_tensor * qp = ggml_get_rows(ctx, st.q_pin[ikv], in.pin_slots);
        qp = ggml_reshape_3d(ctx, qp, d, n_head, plan.n_pin);
        if (kv.hparams.has_rope(il)) {
            // the queries were captured rotated (and Hadamard-rotated where the keys are): undo the
            // Hadamard rotation, shift the RoPE angle, redo it
            if (k_rot) {
                qp = llama_mul_mat_hadamard(ctx, qp, k_rot);
            }
            qp = kv.build_rope_shift(cparams, ctx, qp, in.pin_shift, nullptr, kv.model.get_rope_factors(cparams, il),
                    kv.model.get_rope_freq_base(cparams, il), kv.model.get_rope_freq_scale(cparams, il), il);
            if (k_rot) {
                qp = llama_mul_mat_hadamard(ctx, qp, k_rot);
            }
        }
        qp = ggml_reshape_2d(ctx, qp, n_embd_q, plan.n_pin);
        q = q ? ggml_concat(ctx, q, qp, 1) : qp;
    }
    q = ggml_reshape_3d(ctx, q, d, n_head, plan.n_row());
    return ggml_permute(ctx, q, 0, 2, 1, 3); // [d, n_row, n_head]
}

// the store's keys as [d, n_kv, n_head_kv] and values as [dv, n_kv, n_head_kv] (views)
static ggml_tensor * llama_kv_score_keys(ggml_context * ctx, const llama_kv_score_kv & kvl, int64_t d) {
    const int64_t n_kv  = kvl.k->ne[1];
    const int64_t n_hkv = kvl.k->ne[0]/d;
    ggml_tensor * k = ggml_view_3d(ctx, kvl.k, d, n_hkv, n_kv, ggml_row_size(kvl.k->type, d), kvl.k->nb[1], 0);
    return ggml_permute(ctx, k, 0, 2, 1, 3);
}

static ggml_tensor * llama_kv_score_values(ggml_context * ctx, const llama_kv_score_kv & kvl, int64_t dv) {
    if (kvl.v_trans) {
        // element (cell, e) at e*stride + cell: a permuted view walks it as [dv, n_kv, n_hkv]
        const int64_t n_kv  = kvl.v->ne[0];
        const int64_t n_hkv = kvl.v->ne[1]/dv;
        ggml_tensor * v = ggml_view_3d(ctx, kvl.v, n_kv, dv, n_hkv, kvl.v->nb[1], kvl.v->nb[1]*dv, 0);
        return ggml_permute(ctx, v, 1, 0, 2, 3);
    }
    const int64_t n_kv  = kvl.v->ne[1];
    const int64_t n_hkv = kvl.v->ne[0]/dv;
    ggml_tensor * v = ggml_view_3d(ctx, kvl.v, dv, n_hkv, n_kv, ggml_row_size(kvl.v->type, dv), kvl.v->nb[1], 0);
    return ggml_permute(ctx, v, 0, 2, 1, 3);
}

ggml_tensor * llama_kv_restkv::build_layer_fused(ggml_context * ctx, ggml_tensor * q, const llama_kv_score_kv & kvl,
                                                 ggml_tensor * gram, const llama_kv_score_inputs & in,
                                                 const llama_kv_score_plan & plan, float kq_scale) {
    const int64_t d  = q->ne[0];
    const int64_t dv = gram->ne[0];

    ggml_tensor * k = llama_kv_score_keys(ctx, kvl, d);
    ggml_tensor * v = llama_kv_score_values(ctx, kvl, dv);

    return ggml_restkv_score(ctx, ggml_cont(ctx, q), k, v, gram, in.cell_pos, in.row_pos, in.row_weight,
            kq_scale, plan.pos_window, plan.n_select);
}

llama_kv_score_result llama_kv_restkv::build_layer_composed(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * q,
                                                 const llama_kv_score_kv & kvl, ggml_tensor * gram,
                                                 const llama_kv_score_inputs & in, const llama_kv_score_plan & plan,
                                                 float kq_scale) {
    llama_kv_score_result res;

    const int64_t d      = q->ne[0];
    const int64_t n_row  = q->ne[1];
    const int64_t n_head = q->ne[2];
    const int64_t dv     = gram->ne[0];
    const int64_t n_kv   = plan.n_kv;
    const int64_t n_hkv  = kvl.k->ne[0]/d;
    const int64_t g      = n_head/n_hkv;

    // window attention [n_kv, n_row, n_head]
    ggml_tensor * a = ggml_mul_mat(ctx, llama_kv_score_keys(ctx, kvl, d), q);
    a = ggml_soft_max_ext(ctx, a, in.mask, kq_scale, 0.0f);

    if (plan.n_select > 0) {
        // mean position of the n_select most attended cells, per row and head
        ggml_tensor * top = ggml_cont(ctx, ggml_top_k(ctx, a, plan.n_select));
        top = ggml_reshape_1d(ctx, top, ggml_nelements(top));
        ggml_tensor * tp = ggml_get_rows(ctx, in.cell_pos_f, top);             // [1, n_select*n_row*n_head]
        tp = ggml_reshape_3d(ctx, tp, plan.n_select, n_row, n_head);
        tp = ggml_scale(ctx, ggml_sum_rows(ctx, tp), 1.0f/plan.n_select);      // [1, n_row, n_head]
        ggml_set_output(tp);
        ggml_build_forward_expand(gf, tp);
        res.tpos = tp;
    }

    // averaged over the rows: abar [n_kv, 1, n_head]
    ggml_tensor * at = ggml_cont(ctx, ggml_permute(ctx, a, 1, 0, 2, 3)); // [n_row, n_kv, n_head]
    ggml_tensor * w  = ggml_repeat(ctx, ggml_reshape_3d(ctx, in.row_weight, n_row, 1, 1),
            ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_row, 1, n_head));
    ggml_tensor * abar = ggml_mul_mat(ctx, at, w);
    // a cell holding all of the attention would give infinite odds
    abar = ggml_clamp(ctx, abar, 0.0f, RESTKV_ABAR_MAX);

    if (plan.output == LLAMA_KV_SCORE_OUTPUT_ATTENTION) {
        res.score = abar;
        ggml_set_output(abar);
        ggml_build_forward_expand(gf, abar);
        return res;
    }

    ggml_tensor * odds = ggml_div(ctx, abar, ggml_scale_bias(ctx, abar, -1.0f, 1.0f));

    // values as rows vr [dv, n_kv, n_head_kv] and as columns vt [n_kv, dv, n_head_kv], f32
    ggml_tensor * vr;
    ggml_tensor * vt;
    if (kvl.v_trans) {
        vt = ggml_view_3d(ctx, kvl.v, n_kv, dv, n_hkv, kvl.v->nb[1], kvl.v->nb[1]*dv, 0);
        vt = ggml_cast(ctx, vt, GGML_TYPE_F32);
        vr = ggml_cont(ctx, ggml_permute(ctx, vt, 1, 0, 2, 3));
    } else {
        // whole rows, so that quantized values dequantize block by block
        vr = ggml_cast(ctx, kvl.v, GGML_TYPE_F32);
        vr = ggml_reshape_3d(ctx, vr, dv, n_hkv, n_kv);
        vr = ggml_cont(ctx, ggml_permute(ctx, vr, 0, 2, 1, 3));
        vt = ggml_cont(ctx, ggml_permute(ctx, vr, 1, 0, 2, 3));
    }

    // head output over the cells older than the window: o [dv, 1, n_head]
    ggml_tensor * o = ggml_mul_mat(ctx, vt, ggml_mul(ctx, abar, in.prefix));

    // values per query head: vq [dv, n_kv, n_head], head h reading KV head h/g
    ggml_tensor * vq = ggml_reshape_4d(ctx, vr, dv, n_kv, 1, n_hkv);
    vq = ggml_repeat(ctx, vq, ggml_new_tensor_4d(ctx, GGML_TYPE_F32, dv, n_kv, g, n_hkv));
    vq = ggml_reshape_3d(ctx, vq, dv, n_kv, n_head);

    // ||W_O^h (o - v)||^2 = o'Go - 2 (Go).v + v'Gv
    ggml_tensor * vgv   = ggml_sum_rows(ctx, ggml_mul(ctx, ggml_mul_mat(ctx, gram, vq), vq)); // [1, n_kv, n_head]
    ggml_tensor * go    = ggml_mul_mat(ctx, gram, o);                                          // [dv, 1, n_head]
    ggml_tensor * ogo   = ggml_sum_rows(ctx, ggml_mul(ctx, go, o));                           // [1, 1, n_head]
    ggml_tensor * cross = ggml_mul_mat(ctx, vq, go);                                           // [n_kv, 1, n_head]

    ggml_tensor * err2 = ggml_add(ctx, ggml_reshape_3d(ctx, vgv, n_kv, 1, n_head), ggml_scale(ctx, cross, -2.0f));
    err2 = ggml_add(ctx, err2, ogo);
    ggml_tensor * err = ggml_sqrt(ctx, ggml_relu(ctx, err2));

    res.score = ggml_mul(ctx, odds, err); // [n_kv, 1, n_head]
    ggml_set_output(res.score);
    ggml_build_forward_expand(gf, res.score);
    return res;
}

void llama_kv_restkv::read_layer(const llama_kv_score_result & res, const llama_kv_score_plan & plan, int32_t n_head,
                                 const std::vector<uint32_t> & order, int32_t n_max, float * out_score, float * out_tpos) {
    const int32_t n_kv  = plan.n_kv;
    const int32_t n_row = plan.n_row();
    const int32_t n_out = std::min((int32_t) order.size(), n_max);
    const int32_t half  = n_row/2;

    const bool have_tpos = plan.n_select > 0 && half > 0;

    if (res.fused) {
        // per head, one row of the op's dst: the scores, the two mean top positions, the attention
        const size_t first = plan.output == LLAMA_KV_SCORE_OUTPUT_ATTENTION ? RESTKV_OFF_ABAR(n_kv) : 0;
        std::vector<float> row(RESTKV_OFF_ABAR(n_kv) + n_kv);
        for (int32_t h = 0; h < n_head; ++h) {
            ggml_backend_tensor_get(res.score, row.data(), h*res.score->nb[1], row.size()*sizeof(float));
            if (out_score) {
                float * dst = out_score + (size_t) h*n_max;
                for (int32_t i = 0; i < n_out; ++i) {
                    dst[i] = row[first + order[i]];
                }
            }
            if (out_tpos) {
                float * dst = out_tpos + (size_t) h*2;
                dst[0] = have_tpos ? row[RESTKV_OFF_TPOS(n_kv) + 0] : NAN;
                dst[1] = have_tpos ? row[RESTKV_OFF_TPOS(n_kv) + 1] : NAN;
            }
        }
        return;
    }

    if (out_score) {
        std::vector<float> buf((size_t) n_kv*n_head);
        ggml_backend_tensor_get(res.score, buf.data(), 0, buf.size()*sizeof(float));
        for (int32_t h = 0; h < n_head; ++h) {
            float * dst = out_score + (size_t) h*n_max;
            for (int32_t i = 0; i < n_out; ++i) {
                dst[i] = buf[(size_t) h*n_kv + order[i]];
            }
        }
    }
    if (out_tpos) {
        std::vector<float> tbuf((size_t) n_row*n_head);
        if (have_tpos) {
            ggml_backend_tensor_get(res.tpos, tbuf.data(), 0, tbuf.size()*sizeof(float));
        }
        for (int32_t h = 0; h < n_head; ++h) {
            float * dst = out_tpos + (size_t) h*2;
            dst[0] = dst[1] = NAN;
            if (have_tpos) {
                double front = 0.0;
                double rear  = 0.0;
                for (int32_t r = 0; r < n_row; ++r) {
                    (r < half ? front : rear) += tbuf[(size_t) h*n_row + r];
                }
                dst[0] = (float) (front/half);
                dst[1] = (float) (rear/(n_row - half));
            }
        }
    }
}

llama_kv_score_kv llama_kv_restkv::cache_layer(const llama_kv_cache & kv, ggml_context * ctx, int32_t ikv, int32_t n_kv) {
    const auto & layer = kv.layers[ikv];

    llama_kv_score_kv kvl;
    kvl.k       = ggml_view_2d(ctx, layer.k, layer.k->ne[0], n_kv, layer.k->nb[1], 0);
    kvl.v_trans = kv.v_trans;
    kvl.v       = kv.v_trans
        ? ggml_view_2d(ctx, layer.v, n_kv, layer.v->ne[0], ggml_row_size(layer.v->type, kv.get_size()), 0)
        : ggml_view_2d(ctx, layer.v, layer.v->ne[0], n_kv, layer.v->nb[1], 0);
    return kvl;
}

// the fused scoring op reads f16 and f32 stores; quantized ones take the composed graph
static bool llama_kv_score_fusable(const ggml_tensor * k, const ggml_tensor * v) {
    const bool k_ok = k->type == GGML_TYPE_F16 || k->type == GGML_TYPE_F32;
    const bool v_ok = v->type == GGML_TYPE_F16 || v->type == GGML_TYPE_F32;
    return k_ok && v_ok && k->buffer != nullptr;
}

// the device that holds a tensor (the CPU buffer type names no device)
static ggml_backend_dev_t llama_kv_score_device(const ggml_tensor * t) {
    ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(t->buffer);
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (dev == nullptr && ggml_backend_buft_is_host(buft)) {
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    }
    return dev;
}

int32_t llama_kv_restkv::score(llama_kv_cache & kv, llama_context & lctx, llama_seq_id seq_id, float alpha, int32_t n_select,
                               llama_pos * out_pos, float * out_score, float * out_tpos, int32_t n_max) {
    llama_kv_restkv * st = kv.restkv.get();
    if (st == nullptr || st->n_window == 0) {
        return LLAMA_KV_ERR_NO_WINDOW;
    }
    for (const auto & layer : kv.layers) {
        if (layer.v == nullptr) {
            return LLAMA_KV_ERR_UNSUPPORTED; // MLA: no V to reconstruct
        }
    }
    if (score_n_head(kv) < 0 || !(alpha > 0.0f && alpha <= 1.0f) || n_max < 0) {
        return LLAMA_KV_ERR_BAD_ARG;
    }
    if (!st->gram_ready && !gram_prepare(kv, lctx)) {
        return LLAMA_KV_ERR_COMPUTE;
    }

    llama_kv_score_plan plan;
    const int32_t n_cells = plan_pass(kv, seq_id, alpha, n_select, plan);
    if (n_cells <= 0) {
        return n_cells;
    }

    const int32_t n_layer = (int32_t) kv.layers.size();
    const int32_t n_head  = score_n_head(kv);

    std::vector<llama_kv_score_result> results(n_layer);

    const bool ok = llama_kv_run_side_graph(lctx, kv, [&](ggml_context * ctx, ggml_cgraph * gf, llm_graph_input_kv_side & inp) {
        inp.k_rot = kv.build_input_k_rot(ctx);

        llama_kv_score_inputs in;
        llama_kv_score_add_inputs(inp, ctx, plan, *st, in);

        for (int32_t ikv = 0; ikv < n_layer; ++ikv) {
            const auto & layer = kv.layers[ikv];

            ggml_tensor * q = build_rows(kv, lctx, ctx, ikv, plan, in, inp.k_rot);

            const llama_kv_score_kv kvl = cache_layer(kv, ctx, ikv, plan.n_kv);

            // the fused op, where the device holding this layer's cache has it (CPU, CUDA, Metal) and
            // the cache is f16/f32: memory O(n_kv*n_head) instead of the window attention
            if (st->kernel != LLAMA_KV_SCORE_KERNEL_COMPOSED && llama_kv_score_fusable(layer.k, layer.v)) {
                ggml_tensor * t = build_layer_fused(ctx, q, kvl, st->gram[ikv], in, plan, st->kq_scale[ikv]);
                ggml_backend_dev_t dev = llama_kv_score_device(layer.k);
                if (st->kernel == LLAMA_KV_SCORE_KERNEL_FUSED || (dev && ggml_backend_dev_supports_op(dev, t))) {
                    ggml_set_output(t);
                    ggml_build_forward_expand(gf, t);
                    results[ikv].score = t;
                    results[ikv].fused = true;
                    continue;
                }
            }

            llama_kv_score_add_composed_inputs(inp, ctx, plan, in);
            results[ikv] = build_layer_composed(ctx, gf, q, kvl, st->gram[ikv], in, plan, st->kq_scale[ikv]);
        }
    });

    if (!ok) {
        return LLAMA_KV_ERR_COMPUTE;
    }

    // cells in position order
    const auto & seq_pos = kv.v_cells[kv.seq_to_stream[seq_id]].seq_pos_get(seq_id);

    std::vector<uint32_t> order;
    order.reserve(n_cells);
    for (const auto & pc : seq_pos) {
        if (out_pos && (int32_t) order.size() < n_max) {
            out_pos[order.size()] = pc.first;
        }
        order.push_back(pc.second);
    }

    st->n_fused_last = 0;
    for (int32_t ikv = 0; ikv < n_layer; ++ikv) {
        st->n_fused_last += results[ikv].fused ? 1 : 0;
        read_layer(results[ikv], plan, n_head, order, n_max,
                out_score ? out_score + (size_t) ikv*n_head*n_max : nullptr,
                out_tpos  ? out_tpos  + (size_t) ikv*n_head*2     : nullptr);
    }

    return n_cells;
}

//
// scoring cells from outside the cache
//

int32_t llama_kv_restkv::score_cells(llama_kv_cache & kv, llama_context & lctx, int32_t ikv, int32_t n,
                                     const llama_pos * pos, const uint8_t * k_src, const uint8_t * v_src,
                                     llama_pos pos_rows, float alpha, int32_t n_select, float * out_score, float * out_tpos) {
    llama_kv_restkv * st = kv.restkv.get();
    if (st == nullptr || st->n_window == 0 || st->pin_slots.empty()) {
        return LLAMA_KV_ERR_NO_WINDOW; // the question's rows must be pinned
    }
    const auto & layer = kv.layers[ikv];
    if (layer.v == nullptr) {
        return LLAMA_KV_ERR_UNSUPPORTED;
    }
    if (!st->gram_ready && !gram_prepare(kv, lctx)) {
        return LLAMA_KV_ERR_COMPUTE;
    }

    // the pinned rows alone, right after the last cell; re-rotated to pos_rows (where the cells'
    // keys expect the question)
    llama_kv_score_plan plan;
    plan.n_kv  = n;
    plan.n_win = 0;
    plan.n_pin = (int32_t) st->pin_slots.size();

    llama_pos pos_end = 0;
    for (int32_t i = 0; i < n; ++i) {
        pos_end = std::max(pos_end, pos[i] + 1);
    }
    plan.cell_pos.assign(pos, pos + n);
    plan.pos_window = pos_end;
    plan.row_pos.resize(plan.n_pin);
    plan.pin_shift.resize(plan.n_pin);
    for (int32_t r = 0; r < plan.n_pin; ++r) {
        plan.row_pos[r]   = pos_end + r;
        plan.pin_shift[r] = (pos_rows >= 0 ? pos_rows : pos_end) + r - st->pin_pos[r];
    }
    llama_kv_score_row_weights(st->rows, alpha, plan);
    plan.n_select = n_select > 0 && n_select < n ? n_select : 0;
    plan.output   = st->output;

    // the cells' K/V, uploaded next to the layer's cache: this layer's tier and nothing more
    ggml_init_params params = {
        /*.mem_size   =*/ 2*ggml_tensor_overhead(),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    ggml_context_ptr ctx_kv(ggml_init(params));
    if (!ctx_kv) {
        return LLAMA_KV_ERR_COMPUTE;
    }
    llama_kv_score_kv kvl;
    kvl.k       = ggml_new_tensor_2d(ctx_kv.get(), layer.k->type, layer.k->ne[0], n);
    kvl.v       = ggml_new_tensor_2d(ctx_kv.get(), layer.v->type, layer.v->ne[0], n);
    kvl.v_trans = false;
    ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors_from_buft(ctx_kv.get(), ggml_backend_buffer_get_type(layer.k->buffer)));
    if (!buf) {
        return LLAMA_KV_ERR_COMPUTE;
    }
    ggml_backend_tensor_set(kvl.k, k_src, 0, ggml_nbytes(kvl.k));
    ggml_backend_tensor_set(kvl.v, v_src, 0, ggml_nbytes(kvl.v));

    llama_kv_score_result result;
    const bool ok = llama_kv_run_side_graph(lctx, kv, [&](ggml_context * ctx, ggml_cgraph * gf, llm_graph_input_kv_side & inp) {
        inp.k_rot = kv.build_input_k_rot(ctx);

        llama_kv_score_inputs in;
        llama_kv_score_add_inputs(inp, ctx, plan, *st, in);

        ggml_tensor * q = build_rows(kv, lctx, ctx, ikv, plan, in, inp.k_rot);

        if (st->kernel != LLAMA_KV_SCORE_KERNEL_COMPOSED && llama_kv_score_fusable(kvl.k, kvl.v)) {
            ggml_tensor * t = build_layer_fused(ctx, q, kvl, st->gram[ikv], in, plan, st->kq_scale[ikv]);
            ggml_backend_dev_t dev = llama_kv_score_device(layer.k);
            if (st->kernel == LLAMA_KV_SCORE_KERNEL_FUSED || (dev && ggml_backend_dev_supports_op(dev, t))) {
                ggml_set_output(t);
                ggml_build_forward_expand(gf, t);
                result.score = t;
                result.fused = true;
                return;
            }
        }
        llama_kv_score_add_composed_inputs(inp, ctx, plan, in);
        result = build_layer_composed(ctx, gf, q, kvl, st->gram[ikv], in, plan, st->kq_scale[ikv]);
    });
    if (!ok) {
        return LLAMA_KV_ERR_COMPUTE;
    }

    std::vector<uint32_t> order(n);
    for (int32_t i = 0; i < n; ++i) {
        order[i] = i;
    }
    read_layer(result, plan, score_n_head(kv), order, n, out_score, out_tpos);
    st->n_fused_last = result.fused ? 1 : 0;

    return n;
}

//
// C API
//

int32_t llama_kv_score_n_layer(llama_context * ctx) {
    llama_kv_cache * kv = llama_kv_score_cache(ctx);
    return kv ? llama_kv_restkv::score_n_layer(*kv) : LLAMA_KV_ERR_UNSUPPORTED;
}

int32_t llama_kv_score_n_head(llama_context * ctx) {
    llama_kv_cache * kv = llama_kv_score_cache(ctx);
    if (!kv) {
        return LLAMA_KV_ERR_UNSUPPORTED;
    }
    const int32_t n_head = llama_kv_restkv::score_n_head(*kv);
    return n_head > 0 ? n_head : LLAMA_KV_ERR_UNSUPPORTED;
}

int32_t llama_kv_seq_score(llama_context * ctx, llama_seq_id seq_id, float alpha, int32_t n_select,
                           llama_pos * out_pos, float * out_score, float * out_tpos, int32_t n_max) {
    llama_kv_cache * kv = llama_kv_score_cache(ctx);
    if (!kv) {
        return LLAMA_KV_ERR_UNSUPPORTED;
    }
    if (seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max()) {
        return LLAMA_KV_ERR_BAD_SEQ;
    }
    if (n_max < 0 || (n_max > 0 && out_score == nullptr) || (n_select > 0 && out_tpos == nullptr)) {
        return LLAMA_KV_ERR_BAD_ARG;
    }
    ctx->synchronize();
    return llama_kv_restkv::score(*kv, *ctx, seq_id, alpha, n_select, out_pos, out_score, out_tpos, n_max);
}

int32_t llama_kv_score_n_fused(llama_context * ctx) {
    llama_kv_cache * kv = llama_kv_score_cache(ctx);
    if (!kv) {
        return LLAMA_KV_ERR_UNSUPPORTED;
    }
    return kv->restkv ? kv->restkv->n_fused_last : 0;
}

int32_t llama_kv_score_cells(llama_context * ctx, int32_t il_kv, int32_t n, const llama_pos * pos, const void * k,
                             const void * v, llama_pos pos_rows, float alpha, int32_t n_select, float * out_score,
                             float * out_tpos) {
    llama_kv_cache * kv = llama_kv_score_cache(ctx);
    if (!kv) {
        return ctx && ctx->get_memory() ? LLAMA_KV_ERR_UNSUPPORTED : LLAMA_KV_ERR_NO_MEMORY;
    }
    if (il_kv < 0 || il_kv >= llama_kv_restkv::score_n_layer(*kv) || n <= 0 || !pos || !k || !v || !out_score ||
        (n_select > 0 && !out_tpos) || !(alpha > 0.0f && alpha <= 1.0f) || llama_kv_restkv::score_n_head(*kv) < 0) {
        return LLAMA_KV_ERR_BAD_ARG;
    }
    ctx->synchronize();
    return llama_kv_restkv::score_cells(*kv, *ctx, il_kv, n, pos, (const uint8_t *) k, (const uint8_t *) v, pos_rows,
            alpha, n_select, out_score, out_tpos);
}

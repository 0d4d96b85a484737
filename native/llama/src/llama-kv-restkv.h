// pyrestkv inside llama.cpp: eviction (llama-kv-evict.cpp), the query window captured inside the
// normal graph (llama-kv-query-window.cpp), the ReST-KV scoring pass (llama-kv-score.cpp) and the
// copies of cells to and from a document tier (llama-kv-tier.cpp).
//
// llama_kv_cache owns one llama_kv_restkv through its `restkv` pointer (created by the first call that
// sets the query window or the scoring mode) and names it a friend, as do llama_kv_cache_context and
// llama_context: our code reads the cells and layers directly, and upstream files carry only the hooks
// (see patches/).

#pragma once

#include "llama-restkv.h"

#include "ggml-cpp.h"

#include <cstdint>
#include <utility>
#include <vector>

class  llama_kv_cache;
class  llama_kv_cache_context;
struct llama_context;
struct llama_ubatch;
class  llm_graph_result;

// One layer's K/V as the scoring pass reads them: views of the live cache, or of any other store of
// cells (a stored tier, say), one cell per row.
struct llama_kv_score_kv {
    ggml_tensor * k;       // [n_embd_k_gqa, n_kv]
    ggml_tensor * v;       // v_trans ? [n_kv, n_embd_v_gqa] (one row per channel) : [n_embd_v_gqa, n_kv]
    bool          v_trans;
};

// The host side of one pass, shared by every layer: which rows score, which cells they see.
struct llama_kv_score_plan {
    int32_t n_kv  = 0; // cells spanned, empty ones included
    int32_t n_win = 0; // window rows, oldest first
    int32_t n_pin = 0; // pinned rows, after them

    std::vector<int32_t>   win_slots;  // ring slot of each window row
    std::vector<int32_t>   pin_shift;  // positions each pinned row moves by (re-rotation)
    std::vector<llama_pos> row_pos;    // position of each row [n_win + n_pin]
    std::vector<float>     row_weight; // how the rows' attention is averaged [n_win + n_pin]

    std::vector<int32_t> cell_pos; // position of each cell, -1 where the cell does not count [n_kv]
    llama_pos            pos_window = 0; // cells before it may be evicted; the head output sums over them

    int32_t n_select = 0; // top cells whose mean position the adaptive smoothing needs (0: none)
    llama_kv_score_output output = LLAMA_KV_SCORE_OUTPUT_RESTKV;

    int32_t n_row() const { return n_win + n_pin; }
};

// The graph inputs of one pass, made from its plan. The composed graph's extra inputs are added the
// first time a layer takes that path.
struct llama_kv_score_inputs {
    ggml_tensor * win_slots  = nullptr; // I32 [n_win]
    ggml_tensor * pin_slots  = nullptr; // I32 [n_pin]
    ggml_tensor * pin_shift  = nullptr; // I32 [n_pin]
    ggml_tensor * row_weight = nullptr; // F32 [n_row]
    ggml_tensor * cell_pos   = nullptr; // I32 [n_kv]  (fused)
    ggml_tensor * row_pos    = nullptr; // I32 [n_row] (fused)
    ggml_tensor * mask       = nullptr; // F32 [n_kv, n_row] causal mask (composed)
    ggml_tensor * prefix     = nullptr; // F32 [n_kv] 1 for cells before pos_window (composed)
    ggml_tensor * cell_pos_f = nullptr; // F32 [1, n_kv] (composed, adaptive smoothing)
};

// Where one layer's result lies after the pass ran.
struct llama_kv_score_result {
    ggml_tensor * score = nullptr; // fused: the op's dst; composed: [n_kv, 1, n_head]
    ggml_tensor * tpos  = nullptr; // composed only: [1, n_row, n_head] mean top positions per row
    bool          fused = false;
};

struct llama_kv_restkv {
    //
    // eviction (llama-kv-evict.cpp): no state of its own
    //

    // remove seq_id from the cells at the given positions, then pack the stream; returns cells removed
    static int32_t seq_evict(llama_kv_cache & kv, llama_seq_id seq_id, const llama_pos * pos, int32_t n_pos);

    // move the used cells of a stream down into the holes below them, so that n_kv (the used cells'
    // high-water mark) follows the number of cells in use; host buffers only. Returns cells moved
    static int32_t stream_pack(llama_kv_cache & kv, uint32_t strm);

    // whether every cell of seq_id that seq_remap() would move belongs to seq_id alone
    static bool seq_can_remap(const llama_kv_cache & kv, llama_seq_id seq_id, const std::vector<llama_pos> & pos_old, llama_pos pos_new0);

    // move every cell of seq_id to position pos_new0 + rank, where rank is the index of the first
    // entry of pos_old (ascending) that is >= the cell's position; the K-shift is applied lazily.
    // Call seq_can_remap() first: a shared cell is moved for every sequence it holds
    static void seq_remap(llama_kv_cache & kv, llama_seq_id seq_id, const std::vector<llama_pos> & pos_old, llama_pos pos_new0);

    //
    // query window (llama-kv-query-window.cpp)
    //

    // capture the last n_window queries of every layer, as attention uses them (0 switches it off)
    static bool window_init(llama_kv_cache & kv, int32_t n_window);

    // the graph side of the capture: ring slots for the last queries of a ubatch, and the copy into the ring
    static int32_t       window_size       (const llama_kv_cache_context * mctx);
    static ggml_tensor * build_input_q_idxs(const llama_kv_cache_context * mctx, ggml_context * ctx, const llama_ubatch & ubatch);
    static void          set_input_q_idxs  (const llama_kv_cache_context * mctx, ggml_tensor * dst, const llama_ubatch * ubatch);
    static ggml_tensor * cpy_q             (const llama_kv_cache_context * mctx, ggml_context * ctx, ggml_tensor * q_cur,
                                            ggml_tensor * q_idxs, int32_t il, float kq_scale);

    // the graphs llama_context keeps for reuse were built with (or without) the capture, or the
    // scheduler ran a side graph since: they cannot be reused
    static void reset_graph_reuse(llama_context & lctx);

    // forget the captured queries (positions changed, or a new prompt starts)
    void window_reset();

    // copy the window into the pinned rows (pin) or drop the pinned rows; returns the rows pinned
    int32_t window_pin(bool pin);

    // window slots that hold a query, oldest first
    std::vector<int32_t> window_slots() const;

    //
    // scoring pass (llama-kv-score.cpp)
    //

    // per-layer, per-query-head scores of the cells of seq_id (position order), on the cache's devices
    static int32_t score(llama_kv_cache & kv, llama_context & lctx, llama_seq_id seq_id, float alpha, int32_t n_select,
                         llama_pos * out_pos, float * out_score, float * out_tpos, int32_t n_max);

    // the scored layers, and their query heads (-1 when the layers differ)
    static int32_t score_n_layer(const llama_kv_cache & kv);
    static int32_t score_n_head (const llama_kv_cache & kv);

    // which rows score the cells of seq_id and which cells they see; returns the number of cells of
    // seq_id, or < 0 on error
    static int32_t plan_pass(const llama_kv_cache & kv, llama_seq_id seq_id, float alpha, int32_t n_select,
                             llama_kv_score_plan & plan);

    // W_O^h^T W_O^h for every layer and query head, computed once
    static bool gram_prepare(llama_kv_cache & kv, llama_context & lctx);

    // one layer's query rows [d, n_row, n_head]: the window, then the pinned rows re-rotated
    static ggml_tensor * build_rows(const llama_kv_cache & kv, llama_context & lctx, ggml_context * ctx, int32_t ikv,
                                    const llama_kv_score_plan & plan, const llama_kv_score_inputs & in, ggml_tensor * k_rot);

    // the live cache's cells [0, n_kv) of one layer, as the layer builders read them
    static llama_kv_score_kv cache_layer(const llama_kv_cache & kv, ggml_context * ctx, int32_t ikv, int32_t n_kv);

    // one layer of the pass, fused (GGML_OP_RESTKV_SCORE) or from ordinary ggml ops. Neither knows
    // the cache: q from build_rows(), the K/V of any store, G_h = W_O^h^T W_O^h
    static ggml_tensor * build_layer_fused(ggml_context * ctx, ggml_tensor * q, const llama_kv_score_kv & kv_layer,
                                           ggml_tensor * gram, const llama_kv_score_inputs & in,
                                           const llama_kv_score_plan & plan, float kq_scale);
    static llama_kv_score_result build_layer_composed(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * q,
                                           const llama_kv_score_kv & kv_layer, ggml_tensor * gram,
                                           const llama_kv_score_inputs & in, const llama_kv_score_plan & plan, float kq_scale);

    // copy one layer's result out, cells in the given order (indices into the n_kv cells)
    static void read_layer(const llama_kv_score_result & res, const llama_kv_score_plan & plan, int32_t n_head,
                           const std::vector<uint32_t> & order, int32_t n_max, float * out_score, float * out_tpos);

    // score n cells that are not in the cache (a document tier's: layer ikv's keys k and values v, a
    // row per cell, in the cache's types) with the pinned rows alone, placed right after the cells
    // and re-rotated to pos_rows (< 0: right after the cells). pos orders the cells for the causal
    // mask and the mean top positions. Scratch: these cells' K/V next to the layer's cache
    static int32_t score_cells(llama_kv_cache & kv, llama_context & lctx, int32_t ikv, int32_t n, const llama_pos * pos,
                               const uint8_t * k, const uint8_t * v, llama_pos pos_rows, float alpha, int32_t n_select,
                               float * out_score, float * out_tpos);

    // tests only (include/llama-restkv-debug.h, llama-kv-score-debug.cpp): a layer's tensor as f32 rows
    static int64_t debug_tensor(llama_kv_cache & kv, llama_context & lctx, int32_t ikv, int32_t kind, float * out,
                                int64_t n_max, llama_pos * out_pos, int32_t n_pos_max);

    //
    // document tier (llama-kv-tier.cpp)
    //

    // layer il's keys (is_v false) or values; nullptr if il is out of range or the layer has none
    static const ggml_tensor * tier_tensor(const llama_kv_cache & kv, int32_t il, bool is_v);

    // bytes of n cells of every layer: per layer, n key rows then n value rows
    static int64_t tier_bytes(const llama_kv_cache & kv, int32_t n);

    // copy the K/V of the cells of seq_id at positions pos (each held by one cell) into dst, in the
    // layout of tier_bytes(); returns the bytes written, or < 0 on error
    static int64_t tier_get(llama_kv_cache & kv, llama_seq_id seq_id, const llama_pos * pos, int32_t n, uint8_t * dst);

    // put n cells into the (empty) sequence seq_id: positions pos, keys rotated at pos_rot (nullptr:
    // at pos; else a K-shift to pos follows at the next decode), tokens tok (may be nullptr)
    static int32_t tier_put(llama_kv_cache & kv, llama_seq_id seq_id, const llama_pos * pos, const llama_pos * pos_rot,
                            const llama_token * tok, int32_t n, const uint8_t * src);

    //
    // state
    //

    // per scored layer: a ring of the last n_window queries [n_embd_q, n_window] (F32), the pinned rows
    // [n_embd_q, n_window], and the Gram matrices [d, d, n_head], next to the layer's K/V
    int32_t n_window = 0;
    std::vector<ggml_tensor *> q_win;
    std::vector<ggml_tensor *> q_pin;
    std::vector<ggml_tensor *> gram;
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> ctxs_bufs;
    bool gram_ready = false;

    // host side of the ring: the position of each slot (-1 = empty), the next slot to write, and the
    // kq_scale attention used in each layer (recorded while the graph is built)
    std::vector<llama_pos> win_pos;
    int32_t                win_head = 0;
    std::vector<float>     kq_scale;

    std::vector<int32_t>   pin_slots; // ring slots of the pinned rows, oldest first
    std::vector<llama_pos> pin_pos;   // the positions they were captured at

    llama_kv_score_kernel kernel = LLAMA_KV_SCORE_KERNEL_AUTO;
    llama_kv_score_output output = LLAMA_KV_SCORE_OUTPUT_RESTKV;
    llama_kv_score_rows   rows   = LLAMA_KV_SCORE_ROWS_EMA;

    int32_t n_fused_last = 0; // layers the last pass scored with the fused op
};

// the cache a context scores: the plain KV cache, or the full-attention half of an iSWA cache (its
// sliding-window half keeps only recent tokens anyway); nullptr for other memory types
llama_kv_cache * llama_kv_score_cache(llama_context * ctx);

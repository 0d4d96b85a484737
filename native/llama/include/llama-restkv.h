// pyrestkv's C API to llama.cpp: KV eviction and the ReST-KV scoring pass.
//
// Additive: it changes no struct or enum of llama.h (llama-cpp-python mirrors those byte for byte).
// Every function returns a count (>= 0) or an llama_kv_err (< 0); llama_kv_strerror() explains one.
// Only the plain KV cache of standard attention and the iSWA cache (Gemma 2/3: evicted in both
// halves, scored through the full-attention half) are supported.
//
// This header is also read by pyrestkv's binding (cffi): keep it to enums and flat declarations,
// one per statement, with no macros but LLAMA_API.

#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

    enum llama_kv_err {
        LLAMA_KV_ERR_NO_MEMORY    = -1, // the context has no memory
        LLAMA_KV_ERR_UNSUPPORTED  = -2, // this memory type cannot evict or score (recurrent, hybrid, MLA/DSA, ...)
        LLAMA_KV_ERR_BAD_SEQ      = -3, // seq_id is out of range
        LLAMA_KV_ERR_BAD_ARG      = -4, // a NULL pointer, a negative count or a value out of range
        LLAMA_KV_ERR_CANNOT_SHIFT = -5, // positions of this cache cannot be shifted (M-RoPE, ...)
        LLAMA_KV_ERR_SHARED_CELL  = -6, // a cell of seq_id is shared with another sequence
        LLAMA_KV_ERR_NO_WINDOW    = -7, // no query window, or no query captured yet
        LLAMA_KV_ERR_COMPUTE      = -8, // the scoring graph could not be built or run
        LLAMA_KV_ERR_NO_ROOM      = -9, // not enough free cells
    };

    // A sentence for an llama_kv_err (a static string; "unknown error" for other values)
    LLAMA_API const char * llama_kv_strerror(int32_t err);

    //
    // Eviction
    //
    // Evicting arbitrary positions breaks the promise of llama_memory_seq_pos_min/max that every
    // position in [pos_min, pos_max] is present, until llama_kv_seq_compact() is called.
    //

    // Number of cells that hold seq_id, or < 0 on error
    LLAMA_API int32_t llama_kv_seq_n_cells(llama_memory_t mem, llama_seq_id seq_id);

    // The cells of seq_id in ascending position order: writes at most n_max positions to out_pos and
    // the tokens they hold to out_tok (LLAMA_TOKEN_NULL for embedding input); either may be NULL.
    // Returns the total number of cells of seq_id, or < 0 on error
    LLAMA_API int32_t llama_kv_seq_cells(
            llama_memory_t   mem,
              llama_seq_id   seq_id,
                 llama_pos * out_pos,
               llama_token * out_tok,
                   int32_t   n_max);

    // Removes the cells of seq_id at the given positions (any order; absent positions are skipped).
    // Where the cache lives in host memory, the cells above the freed ones then move down into the
    // holes (their K/V rows are copied), so that attention spans only the cells in use.
    // Returns the number of cells removed, or < 0 on error
    LLAMA_API int32_t llama_kv_seq_evict(
            llama_memory_t   mem,
              llama_seq_id   seq_id,
           const llama_pos * pos,
                   int32_t   n_pos);

    // Renumbers the positions of seq_id to 0, 1, ..., n - 1, keeping their order. The keys are
    // re-rotated by one K-shift at the next decode (as with llama_memory_seq_add). On an iSWA cache
    // both halves move, or neither does.
    // Returns n, the number of cells of seq_id (the next position is n), or < 0 on error
    LLAMA_API int32_t llama_kv_seq_compact(llama_memory_t mem, llama_seq_id seq_id);

    // Bytes allocated for the K and V tensors of the memory, or < 0 on error
    LLAMA_API int64_t llama_kv_size_bytes(llama_memory_t mem);

    //
    // ReST-KV scoring
    //
    // A query window keeps the last n_window queries of every scored layer, exactly as attention used
    // them. A scoring pass then rates every cached cell by how much removing it would change each
    // layer's attention output (ReST-KV's layer-wise output reconstruction), on the devices that hold
    // the cache.
    //

    // How the scoring pass runs
    enum llama_kv_score_kernel {
        LLAMA_KV_SCORE_KERNEL_AUTO     = 0, // the fused op (GGML_OP_RESTKV_SCORE) where the device holding
                                            // the layer's cache implements it and the cache is f16/f32,
                                            // ordinary ggml ops otherwise (other backends, quantized caches)
        LLAMA_KV_SCORE_KERNEL_COMPOSED = 1, // always the ordinary ggml ops
        LLAMA_KV_SCORE_KERNEL_FUSED    = 2, // the fused op for every f16/f32 layer, wherever the scheduler runs it
    };

    // What a pass writes to out_score
    enum llama_kv_score_output {
        LLAMA_KV_SCORE_OUTPUT_RESTKV    = 0, // ReST-KV's score (see llama_kv_seq_score)
        LLAMA_KV_SCORE_OUTPUT_ATTENTION = 1, // the rows' averaged attention a: what SnapKV, H2O and TOVA rank by
    };

    // How a pass averages the attention of its rows
    enum llama_kv_score_rows {
        LLAMA_KV_SCORE_ROWS_EMA  = 0, // exponential moving average, the newest row weighted alpha
        LLAMA_KV_SCORE_ROWS_MEAN = 1, // uniformly
        LLAMA_KV_SCORE_ROWS_LAST = 2, // the newest row only (the last pinned row, when rows are pinned)
    };

    // Capture the last n_window (1..256) queries of every scored layer from now on; 0 switches
    // capture off. Forgets the captured and pinned queries. Returns 0, or < 0 on error
    LLAMA_API int32_t llama_kv_set_query_window(struct llama_context * ctx, int32_t n_window);

    // pin = true : keep a copy of the current window as pinned rows (for example the queries of the
    //              question, decoded once); every scoring pass re-rotates them to the positions right
    //              after the end of the cache and appends them as the newest rows
    // pin = false: drop the pinned rows
    // Returns the number of rows pinned, or < 0 on error
    LLAMA_API int32_t llama_kv_pin_query_window(struct llama_context * ctx, bool pin);

    // Forget the captured (not the pinned) queries. Returns 0, or < 0 on error
    LLAMA_API int32_t llama_kv_reset_query_window(struct llama_context * ctx);

    // kernel: an llama_kv_score_kernel (LLAMA_KV_SCORE_KERNEL_AUTO until set)
    // output: an llama_kv_score_output, rows: an llama_kv_score_rows (RESTKV and EMA until set)
    // Returns 0, or < 0 on error
    LLAMA_API int32_t llama_kv_set_score_kernel(struct llama_context * ctx, int32_t kernel);
    LLAMA_API int32_t llama_kv_set_score_output(struct llama_context * ctx, int32_t output, int32_t rows);

    // Number of scored layers and query heads: out_score below is [n_layer][n_head][n_max]
    LLAMA_API int32_t llama_kv_score_n_layer(struct llama_context * ctx);
    LLAMA_API int32_t llama_kv_score_n_head(struct llama_context * ctx);

    // Score the cells of seq_id. Window rows (oldest first, then the pinned rows) attend to the cache
    // (causally), their attention is averaged over the rows (EMA: the newest row weighted alpha), and
    //   score[l][h][c] = a/(1-a) * || W_O^h (o_h - v_c) ||
    // where a is the averaged attention of query head h on cell c and o_h the head's output over the
    // cells older than the window. If n_select > 0, out_tpos[l][h][0..1] receive the mean position of
    // the n_select most attended cells, averaged over the first and over the second half of the rows
    // (ReST-KV's adaptive smoothing window); out_tpos may be NULL when n_select <= 0.
    // Cells come in ascending position order, their positions in out_pos.
    // Returns the number of cells (only the first n_max are written), or < 0 on error
    LLAMA_API int32_t llama_kv_seq_score(
            struct llama_context * ctx,
                    llama_seq_id   seq_id,
                           float   alpha,
                         int32_t   n_select,
                       llama_pos * out_pos,
                           float * out_score,
                           float * out_tpos,
                         int32_t   n_max);

    // Number of layers that the last scoring pass scored with the fused op, or < 0 on error
    LLAMA_API int32_t llama_kv_score_n_fused(struct llama_context * ctx);

    //
    // Document tier
    //
    // A tier keeps the K/V of every cell a document read produced (pyrestkv writes it to a file), so
    // that each later question can score all of them and recall the ones it needs into the cache.
    // These functions move the bytes and score them; the file is the caller's. One cell's K/V, for
    // every layer of a part, is laid out as: per layer, the n key rows, then the n value rows (a row
    // per cell, also where the cache keeps V transposed), in the cache's types.
    //

    // Which cache of the memory
    enum llama_kv_part {
        LLAMA_KV_PART_SCORED = 0, // the plain cache, or the full-attention half of an iSWA cache
        LLAMA_KV_PART_SWA    = 1, // the sliding-window half of an iSWA cache (no layers elsewhere)
    };

    // Number of layers of a part (0: the part does not exist), or < 0 on error
    LLAMA_API int32_t llama_kv_part_n_layer(struct llama_context * ctx, int32_t part);

    // Layer il of a part: the ggml_type and the bytes per cell of its keys (is_v false) or values
    LLAMA_API int32_t llama_kv_part_layer_type(struct llama_context * ctx, int32_t part, int32_t il, bool is_v);
    LLAMA_API int64_t llama_kv_part_row_size(struct llama_context * ctx, int32_t part, int32_t il, bool is_v);

    // The positions of the cells of seq_id in a part, ascending: writes at most n_max to out_pos.
    // Returns the number of cells, or < 0 on error
    LLAMA_API int32_t llama_kv_part_seq_positions(
            struct llama_context * ctx,
                         int32_t   part,
                    llama_seq_id   seq_id,
                       llama_pos * out_pos,
                         int32_t   n_max);

    // Copies the K/V of the n cells of seq_id at the given positions (each held by exactly one cell)
    // out of a part into dst (size bytes, at least what n cells take).
    // Returns the bytes written, or < 0 on error
    LLAMA_API int64_t llama_kv_seq_get_kv(
            struct llama_context * ctx,
                         int32_t   part,
                    llama_seq_id   seq_id,
               const llama_pos   * pos,
                         int32_t   n,
                            void * dst,
                         int64_t   size);

    // Puts n cells into seq_id, which must hold no cell of the part yet: cell i at position pos[i],
    // holding token tok[i] (tok may be NULL), its K/V from src (size: exactly what n cells take). Its
    // keys were rotated at pos_rot[i] (pos_rot NULL: at pos[i]); the next decode re-rotates them to
    // pos[i] with one K-shift, so positions that repeated when they were read may be made dense.
    // Returns n, or < 0 on error (LLAMA_KV_ERR_NO_ROOM: fewer than n free cells)
    LLAMA_API int32_t llama_kv_seq_put_kv(
            struct llama_context * ctx,
                         int32_t   part,
                    llama_seq_id   seq_id,
               const llama_pos   * pos,
               const llama_pos   * pos_rot,
             const llama_token   * tok,
                         int32_t   n,
                      const void * src,
                         int64_t   size);

    // Scores n cells from outside the cache (a tier's) for scored layer il_kv: k and v hold the
    // cells' keys and values of that layer (a row per cell, in the cache's types). The pinned rows
    // alone score them (pin a question's queries first), placed after the cells in the order pos
    // gives them (the causal mask and the mean top positions use pos) and re-rotated to positions
    // pos_rows, pos_rows + 1, ... (< 0: right after the last of pos). Writes out_score[n_head][n]
    // and, if n_select > 0, out_tpos[n_head][2], as llama_kv_seq_score does. Scratch: this layer's
    // n cells of K/V, allocated next to the layer's cache for the call.
    // Returns n, or < 0 on error
    LLAMA_API int32_t llama_kv_score_cells(
            struct llama_context * ctx,
                         int32_t   il_kv,
                         int32_t   n,
               const llama_pos   * pos,
                      const void * k,
                      const void * v,
                       llama_pos   pos_rows,
                           float   alpha,
                         int32_t   n_select,
                           float * out_score,
                           float * out_tpos);

#ifdef __cplusplus
}
#endif

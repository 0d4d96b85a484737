// GGML_OP_RESTKV_SCORE on CUDA: reads the op's tensors and params as the CPU implementation does
// (ggml-cpu/restkv-score.cpp) and runs the kernels of restkv-score-kernels.cuh.

#include "restkv-score.cuh"
#include "restkv-score-kernels.cuh"

void ggml_cuda_op_restkv_score(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * gram = dst->src[3];
    const ggml_tensor * cpos = dst->src[4];
    const ggml_tensor * rpos = dst->src[5];
    const ggml_tensor * ema  = dst->src[6];

    GGML_ASSERT(q->type == GGML_TYPE_F32 && ggml_is_contiguous(q));
    GGML_ASSERT(gram->type == GGML_TYPE_F32 && ggml_is_contiguous(gram));
    GGML_ASSERT(k->type == GGML_TYPE_F16 || k->type == GGML_TYPE_F32);
    GGML_ASSERT(v->type == GGML_TYPE_F16 || v->type == GGML_TYPE_F32);
    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_is_contiguous(dst));

    restkv_score_cuda_args a;
    a.q    = (const float   *) q->data;
    a.k    = k->data;
    a.v    = v->data;
    a.gram = (const float   *) gram->data;
    a.cpos = (const int32_t *) cpos->data;
    a.rpos = (const int32_t *) rpos->data;
    a.ema  = (const float   *) ema->data;
    a.dst  = (float *) dst->data;

    a.k_f16 = k->type == GGML_TYPE_F16;
    a.v_f16 = v->type == GGML_TYPE_F16;
    a.nbk0  = k->nb[0];
    a.nbk1  = k->nb[1];
    a.nbk2  = k->nb[2];
    a.nbv0  = v->nb[0];
    a.nbv1  = v->nb[1];
    a.nbv2  = v->nb[2];

    a.d         = (int) q->ne[0];
    a.n_row     = (int) q->ne[1];
    a.n_head    = (int) q->ne[2];
    a.n_kv      = (int) k->ne[1];
    a.n_head_kv = (int) k->ne[2];
    a.dv        = (int) v->ne[0];

    memcpy(&a.scale,      (const float   *) dst->op_params + 0, sizeof(float));
    memcpy(&a.pos_window, (const int32_t *) dst->op_params + 1, sizeof(int32_t));
    memcpy(&a.n_select,   (const int32_t *) dst->op_params + 2, sizeof(int32_t));

    // the partial softmax max/sum of each (head, row, cell split): O(n_head*n_row*n_kv/blocksize)
    const size_t n_partials = restkv_score_cuda_partials_size(a.n_kv, a.n_row, a.n_head)/sizeof(float);
    ggml_cuda_pool_alloc<float> partials(ctx.pool(), n_partials);
    a.partials = partials.get();

    restkv_score_cuda_launch(a, ctx.stream());
    CUDA_CHECK(cudaGetLastError());
}

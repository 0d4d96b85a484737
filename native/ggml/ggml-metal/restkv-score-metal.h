// GGML_OP_RESTKV_SCORE on Metal: what kernels/restkv_score.metal and the host code share.
//
// The kernels are NOT part of ggml's Metal library (the per-kind table GGML_METAL_LIBS in
// ggml-metal-device.m, the embedded sources, default.metallib). ggml builds that library with
// ggml_metal_library_compile_all, which fails as a whole if any one source fails to compile; the
// device then has no library and the Metal backend does not start, so an error in our kernels
// would make every model fail to load. Instead restkv-score.cmake embeds our source on its own
// (kernels/restkv_score.metal with this header and ../restkv-score-common.h inlined) and
// restkv-score-metal.cpp compiles it into a library of its own the first time supports_op is asked
// about the op. If that compile, or creating any of its pipelines, fails, supports_op answers
// false for GGML_OP_RESTKV_SCORE and the scoring pass builds the composed graph instead.

#ifndef RESTKV_SCORE_METAL_H
#define RESTKV_SCORE_METAL_H

#if !defined(__METAL_VERSION__)
#    include <stdint.h>
#endif

// threads per threadgroup of every pass (RESTKV_NT in the kernels)
#define RESTKV_METAL_NT 256

typedef struct {
    int32_t d;
    int32_t dv;
    int32_t n_row;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t n_kv;
    int64_t nbk0;
    int64_t nbk1;
    int64_t nbk2;
    int64_t nbv0;
    int64_t nbv1;
    int64_t nbv2;
    float   scale;
    int32_t pos_window;
    int32_t n_select;
} ggml_metal_kargs_restkv_score;

#if !defined(__METAL_VERSION__)
#include "ggml-metal-device.h"

#ifdef __cplusplus
extern "C" {
#endif

// whether the kernels compiled and all their pipelines exist on this device (compiles them on the
// first call, once per device; thread-safe). Never aborts: a failure is logged once and is false.
bool ggml_metal_restkv_score_available(ggml_metal_device_t dev);

// the kernels' library, NULL where ggml_metal_restkv_score_available is false
ggml_metal_library_t ggml_metal_restkv_score_library(ggml_metal_device_t dev);

// pass: zero, stats, attn, hist2, o, head or cells; type: the K (stats, attn, hist2) or V (o, cells)
// type, ignored by zero and head. The pipeline was created by ggml_metal_restkv_score_available.
struct ggml_metal_pipeline_with_params ggml_metal_restkv_score_pipeline(ggml_metal_library_t lib, const char * pass, enum ggml_type type);

#ifdef __cplusplus
}
#endif
#endif // !__METAL_VERSION__

#endif // RESTKV_SCORE_METAL_H

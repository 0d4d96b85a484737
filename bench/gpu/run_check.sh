#!/bin/sh
# Builds and runs the GPU check of GGML_OP_RESTKV_SCORE's CUDA kernels (needs nvcc and a GPU; no ggml).
# Prints the check against the host reference at 8k cells and a timing table (fused vs composed).
set -e
cd "$(dirname "$0")"
out=${TMPDIR:-/tmp}/restkv_score_check
nvcc -O3 -std=c++17 -arch=native -o "$out" restkv_score_check.cu 2>/dev/null ||
    nvcc -O3 -std=c++17 -arch=sm_90 -o "$out" restkv_score_check.cu
exec "$out"

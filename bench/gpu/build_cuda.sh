#!/bin/sh
# Builds pyrestkv's patched llama.cpp with CUDA into pyrestkv/lib, with plain CMake (no pip), for a
# machine that has nvcc but may lack network, pip packages and a full CUDA toolkit.
#
#   sh bench/gpu/build_cuda.sh [--configure-only]
#
# The llama.cpp tree: $PYRESTKV_LLAMA_CPP_DIR, else bench/gpu/carry/llama.cpp-src.tar.xz (made by
# bench/gpu/prepare_carry.sh from the pinned sdist), else the pinned sdist itself (fetched with pip).
# cuBLAS: the toolkit's own, else the one in Python's nvidia-cublas package (nvidia/cu13 or
# nvidia/cublas), else $CUBLAS_ROOT (a folder with include/cublas_v2.h and lib/libcublas.so*).
# Architectures: $CUDA_ARCHS (default 90, the H100/H200). Prints the LD_LIBRARY_PATH to run with.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
PYTHON=${PYTHON:-python3}
build=${PYRESTKV_CUDA_BUILD:-$root/build/cuda}
archs=${CUDA_ARCHS:-90}

nvcc=$(command -v nvcc || true)
[ -n "$nvcc" ] || { echo "build_cuda.sh: nvcc is not on PATH" >&2; exit 1; }
toolkit=$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)

# the llama.cpp tree
if [ -z "${PYRESTKV_LLAMA_CPP_DIR:-}" ] && [ -f "$here/carry/llama.cpp-src.tar.xz" ]; then
    PYRESTKV_LLAMA_CPP_DIR=$build/llama.cpp-carried
    if [ ! -f "$PYRESTKV_LLAMA_CPP_DIR/include/llama.h" ]; then
        mkdir -p "$PYRESTKV_LLAMA_CPP_DIR"
        tar -xJf "$here/carry/llama.cpp-src.tar.xz" -C "$PYRESTKV_LLAMA_CPP_DIR"
    fi
fi
export PYRESTKV_LLAMA_CPP_DIR="${PYRESTKV_LLAMA_CPP_DIR:-}"

# cuBLAS: the toolkit's (wherever nvcc's toolkit keeps its headers), else the pip package's folder
has_cublas=""
for t in "${CUDA_HOME:-}" "$toolkit" /usr/local/cuda; do
    if [ -n "$t" ] && { [ -f "$t/include/cublas_v2.h" ] || [ -f "$t/targets/x86_64-linux/include/cublas_v2.h" ]; }; then
        has_cublas=1
    fi
done
cublas_root=${CUBLAS_ROOT:-}
if [ -z "$cublas_root" ] && [ -z "$has_cublas" ]; then
    cublas_root=$("$PYTHON" - <<'EOF'
import os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
for base in nvidia.__path__:
    for sub in ("cu13", "cublas"):
        if os.path.exists(os.path.join(base, sub, "include", "cublas_v2.h")):
            print(os.path.join(base, sub))
            raise SystemExit(0)
EOF
)
    [ -n "$cublas_root" ] || { echo "build_cuda.sh: no cuBLAS found (no cublas_v2.h in the CUDA toolkit, no nvidia-cublas Python package); set CUBLAS_ROOT" >&2; exit 1; }
fi
extra=""
libpath=$toolkit/lib64:$toolkit/lib:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
if [ -n "$cublas_root" ]; then
    cublas=$(ls "$cublas_root"/lib/libcublas.so* | head -n 1)
    cublaslt=$(ls "$cublas_root"/lib/libcublasLt.so* | head -n 1)
    extra="-DCUDA_cublas_LIBRARY=$cublas -DCUDA_cublasLt_LIBRARY=$cublaslt -DCMAKE_CUDA_FLAGS=-I$cublas_root/include -DCMAKE_CXX_FLAGS=-I$cublas_root/include"
    libpath=$cublas_root/lib:$libpath
fi

# the driver library (ggml's VMM pool links it): the driver's, else the toolkit's stub, else no VMM
driver=$( (ldconfig -p 2>/dev/null | awk '/libcuda\.so/ {print $NF}'; \
           ls /usr/local/nvidia/lib64/libcuda.so* /usr/lib/x86_64-linux-gnu/libcuda.so* \
              "$toolkit"/lib64/stubs/libcuda.so "$toolkit"/lib/stubs/libcuda.so 2>/dev/null) | head -n 1)
if [ -n "$driver" ]; then
    extra="$extra -DCUDA_cuda_driver_LIBRARY=$driver"
else
    extra="$extra -DGGML_CUDA_NO_VMM=ON"
fi

generator=""
command -v ninja >/dev/null && generator="-G Ninja"
# shellcheck disable=SC2086  # $extra and $generator are lists of arguments
cmake -S "$root" -B "$build" $generator -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF \
    -DCMAKE_CUDA_ARCHITECTURES="$archs" -DCMAKE_CUDA_COMPILER="$nvcc" -DCUDAToolkit_ROOT="$toolkit" \
    -DCMAKE_INSTALL_PREFIX="$root" -DPython_EXECUTABLE="$(command -v "$PYTHON")" $extra
if [ "${1:-}" = "--configure-only" ]; then
    exit 0
fi
cmake --build "$build" -j "$(nproc 2>/dev/null || echo 4)"
cmake --install "$build" --component pyrestkv
echo "LD_LIBRARY_PATH=$libpath"

#!/bin/sh
# The device check: pyrestkv's CUDA build on a synthetic Llama-3.1-8B-shaped model, against the CPU.
#
#   sh bench/gpu/device_check.sh OUT [device_check.py options]
#
# On a GPU machine (nvidia-smi sees a GPU):
#   1. bench/gpu/run_check.sh, the standalone check of the CUDA kernels (OUT/kernel_check.txt);
#   2. the Python packages a bare machine lacks, from bench/gpu/carry/ (bench/gpu/prepare_carry.sh);
#   3. pyrestkv/lib with CUDA: bench/gpu/carry/lib if carried, else bench/gpu/build_cuda.sh;
#   4. bench/gpu/device_check.py --out OUT: the checks and the timings (OUT/device_check.json).
# On a machine without a GPU only step 4 runs, with the installed pyrestkv and both arms on the CPU
# (tests/test_device_check.py runs it so, with small sizes); PYTHON names the interpreter.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 OUT [device_check.py options]" >&2; exit 2; }
out=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
PYTHON=${PYTHON:-python3}
mkdir -p "$out"
start=$(date +%s)

gpu=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    gpu=1
    nvidia-smi -L
fi

if [ -n "$gpu" ]; then
    echo "== 1. CUDA kernels, standalone ($(($(date +%s) - start)) s)"
    sh "$here/run_check.sh" 2>&1 | tee "$out/kernel_check.txt"

    echo "== 2. Python packages ($(($(date +%s) - start)) s)"
    site=${TMPDIR:-/tmp}/pyrestkv-site
    if [ -d "$here/carry/wheels" ]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$here"/carry/wheels/*.whl
        cp -r "$here"/carry/site/* "$site/"
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi

    echo "== 3. pyrestkv/lib with CUDA ($(($(date +%s) - start)) s)"
    if [ -d "$here/carry/lib" ]; then
        rm -rf "$root/pyrestkv/lib"
        cp -a "$here/carry/lib" "$root/pyrestkv/lib"
        # the synthetic model's gguf-py and vocabulary come from the llama.cpp tree
        if [ -z "${PYRESTKV_LLAMA_SRC:-}" ] && [ -f "$here/carry/llama.cpp-src.tar.xz" ]; then
            export PYRESTKV_LLAMA_SRC=${TMPDIR:-/tmp}/pyrestkv-llama-src
            mkdir -p "$PYRESTKV_LLAMA_SRC"
            tar -xJf "$here/carry/llama.cpp-src.tar.xz" -C "$PYRESTKV_LLAMA_SRC"
        fi
    elif [ ! -e "$root/pyrestkv/lib/libggml-cuda.so" ]; then
        PYTHON=$PYTHON sh "$here/build_cuda.sh" 2>&1 | tee "$out/build_cuda.log" | tail -n 3
    fi
    ldpath=$(grep '^LD_LIBRARY_PATH=' "$out/build_cuda.log" 2>/dev/null | tail -n 1 | cut -d= -f2- || true)
    [ -n "$ldpath" ] || ldpath=$("$PYTHON" -c "import nvidia, os; print(':'.join(os.path.join(b, s, 'lib') for b in nvidia.__path__ for s in ('cu13', 'cublas', 'cuda_runtime')))" 2>/dev/null || true)
    export LD_LIBRARY_PATH="$ldpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# the tree's pyrestkv where it has its libraries (the GPU build), else the installed one
if [ -e "$root/pyrestkv/lib/libllama.so" ]; then
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "== 4. device_check.py ($(($(date +%s) - start)) s)"
status=0
PYTHONUNBUFFERED=1 "$PYTHON" "$here/device_check.py" --out "$out" "$@" || status=$?
echo "== done in $(($(date +%s) - start)) s"
exit $status

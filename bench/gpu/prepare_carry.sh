#!/bin/sh
# Stages what a bare GPU machine (Python 3.12, numpy, cmake, ninja, nvcc; no network, no pip
# packages of ours) needs for bench/gpu/device_check.sh, in bench/gpu/carry/ (git-ignored, ~10 MB):
#   llama.cpp-src.tar.xz  the llama.cpp tree of the pinned llama-cpp-python sdist, only what the build
#                         and the synthetic model need (CMake files, ggml, src, include, vendor, gguf-py,
#                         models/ggml-vocab-llama-bpe.gguf)
#   wheels/               cffi and pycparser for CPython 3.12 (pip download)
#   site/                 llama-cpp-python's Python code and diskcache, copied from this venv (pure Python)
#   lib/                  (only with --with-libs) this machine's CUDA build of pyrestkv/lib, so that the
#                         GPU machine need not build (bench/gpu/build_cuda.sh first)
#
#   PYTHON=.venv/bin/python sh bench/gpu/prepare_carry.sh [--with-libs]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
PYTHON=${PYTHON:-$root/.venv/bin/python}
carry=$here/carry
rm -rf "$carry"
mkdir -p "$carry/wheels" "$carry/site"

# the llama.cpp tree: from the pinned, checksummed sdist (cmake/llama_cpp_source.py fetches it)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" - "$root" "$tmp" <<'PYEOF'
import sys, tarfile
from pathlib import Path
root, tmp = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(root / "cmake"))
import llama_cpp_source as src
src.extract_vendor(src.fetch_sdist(), tmp / "llama.cpp")
PYEOF
(cd "$tmp/llama.cpp" && tar -cJf "$carry/llama.cpp-src.tar.xz" CMakeLists.txt cmake ggml src include vendor \
    gguf-py models/ggml-vocab-llama-bpe.gguf LICENSE licenses)

# the versions this venv runs
pins=$("$PYTHON" -c "from importlib.metadata import version as v; print(f'cffi=={v(\"cffi\")} pycparser=={v(\"pycparser\")}')")
# shellcheck disable=SC2086  # $pins is a list of requirements
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$carry/wheels" $pins

site=$("$PYTHON" -c "import llama_cpp, os; print(os.path.dirname(os.path.dirname(llama_cpp.__file__)))" 2>/dev/null ||
       "$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for pkg in llama_cpp diskcache; do
    cp -r "$site/$pkg" "$carry/site/"
done
find "$carry/site" -name __pycache__ -prune -exec rm -rf {} +

if [ "${1:-}" = "--with-libs" ]; then
    [ -e "$root/pyrestkv/lib/libggml-cuda.so" ] || { echo "prepare_carry.sh: no CUDA build in pyrestkv/lib (run bench/gpu/build_cuda.sh)" >&2; exit 1; }
    cp -a "$root/pyrestkv/lib" "$carry/lib"
fi
du -sh "$carry"

"""The CUDA implementation of GGML_OP_RESTKV_SCORE compiles (no GPU needed, only nvcc).

(a) the standalone kernels header through a tiny translation unit, for sm_80 and sm_90;
(b) the ggml glue (restkv-score.cu) against the patched llama.cpp tree, for sm_90 only: it pulls in
    ggml-cuda's common.cuh and takes a few seconds per arch on 2 cores.
The tree is build/*/llama.cpp-src (made by the package build) or $PYRESTKV_LLAMA_SRC.
"""

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "native" / "ggml" / "ggml-cuda"

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")

# ggml-cuda's vendors/cuda.h includes cublas_v2.h; a toolkit without cuBLAS gets these declarations,
# enough to compile a file that does not call cuBLAS
CUBLAS_STUB = """#pragma once
#include <cuda_runtime.h>
#include <library_types.h>
typedef enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_INITIALIZED = 1, CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7, CUBLAS_STATUS_ARCH_MISMATCH = 8, CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13, CUBLAS_STATUS_INTERNAL_ERROR = 14, CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16 } cublasStatus_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TENSOR_OP_MATH = 1, CUBLAS_TF32_TENSOR_OP_MATH = 3 } cublasMath_t;
typedef struct cublasContext * cublasHandle_t;
cublasStatus_t cublasCreate(cublasHandle_t * handle);
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode);
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream);
cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void * workspace, size_t size);
const char * cublasGetStatusString(cublasStatus_t status);
"""


def nvcc(args, cwd):
    proc = subprocess.run([NVCC, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}"


def llama_src():
    env = os.environ.get("PYRESTKV_LLAMA_SRC")
    if env:
        return Path(env)
    found = sorted(glob.glob(str(ROOT / "build" / "*" / "llama.cpp-src")))
    return Path(found[0]) if found else None


def has_cublas():
    nvcc_dir = Path(NVCC).resolve().parent
    for inc in [nvcc_dir.parent / "include", Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]:
        if (inc / "cublas_v2.h").exists():
            return True
    return False


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_header_compiles_standalone(tmp_path, arch):
    tu = tmp_path / "tu.cu"
    tu.write_text(
        '#include "restkv-score-kernels.cuh"\n'
        "void run(const restkv_score_cuda_args & a, cudaStream_t s) { restkv_score_cuda_launch(a, s); }\n"
    )
    # the header includes "../restkv-score-common.h", as in the overlaid ggml tree
    nvcc(["-O3", f"-arch={arch}", "-I", str(CUDA_DIR), "-c", str(tu), "-o", str(tmp_path / "tu.o")], tmp_path)


@pytest.mark.parametrize("arch", ["sm_90"])
def test_ggml_glue_compiles(tmp_path, arch):
    src = llama_src()
    if src is None or not (src / "ggml" / "src" / "ggml-cuda").is_dir():
        pytest.skip("no patched llama.cpp tree: build the package first (build/*/llama.cpp-src) or set PYRESTKV_LLAMA_SRC")
    glue = src / "ggml" / "src" / "ggml-cuda" / "restkv-score.cu"
    if not glue.exists():
        pytest.skip(f"{glue} is missing: the tree predates the CUDA overlay, rebuild the package")
    includes = [src / "ggml" / "include", src / "ggml" / "src", src / "ggml" / "src" / "ggml-cuda"]
    args = ["-O3", "-std=c++17", f"-arch={arch}"]
    if not has_cublas():
        (tmp_path / "stub").mkdir()
        (tmp_path / "stub" / "cublas_v2.h").write_text(CUBLAS_STUB)
        args += ["-I", str(tmp_path / "stub")]
    for inc in includes:
        args += ["-I", str(inc)]
    nvcc([*args, "-c", str(glue), "-o", str(tmp_path / "glue.o")], tmp_path)

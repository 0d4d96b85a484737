"""The Metal kernels of GGML_OP_RESTKV_SCORE compile, as far as that can be checked without a Mac.

Apple's Metal compiler does not run on Linux. What runs here instead:

(a) the exact text the Metal backend compiles at run time (kernels/restkv_score.metal with its two
    quoted includes inlined, as ggml-metal/restkv-score.cmake embeds it) is compiled as C++17 by
    g++ (or clang++) with -fsyntax-only against tests/metal_shim/metal_stdlib, a stand-in for
    <metal_stdlib> with MSL's signatures. Four times: once plain and once with each of the device,
    threadgroup and constant address spaces made volatile, so that a pointer of one space passed
    where another is expected is an error (see the shim's header comment for what that catches);
(b) deliberately broken copies of that text FAIL to compile, so (a) is shown to catch errors;
(c) every pipeline name the host asks for (restkv-score-metal.cpp) is a kernel of the source;
(d) the host C++ glue (native/ggml/ggml-metal/restkv-score-metal.cpp and, in the patched tree,
    ggml-metal-ops.cpp) compiles with -fsyntax-only against ggml's headers. The Objective-C part of
    the patch (one case of ggml_metal_device_supports_op in ggml-metal-device.m) is not compiled:
    it needs Apple's Foundation and Metal headers.

Not checked here: what only Apple's compiler knows (MSL's own rules beyond the shim, warnings it
would emit, register pressure, threadgroup memory limits), and running the kernels.
"""

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native" / "ggml"
METAL_DIR = NATIVE / "ggml-metal"
KERNEL = METAL_DIR / "kernels" / "restkv_score.metal"
SHIM_DIR = Path(__file__).resolve().parent / "metal_shim"

CXX = next((c for c in (os.environ.get("CXX"), "g++", "clang++", "c++") if c and shutil.which(c)), None)
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++, clang++ or c++) on PATH")

# the quoted includes restkv-score.cmake inlines, and the files it inlines for them
INLINED = {
    "restkv-score-metal.h": METAL_DIR / "restkv-score-metal.h",
    "restkv-score-common.h": NATIVE / "restkv-score-common.h",
}

SPACES = {0: "no address space", 1: "device", 2: "threadgroup", 3: "constant"}

WARN_FLAGS = ["-Wall", "-Wextra", "-Werror", "-Wno-attributes", "-Wno-unused-parameter"]


def flattened_source() -> str:
    """The kernel text as the Metal backend compiles it (what restkv-score.cmake embeds)."""
    src = KERNEL.read_text()
    for name, path in INLINED.items():
        line = f'#include "{name}"'
        assert line in src, f"{KERNEL.name} must include {line}"
        src = src.replace(line, path.read_text())
    return src


def compile_msl(tmp_path: Path, text: str, space: int, name: str = "restkv_score.metal"):
    path = tmp_path / name
    path.write_text(text)
    args = [CXX, "-std=c++17", "-fsyntax-only", "-x", "c++", *WARN_FLAGS, f"-DRESTKV_SHIM_SPACE={space}",
            "-I", str(SHIM_DIR), str(path)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_kernel_includes_only_what_is_inlined():
    # any other quoted include would not be found when the embedded text is compiled at run time
    quoted = re.findall(r'(?m)^\s*#\s*include\s+"([^"]+)"', KERNEL.read_text())
    assert sorted(quoted) == sorted(INLINED), quoted
    # (a quoted include in the inlined headers, under Metal, fails the shim compile: it runs in a
    # directory that has none of them)


@pytest.mark.parametrize("space", sorted(SPACES), ids=[SPACES[s] for s in sorted(SPACES)])
def test_kernel_compiles_against_shim(tmp_path, space):
    proc = compile_msl(tmp_path, flattened_source(), space)
    assert proc.returncode == 0, f"{KERNEL} ({SPACES[space]} volatile) does not compile:\n{proc.stderr}"


# (anchor in the flattened source, replacement, the address space whose pass must catch it or None
# for every pass, what the mutation is)
BROKEN = [
    ("m_run[i] = m_new;", "m_run[i] = m_new", None, "missing semicolon"),
    ("e = simd_sum(e);", "e = simd_sum(e_undeclared);", None, "undeclared identifier"),
    ("tmax = max(tmax, acc[i][j]);", "tmax = max(tmax, acc[i][j], 0.0f);", None, "wrong argument count"),
    ("tmax = max(tmax, acc[i][j]);", "tmax = max(tmax, 1);", None, "max(float, int)"),
    ("restkv_hist_topk_mean2(hist + 3*RESTKV_HIST_BINS*r, hist2 + 3*RESTKV_HIST_BINS*r, a.n_select)",
     "restkv_hist_topk_mean2(hist + 3*RESTKV_HIST_BINS*r, a.n_select)", None, "common-header call, argument missing"),
    ("const int n_front = a.n_row/2;", "const int half = a.n_row/2;", None, "a variable named half (an MSL type)"),
    ("const uint32_t bits = as_type<uint32_t>(p);", "const uint32_t bits = as_type<uint64_t>(p);", None,
     "as_type between sizes"),
    # a threadgroup pointer where the common header wants a device one
    # (hist1 then reaches restkv_hist_boundary's device parameter)
    ("device const uint32_t * hist1 = (device const uint32_t *)",
     "threadgroup const uint32_t * hist1 = (threadgroup const uint32_t *)", 2,
     "threadgroup pointer into a device parameter"),
    # a device pointer where a threadgroup one is expected
    ("threadgroup float * as = smem;", "threadgroup float * as = (device float *) A;", 1,
     "device pointer into a threadgroup variable"),
    # the kernel arguments (constant) passed by a non-constant reference
    ("static inline device float * restkv_out(constant ggml_metal_kargs_restkv_score & a,",
     "static inline device float * restkv_out(thread ggml_metal_kargs_restkv_score & a,", 3,
     "constant argument into a thread reference"),
]


@pytest.mark.parametrize("anchor,replacement,space,what", BROKEN, ids=[b[3] for b in BROKEN])
def test_broken_copy_fails(tmp_path, anchor, replacement, space, what):
    src = flattened_source()
    assert anchor in src, f"update this mutation ({what}): its anchor is no longer in the kernel"
    broken = src.replace(anchor, replacement, 1)
    spaces = [space] if space is not None else sorted(SPACES)
    for s in spaces:
        proc = compile_msl(tmp_path, broken, s, name="broken.metal")
        assert proc.returncode != 0, f"the shim compile did not catch: {what} ({SPACES[s]} volatile)"
    if space is not None and space != 0:
        # the plain pass (no space volatile) cannot see it: that is why the test compiles per space
        assert compile_msl(tmp_path, broken, 0, name="broken.metal").returncode == 0


def test_host_pipeline_names_exist():
    src = KERNEL.read_text()
    names = set(re.findall(r'\[\[host_name\("([^"]+)"\)\]\]', src))
    names |= set(re.findall(r"(?m)^kernel void (kernel_restkv_score_\w+)\(", src))
    host = (METAL_DIR / "restkv-score-metal.cpp").read_text()
    typed = re.search(r"k_passes_typed\[\] = \{([^}]*)\}", host).group(1)
    plain = re.search(r"k_passes_plain\[\] = \{([^}]*)\}", host).group(1)
    want = {f"kernel_restkv_score_{p}_{t}" for p in re.findall(r'"(\w+)"', typed) for t in ("f16", "f32")}
    want |= {f"kernel_restkv_score_{p}" for p in re.findall(r'"(\w+)"', plain)}
    assert want <= names, f"pipelines the host creates but the kernel source lacks: {sorted(want - names)}"


def ggml_tree():
    """The patched llama.cpp tree the package build makes (or $PYRESTKV_LLAMA_SRC)."""
    env = os.environ.get("PYRESTKV_LLAMA_SRC")
    cands = [Path(env)] if env else []
    cands += [Path(p) for p in sorted(glob.glob(str(ROOT / "build" / "*" / "llama.cpp-src")))]
    for c in cands:
        if (c / "ggml" / "src" / "ggml-metal" / "ggml-metal-device.h").exists():
            return c
    return None


def write_embedded_inc(tmp_path: Path) -> Path:
    # the raw string restkv-score.cmake writes
    inc = tmp_path / "restkv-score-metal-src.inc"
    inc.write_text('R"restkv_msl(' + flattened_source() + ')restkv_msl"\n')
    return tmp_path


def compile_cxx(path: Path, includes):
    args = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wno-format", "-Werror=return-type"]
    for inc in includes:
        args += ["-I", str(inc)]
    args.append(str(path))
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_host_glue_compiles(tmp_path):
    tree = ggml_tree()
    if tree is None:
        pytest.skip("no llama.cpp tree (build/*/llama.cpp-src, made by the package build, or $PYRESTKV_LLAMA_SRC)")
    gen = write_embedded_inc(tmp_path)
    # ggml-metal-device.h is upstream's own (patch 0003 leaves it alone), so any tree will do
    proc = compile_cxx(METAL_DIR / "restkv-score-metal.cpp",
                       [METAL_DIR, tree / "ggml" / "src" / "ggml-metal", tree / "ggml" / "src", tree / "ggml" / "include", gen])
    assert proc.returncode == 0, f"restkv-score-metal.cpp does not compile:\n{proc.stderr}"


def test_patched_metal_ops_compile(tmp_path):
    tree = ggml_tree()
    ops = tree / "ggml" / "src" / "ggml-metal" / "ggml-metal-ops.cpp" if tree else None
    if ops is None or "ggml_metal_restkv_score_library" not in ops.read_text():
        pytest.skip("no patched llama.cpp tree with the current patch 0003 (build the package or set PYRESTKV_LLAMA_SRC)")
    gen = write_embedded_inc(tmp_path)
    proc = compile_cxx(ops, [ops.parent, tree / "ggml" / "src", tree / "ggml" / "include", gen])
    assert proc.returncode == 0, f"{ops} does not compile:\n{proc.stderr}"

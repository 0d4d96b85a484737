"""pyrestkv: read documents longer than the KV cache with a local GGUF model.

    from pyrestkv import Llama, default_model_path
    llm = Llama(default_model_path(), kv_policy="shift", n_ctx=1024)
    llm.create_completion(document + question)
    llm.kv_stats()

    llm = Llama(default_model_path(), kv_policy=RestKVPolicy(budget=1024))  # a policy is its configuration

    doc = llm.read("report.txt")     # read once, every cell to a tier on disk (a Document)
    doc.ask("Who signed the audit?")  # each question recalls the cells it needs

Importing pyrestkv points llama-cpp-python at pyrestkv's patched libllama, so it must be imported
before llama_cpp.
"""

from ._loader import load_llama_cpp as _load_llama_cpp

_load_llama_cpp()

from ._binding import KVCacheError  # noqa: E402
from .llama import Llama  # noqa: E402
from .models import default_model_path  # noqa: E402
from .session import Document  # noqa: E402
from .tier import TierError  # noqa: E402
from .policies import (  # noqa: E402
    POLICIES, AttentionPolicy, BudgetPolicy, CacheView, ContextShiftPolicy, Eviction, FullPolicy, H2OPolicy,
    KVCacheFullError, KVPolicy, ModelInfo, RestKVPolicy, ScoredPolicy, ScoringSpec, SnapKVPolicy, StreamingPolicy,
    TOVAPolicy, TruncatePolicy,
)

__version__ = "0.1.0"

__all__ = [
    "Llama",
    "Document",
    "TierError",
    "default_model_path",
    "KVCacheError",
    "KVCacheFullError",
    "POLICIES",
    "KVPolicy",
    "FullPolicy",
    "ContextShiftPolicy",
    "BudgetPolicy",
    "StreamingPolicy",
    "TruncatePolicy",
    "ScoredPolicy",
    "RestKVPolicy",
    "AttentionPolicy",
    "SnapKVPolicy",
    "H2OPolicy",
    "TOVAPolicy",
    "CacheView",
    "Eviction",
    "ModelInfo",
    "ScoringSpec",
]

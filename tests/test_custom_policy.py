"""A policy written outside pyrestkv, as a user would: one class, defined here, that reuses the
scoring pass's attention output, passed to Llama as an instance and run on the real model."""

import numpy as np

from helpers import N_HEAD, N_LAYER, open_llama
from pyrestkv.haystack import make_document
from pyrestkv.policies import AttentionPolicy


class NewestRowMaxPool(AttentionPolicy):
    """Rank cells by the newest row's attention, max-pooled over 3 neighbouring positions."""

    name = "newest-max-pool"
    score_rows = "last"

    def accumulate(self, positions, scores):
        self.passes = getattr(self, "passes", 0) + 1
        assert scores.shape == (N_LAYER, N_HEAD, len(positions))
        # rows "last": one distribution over the cells per head
        np.testing.assert_allclose(scores.sum(axis=2), 1.0, rtol=2e-3)
        padded = np.pad(scores, ((0, 0), (0, 0), (1, 1)), mode="edge")
        return np.maximum(np.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])


def test_a_new_attention_policy_is_one_class(model_path):
    policy = NewestRowMaxPool(budget=128, window=16, sink=4)
    llm = open_llama(model_path, kv_policy=policy, n_batch=128)
    tokens = llm.tokenize(make_document(llm, 800, [], seed=13).encode())[:700]
    llm.eval(tokens)
    stats = llm.kv_stats()
    assert stats["policy"] == "newest-max-pool" and stats["n_ctx"] == 256 and stats["budget"] == 128
    # the scoring pass ran once per eviction, and every one went through the new rule
    assert stats["scoring_passes"] == stats["evictions"] == policy.passes >= (700 - 256) // 128
    positions, cached = llm.kv_cells()
    assert len(positions) == 128 and stats["cells_peak"] <= 256  # back to the budget after the last chunk
    assert stats["tokens_evicted"] == 700 - 128
    assert np.array_equal(positions[:4], np.arange(4))  # the sinks
    assert list(cached[-16:]) == tokens[-16:]  # the window
    llm.close()

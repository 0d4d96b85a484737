"""KV policies: small objects that decide which cached positions to drop.

A policy sees the cache as a `CacheView` (the cached positions in order, the cell budget) and
answers with an `Eviction` (positions to drop, and whether to renumber the rest). The `Llama`
subclass applies it through the C API and keeps the books. Policies never touch llama.cpp.

  full    keep everything; a full cache is an error (llama-cpp-python's behaviour)
  shift   llama.cpp's context shift: keep the first n_keep tokens, drop n_discard of the rest
          (default half), re-position the remainder (one K-shift)
  restkv  ReST-KV: score every cell on the cache's device (scoring pass in patches/0002), smooth
          and aggregate on the host (native/restkv_policy), keep the best kv_budget cells

Baselines, under the same budget, window, sink tokens and eviction schedule as restkv, so that a
comparison isolates the rule that rates the cells. The three that score read the averaged attention
from the same scoring pass (patches/0006), with the same pinned question rows where kv_query asks
for them, and aggregate across heads and layers as restkv does:
  snapkv     mean attention of the scoring rows, box-smoothed over 5 positions (SnapKV)
  h2o        attention of the scoring rows, accumulated over every pass a cell lived through (H2O)
  tova       attention of the newest row alone (TOVA)
  streaming  no scoring: the first kv_sink tokens and the most recent ones (StreamingLLM)
  truncate   no scoring: the first half of the budget and the most recent tokens
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from . import _binding


class KVCacheFullError(ValueError):
    """The cache has no room and the policy may not evict."""


@dataclass
class CacheView:
    positions: np.ndarray  # cached positions of the sequence, ascending
    n_ctx: int  # cells in the cache
    n_incoming: int  # tokens about to be decoded
    # runs one scoring pass: (positions [n], scores [n_layer, n_head, n], tpos [n_layer, n_head, 2]);
    # takes n_select, the cells the policy will keep outside its window (0: skip the AWS statistics)
    score: Optional[Callable] = None


@dataclass
class Eviction:
    positions: np.ndarray  # positions to remove
    compact: bool  # renumber the kept positions densely afterwards


class KVPolicy:
    name = "base"
    #: True if the policy may drop tokens, so that prompts longer than n_ctx are accepted
    evicts = True
    #: True if the policy rates cells with the scoring pass (needs the query window)
    scored = False

    def bind(self, n_ctx: int, add_bos: bool) -> None:
        """Check the policy against the context it will run in (ValueError if it cannot)."""

    def make_room(self, view: CacheView) -> Eviction | None:
        """Called when view.n_incoming tokens do not fit. May free fewer cells than asked;
        the caller then decodes what fits."""
        raise NotImplementedError

    def after_chunk(self, view: CacheView, n_decoded: int) -> Eviction | None:
        """Called after each decoded chunk; may evict."""
        return None

    def describe(self) -> dict:
        return {}


class FullPolicy(KVPolicy):
    name = "full"
    evicts = False

    def make_room(self, view: CacheView) -> Eviction | None:
        raise KVCacheFullError(
            f"the KV cache is full: {len(view.positions)} of n_ctx={view.n_ctx} cells are used and "
            f"{view.n_incoming} more tokens were given. Use a larger n_ctx, or kv_policy='shift' "
            "to read past the cache."
        )


class ContextShiftPolicy(KVPolicy):
    """llama.cpp server's context shift (tools/server/server-context.cpp, pre_decode)."""

    name = "shift"

    def __init__(self, n_keep: int = 0, n_discard: int = 0):
        if n_keep < 0:
            raise ValueError(f"n_keep must be >= 0, got {n_keep}")
        if n_discard < 0:
            raise ValueError(f"n_discard must be >= 0 (0 means half of the discardable tokens), got {n_discard}")
        self.n_keep = n_keep
        self.n_discard = n_discard
        self._n_keep_eff = n_keep

    def bind(self, n_ctx: int, add_bos: bool) -> None:
        if self.n_keep >= n_ctx:
            raise ValueError(
                f"n_keep={self.n_keep} must be smaller than n_ctx={n_ctx}: nothing would be left to discard"
            )
        # as the server does: the BOS token is kept on top of n_keep, and 4 cells stay free
        self._n_keep_eff = min(n_ctx - 4, self.n_keep + int(add_bos))

    def make_room(self, view: CacheView) -> Eviction | None:
        n_cached = len(view.positions)
        n_left = n_cached - self._n_keep_eff
        n_discard = self.n_discard if self.n_discard else n_left // 2
        n_discard = min(max(n_discard, 0), max(0, n_left - 1))
        if n_discard == 0:
            return None
        drop = view.positions[self._n_keep_eff : self._n_keep_eff + n_discard]
        return Eviction(positions=drop, compact=True)

    def describe(self) -> dict:
        return {"n_keep": self.n_keep, "n_discard": self.n_discard}


class RestKVPolicy(KVPolicy):
    """ReST-KV (ICLR 2026): keep the cells whose removal would change the layers' attention output
    the most, as seen by the recent queries (and, prompt-aware, by the prompt's tail).

    score : per layer and query head, odds * ||W_O^h (o_h - v)||, from the scoring pass on the device
    select: AWS smoothing per head (beta, kernel), mean over each KV head's query heads, summed over KV
            heads, max over layers of the per-layer rank; keep the best `budget` cells, always the
            last `window` and the first `sink` positions
    """

    name = "restkv"
    scored = True
    #: what the scoring pass returns to this policy, and how it averages its rows (patches/0006)
    score_output = "restkv"
    score_rows = "ema"
    default_kernel = 21

    def __init__(self, budget: int = 2048, window: int = 32, sink: int = 4, alpha: float = 0.3,
                 beta: float = 2000.0, kernel: Optional[int] = None, query: Union[str, list, None] = "tail",
                 positions: str = "auto", aggregate: str = "max_rank"):
        kernel = self.default_kernel if kernel is None else kernel
        for name, value, low in (("kv_budget", budget, 1), ("kv_window", window, 1), ("kv_sink", sink, 0),
                                 ("kv_kernel", kernel, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if window > 256:
            raise ValueError(f"kv_window must be <= 256, got {window}")
        if budget < window + sink:
            raise ValueError(
                f"kv_budget={budget} must be at least kv_window + kv_sink = {window + sink}: "
                "the recent window and the sink tokens are always kept"
            )
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"kv_alpha must be in (0, 1], got {alpha}")
        if not beta > 0.0:
            raise ValueError(f"kv_beta must be positive, got {beta}")
        if aggregate not in _binding.AGGREGATES:
            raise ValueError(f"kv_aggregate must be one of {sorted(_binding.AGGREGATES)}, got {aggregate!r}")
        if positions not in ("keep", "compact", "auto"):
            raise ValueError(f"kv_positions must be 'keep', 'compact' or 'auto', got {positions!r}")
        if not (query is None or query in ("tail", "none") or isinstance(query, (str, list, tuple))):
            raise ValueError(f"kv_query must be 'tail', 'none', a question text or a token list, got {query!r}")
        if isinstance(query, (list, tuple)) and not all(isinstance(t, (int, np.integer)) for t in query):
            raise ValueError("kv_query as a list must hold token ids")
        self.budget = int(budget)
        self.window = int(window)
        self.sink = int(sink)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.kernel = int(kernel)
        self.query = "none" if query is None else query
        self.positions = positions
        self.aggregate = aggregate
        self.n_head_kv = 1  # set by the Llama once the model is known

    def make_room(self, view: CacheView) -> Eviction | None:
        # generation filled the cache: back down to the budget, so scoring runs once per n_ctx - budget tokens
        return self.evict_to_budget(view)

    def after_chunk(self, view: CacheView, n_decoded: int) -> Eviction | None:
        """A prompt chunk was decoded: evict down to the budget once above it."""
        if n_decoded > 1 and len(view.positions) > self.budget:
            return self.evict_to_budget(view)
        return None

    def evict_to_budget(self, view: CacheView) -> Eviction | None:
        if len(view.positions) <= self.budget:
            return None
        pos, cell, n_lead = self.rate(view)
        protect = np.zeros(len(pos), dtype=np.uint8)
        protect[:n_lead] = 1
        protect[max(0, len(pos) - self.window):] = 1
        evict = _binding.select_evict(cell, self.budget, protect)
        self.evicted(pos, evict)
        return Eviction(positions=pos[evict], compact=self.positions == "compact")

    def rate(self, view: CacheView):
        """(positions, one score per cell (higher is kept), how many leading cells to keep always)."""
        positions = view.positions
        # the AWS offset needs the top keys' mean positions only where it can be non-zero
        span = int(positions[-1]) - int(positions[0])
        n_select = self.budget - self.window if span >= self.beta else 0
        pos, scores, tpos = view.score(n_select)
        cell, _, _ = _binding.cell_scores(scores, tpos, self.n_head_kv, self.kernel, self.beta, self.aggregate)
        return pos, cell, self.sink

    def evicted(self, positions: np.ndarray, evict: np.ndarray) -> None:
        """Told which cells an eviction removed (indices into positions)."""

    def describe(self) -> dict:
        return {
            "kv_window": self.window, "kv_sink": self.sink, "kv_alpha": self.alpha, "kv_beta": self.beta,
            "kv_kernel": self.kernel, "kv_query": self.query if isinstance(self.query, str) else "tokens",
            "kv_positions": self.positions, "kv_aggregate": self.aggregate,
        }


class AttentionPolicy(RestKVPolicy):
    """A baseline that ranks cells by the scoring rows' attention: the same pass, window, pinned
    question rows, sink tokens and cross-layer aggregation as restkv; only the rule differs."""

    scored = True
    score_output = "attention"

    def rate(self, view: CacheView):
        pos, scores, _ = view.score(0)
        scores = self.accumulate(pos, scores)
        no_aws = np.full(scores.shape[:2] + (2,), np.nan, dtype=np.float32)  # a fixed kernel: no AWS
        cell, _, _ = _binding.cell_scores(scores, no_aws, self.n_head_kv, self.kernel, self.beta, self.aggregate)
        return pos, cell, self.sink

    def accumulate(self, positions: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return scores

    def describe(self) -> dict:
        d = super().describe()
        for key in ("kv_alpha", "kv_beta"):
            d.pop(key)
        return d


class SnapKVPolicy(AttentionPolicy):
    """SnapKV: the mean attention of the window's queries (and the question's), pooled over 5 positions."""

    name = "snapkv"
    score_rows = "mean"
    default_kernel = 5


class TOVAPolicy(AttentionPolicy):
    """TOVA: the attention of the newest query (the question's last token, when it is pinned)."""

    name = "tova"
    score_rows = "last"
    default_kernel = 1


class H2OPolicy(AttentionPolicy):
    """H2O: attention accumulated over every scoring pass a cell has lived through (heavy hitters).
    The scoring pass sees the window's rows, so the sum runs over those, not over every query."""

    name = "h2o"
    score_rows = "mean"
    default_kernel = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kept_pos = np.empty(0, dtype=np.int32)
        self._kept_acc = None

    def accumulate(self, positions: np.ndarray, scores: np.ndarray) -> np.ndarray:
        k = len(self._kept_pos)
        # the cells kept last time lead this pass's cells, in order; otherwise the cache was reset,
        # renumbered or trimmed from outside, and the sums start again
        if self._kept_acc is not None and k <= len(positions) and np.array_equal(positions[:k], self._kept_pos):
            scores = scores.copy()
            scores[:, :, :k] += self._kept_acc
        self._acc = scores
        return scores

    def evicted(self, positions: np.ndarray, evict: np.ndarray) -> None:
        keep = np.ones(len(positions), dtype=bool)
        keep[evict] = False
        self._kept_pos = positions[keep]
        self._kept_acc = self._acc[:, :, keep]


class StreamingPolicy(RestKVPolicy):
    """StreamingLLM: the first kv_sink tokens (attention sinks) and the most recent ones."""

    name = "streaming"
    scored = False

    def rate(self, view: CacheView):
        pos = view.positions
        return pos, pos.astype(np.float32), self.sink

    def describe(self) -> dict:
        return {"kv_sink": self.sink, "kv_positions": self.positions}


class TruncatePolicy(StreamingPolicy):
    """Keep the head and the tail of the text: the first half of the budget and the most recent tokens."""

    name = "truncate"

    def rate(self, view: CacheView):
        pos = view.positions
        return pos, pos.astype(np.float32), max(self.sink, min(self.budget // 2, self.budget - self.window))

    def describe(self) -> dict:
        return {"kv_head": self.budget // 2, "kv_positions": self.positions}


POLICIES = {
    "full": FullPolicy, "shift": ContextShiftPolicy, "restkv": RestKVPolicy, "snapkv": SnapKVPolicy,
    "h2o": H2OPolicy, "tova": TOVAPolicy, "streaming": StreamingPolicy, "truncate": TruncatePolicy,
}
#: the policies that keep kv_budget cells (and take kv_budget, kv_window, kv_sink)
BUDGET_POLICIES = tuple(name for name, cls in POLICIES.items() if issubclass(cls, RestKVPolicy))

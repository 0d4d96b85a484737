"""KV policies: small objects that decide which cached positions to drop.

A policy sees the cache as a `CacheView` (the cached positions in order, the cell budget) and
answers with an `Eviction` (positions to drop, and whether to renumber the rest). The `Llama`
subclass applies it through the C API and keeps the books. Policies never touch llama.cpp.

  full   keep everything; a full cache is an error (llama-cpp-python's behaviour)
  shift  llama.cpp's context shift: keep the first n_keep tokens, drop n_discard of the rest
         (default half), re-position the remainder (one K-shift)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class KVCacheFullError(ValueError):
    """The cache has no room and the policy may not evict."""


@dataclass
class CacheView:
    positions: np.ndarray  # cached positions of the sequence, ascending
    n_ctx: int  # cells in the cache
    n_incoming: int  # tokens about to be decoded


@dataclass
class Eviction:
    positions: np.ndarray  # positions to remove
    compact: bool  # renumber the kept positions densely afterwards


class KVPolicy:
    name = "base"
    #: True if the policy may drop tokens, so that prompts longer than n_ctx are accepted
    evicts = True

    def bind(self, n_ctx: int, add_bos: bool) -> None:
        """Check the policy against the context it will run in (ValueError if it cannot)."""

    def make_room(self, view: CacheView) -> Eviction | None:
        """Called when view.n_incoming tokens do not fit. May free fewer cells than asked;
        the caller then decodes what fits."""
        raise NotImplementedError

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


POLICIES = {"full": FullPolicy, "shift": ContextShiftPolicy}

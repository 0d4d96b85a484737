"""KV policies: small objects that decide which cached positions to drop.

A policy is its whole configuration (a dataclass, as a kvpress press is). It sees the cache as a
`CacheView` (the cached positions in order, the cell budget, and for policies that score, one
scoring pass to run) and answers with an `Eviction` (positions to drop, and whether to renumber the
rest). The `Llama` subclass applies it through the C API and keeps the books; policies never touch
llama.cpp. What a policy needs to know of the model arrives once, in `bind(ModelInfo)`; what a
scoring policy asks of the scoring pass leaves once, as its `scoring()` spec.

  full    keep everything; a full cache is an error (llama-cpp-python's behaviour)
  shift   llama.cpp's context shift: keep the first n_keep tokens, drop n_discard of the rest
          (default half), re-position the remainder (one K-shift)
  restkv  ReST-KV: score every cell on the cache's device (the scoring pass,
          native/llama/src/llama-kv-score.cpp), smooth and aggregate on the host
          (native/restkv_policy), keep the best kv_budget cells

Baselines, under the same budget, window, sink tokens and eviction schedule as restkv, so that a
comparison isolates the rule that rates the cells. The three that score read the averaged attention
from the same scoring pass (llama_kv_set_score_output), with the same pinned question rows where kv_query asks
for them, and aggregate across heads and layers as restkv does:
  snapkv     mean attention of the scoring rows, box-smoothed over 5 positions (SnapKV)
  h2o        attention of the scoring rows, accumulated over every pass a cell lived through (H2O)
  tova       attention of the newest row alone (TOVA)
  streaming  no scoring: the first kv_sink tokens and the most recent ones (StreamingLLM)
  truncate   no scoring: the first half of the budget and the most recent tokens

The classes: KVPolicy -> FullPolicy, ContextShiftPolicy, BudgetPolicy (budget, window, sinks,
positions; the evict-to-budget schedule) -> StreamingPolicy -> TruncatePolicy, and ScoredPolicy
(the question probe, aggregation, smoothing width, scoring spec) -> RestKVPolicy, AttentionPolicy
-> SnapKVPolicy, H2OPolicy, TOVAPolicy. A new rule over the attention output is one subclass of
AttentionPolicy (its `score_rows` and, if it needs one, an `accumulate`); pass an instance as
`Llama(kv_policy=...)`, or add it to POLICIES below to give it a name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable, ClassVar, Optional, Union

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


@dataclass(frozen=True)
class ModelInfo:
    """What a policy may need of the model and context it serves (given to `bind`)."""

    n_ctx: int  # cells in the cache
    add_bos: bool = False  # the vocabulary puts a BOS token first
    n_head_kv: int = 1  # KV heads per layer (query heads come in groups over them)
    n_ctx_train: int = 2**31 - 1  # the training context: positions should stay below it


@dataclass(frozen=True)
class ScoringSpec:
    """What a scoring policy asks of the scoring pass; the Llama applies it once, at bind time."""

    window: int  # recent queries captured as scoring rows (the query window)
    output: str  # "restkv" (ReST-KV's score) or "attention" (the rows' averaged attention)
    rows: str  # how the rows are averaged: "ema", "mean" or "last" (the newest row alone)
    op: str  # how the pass runs: "auto", "fused" (one ggml op per layer) or "composed" (ordinary ops)
    alpha: float = 0.3  # EMA weight of the newest row, for rows "ema"


def _param(default, keyword: str):
    """A policy field and the Llama keyword that sets it (kv_budget -> budget)."""
    return field(default=default, metadata={"keyword": keyword})


def _check_int(keyword: str, value, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{keyword} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{keyword} must be >= {low}, got {value}")


QUERY_CHOICES = "'tail', 'none', a question text or a token list"


def check_query(query, keyword: str = "kv_query") -> Union[str, list]:
    """A question probe as policies and `Llama.kv_probe` take it: "tail" (the prompt's last window
    tokens), "none" (no probe; also None), a question text or a list of token ids."""
    if query is None:
        return "none"
    if isinstance(query, str):
        return query
    if isinstance(query, (list, tuple)):
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in query):
            raise ValueError(f"{keyword} as a list must hold token ids")
        return list(query)
    raise ValueError(f"{keyword} must be {QUERY_CHOICES}, got {query!r}")


@dataclass
class KVPolicy:
    name: ClassVar[str] = "base"
    #: True if the policy may drop tokens, so that prompts longer than n_ctx are accepted
    evicts: ClassVar[bool] = True
    #: the model this policy serves, once bound (one Llama per policy: some keep per-cache state)
    model: Optional[ModelInfo] = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def keywords(cls) -> dict:
        """The Llama keywords this policy takes, each with the field it sets."""
        return {f.metadata["keyword"]: f.name for f in fields(cls) if "keyword" in f.metadata}

    def size_context(self, n_ctx: Optional[int], n_batch: int, n_ubatch: int) -> tuple:
        """Before the model loads: the (n_ctx, n_batch, n_ubatch) to use, given the caller's (n_ctx
        None: not given, llama-cpp-python's default; 0: the model's training context). ValueError
        if the policy cannot work with them."""
        return n_ctx, n_batch, n_ubatch

    def bind(self, model: ModelInfo) -> None:
        """Check the policy against the model and context it will serve (ValueError if it cannot)."""
        if self.model is not None:
            raise ValueError(
                f"this {type(self).__name__} already serves another Llama; give each Llama its own policy "
                "(dataclasses.replace(policy) makes an unbound copy)"
            )
        self.model = model

    def scoring(self) -> Optional[ScoringSpec]:
        """What the scoring pass must provide, or None for a policy that does not score."""
        return None

    def should_compact(self, pos_next: int, n_incoming: int) -> bool:
        """Whether to renumber the cached positions before n_incoming tokens are decoded at pos_next."""
        return False

    def make_room(self, view: CacheView) -> Eviction | None:
        """Called when view.n_incoming tokens do not fit. May free fewer cells than asked;
        the caller then decodes what fits."""
        raise NotImplementedError

    def after_chunk(self, view: CacheView, n_decoded: int) -> Eviction | None:
        """Called after each decoded chunk; may evict."""
        return None

    def describe(self) -> dict:
        """The configuration, as kv_stats() reports it."""
        return {}


@dataclass
class FullPolicy(KVPolicy):
    name: ClassVar[str] = "full"
    evicts: ClassVar[bool] = False

    def make_room(self, view: CacheView) -> Eviction | None:
        raise KVCacheFullError(
            f"the KV cache is full: {len(view.positions)} of n_ctx={view.n_ctx} cells are used and "
            f"{view.n_incoming} more tokens were given. Use a larger n_ctx, or kv_policy='shift' "
            "to read past the cache."
        )


@dataclass
class ContextShiftPolicy(KVPolicy):
    """llama.cpp server's context shift (tools/server/server-context.cpp, pre_decode)."""

    name: ClassVar[str] = "shift"
    n_keep: int = _param(0, "n_keep")  # leading tokens never discarded (a BOS token is kept on top)
    n_discard: int = _param(0, "n_discard")  # tokens discarded per shift; 0: half of the discardable ones

    def __post_init__(self):
        _check_int("n_keep", self.n_keep, 0)
        if not isinstance(self.n_discard, (int, np.integer)) or isinstance(self.n_discard, bool):
            raise TypeError(f"n_discard must be an integer, got {self.n_discard!r}")
        if self.n_discard < 0:
            raise ValueError(f"n_discard must be >= 0 (0 means half of the discardable tokens), got {self.n_discard}")
        self._n_keep_eff = self.n_keep

    def _check_n_keep(self, n_ctx: int) -> None:
        if self.n_keep >= n_ctx:
            raise ValueError(
                f"n_keep={self.n_keep} must be smaller than n_ctx={n_ctx}: nothing would be left to discard"
            )

    def size_context(self, n_ctx: Optional[int], n_batch: int, n_ubatch: int) -> tuple:
        if n_ctx:  # otherwise the size is known once the model is loaded, and bind checks then
            self._check_n_keep(n_ctx)
        return n_ctx, n_batch, n_ubatch

    def bind(self, model: ModelInfo) -> None:
        self._check_n_keep(model.n_ctx)
        super().bind(model)
        # as the server does: the BOS token is kept on top of n_keep, and 4 cells stay free
        self._n_keep_eff = min(model.n_ctx - 4, self.n_keep + int(model.add_bos))

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


POSITIONS = ("keep", "compact", "auto")


@dataclass
class BudgetPolicy(KVPolicy):
    """Keeps `budget` cells: after each prefill chunk once above it, and during generation once the
    cache is full, it evicts back down to the budget the cells `rate` rates lowest, never the last
    `window` positions nor the leading ones `rate` protects (the `sink` tokens)."""

    budget: int = _param(2048, "kv_budget")  # cells kept after each eviction
    window: int = _param(32, "kv_window")  # recent tokens always kept (and, scoring, the recent queries)
    sink: int = _param(4, "kv_sink")  # first tokens always kept
    # "keep" the original positions, "compact" after each eviction, or "auto": keep them until the
    # next one would pass the model's training context, then compact
    positions: str = _param("auto", "kv_positions")

    def __post_init__(self):
        for keyword, value, low in (("kv_budget", self.budget, 1), ("kv_window", self.window, 1),
                                    ("kv_sink", self.sink, 0)):
            _check_int(keyword, value, low)
        if self.window > 256:
            raise ValueError(f"kv_window must be <= 256, got {self.window}")
        if self.budget < self.window + self.sink:
            raise ValueError(
                f"kv_budget={self.budget} must be at least kv_window + kv_sink = {self.window + self.sink}: "
                "the recent window and the sink tokens are always kept"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"kv_positions must be 'keep', 'compact' or 'auto', got {self.positions!r}")
        self.budget, self.window, self.sink = int(self.budget), int(self.window), int(self.sink)

    def size_context(self, n_ctx: Optional[int], n_batch: int, n_ubatch: int) -> tuple:
        """n_ctx = kv_budget + one prefill chunk: the cache never holds more than that."""
        n_ubatch = min(n_ubatch, n_batch)
        if self.window > n_ubatch:
            raise ValueError(
                f"kv_window={self.window} is larger than n_ubatch={n_ubatch}: the window holds the last "
                "queries of one micro-batch. Use a smaller kv_window or a larger n_ubatch."
            )
        if not n_ctx:
            return self.budget + n_batch, n_batch, n_ubatch
        if n_ctx < self.budget + self.window:
            raise ValueError(
                f"n_ctx={n_ctx} leaves no room to read past kv_budget={self.budget}: it needs at "
                f"least kv_budget + kv_window = {self.budget + self.window} cells (default: kv_budget + n_batch)"
            )
        # a prefill chunk must fit beside the budget (it still holds the window: n_ctx >= budget + window)
        n_batch = min(n_batch, n_ctx - self.budget)
        return n_ctx, n_batch, min(n_ubatch, n_batch)

    def should_compact(self, pos_next: int, n_incoming: int) -> bool:
        return self.positions == "auto" and pos_next + n_incoming > self.model.n_ctx_train

    def make_room(self, view: CacheView) -> Eviction | None:
        # generation filled the cache: back down to the budget, so that eviction runs once per
        # n_ctx - budget tokens
        return self.evict_to_budget(view)

    def after_chunk(self, view: CacheView, n_decoded: int) -> Eviction | None:
        """A prompt chunk was decoded: evict down to the budget once above it."""
        if n_decoded > 1 and len(view.positions) > self.budget:
            return self.evict_to_budget(view)
        return None

    def evict_to_budget(self, view: CacheView) -> Eviction | None:
        if len(view.positions) <= self.budget:
            return None
        pos, evict = self.choose(view, self.budget)
        self.evicted(pos, evict)
        return Eviction(positions=pos[evict], compact=self.positions == "compact")

    def choose(self, view: CacheView, n_keep: int) -> tuple:
        """(positions, indices of the cells to evict so that n_keep remain): the lowest rated, never
        the leading ones `rate` protects nor the last `window`. A document session recalls with it."""
        pos, cell, n_lead = self.rate(view)
        protect = np.zeros(len(pos), dtype=np.uint8)
        protect[:n_lead] = 1
        protect[max(0, len(pos) - self.window):] = 1
        return pos, _binding.select_evict(cell, n_keep, protect)

    def rate(self, view: CacheView):
        """(positions, one score per cell (higher is kept), how many leading cells to keep always)."""
        raise NotImplementedError

    def evicted(self, positions: np.ndarray, evict: np.ndarray) -> None:
        """Told which cells an eviction removed (indices into positions)."""


@dataclass
class StreamingPolicy(BudgetPolicy):
    """StreamingLLM: the first kv_sink tokens (attention sinks) and the most recent ones."""

    name: ClassVar[str] = "streaming"

    def rate(self, view: CacheView):
        pos = view.positions
        return pos, pos.astype(np.float32), self.sink

    def describe(self) -> dict:
        return {"kv_sink": self.sink, "kv_positions": self.positions}


@dataclass
class TruncatePolicy(StreamingPolicy):
    """Keep the head and the tail of the text: the first half of the budget and the most recent tokens."""

    name: ClassVar[str] = "truncate"

    def rate(self, view: CacheView):
        pos = view.positions
        return pos, pos.astype(np.float32), max(self.sink, min(self.budget // 2, self.budget - self.window))

    def describe(self) -> dict:
        return {"kv_head": self.budget // 2, "kv_positions": self.positions}


@dataclass
class ScoredPolicy(BudgetPolicy):
    """A budget policy that rates cells with the scoring pass: per layer and query head, a score per
    cell (what `score_output` and `score_rows` ask for), smoothed over neighbouring positions,
    averaged over each KV head's query heads, summed over KV heads, then aggregated over layers."""

    #: what the scoring pass returns to this policy, and how it averages its rows
    score_output: ClassVar[str] = "restkv"
    score_rows: ClassVar[str] = "ema"

    # the question probe: "tail" scores with the prompt's last `window` tokens as if asked at the end
    # of the cache (prompt-aware), "none" with the recent queries only, or a question text or tokens
    query: Union[str, list, None] = _param("tail", "kv_query")
    # one score per cell across layers: "max_rank" (max over layers of the per-layer rank) or "mean"
    aggregate: str = _param("max_rank", "kv_aggregate")
    # width of the box smoothing over neighbouring positions (ReST-KV's minimum AWS width, SnapKV's pooling)
    smoothing_width: int = _param(1, "kv_kernel")
    # how the scoring pass runs: "auto" (the fused op where the cache's device has it), "fused", "composed"
    scoring_op: str = _param("auto", "kv_score_kernel")

    def __post_init__(self):
        super().__post_init__()
        _check_int("kv_kernel (smoothing_width)", self.smoothing_width, 1)
        self.smoothing_width = int(self.smoothing_width)
        if self.aggregate not in _binding.AGGREGATES:
            raise ValueError(f"kv_aggregate must be one of {sorted(_binding.AGGREGATES)}, got {self.aggregate!r}")
        if self.scoring_op not in _binding.SCORE_KERNELS:
            raise ValueError(
                f"kv_score_kernel (scoring_op) must be one of {sorted(_binding.SCORE_KERNELS)}, got {self.scoring_op!r}"
            )
        self.query = check_query(self.query)

    def scoring(self) -> ScoringSpec:
        return ScoringSpec(window=self.window, output=self.score_output, rows=self.score_rows, op=self.scoring_op)

    def cell_scores(self, scores: np.ndarray, tpos: np.ndarray, beta: float = 2000.0) -> np.ndarray:
        """One score per cell from the pass's per-head scores (tpos NaN: a fixed smoothing width)."""
        cell, _, _ = _binding.cell_scores(scores, tpos, self.model.n_head_kv, self.smoothing_width, beta,
                                          self.aggregate)
        return cell

    def describe(self) -> dict:
        return {
            "kv_window": self.window, "kv_sink": self.sink, "kv_kernel": self.smoothing_width,
            "kv_query": self.query if isinstance(self.query, str) else "tokens",
            "kv_positions": self.positions, "kv_aggregate": self.aggregate,
        }


@dataclass
class RestKVPolicy(ScoredPolicy):
    """ReST-KV (ICLR 2026): keep the cells whose removal would change the layers' attention output
    the most, as seen by the recent queries (and, prompt-aware, by the prompt's tail).

    score : per layer and query head, odds * ||W_O^h (o_h - v)||, from the scoring pass on the device
    select: AWS smoothing per head (beta, smoothing_width), mean over each KV head's query heads,
            summed over KV heads, max over layers of the per-layer rank; keep the best `budget`
            cells, always the last `window` and the first `sink` positions
    """

    name: ClassVar[str] = "restkv"
    smoothing_width: int = _param(21, "kv_kernel")
    alpha: float = _param(0.3, "kv_alpha")  # EMA weight of the newest query
    beta: float = _param(2000.0, "kv_beta")  # scale of the adaptive smoothing window (AWS)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"kv_alpha must be in (0, 1], got {self.alpha}")
        if not self.beta > 0.0:
            raise ValueError(f"kv_beta must be positive, got {self.beta}")
        self.alpha, self.beta = float(self.alpha), float(self.beta)

    def scoring(self) -> ScoringSpec:
        return replace(super().scoring(), alpha=self.alpha)

    def rate(self, view: CacheView):
        positions = view.positions
        # the AWS offset needs the top keys' mean positions only where it can be non-zero
        span = int(positions[-1]) - int(positions[0])
        n_select = self.budget - self.window if span >= self.beta else 0
        pos, scores, tpos = view.score(n_select)
        return pos, self.cell_scores(scores, tpos, self.beta), self.sink

    def describe(self) -> dict:
        return {**super().describe(), "kv_alpha": self.alpha, "kv_beta": self.beta}


@dataclass
class AttentionPolicy(ScoredPolicy):
    """A baseline that ranks cells by the scoring rows' attention: the same pass, window, pinned
    question rows, sink tokens and cross-layer aggregation as restkv; only the rule differs.
    A subclass picks `score_rows` ("mean", "last", or "ema" at weight 0.3), its `smoothing_width`
    default, and may `accumulate` scores across passes."""

    score_output: ClassVar[str] = "attention"

    def rate(self, view: CacheView):
        pos, scores, _ = view.score(0)
        scores = self.accumulate(pos, scores)
        no_aws = np.full(scores.shape[:2] + (2,), np.nan, dtype=np.float32)  # a fixed width: no AWS
        return pos, self.cell_scores(scores, no_aws), self.sink

    def accumulate(self, positions: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """This pass's per-head scores [n_layer, n_head, n] -> the ones to rank by."""
        return scores


@dataclass
class SnapKVPolicy(AttentionPolicy):
    """SnapKV: the mean attention of the window's queries (and the question's), pooled over 5 positions."""

    name: ClassVar[str] = "snapkv"
    score_rows: ClassVar[str] = "mean"
    smoothing_width: int = _param(5, "kv_kernel")


@dataclass
class TOVAPolicy(AttentionPolicy):
    """TOVA: the attention of the newest query (the question's last token, when it is pinned)."""

    name: ClassVar[str] = "tova"
    score_rows: ClassVar[str] = "last"


@dataclass
class H2OPolicy(AttentionPolicy):
    """H2O: attention accumulated over every scoring pass a cell has lived through (heavy hitters).
    The scoring pass sees the window's rows, so the sum runs over those, not over every query."""

    name: ClassVar[str] = "h2o"
    score_rows: ClassVar[str] = "mean"

    def __post_init__(self):
        super().__post_init__()
        self._kept_pos = np.empty(0, dtype=np.int32)
        self._kept_acc = None
        self._acc = None

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


#: the policies by name; every list of choices (CLI, qa, bench) is derived from it
POLICIES = {cls.name: cls for cls in (
    FullPolicy, ContextShiftPolicy, RestKVPolicy, SnapKVPolicy, H2OPolicy, TOVAPolicy, StreamingPolicy, TruncatePolicy,
)}
#: the policies that keep kv_budget cells (and take kv_budget, kv_window, kv_sink)
BUDGET_POLICIES = tuple(name for name, cls in POLICIES.items() if issubclass(cls, BudgetPolicy))
#: the policies that rate cells with the scoring pass (and take kv_query)
SCORED_POLICIES = tuple(name for name, cls in POLICIES.items() if issubclass(cls, ScoredPolicy))
#: every Llama keyword that configures a registered policy
POLICY_KEYWORDS = tuple(dict.fromkeys(kw for cls in POLICIES.values() for kw in cls.keywords()))


def make_policy(kv_policy: Union[str, KVPolicy] = "full", **keywords) -> KVPolicy:
    """A policy from a registry name and the Llama keywords the caller passed (kv_budget=..., n_keep=...),
    or the given instance itself, which carries its whole configuration. A keyword the policy does not
    take is an error; kv_kernel=None means the policy's default."""
    if isinstance(kv_policy, KVPolicy):
        if keywords:
            cls = type(kv_policy).__name__
            raise ValueError(
                f"kv_policy is a {cls} instance, which is its whole configuration: give "
                f"{', '.join(sorted(keywords))} to {cls}(...) itself, or pass the policy by name"
            )
        if kv_policy.model is not None:
            kv_policy.bind(kv_policy.model)  # raises: it serves another Llama already
        return kv_policy
    if isinstance(kv_policy, type) and issubclass(kv_policy, KVPolicy):
        raise TypeError(f"kv_policy takes a policy instance, e.g. {kv_policy.__name__}(), not the class")
    if not isinstance(kv_policy, str) or kv_policy not in POLICIES:
        raise ValueError(
            f"unknown kv_policy {kv_policy!r}; choose one of {sorted(POLICIES)}, or pass a KVPolicy instance"
        )
    cls = POLICIES[kv_policy]
    accepted = cls.keywords()
    rejected = [kw for kw in keywords if kw not in accepted]
    if rejected:
        takes = ", ".join(accepted) if accepted else "no policy parameters"
        raise ValueError(f"kv_policy={kv_policy!r} does not take {', '.join(rejected)}; it takes {takes}")
    return cls(**{accepted[kw]: v for kw, v in keywords.items() if not (kw == "kv_kernel" and v is None)})

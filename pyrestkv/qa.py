"""Long-document question answering: the prompt, the question-aware read, the answer.

`Llama.ask` (and `pyrestkv ask`) read a document of any length under the Llama's kv_budget, with
eviction guided by the question, then answer. The defaults were measured on the NIAH grid
(`bench/niah.py --layout ... --queries ...`; the numbers are in README.md, "Choosing ask()'s defaults"):

  layout            where the question goes: "after" the document (default), "before" it, or "both"
  question_queries  which queries the scoring pass is given as pinned rows while the document is
                    read: "tail" (the prompt's last kv_window tokens: the end of the question with
                    the chat template's assistant header; default), "question" (the question alone),
                    or "none" (question-blind). Either probe is decoded once right after the cache,
                    then re-rotated to the cache's end at every pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional, Union

from .documents import read_document  # noqa: F401  (part of this module's API)
from .policies import BudgetPolicy

QA_INSTRUCTION = "Read the document below, then answer the question."
#: where the question goes relative to the document (the first is the default)
LAYOUTS = ("after", "before", "both")
#: which queries score the cache while the document is read (the first is the default)
QUESTION_QUERIES = ("tail", "question", "none")
#: the smallest budget resolve_budget() gives: twice the default recent window (64), so that beside
#: the window and the sink tokens (36 cells, always kept) the policy still chooses 28 cells
MIN_BUDGET = 2 * BudgetPolicy.window


@dataclass
class AskResult:
    answer: str
    kv_stats: dict = field(repr=False)
    tokens_read: int = 0  # tokens decoded by this call: the prompt (less a reused prefix) and the answer
    answer_tokens: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return self.answer


def qa_messages(document: str, question: str, layout: str = "after") -> list:
    """Chat messages for document QA in the given layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    doc = f"Document:\n{document.strip()}"
    q = f"Question: {question.strip()}"
    parts = {
        "after": [QA_INSTRUCTION, doc, q],
        "before": [QA_INSTRUCTION, q, doc, "Answer the question above."],
        "both": [QA_INSTRUCTION, q, doc, q],
    }[layout]
    return [{"role": "user", "content": "\n\n".join(parts)}]


def is_fraction(budget: str) -> bool:
    """Whether a budget given as text is a fraction of the document ("1/8", "0.125"), not a token count."""
    return "/" in budget or "." in budget


def resolve_budget(budget: Union[int, float, str], n_doc_tokens: int) -> int:
    """kv_budget in cells from a token count (int >= 1) or a fraction of the document (a float in
    (0, 1), or a string such as "1/8" or "0.125"), never below MIN_BUDGET."""
    if isinstance(budget, bool):
        raise TypeError(f"budget must be a token count or a fraction, got {budget!r}")
    if isinstance(budget, str):
        text = budget.strip()
        try:
            value = Fraction(text) if is_fraction(text) else int(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"budget must be a token count (1024) or a fraction of the document (1/8, 0.125), got {budget!r}") from None
        budget = value
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        return max(MIN_BUDGET, budget)
    frac = float(budget)
    if not 0.0 < frac < 1.0:
        raise ValueError(f"a budget given as a fraction of the document must lie in (0, 1), got {budget}")
    return max(MIN_BUDGET, int(round(frac * n_doc_tokens)))


def collect_answer(chunks, emit: Callable[[str], None], chat: bool) -> None:
    """Pass each piece of a streamed answer (llama_cpp's chat completion or completion chunks) to
    emit. A base model (chat False) goes on to invent the next question: its answer ends at the
    first blank line after it began (not at the line breaks it may start with)."""
    pieces = []
    for chunk in chunks:
        choice = chunk["choices"][0]
        piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
        if not piece:
            continue
        if not chat:
            so_far = "".join(pieces).lstrip()
            answer = (so_far + piece) if so_far else piece.lstrip()
            cut = min((i for i in (answer.find("\n\n"), answer.find("\nQuestion:")) if i >= 0), default=-1)
            if cut >= 0:
                if answer[len(so_far):cut]:
                    pieces.append(answer[len(so_far):cut])
                    emit(pieces[-1])
                chunks.close()
                return
        pieces.append(piece)
        emit(piece)


def check_answer_args(question, max_tokens, stream) -> None:
    """What ask() and Document.ask() both refuse: an empty question, a bad max_tokens or stream."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if stream is not None and not callable(stream):
        raise TypeError("stream must be a callable that takes each piece of the answer, or None")


class AnswerCollector:
    """The answer's pieces as they stream (passed on to stream, if given), then the AskResult."""

    def __init__(self, llm, stream: Optional[Callable[[str], None]]):
        self.llm, self.stream, self.pieces = llm, stream, []
        self.t0 = time.perf_counter()
        self.seen0 = llm.kv_stats()["tokens_seen"]

    def emit(self, piece: str) -> None:
        self.pieces.append(piece)
        if self.stream is not None:
            self.stream(piece)

    def result(self, extra_stats: Optional[dict] = None) -> AskResult:
        # the answer's time, taken first and rounded down: never more than the caller waited
        seconds = math.floor((time.perf_counter() - self.t0) * 1e3) / 1e3
        stats = {**self.llm.kv_stats(), **(extra_stats or {})}
        answer = "".join(self.pieces).strip()
        n_answer = len(self.llm.tokenize(answer.encode(), add_bos=False, special=False)) if answer else 0
        return AskResult(answer=answer, kv_stats=stats, tokens_read=stats["tokens_seen"] - self.seen0,
                         answer_tokens=n_answer, seconds=seconds)


def ask(llm, document=None, question: Optional[str] = None, *, text: Optional[str] = None, path=None,
        max_tokens: int = 128, layout: str = "after", question_queries: str = "tail",
        stream: Optional[Callable[[str], None]] = None, temperature: float = 0.0) -> AskResult:
    """See Llama.ask."""
    if question is None:
        raise TypeError("ask() needs a question: ask(document, question), or ask(text=..., question=...)")
    check_answer_args(question, max_tokens, stream)
    text = read_document(document, text=text, path=path)
    if not text.strip():
        raise ValueError("the document is empty")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if question_queries not in QUESTION_QUERIES:
        raise ValueError(f"question_queries must be one of {QUESTION_QUERIES}, got {question_queries!r}")

    # the probe guides this call's eviction only; the policy's own kv_query stays as it is
    probe = {"question": question.strip(), "tail": "tail", "none": "none"}[question_queries]
    answer = AnswerCollector(llm, stream)
    with llm.kv_probe(probe):
        messages = qa_messages(text, question, layout)
        if llm.metadata.get("tokenizer.chat_template"):
            chunks = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature,
                                                stream=True)
            collect_answer(chunks, answer.emit, chat=True)
        else:  # a base model: plain text, the answer after "Answer:"
            prompt = messages[0]["content"] + "\n\nAnswer:"
            chunks = llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, stream=True)
            collect_answer(chunks, answer.emit, chat=False)
    return answer.result()

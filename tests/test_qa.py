"""`Llama.ask` and pyrestkv.qa on the real model: the answer, the question probe, the stats, the
prompt layouts and budgets as fractions of the document."""

import textwrap
import time

import pytest

from helpers import open_llama
from test_documents import write_pdf
from pyrestkv.haystack import make_document
from pyrestkv.policies import BudgetPolicy
from pyrestkv.qa import MIN_BUDGET, qa_messages, read_document, resolve_budget

MARIGOLD = "Important note: the rescue ship was called the Marigold."


def test_ask_answers_and_returns_stats(model_path, tmp_path):
    # question-blind as built; ask() makes it question-aware for its call only
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256, kv_query="none")
    doc = make_document(llm, 1500, [(0.4, MARIGOLD)], seed=5)
    pieces = []
    t0 = time.perf_counter()
    result = llm.ask(doc, "What was the rescue ship called?", max_tokens=16, stream=pieces.append,
                     question_queries="question")
    wall = time.perf_counter() - t0
    assert "Marigold" in result.answer
    assert "".join(pieces).strip() == result.answer
    stats = result.kv_stats
    assert stats["policy"] == "restkv" and stats["evictions"] > 0 and stats["probe_tokens"] > 0
    assert result.tokens_read > 1500 and result.answer_tokens > 0
    # the call's own time: at least its scoring passes, at most what the caller waited
    assert stats["scoring_ms"] / 1e3 <= result.seconds <= wall
    # the probe was this call's: the policy's own query is untouched, and is in force again
    assert llm.kv_policy.query == "none" and stats["kv_query"] == "none" and llm._probe_override is None
    # the same document from a file, question-blind this time
    path = tmp_path / "doc.txt"
    path.write_text(doc)
    result = llm.ask(str(path), "What was the rescue ship called?", max_tokens=16, question_queries="none")
    # the leading tokens still cached where they were first read are reused, the rest read again
    assert 1000 < result.tokens_read < 1500 + 50 and result.kv_stats["probe_tokens"] == stats["probe_tokens"]
    llm.close()


def test_ask_rejects_bad_input(model_path, tmp_path):
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256)
    with pytest.raises(ValueError, match="document is empty"):
        llm.ask("   ", "q?")
    with pytest.raises(ValueError, match="question is empty"):
        llm.ask("some text", " ")
    with pytest.raises(ValueError, match="layout"):
        llm.ask("some text", "q?", layout="middle")
    with pytest.raises(ValueError, match="question_queries"):
        llm.ask("some text", "q?", question_queries="all")
    with pytest.raises(ValueError, match="max_tokens"):
        llm.ask("some text", "q?", max_tokens=0)
    with pytest.raises(TypeError, match="stream"):
        llm.ask("some text", "q?", stream=True)
    with pytest.raises(ValueError, match="not a directory"):
        read_document(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_document(tmp_path / "missing.txt")
    # a mistyped path is not a document: nothing is read, the error says how to pass text
    with pytest.raises(FileNotFoundError, match="'report.txt' names no file.*text="):
        llm.ask("report.txt", "What was the revenue?")
    with pytest.raises(FileNotFoundError, match="document not found"):
        llm.ask(path=tmp_path / "missing.pdf", question="q?")
    with pytest.raises(TypeError, match="give the document once"):
        llm.ask("some text", "q?", text="other text")
    with pytest.raises(TypeError, match="needs a question"):
        llm.ask(text="some text")
    assert llm.kv_stats()["tokens_seen"] == 0
    llm.close()


def test_ask_text_and_path_explicitly(model_path, tmp_path, monkeypatch):
    """text= reads a string that looks like a path as text; a PDF is read through path=, a Path or its name."""
    monkeypatch.chdir(tmp_path)
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256)
    doc = make_document(llm, 400, [(0.5, MARIGOLD)], seed=11)
    pdf = write_pdf(tmp_path / "log.pdf", textwrap.wrap(doc, 90))
    answers = [llm.ask(document, "What was the rescue ship called?", max_tokens=16).answer
               for document in ("log.pdf", pdf)]
    answers.append(llm.ask(path="log.pdf", question="What was the rescue ship called?", max_tokens=16).answer)
    assert all("Marigold" in answer for answer in answers), answers
    # said to be text, a file name is read as the document (and there is no such file)
    assert llm.ask(text="report.txt", question="What is the document?", max_tokens=4).tokens_read > 0
    llm.close()


def test_prompt_layouts_and_budgets():
    after, before, both = (qa_messages("DOC", "Q?", layout)[0]["content"] for layout in ("after", "before", "both"))
    assert after.index("DOC") < after.index("Q?")
    assert before.index("Q?") < before.index("DOC")
    assert both.count("Q?") == 2
    assert resolve_budget(1024, 8000) == 1024
    assert resolve_budget("1/8", 8000) == 1000
    assert resolve_budget(0.125, 8000) == 1000
    assert resolve_budget("1/8", 100) == 64 == MIN_BUDGET  # never below the window and sink tokens
    assert MIN_BUDGET > BudgetPolicy.window + BudgetPolicy.sink
    for bad in ("0", "1/0", "abc", 1.5, 0.0, -3):
        with pytest.raises(ValueError):
            resolve_budget(bad, 8000)


def test_kv_probe_is_explicit_and_scoped(model_path):
    """kv_probe overrides the policy's kv_query for its block only, and checks its argument."""
    llm = open_llama(model_path, kv_policy="restkv", kv_budget=256, n_batch=256)  # kv_query "tail"
    tokens = llm.tokenize(make_document(llm, 800, [], seed=6).encode())[:700]
    with llm.kv_probe("none"):
        llm.eval(tokens)
    assert llm.kv_stats()["probe_tokens"] == 0 and llm.kv_stats()["scoring_passes"] > 0
    llm.reset()
    with llm.kv_probe("What is the name of the ship?"):
        llm.eval(tokens)
    n_question = len(llm.tokenize(b"What is the name of the ship?", add_bos=False, special=True))
    assert llm.kv_stats()["probe_tokens"] == n_question
    llm.reset()
    llm.eval(tokens)  # outside the block: the policy's "tail", kv_window tokens
    assert llm.kv_stats()["probe_tokens"] == n_question + 32
    with pytest.raises(ValueError, match="kv_probe's query must be 'tail', 'none', a question text or a token list"):
        with llm.kv_probe(7):
            pass
    assert llm.kv_policy.query == "tail"
    llm.close()

"""`pyrestkv ask`, the main job, on a short document."""

import html
import subprocess
import sys

import pytest

from pyrestkv.cli import main
from pyrestkv.haystack import make_document
from test_documents import write_pdf


def test_ask_answers_from_a_document(tmp_path, capsys):
    import pyrestkv

    llm = pyrestkv.Llama(pyrestkv.default_model_path(), n_ctx=512, verbose=False)
    doc = make_document(llm, 900, [(0.4, "Important note: the rescue ship was called the Marigold.")], seed=5)
    llm.close()
    path = tmp_path / "doc.txt"
    path.write_text(doc)
    # --n-ctx reaches restkv too (its default would be kv_budget + n_batch = 512)
    assert main(["ask", "--doc", str(path), "--kv-budget", "256", "--n-batch", "256", "--n-ctx", "768",
                 "--max-tokens", "24", "What was the rescue ship called?"]) == 0
    out, err = capsys.readouterr()
    assert "Marigold" in out
    assert "[kv]          policy: restkv" in err and "scoring_passes" in err
    assert "[kv]           n_ctx: 768" in err and "[kv]          budget: 256" in err


def test_ask_reads_an_html_page(tmp_path, capsys):
    import pyrestkv

    llm = pyrestkv.Llama(pyrestkv.default_model_path(), n_ctx=512, verbose=False)
    doc = make_document(llm, 400, [(0.5, "Important note: the rescue ship was called the Marigold.")], seed=3)
    llm.close()
    page = tmp_path / "log.html"
    page.write_text(f"<html><head><script>var ship = 'Titanic';</script></head><body><p>{html.escape(doc)}</p></body></html>")
    assert main(["ask", "--doc", str(page), "--kv-budget", "256", "--n-batch", "256", "--max-tokens", "16",
                 "What was the rescue ship called?"]) == 0
    out, err = capsys.readouterr()
    assert "Marigold" in out and "[kv]          policy: restkv" in err


def test_ask_names_the_missing_extra(tmp_path, monkeypatch):
    pdf = write_pdf(tmp_path / "report.pdf", ["The revenue was 12 million."])
    monkeypatch.setitem(sys.modules, "pypdf", None)
    with pytest.raises(SystemExit, match=r'reading report.pdf needs pypdf.*pip install "pyrestkv\[pdf\]"'):
        main(["ask", "--doc", str(pdf), "What was the revenue?"])


def test_ask_checks_n_ctx_against_the_budget(tmp_path):
    # a cache too small for the budget is refused with the Llama's message, before the model loads
    path = tmp_path / "doc.txt"
    path.write_text("Some text. " * 50)
    with pytest.raises(SystemExit, match="n_ctx=280 leaves no room to read past kv_budget=256"):
        main(["ask", "--doc", str(path), "--kv-budget", "256", "--n-ctx", "280", "q?"])


def test_policy_choices_come_from_the_registry(capsys):
    from pyrestkv.policies import POLICIES

    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(POLICIES) + "}" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--doc", "/nonexistent.txt", "q"], "document not found"),
        (["--doc", "{dir}", "q"], "must be a text, Markdown, PDF or HTML file"),
        (["--doc", "{empty}", "q"], "is empty"),
        (["--doc", "{scan}", "q"], "no text could be extracted from scan.pdf; is it a scan?"),
        (["--doc", "{empty}", "--kv-budget", "0", "q"], "must be a positive integer"),
        (["--doc", "{empty}", "--kv-policy", "lru", "q"], "invalid choice"),
    ],
)
def test_ask_rejects_bad_input(tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    scan = write_pdf(tmp_path / "scan.pdf", [])
    args = [a.format(dir=tmp_path, empty=empty, scan=scan) for a in args]
    proc = subprocess.run([sys.executable, "-m", "pyrestkv.cli", "ask", *args], capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in proc.stderr

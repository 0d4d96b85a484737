"""pyrestkv.documents without the model: text or path, the formats (PDF, HTML) and their errors."""

import sys
from pathlib import Path

import pytest

from pyrestkv.documents import MissingExtraError, looks_like_path, read_document


def write_pdf(path: Path, lines) -> Path:
    """A one-page PDF whose content stream draws `lines` of Helvetica text (none: a page with only
    a filled rectangle, like a scan without a text layer), with a correct xref table."""
    if lines:
        escaped = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in lines]
        content = "BT /F1 12 Tf 72 720 Td " + " 0 -16 Td ".join(f"({line}) Tj" for line in escaped) + " ET"
    else:
        content = "0.5 g 72 72 468 648 re f"
    stream = content.encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


HTML = """<!DOCTYPE html>
<html><head><title>Station log</title>
<style>body { color: red; } .secret { display: none }</style>
<script>var code = "9999"; document.write("tracking pixel");</script>
</head><body>
<h1>Cargo doors</h1>
<p>The access code of the east cargo door is <b>7318</b>.</p>
<ul><li>West door: closed</li><li>North door: open</li></ul>
<noscript>Enable JavaScript</noscript>
</body></html>
"""


@pytest.mark.parametrize("text", [
    "The cat sat on the mat.",                  # a sentence: a period, then nothing
    "The cat sat on the mat. Then it slept",   # a period followed by a word is no suffix
    "Version 2.0 of the report",
    "cats and/or dogs are welcome",            # a slash between words
    "first line\nsecond line with a/slash and report.txt",  # more than one line
])
def test_strings_that_are_text(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path(text)
    assert read_document(text) == text


@pytest.mark.parametrize("name", ["report.txt", "notes/a", "My Notes.md", "/data/my report", "paper.PDF", "page.htm"])
def test_a_missing_path_is_not_a_document(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(name)
    with pytest.raises(FileNotFoundError, match="document not found: .* names no file.*pass it as text="):
        read_document(name)
    assert read_document(text=name) == name  # said explicitly, it is text
    with pytest.raises(FileNotFoundError, match="document not found"):
        read_document(path=name)


def test_text_or_path_explicitly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a").write_text("the lease was signed by Ada")
    (tmp_path / "The cat sat on the mat.").write_text("a file with a sentence for a name")
    assert read_document("notes/a") == "the lease was signed by Ada"   # an existing file is read
    assert read_document(Path("notes/a")) == "the lease was signed by Ada"
    assert read_document(path="notes/a") == "the lease was signed by Ada"
    assert read_document(text="notes/a") == "notes/a"
    # an existing file wins over text, unless text= says otherwise
    assert read_document("The cat sat on the mat.") == "a file with a sentence for a name"
    assert read_document(text="The cat sat on the mat.") == "The cat sat on the mat."
    with pytest.raises(TypeError, match="give the document once"):
        read_document("x", text="y")
    with pytest.raises(TypeError, match="give the document once"):
        read_document()
    with pytest.raises(TypeError, match="text must be a str"):
        read_document(text=Path("notes/a"))
    with pytest.raises(TypeError, match="document must be text or a path"):
        read_document(42)
    with pytest.raises(ValueError, match="not a directory"):
        read_document(path=tmp_path)


def test_pdf_text_is_extracted(tmp_path):
    pdf = write_pdf(tmp_path / "log.pdf", ["Station log, day 12 (evening).", "The east cargo door code is 7318."])
    text = read_document(pdf)
    assert "day 12 (evening)" in text and "east cargo door code is 7318" in text
    assert read_document(str(pdf)) == text == read_document(path=str(pdf))


def test_a_pdf_without_text_is_an_error(tmp_path):
    scan = write_pdf(tmp_path / "scan.pdf", [])
    with pytest.raises(ValueError, match=r"no text could be extracted from scan\.pdf; is it a scan\?"):
        read_document(scan)
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"this is not a PDF at all")
    with pytest.raises(ValueError, match="broken.pdf is not a readable PDF"):
        read_document(broken)


def test_html_keeps_the_visible_text_only(tmp_path):
    page = tmp_path / "log.html"
    page.write_text(HTML)
    text = read_document(page)
    assert "The access code of the east cargo door is 7318." in text  # inline tags do not split a line
    assert "West door: closed\nNorth door: open" in text and "Cargo doors" in text
    for dropped in ("9999", "tracking pixel", "color: red", "display: none", "Enable JavaScript"):
        assert dropped not in text
    blank = tmp_path / "blank.htm"
    blank.write_text("<html><script>x = 1</script></html>")
    with pytest.raises(ValueError, match="no text could be extracted from blank.htm"):
        read_document(blank)


@pytest.mark.parametrize("module, extra, name", [("pypdf", "pdf", "a.pdf"), ("bs4", "html", "a.html")])
def test_a_missing_extra_names_the_install_command(module, extra, name, tmp_path, monkeypatch):
    path = tmp_path / name
    if extra == "pdf":
        write_pdf(path, ["some text"])
    else:
        path.write_text("<p>some text</p>")
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if not installed
    with pytest.raises(MissingExtraError, match=f'reading {name} needs {module}.*pip install "pyrestkv\\[{extra}\\]"'):
        read_document(path)
    assert issubclass(MissingExtraError, ImportError)

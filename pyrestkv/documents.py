"""Reading a document: text given as such, or a file (plain text, Markdown, PDF, HTML).

`read_document(document)` guesses: a path object is a file, and so is a one-line string that names
an existing file or looks like a path (a document suffix such as .txt, or a path separator); any
other string is the text itself. `read_document(text=...)` and `read_document(path=...)` say which.
PDF needs pypdf (`pip install "pyrestkv[pdf]"`), HTML BeautifulSoup (`pip install "pyrestkv[html]"`).
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Optional, Union

PDF_SUFFIXES = (".pdf",)
HTML_SUFFIXES = (".html", ".htm")
#: suffixes that make a one-line string a file name (read as text unless PDF or HTML)
DOCUMENT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".log", ".csv", ".json") + PDF_SUFFIXES + HTML_SUFFIXES
#: longest string taken for a path; anything longer is text
MAX_PATH_CHARS = 4096

_PATH_SEPARATORS = tuple({"/", os.sep, os.altsep} - {None})
#: elements whose text is not the page's: code, styling, templates
_HTML_DROPPED = ["script", "style", "noscript", "template"]
#: elements that end a line of the page's text
_HTML_BLOCKS = ["p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table",
                "section", "article", "header", "footer", "title", "dt", "dd"]

DocumentLike = Union[str, os.PathLike]


class MissingExtraError(ImportError):
    """A document format needs a package that is not installed; the message names the extra."""


def looks_like_path(text: str) -> bool:
    """Whether a string is more likely a file name than a document: one line, and a document suffix
    ("report.txt", "my notes.md") or a path separator, without spaces ("notes/a") or at the start
    ("/data/my report"). "The cat sat on the mat." and "cats and/or dogs" are text."""
    s = text.strip()
    if not s or "\n" in s or len(s) > MAX_PATH_CHARS:
        return False
    if s.lower().endswith(DOCUMENT_SUFFIXES):
        return True
    has_separator = any(sep in s for sep in _PATH_SEPARATORS)
    return has_separator and (not re.search(r"\s", s) or s.startswith(_PATH_SEPARATORS + ("~", ".")))


def read_document(document: Optional[DocumentLike] = None, *, text: Optional[str] = None,
                  path: Optional[DocumentLike] = None) -> str:
    """The document's text, from exactly one of:

    document: a path object (a file), or a string: a file if it is one line and names an existing
        file, an error if it looks like a path (see looks_like_path) but names no file, else the
        text itself.
    text: the text itself, whatever it looks like.
    path: a file: .pdf (pypdf), .html/.htm (BeautifulSoup), anything else as UTF-8 text.
    """
    given = [name for name, value in (("document", document), ("text", text), ("path", path)) if value is not None]
    if len(given) != 1:
        raise TypeError(f"give the document once: as document, text=... or path=... (got {', '.join(given) or 'none'})")
    if text is not None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}; for a file use path=...")
        return text
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or a path object, got {type(path).__name__}")
        return read_file(path)
    if isinstance(document, os.PathLike):
        return read_file(document)
    if not isinstance(document, str):
        raise TypeError(f"document must be text or a path, got {type(document).__name__}")
    one_line = "\n" not in document and len(document) <= MAX_PATH_CHARS
    if one_line and os.path.isfile(os.path.expanduser(document.strip())):
        return read_file(document.strip())
    if looks_like_path(document):
        raise FileNotFoundError(
            f"document not found: {document.strip()!r} names no file. To read this string itself as the "
            "document, pass it as text=...; for a file, check the path (or pass path=... or a pathlib.Path)"
        )
    return document


def read_file(path: DocumentLike) -> str:
    """A file's text, by its suffix: PDF, HTML, or anything else as UTF-8 text."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"document not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"the document must be a text, Markdown, PDF or HTML file, not a directory: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PDF_SUFFIXES:
        return read_pdf(path)
    if suffix in HTML_SUFFIXES:
        return read_html(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _import_extra(module: str, extra: str, path: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"reading {os.path.basename(path)} needs {module}, which is not installed: pip install \"pyrestkv[{extra}]\""
        ) from None


def read_pdf(path: str) -> str:
    """The text of every page of a PDF, pages separated by a blank line."""
    pypdf = _import_extra("pypdf", "pdf", path)
    name = os.path.basename(path)
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ValueError(f"{name} is encrypted with a password; decrypt it first (e.g. qpdf --decrypt)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except pypdf.errors.PdfReadError as e:
        raise ValueError(f"{name} is not a readable PDF: {e}") from None
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        raise ValueError(
            f"no text could be extracted from {name}; is it a scan? Run OCR on it first (e.g. ocrmypdf) "
            "or pass its text with text=..."
        )
    return text


def read_html(path: str) -> str:
    """The visible text of an HTML page: no scripts or styles, a line per block element."""
    bs4 = _import_extra("bs4", "html", path)
    with open(path, "rb") as f:
        soup = bs4.BeautifulSoup(f.read(), "html.parser")  # bytes: the page's own charset is honoured
    for element in soup(_HTML_DROPPED):
        element.decompose()
    for element in soup(_HTML_BLOCKS):
        element.insert_after("\n")
    lines = (re.sub(r"\s+", " ", line).strip() for line in soup.get_text().splitlines())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if not text:
        raise ValueError(f"no text could be extracted from {os.path.basename(path)}: the page has no visible text")
    return text

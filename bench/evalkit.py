"""Shared parts of the accuracy suites (bench/niah.py, bench/ruler_lite.py, bench/fidelity.py).

An *arm* is a policy under a budget: "full" (n_ctx = the whole prompt), "shift" (llama.cpp's context
shift with n_ctx = budget + n_batch, the same memory as the others), or a budget policy ("restkv",
"snapkv", "h2o", "tova", "streaming", "truncate"), question-aware by default, "<policy>:blind" for
question-blind, "<policy>:session" for a document session (`llm.read` of the document, question-blind,
every cell to the tier, then `doc.ask`). Every arm answers through `Llama.ask` or `Document.ask`, so
restkv is measured as users run it.

Budgets are token counts or fractions of the document ("1/8"). Results are JSON (one row per sample
and arm), a Markdown table (accuracy per arm and budget, with the sample count and a 95% Wilson
interval) and a PNG (accuracy against budget, one line per policy, the intervals as error bars), all
under bench/results/. A NIAH result over several lengths also gets a depth x length heatmap per arm,
reading speed against length, and their tables (bench/heatmap.py).

Runs resume: each answer is appended to bench/results/<suite>-<tag>.partial.jsonl as it completes,
and a rerun of the same command skips the answers already there, so a long grid can be split over
several sittings (the JSON, table and plot are written from all of them at the end). Runs made
separately (other arms, other lengths) are joined with bench/merge.py, never by hand.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

import pyrestkv  # noqa: F401  (first: it points llama_cpp at pyrestkv's patched libllama)
from pyrestkv.policies import POLICIES, SCORED_POLICIES
from pyrestkv.qa import LAYOUTS, QUESTION_QUERIES

RESULTS = Path(__file__).resolve().parent / "results"
SCORED = SCORED_POLICIES


def model_path(name: str) -> str:
    import pyrestkv
    from pyrestkv.models import gemma3_model_path

    if name == "smollm2":
        return pyrestkv.default_model_path()
    if name == "gemma3":
        return gemma3_model_path()
    if not os.path.isfile(name):
        raise SystemExit(f"model not found: {name} (smollm2, gemma3 or a GGUF path)")
    return name


def parse_arms(text: str, layout: str = "after") -> list:
    """The arms of --arms, refusing at once (before any haystack is built or model loaded) the ones
    that cannot run, with this --layout among them."""
    arms = []
    for a in text.split(","):
        a = a.strip()
        policy, _, mode = a.partition(":")
        if policy not in POLICIES:
            raise SystemExit(f"unknown policy {policy!r} in --arms (one of {', '.join(POLICIES)})")
        if mode not in ("", "blind", "session"):
            raise SystemExit(f"arm {a!r}: the suffixes are ':blind' and ':session'")
        if mode == "blind" and policy not in SCORED:
            raise SystemExit(f"arm {a!r}: {policy} does not score, so it has no question-blind variant")
        if mode == "session" and policy in ("full", "shift"):
            raise SystemExit(f"arm {a!r}: a document session needs a policy that keeps kv_budget cells")
        if mode == "session" and layout != "after":
            raise SystemExit(f"arm {a!r}: a document session lays the question after the document (--layout after)")
        arms.append(a)
    return arms


def parse_budgets(text: str) -> list:
    out = []
    for b in text.split(","):
        b = b.strip()
        out.append(str(Fraction(b)) if "/" in b else int(b))
    return out


def budget_cells(budget, n_doc: int) -> int:
    from pyrestkv.qa import resolve_budget

    return resolve_budget(budget, n_doc)


def full_n_ctx(n_doc: int, max_tokens: int) -> int:
    """The full cache's context for a document of n_doc tokens: the document, the answer, and 64
    tokens for the chat template and the question."""
    return n_doc + max_tokens + 64


def full_fits(n_doc: int, max_tokens: int, n_ctx_train: int | None) -> bool:
    """Whether the full cache can read the document within the model's training context (positions
    beyond it are outside what the model learnt, so a full-cache answer there measures nothing)."""
    return n_ctx_train is None or full_n_ctx(n_doc, max_tokens) <= n_ctx_train


def training_context(path: str) -> int:
    """The model's training context from its GGUF metadata (reads the vocabulary, not the weights)."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    # a vocabulary-only model loads no hyperparameters (its n_ctx_train() is 0): read the metadata
    arch = vocab.metadata.get("general.architecture", "")
    n = int(vocab.metadata.get(f"{arch}.context_length", 0))
    vocab.close()
    if n <= 0:
        raise SystemExit(f"{path} names no training context ({arch}.context_length) in its metadata")
    return n


def open_arm(path: str, arm: str, budget, n_doc: int, args):
    """A Llama for one arm; n_doc is the prompt's length in tokens."""
    import pyrestkv

    policy, _, _ = arm.partition(":")
    common = dict(n_batch=args.n_batch, n_threads=args.threads, n_threads_batch=args.threads, verbose=False, seed=0)
    if policy == "full":
        return pyrestkv.Llama(path, kv_policy="full", n_ctx=full_n_ctx(n_doc, args.max_tokens), **common)
    cells = budget_cells(budget, n_doc)
    if policy == "shift":
        return pyrestkv.Llama(path, kv_policy="shift", n_ctx=cells + args.n_batch, n_keep=args.n_keep, **common)
    return pyrestkv.Llama(path, kv_policy=policy, kv_budget=cells, **common)


def ask(llm, arm: str, document: str, question: str, args) -> str:
    if arm.endswith(":session"):
        doc = llm.read(text=document)
        try:
            return doc.ask(question, max_tokens=args.max_tokens).answer
        finally:
            doc.close()
    queries = "none" if arm.endswith(":blind") else args.queries
    return llm.ask(document, question, max_tokens=args.max_tokens, layout=args.layout,
                   question_queries=queries).answer


def common_args(ap, max_tokens: int = 32) -> None:
    ap.add_argument("--model", default="gemma3", help="smollm2, gemma3 or a GGUF path (default: gemma3)")
    ap.add_argument("--arms", default="full,shift,restkv,snapkv",
                    help="policies, comma-separated; '<policy>:blind' for question-blind scoring, '<policy>:session' "
                         "for a document session (read once, then recall per question)")
    ap.add_argument("--budgets", default="1/8", help="token counts or fractions of the document (default: 1/8)")
    ap.add_argument("--layout", default=LAYOUTS[0], choices=LAYOUTS)
    ap.add_argument("--queries", default=QUESTION_QUERIES[0], choices=QUESTION_QUERIES,
                    help=f"question-aware arms: which queries guide eviction (default: {QUESTION_QUERIES[0]})")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--n-keep", type=int, default=64, help="shift: tokens kept at the start (chat header, instruction)")
    ap.add_argument("--max-tokens", type=int, default=max_tokens)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default=None, help="results file suffix (default: the model name)")


def row_key(row: dict) -> str:
    """What identifies an answer: its arm, budget and sample labels (not the answer or its timings)."""
    labels = {k: v for k, v in row.items() if k not in ANSWER_FIELDS}
    return json.dumps(labels, sort_keys=True)


# what a row records about its answer; every other field labels the sample and the arm. scoring_ms
# is the arm's running total (kv_stats() of a Llama that answers every sample of the arm and
# length), scoring_ms_answer this answer's share of it
ANSWER_FIELDS = ("document", "question", "answers", "cells", "score", "answer", "expected", "seconds", "scoring_ms",
                 "scoring_ms_answer", "tok_s")


def partial_path(suite: str, args) -> Path:
    return RESULTS / f"{suite}-{args.tag or args.model}.partial.jsonl"


def load_partial(path: Path, key=None) -> dict:
    """The answers a previous sitting appended, by key(row) (default row_key; a torn last line is dropped)."""
    key = key or row_key
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[key(row)] = row
    return done


def append_partial(path: Path):
    """The partial file opened for appending. A sitting stopped mid-write leaves a torn last line
    (load_partial drops it): the next answer goes on a line of its own, not glued onto it."""
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    log = open(path, "a")
    if torn:
        log.write("\n")
    return log


def run_grid(samples: list, args, suite: str, score_fn, n_ctx_train: int | None = None) -> dict:
    """samples: dicts with document, question, answers, n_tokens and any labels. Runs every arm and
    budget on every sample (one Llama per arm, budget and document length), scores with
    score_fn(answer, sample) in [0, 1], and returns the results. Each answer is appended to the
    partial file as it completes; answers already there are not asked again. Given the model's
    n_ctx_train, the full arm skips the documents it cannot hold (no row: the result records
    n_ctx_train, from which a report tells "cannot run" from "not run yet")."""
    from tqdm import tqdm

    path = model_path(args.model)
    arms = parse_arms(args.arms, args.layout)
    budgets = parse_budgets(args.budgets)
    runs = [(arm, None) if arm == "full" else (arm, b) for arm in arms for b in budgets]
    runs = list(dict.fromkeys(runs))
    by_len = {}
    for s in samples:
        by_len.setdefault(s["n_tokens"], []).append(s)
    # what else changes an answer: a rerun with other settings asks again
    setup = (f"layout={args.layout} queries={args.queries} n_batch={args.n_batch} n_keep={args.n_keep} "
             f"max_tokens={args.max_tokens} seed={getattr(args, 'seed', None)}")
    RESULTS.mkdir(exist_ok=True)
    partial = partial_path(suite, args)
    done = load_partial(partial)
    rows = []
    bar = tqdm(total=len(runs) * len(samples), desc=suite, unit="answer")
    with append_partial(partial) as log:
        for arm, budget in runs:
            for n_doc, group in sorted(by_len.items()):
                if arm == "full" and not full_fits(n_doc, args.max_tokens, n_ctx_train):
                    print(f"full: {n_doc}-token documents do not fit the training context ({n_ctx_train}): "
                          "not run", file=sys.stderr)
                    bar.update(len(group))
                    continue
                todo = []
                for s in group:
                    labels = {**{k: v for k, v in s.items() if k not in ANSWER_FIELDS}, "arm": arm, "budget": budget,
                              "setup": setup}
                    key = row_key(labels)
                    # an answer is reused only for the same sample: a grid built from other flags
                    # (--lengths, --kinds) may give these labels another document, seeded apart
                    if key in done and done[key].get("expected") == s["answers"]:
                        rows.append(done[key])
                        bar.update(1)
                    else:
                        todo.append((s, labels))
                if not todo:
                    continue
                llm = open_arm(path, arm, budget, n_doc, args)
                for s, labels in todo:
                    scoring_before = llm.kv_stats().get("scoring_ms")
                    t0 = time.perf_counter()
                    answer = ask(llm, arm, s["document"], s["question"], args)
                    seconds = time.perf_counter() - t0
                    stats = llm.kv_stats()
                    scoring = stats.get("scoring_ms")
                    row = {
                        **labels, "cells": stats.get("budget") if arm != "full" else None,
                        "score": score_fn(answer, s), "answer": answer[:200], "expected": s["answers"],
                        "seconds": round(seconds, 2), "scoring_ms": scoring,
                        "scoring_ms_answer": None if scoring is None else round(scoring - scoring_before, 3),
                        "tok_s": round(s["n_tokens"] / seconds, 1),
                    }
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    rows.append(row)
                    bar.update(1)
                    bar.set_postfix_str(f"{arm} {budget or ''}")
                llm.close()
    bar.close()
    result = {"suite": suite, "model": args.model, "config": dict(vars(args)), "rows": rows}
    if n_ctx_train is not None:
        result["n_ctx_train"] = n_ctx_train
    return result


def wilson(k: float, n: int, z: float = 1.96) -> tuple:
    """The 95% Wilson score interval of a proportion k/n, in [0, 1]."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def clearly_above(a: dict, b: dict) -> bool:
    """Whether summary row a beats b beyond chance: a's interval lies wholly above b's."""
    return a["lo"] > b["hi"]


def summarize(result: dict, by=("arm", "budget")) -> list:
    """Mean score (percent) per arm and budget (and per `by` fields), with the sample count n and
    the 95% Wilson interval [lo, hi] in percent; `mean` is the unrounded fraction, for differences
    and ratios (the rounded figures would print 66.7 - 33.3 as +33.4)."""
    groups = {}
    for r in result["rows"]:
        key = tuple(r.get(k) for k in by)
        groups.setdefault(key, []).append(r["score"])
    out = []
    for k, v in groups.items():
        lo, hi = wilson(sum(v), len(v))
        out.append(dict(zip(by, k), accuracy=round(100.0 * sum(v) / len(v), 1), mean=sum(v) / len(v), n=len(v),
                        lo=round(100.0 * lo, 1), hi=round(100.0 * hi, 1)))
    return out


def markdown(result: dict, by=("arm", "budget")) -> str:
    rows = summarize(result, by)
    head = "| " + " | ".join(by) + " | accuracy % | 95% interval | samples |"
    lines = [head, "|" + "---|" * (len(by) + 3)]
    for r in rows:
        lines.append("| " + " | ".join("full cache" if (k == "budget" and r[k] is None) else str(r[k]) for k in by)
                     + f" | {r['accuracy']} | {r['lo']}–{r['hi']} | {r['n']} |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    return plt


def plot(result: dict, dest: Path) -> Path | None:
    """Accuracy against budget, one line per arm; the full cache as a horizontal line."""
    plt = pyplot()
    if plt is None:
        return None
    rows = summarize(result)
    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None}, key=lambda b: float(Fraction(str(b))))
    xs = list(range(len(budgets)))
    policies = [a for a in dict.fromkeys(r["arm"] for r in rows) if a != "full"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        if arm == "full":
            full = [r for r in rows if r["arm"] == "full"]
            if full:
                ax.axhline(full[0]["accuracy"], color="black", linestyle="--", label="full cache")
                ax.axhspan(full[0]["lo"], full[0]["hi"], color="black", alpha=0.08)
            continue
        pts = [(x, next((r for r in rows if r["arm"] == arm and r["budget"] == b), None)) for x, b in zip(xs, budgets)]
        pts = [(x, r) for x, r in pts if r is not None]
        ys = [r["accuracy"] for _, r in pts]
        err = [[r["accuracy"] - r["lo"] for _, r in pts], [r["hi"] - r["accuracy"] for _, r in pts]]
        dodge = 0.06 * (policies.index(arm) - (len(policies) - 1) / 2)  # so that the error bars stay apart
        ax.errorbar([x + dodge for x, _ in pts], ys, yerr=err, marker="o", capsize=3, label=arm)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("kv_budget (tokens, or fraction of the document)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title(f"{result['suite']}, {result['model']} (95% Wilson intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def save(result: dict, args, by=("arm", "budget")) -> None:
    RESULTS.mkdir(exist_ok=True)
    stem = f"{result['suite']}-{args.tag or args.model}"
    result["command"] = "python " + " ".join(sys.argv)
    write(result, stem, by)


def write(result: dict, stem: str, by=("arm", "budget")) -> None:
    """The result's JSON, Markdown table (headed by its command) and plot under bench/results/."""
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    table = markdown(result, by)
    (RESULTS / f"{stem}.md").write_text(f"`{result['command']}`\n\n{table}\n")
    png = plot(result, RESULTS / f"{stem}.png")
    print(table)
    print(f"results: {RESULTS / (stem + '.json')}" + (f", plot: {png}" if png else ""))
    if has_lengths(result):
        import heatmap  # bench/heatmap.py, beside this file

        for png in heatmap.write(result, stem, RESULTS):
            print(f"plot: {png}")


def has_lengths(result: dict) -> bool:
    """A NIAH result over several document lengths, or a part of a --grid run (its first lengths):
    it gets a depth x length heatmap and a speed plot."""
    if result["suite"] != "niah":
        return False
    return len({r.get("length") for r in result["rows"]}) > 1 or bool(result.get("config", {}).get("grid"))


def normalize(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()

"""Read once, ask many: a document session (llm.read + doc.ask) against ask() (a whole read per
question) and the full cache, on documents with several needles each, every needle asked.

    python bench/sessions.py --model smollm2 --lengths 7936 --docs 3       # SmolLM2 at 8k
    python bench/sessions.py --model gemma3 --lengths 4096,7936,16128      # Gemma-3-270m, 4k to 16k

Each document is a Paul Graham haystack (bench/niah.py's) with --needles RULER magic-number needles
at evenly spread depths (a random offset per document), each with its own key. Arms, all at
kv_budget = --budget of the document (default 1/8):
  session  restkv: llm.read() once (question-blind, every cell to the tier), then doc.ask() per needle
  ask      restkv: llm.ask() per needle, reading the whole document again each time (question-aware)
  full     the full cache (n_ctx = the prompt), where the document fits the training context
Per question: the answer's hit (RULER's string match), seconds (session: the recall and the
answer, its one read recorded apart; full: llama-cpp-python reuses the document as the next
prompt's prefix, so only a document's first question reads it), and for the session the tier's bytes, the recall's
milliseconds and the process's peak RSS during the question (reset before it through
/proc/self/clear_refs). Runs resume from bench/results/sessions-<tag>.partial.jsonl, as the other
suites do. Writes bench/results/sessions-<tag>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from evalkit import RESULTS, append_partial, budget_cells, full_fits, full_n_ctx, load_partial, model_path, normalize, pyplot
from evalkit import summarize, training_context
from niah import haystack, make_needle, pg_sentences

ARMS = ("session", "ask", "full")
#: what identifies an answer (every other field of a row records the answer and its costs)
LABELS = ("arm", "length", "doc", "needle", "depth", "budget", "setup")


def row_key(row: dict) -> str:
    return json.dumps({k: row.get(k) for k in LABELS}, sort_keys=True)


def build_documents(args, path: str) -> list:
    """[{length, doc, text, needles: [{depth, question, answers}]}]"""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    count = lambda s: len(vocab.tokenize(s.encode(), add_bos=False))  # noqa: E731
    sentences = pg_sentences()
    docs = []
    for n in [int(x) for x in args.lengths.split(",")]:
        for d in range(args.docs):
            rng = random.Random(args.seed * 100_000 + n * 10 + d)
            needles, keys = [], set()
            while len(needles) < args.needles:
                sents, question, answers = make_needle("number", rng, 0)
                key = question.split(" for ")[1]
                if key not in keys:  # each needle its own key
                    keys.add(key)
                    needles.append({"sentence": sents[0], "question": question, "answers": answers})
            offset = rng.random() / args.needles
            for i, nd in enumerate(needles):
                nd["depth"] = round(100.0 * (offset + i / args.needles), 1)
            body = haystack(sentences, rng.randrange(len(sentences)), n - sum(count(x["sentence"]) for x in needles),
                            count)
            for nd in sorted(needles, key=lambda x: -x["depth"]):
                body.insert(int(round(nd["depth"] / 100.0 * len(body))), nd["sentence"])
            docs.append({"length": n, "doc": d, "text": " ".join(body), "needles": needles})
    vocab.close()
    return docs


def peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def hit(answer: str, needle: dict) -> float:
    return float(all(normalize(a) in normalize(answer) for a in needle["answers"]))


def open_llama(path: str, arm: str, n_doc: int, args):
    import pyrestkv

    common = dict(n_batch=args.n_batch, n_threads=args.threads, n_threads_batch=args.threads, verbose=False, seed=0)
    if arm == "full":
        return pyrestkv.Llama(path, kv_policy="full", n_ctx=full_n_ctx(n_doc, args.max_tokens), **common)
    return pyrestkv.Llama(path, kv_policy="restkv", kv_budget=budget_cells(args.budget, n_doc), **common)


def run(args) -> dict:
    from tqdm import tqdm

    path = model_path(args.model)
    n_ctx_train = training_context(path)
    docs = build_documents(args, path)
    arms = [a for a in args.arms.split(",")]
    setup = f"budget={args.budget} n_batch={args.n_batch} max_tokens={args.max_tokens} seed={args.seed}"
    RESULTS.mkdir(exist_ok=True)
    partial = RESULTS / f"sessions-{args.tag or args.model}.partial.jsonl"
    done = load_partial(partial, key=row_key)
    rows = []
    bar = tqdm(total=len(docs) * len(arms) * args.needles, desc="sessions", unit="answer")
    with append_partial(partial) as log:
        for arm in arms:
            for doc in docs:
                n = doc["length"]
                if arm == "full" and not full_fits(n, args.max_tokens, n_ctx_train):
                    bar.update(len(doc["needles"]))
                    continue
                labels = [{"arm": arm, "length": n, "doc": doc["doc"], "needle": i, "depth": nd["depth"],
                           "budget": None if arm == "full" else args.budget, "setup": setup}
                          for i, nd in enumerate(doc["needles"])]
                todo = [(lab, nd) for lab, nd in zip(labels, doc["needles"]) if row_key(lab) not in done]
                rows += [done[row_key(lab)] for lab in labels if row_key(lab) in done]
                bar.update(len(labels) - len(todo))
                if not todo:
                    continue
                llm = open_llama(path, arm, n, args)
                extra = {}
                if arm == "session":
                    t0 = time.perf_counter()
                    session = llm.read(text=doc["text"])
                    extra = {"read_seconds": round(time.perf_counter() - t0, 2), "tier_bytes": session.tier.nbytes,
                             "n_tokens": session.n_tokens,
                             # the full cache's K/V for this many cells, all layers (the restkv cache's per cell)
                             "full_kv_bytes": int(llm.kv_stats()["kv_bytes"] / llm.n_ctx() * session.n_tokens)}
                for lab, nd in todo:
                    peak_rss_reset()
                    t0 = time.perf_counter()
                    if arm == "session":
                        result = session.ask(nd["question"], max_tokens=args.max_tokens)
                        stats = {"recall_ms": result.kv_stats["recall_ms"], "cells_recalled":
                                 result.kv_stats["cells_recalled"], "peak_rss_mib": peak_rss_mib()}
                    else:
                        result = llm.ask(text=doc["text"], question=nd["question"], max_tokens=args.max_tokens)
                        stats = {}
                    seconds = time.perf_counter() - t0
                    row = {**lab, "score": hit(result.answer, nd), "answer": result.answer[:200],
                           "expected": nd["answers"], "seconds": round(seconds, 2), **extra, **stats}
                    if arm != "session":
                        row["tok_s"] = round(result.tokens_read / seconds, 1)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    rows.append(row)
                    bar.update(1)
                if arm == "session":
                    session.close()
                llm.close()
    bar.close()
    return {"suite": "sessions", "model": args.model, "config": dict(vars(args)), "n_ctx_train": n_ctx_train,
            "rows": rows}


def speed_table(result: dict) -> list:
    """Per length: median seconds per question of each arm, the session's read, and ask/session."""
    out = []
    for n in sorted({r["length"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["length"] == n]
        med = {a: statistics.median([r["seconds"] for r in rows if r["arm"] == a]) for a in ARMS
               if any(r["arm"] == a for r in rows)}
        sess = [r for r in rows if r["arm"] == "session"]
        line = {"length": n, **{f"{a}_s": round(v, 2) for a, v in med.items()}}
        if sess:
            line["read_s"] = round(statistics.median(r["read_seconds"] for r in sess), 1)
            line["tier_mib"] = round(statistics.median(r["tier_bytes"] for r in sess) / 2**20, 1)
            line["full_kv_mib"] = round(statistics.median(r["full_kv_bytes"] for r in sess) / 2**20, 1)
            rss = [r["peak_rss_mib"] for r in sess if r.get("peak_rss_mib")]
            line["peak_rss_mib"] = max(rss) if rss else None
            line["recall_ms"] = round(statistics.median(r["recall_ms"] for r in sess))
        full = [r for r in rows if r["arm"] == "full"]
        if full:
            # the full cache keeps the whole document, so llama-cpp-python reuses it as the prompt's
            # prefix: the first question of a document reads it, the later ones decode the question
            first = [r["seconds"] for r in full if r["needle"] == 0]
            later = [r["seconds"] for r in full if r["needle"] > 0]
            line["full_first_s"] = round(statistics.median(first), 2) if first else None
            line["full_s"] = round(statistics.median(later), 2) if later else None
        if "ask" in med and "session" in med:
            line["speedup"] = round(med["ask"] / med["session"], 1)
        out.append(line)
    return out


def markdown(result: dict) -> str:
    acc = summarize(result, by=("arm", "length"))
    lengths = sorted({r["length"] for r in acc})
    lines = ["| arm | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for arm in [a for a in ARMS if any(r["arm"] == a for r in acc)]:
        cells = []
        for n in lengths:
            r = next((r for r in acc if r["arm"] == arm and r["length"] == n), None)
            cells.append(f"{r['accuracy']} [{r['lo']}–{r['hi']}], n={r['n']}" if r else "—")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    speed = speed_table(result)
    lines += ["", "| length | session: read once (s) | session: per question (s) | ask(): per question (s) | "
              "ask() / session | full cache: first, later questions (s) | recall (ms) | tier (MiB) | full cache "
              "K/V (MiB) | peak RSS in a question (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in speed:
        full = f"{s['full_first_s']}, {s['full_s']}" if s.get("full_first_s") is not None else "—"
        lines.append(f"| {s['length']} | {s.get('read_s', '—')} | {s.get('session_s', '—')} | {s.get('ask_s', '—')} | "
                     f"{s.get('speedup', '—')}× | {full} | {s.get('recall_ms', '—')} | "
                     f"{s.get('tier_mib', '—')} | {s.get('full_kv_mib', '—')} | {s.get('peak_rss_mib', '—')} |")
    lines += ["", "Medians. The full cache holds the whole document, so llama-cpp-python reuses it as the next "
              "prompt's prefix: only a document's first question reads it. restkv's ask() reads it again for every "
              "question (its cache was evicted for the previous one); a session reads it once, then recalls."]
    return "\n".join(lines)


def plot(result: dict, dest: Path) -> Path | None:
    """Accuracy per arm against length (with the intervals) and the median seconds per question."""
    plt = pyplot()
    if plt is None:
        return None
    acc = summarize(result, by=("arm", "length"))
    lengths = sorted({r["length"] for r in acc})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    arms = [a for a in ARMS if any(r["arm"] == a for r in acc)]
    for j, arm in enumerate(arms):
        pts = [r for n in lengths for r in acc if r["arm"] == arm and r["length"] == n]
        xs = [lengths.index(r["length"]) + 0.08 * (j - (len(arms) - 1) / 2) for r in pts]
        ax1.errorbar(xs, [r["accuracy"] for r in pts], yerr=[[r["accuracy"] - r["lo"] for r in pts],
                     [r["hi"] - r["accuracy"] for r in pts]], marker="o", capsize=3, label=arm)
        secs = [(lengths.index(n), statistics.median([x["seconds"] for x in result["rows"]
                                                     if x["arm"] == arm and x["length"] == n]))
                for n in lengths if any(x["arm"] == arm and x["length"] == n for x in result["rows"])]
        ax2.plot([x for x, _ in secs], [s for _, s in secs], marker="o", label=arm)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([str(n) for n in lengths])
        ax.set_xlabel("document length (tokens)")
        ax.legend(fontsize=8)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_ylim(-5, 105)
    ax1.set_title("accuracy, 95% Wilson intervals")
    ax2.set_yscale("log")
    ax2.set_ylabel("seconds per question (median)")
    ax2.set_title("session: recall + answer; ask(): a whole read;\nfull: the document reused as a prefix", fontsize=9)
    fig.suptitle(f"document sessions, {result['model']}, kv_budget = {result['config']['budget']} of the document")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def write(result: dict, stem: str) -> None:
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (RESULTS / f"{stem}.md").write_text(f"`{result['command']}`\n\n{table}\n")
    png = plot(result, RESULTS / f"{stem}.png")
    print(table)
    print(f"results: {RESULTS / (stem + '.json')}" + (f", plot: {png}" if png else ""))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3", help="smollm2, gemma3 or a GGUF path (default: gemma3)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--lengths", default="4096,7936", help="document lengths in tokens (default: 4096,7936)")
    ap.add_argument("--docs", type=int, default=3, help="documents per length (default: 3)")
    ap.add_argument("--needles", type=int, default=4, help="needles per document, each asked (default: 4)")
    ap.add_argument("--budget", default="1/8", help="kv_budget: tokens or a fraction of the document (default: 1/8)")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tag", default=None, help="results file suffix (default: the model name)")
    args = ap.parse_args(argv)
    for arm in args.arms.split(","):
        if arm not in ARMS:
            ap.error(f"unknown arm {arm!r}: one of {', '.join(ARMS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    result["command"] = "python " + " ".join(sys.argv)
    write(result, f"sessions-{args.tag or args.model}")


if __name__ == "__main__":
    main()

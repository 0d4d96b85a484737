"""Needle retrieval under a KV budget: which policy keeps a fact alive while a long document is read.

    python bench/needles.py --policies full,shift,restkv --budget 512 --doc-tokens 3000
    python bench/needles.py --policies restkv --kernel 5 --sink 0 --aggregate mean --tag k5

Each case hides one fact (pyrestkv.haystack.NEEDLE_CASES) in synthetic prose, asks about it at the
end, and counts a hit when the expected answer appears in the greedy answer. The full cache gets
n_ctx = the document length; shift gets the same n_ctx as restkv (kv_budget + n_batch), so both use
the same memory. Results go to bench/results/needles-<tag>.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

import pyrestkv
from pyrestkv.haystack import NEEDLE_CASES, make_document, needle_prompt

RESULTS = Path(__file__).resolve().parent / "results"


def answer(llm, prompt: str, max_tokens: int = 24) -> str:
    out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                     temperature=0.0)
    return out["choices"][0]["message"]["content"] or ""


def open_policy(model_path: str, policy: str, args, doc_tokens: int):
    common = dict(n_batch=args.n_batch, n_threads=args.threads, n_threads_batch=args.threads, verbose=False, seed=0)
    if policy == "full":
        return pyrestkv.Llama(model_path, kv_policy="full", n_ctx=doc_tokens + 256, **common)
    if policy == "shift":
        return pyrestkv.Llama(model_path, kv_policy="shift", n_ctx=args.budget + args.n_batch, n_keep=args.n_keep, **common)
    return pyrestkv.Llama(
        model_path, kv_policy="restkv", kv_budget=args.budget, kv_kernel=args.kernel, kv_sink=args.sink,
        kv_aggregate=args.aggregate, kv_query=args.query, kv_positions=args.positions, **common,
    )


def run(args) -> dict:
    model_path = args.model or pyrestkv.default_model_path()
    policies = args.policies.split(",")
    cases = NEEDLE_CASES[: args.cases]
    rows = []
    bar = tqdm(total=len(cases) * len(policies), desc="needles", unit="run")
    for ci, case in enumerate(cases):
        for policy in policies:
            llm = open_policy(model_path, policy, args, args.doc_tokens)
            doc = make_document(llm, args.doc_tokens, [(case.depth, case.fact)], seed=100 + ci)
            t0 = time.perf_counter()
            text = answer(llm, needle_prompt(doc, case.question))
            seconds = time.perf_counter() - t0
            stats = llm.kv_stats()
            llm.close()
            rows.append({
                "case": ci, "depth": case.depth, "policy": policy, "hit": case.answer.lower() in text.lower(),
                "answer": text, "seconds": round(seconds, 2), "cells_peak": stats["cells_peak"],
                "n_ctx": stats["n_ctx"], "scoring_ms": stats.get("scoring_ms"),
            })
            bar.update(1)
    bar.close()
    return {"config": vars(args), "rows": rows}


def table(result: dict) -> str:
    rows = result["rows"]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    lines = ["| policy | hits | cases | mean seconds |", "|---|---|---|---|"]
    for p in policies:
        rs = [r for r in rows if r["policy"] == p]
        lines.append(f"| {p} | {sum(r['hit'] for r in rs)} | {len(rs)} | {sum(r['seconds'] for r in rs) / len(rs):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="full,shift,restkv")
    ap.add_argument("--model")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--doc-tokens", type=int, default=3000)
    ap.add_argument("--cases", type=int, default=len(NEEDLE_CASES))
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--n-keep", type=int, default=32, help="shift: tokens kept at the start (the chat header)")
    ap.add_argument("--kernel", type=int, default=21)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--aggregate", default="max_rank", choices=["max_rank", "mean"])
    ap.add_argument("--query", default="tail")
    ap.add_argument("--positions", default="auto", choices=["keep", "compact", "auto"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--tag", default="default")
    args = ap.parse_args(argv)

    result = run(args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"needles-{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    for r in result["rows"]:
        print(f"case {r['case']} depth {r['depth']:.2f} {r['policy']:>7}: {'hit ' if r['hit'] else 'miss'} {r['answer'][:70]!r}")
    print(table(result))
    print(f"results: {out}")


if __name__ == "__main__":
    main()

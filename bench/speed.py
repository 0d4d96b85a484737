"""Speed and memory of reading a long document, then answering: full cache, shift and restkv.

    python bench/speed.py                      # SmolLM2-135M, documents of 1k, 2k, 4k and 8k tokens
    python bench/speed.py --model gemma3 --lengths 2048,8192
    python bench/speed.py --lengths 16128 --budgets 2016 --policies shift,streaming,restkv

streaming keeps the same cells per chunk as restkv without scoring them, so restkv against
streaming is what scoring costs, and streaming against shift what keeping the budget full costs
(the cells each token attends: `cells/token`). `--rounds N` runs the arms N times, every other round
in reverse order, and prints each ratio per round and its median: the machine drifts by more than
the differences measured, and arms minutes apart drift least.

Every arm runs in a fresh subprocess (so peak RSS is its own), with the same threads, one after the
other; compare arms as ratios within one run, since the machine is shared and noisy. Measured per arm:
time to first token, prefill tok/s, decode tok/s after the document (EOS banned), peak RSS, KV bytes,
scoring passes and their share of the prefill time, and the read split into its forward passes
(`kv_stats()["decode_ms"]`), scoring, eviction and the rest. Writes bench/results/speed-<tag>.json, a Markdown
table on stdout, and bench/results/speed-<tag>.png when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def model_path(name: str) -> str:
    import pyrestkv
    from pyrestkv.models import gemma3_model_path

    if name == "smollm2":
        return pyrestkv.default_model_path()
    if name == "gemma3":
        return gemma3_model_path()
    return name


def run_arm(arm: dict) -> dict:
    """One measurement, in this process."""
    import pyrestkv
    from pyrestkv.haystack import make_document

    path = model_path(arm["model"])
    common = dict(n_batch=arm["n_batch"], n_threads=arm["threads"], n_threads_batch=arm["threads"], verbose=False, seed=0)
    probe = pyrestkv.Llama(path, n_ctx=512, verbose=False)
    tokens = probe.tokenize(make_document(probe, arm["length"] + 200, [], seed=7).encode())[: arm["length"]]
    probe.close()

    if arm["policy"] == "full":
        llm = pyrestkv.Llama(path, kv_policy="full", n_ctx=arm["length"] + arm["decode"] + 64, **common)
    elif arm["policy"] == "shift":
        llm = pyrestkv.Llama(path, kv_policy="shift", n_ctx=arm["n_ctx"], n_keep=32, **common)
    else:
        llm = pyrestkv.Llama(path, kv_policy=arm["policy"], kv_budget=arm["budget"], **common)

    t0 = time.perf_counter()
    llm.eval(tokens)
    token = llm.sample(temp=0.0)
    ttft = time.perf_counter() - t0
    prefill = ttft
    read = llm.kv_stats()

    eos = llm.token_eos()
    t1 = time.perf_counter()
    for _ in range(arm["decode"]):
        llm.eval([token])
        token = llm.sample(temp=0.0, logits_processor=lambda ids, scores: _ban(scores, eos))
    decode = time.perf_counter() - t1

    stats = llm.kv_stats()
    llm.close()
    scoring_s = stats.get("scoring_ms", 0.0) / 1e3
    read_scoring_ms = read.get("scoring_ms", 0.0)
    return {
        **arm,
        "n_ctx": stats["n_ctx"],
        "ttft_s": round(ttft, 3),
        "prefill_tok_s": round(len(tokens) / prefill, 1),
        "decode_tok_s": round(arm["decode"] / decode, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "kv_bytes": stats["kv_bytes"],
        "cells_peak": stats["cells_peak"],
        "cells_per_token": round(read["cells_attended"] / len(tokens), 1),
        "evict_ms": read["evict_ms"],
        # the read split: forward passes (llama_decode), scoring passes, eviction, and the rest (Python)
        "read_decode_s": round(read["decode_ms"] / 1e3, 3),
        "read_scoring_s": round(read_scoring_ms / 1e3, 3),
        "read_other_s": round(prefill - (read["decode_ms"] + read_scoring_ms + read["evict_ms"]) / 1e3, 3),
        "scoring_passes": stats.get("scoring_passes", 0),
        "scoring_ms_per_pass": round(stats.get("scoring_ms", 0.0) / max(1, stats.get("scoring_passes", 0)), 1),
        "scoring_share_of_prefill": round(scoring_s / prefill, 3),
    }


def _ban(scores, token):
    scores[token] = -1e30
    return scores


def arms(args) -> list:
    from pyrestkv.policies import POLICIES

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or set(policies) - set(POLICIES):
        raise SystemExit(f"--policies {args.policies!r}: choose from {', '.join(POLICIES)}")
    out = []
    for length in [int(x) for x in args.lengths.split(",")]:
        base = dict(model=args.model, length=length, n_batch=args.n_batch, threads=args.threads, decode=args.decode)
        if "full" in policies:
            out.append({**base, "policy": "full", "budget": None, "n_ctx": None})
        for budget in [int(x) for x in args.budgets.split(",")]:
            if budget + args.n_batch >= length:
                continue  # the document fits: nothing to evict
            for policy in policies:
                if policy == "shift":  # the same memory: n_ctx = the budget + one chunk
                    out.append({**base, "policy": "shift", "budget": budget, "n_ctx": budget + args.n_batch})
                elif policy != "full":
                    out.append({**base, "policy": policy, "budget": budget, "n_ctx": None})
    return out


def table(rows: list) -> str:
    lines = [
        "| round | model | doc tokens | policy | budget | n_ctx | TTFT s | prefill tok/s | decode tok/s | peak RSS MiB | KV MiB | cells/token | scoring passes | ms/pass | scoring / prefill | evict ms | read: forward s | read: other s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('round', 0)} | {r['model']} | {r['length']} | {r['policy']} | {r['budget'] or '-'} | {r['n_ctx']} | {r['ttft_s']} | "
            f"{r['prefill_tok_s']} | {r['decode_tok_s']} | {r['peak_rss_mib']} | {r['kv_bytes'] / 2**20:.1f} | "
            f"{r.get('cells_per_token', '-')} | {r['scoring_passes']} | {r['scoring_ms_per_pass']} | "
            f"{r['scoring_share_of_prefill']:.1%} | {r.get('evict_ms', '-')} | {r.get('read_decode_s', '-')} | "
            f"{r.get('read_other_s', '-')} |"
        )
    return "\n".join(lines)


def ratios(rows: list) -> list:
    """Each bounded policy's prefill tok/s over shift's, and restkv's over streaming's, per round
    (the same length and budget), with the median over rounds; and restkv's forward passes alone
    against streaming's (the same cells attended), as a speed ratio: streaming's seconds over restkv's."""
    groups = {}
    for r in rows:
        if r["policy"] != "full":
            groups.setdefault((r["length"], r["budget"]), {}).setdefault(r.get("round", 0), {})[r["policy"]] = r
    speed = {"prefill tok/s": lambda a, b: a["prefill_tok_s"] / b["prefill_tok_s"],
             # rows from before the read was split have no read_decode_s
             "read forward passes": lambda a, b: b["read_decode_s"] / a["read_decode_s"]
             if a.get("read_decode_s") and b.get("read_decode_s") else None}
    out = []
    for (length, budget), by_round in sorted(groups.items()):
        policies = sorted({p for arms in by_round.values() for p in arms})
        pairs = [(p, "shift", "prefill tok/s") for p in policies if p != "shift"] + [
            ("restkv", "streaming", "prefill tok/s"), ("restkv", "streaming", "read forward passes")]
        for policy, against, measure in pairs:
            per_round = [speed[measure](arms[policy], arms[against]) for _, arms in sorted(by_round.items())
                         if policy in arms and against in arms]
            per_round = [x for x in per_round if x is not None]
            if per_round:
                out.append({"length": length, "budget": budget, "policy": policy, "against": against, "measure": measure,
                            "per_round": [round(x, 3) for x in per_round], "median": round(statistics.median(per_round), 3)})
    return out


def ratio_lines(items: list) -> str:
    return "\n".join(
        f"{x['length']} tokens, kv_budget {x['budget']}: {x['policy']} / {x['against']} {x['measure']} "
        f"{', '.join(f'{v:.3f}' for v in x['per_round'])} (median {x['median']:.3f})" for x in items)


def plot(rows: list, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, label in (("prefill_tok_s", axes[0], "prefill tok/s"), ("decode_tok_s", axes[1], "decode tok/s after the document")):
        series = {}
        for r in rows:
            name = r["policy"] if r["policy"] == "full" else f"{r['policy']} {r['budget']}"
            series.setdefault(name, {}).setdefault(r["length"], []).append(r[key])
        for name, by_length in sorted(series.items()):
            xs = sorted(by_length)
            ax.plot(xs, [statistics.median(by_length[x]) for x in xs], marker="o", label=name)  # median over rounds
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{rows[0]['model']}, {rows[0]['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a GGUF path")
    ap.add_argument("--lengths", default="1024,2048,4096,8000")
    ap.add_argument("--budgets", default="512,1024,2048")
    ap.add_argument("--policies", default="full,shift,restkv",
                    help="full, shift (n_ctx = budget + n_batch), or any budget policy (restkv, streaming, snapkv, ...)")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64, help="tokens generated after the document")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="run every arm this many times, alternating the order")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm given as JSON
    args = ap.parse_args(argv)

    if args.arm:
        print(json.dumps(run_arm(json.loads(args.arm))))
        return

    from tqdm import tqdm

    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: run at least one round")
    rows = []
    one_round = arms(args)
    todo = []
    for k in range(args.rounds):
        todo += [{**arm, "round": k} for arm in (one_round if k % 2 == 0 else one_round[::-1])]
    for arm in tqdm(todo, desc="speed", unit="arm"):
        proc = subprocess.run([sys.executable, __file__, "--arm", json.dumps(arm)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    tag = args.tag or args.model
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"speed-{tag}.json"
    summary = ratios(rows)
    out.write_text(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "arm"}, "rows": rows,
                               "ratios": summary}, indent=1))
    print(table(rows))
    print(ratio_lines(summary))
    print(f"results: {out}")
    png = RESULTS / f"speed-{tag}.png"
    if plot(rows, png):
        print(f"plot: {png}")
    else:
        print("plot skipped: pip install matplotlib (or pip install .[bench])")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()

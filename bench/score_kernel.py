"""One scoring pass, fused op against composed graph, on this machine's CPU.

    python bench/score_kernel.py                     # SmolLM2-135M, caches of 2k, 4k and 8k cells

For each cache size: prefill a document into a full cache with a 32-query window, then time
`llama_kv_seq_score` (all 30 layers, with the adaptive-smoothing statistics) with the fused op
(GGML_OP_RESTKV_SCORE) and with the composed graph of ordinary ggml ops, the median of several
passes each, and check that both give the same scores. The scratch memory per layer is computed from
the shapes: the fused op writes RESTKV_ROW_SIZE floats per head (native/ggml/restkv-score-common.h),
the composed graph materializes at least the window attention twice (logits and softmax, n_kv x rows
x heads floats each) and the values per query head twice (dv x n_kv x heads): a lower bound.
Writes bench/results/score-kernel-<model>.json and a Markdown table. The GPU counterpart is
bench/gpu/run_check.sh (CUDA kernels, 8k/32k/128k cells).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HIST_BINS = 64  # RESTKV_HIST_BINS


def fused_scratch_bytes(n_kv: int, n_row: int, dv: int, n_head: int) -> int:
    row = 2 * n_kv + 3 + 2 * n_row + 2 * dv + 2 * 3 * HIST_BINS * n_row  # RESTKV_ROW_SIZE
    return 4 * row * n_head


def composed_scratch_bytes(n_kv: int, n_row: int, dv: int, n_head: int) -> int:
    """A lower bound: the composed graph holds more intermediates than these."""
    attention = n_kv * n_row * n_head * 2  # logits and softmax
    values = dv * n_kv * n_head * 2  # values per query head, and G v
    return 4 * (attention + values)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,4096,8000")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np
    from tqdm import tqdm

    import pyrestkv
    from pyrestkv import _binding as B
    from pyrestkv.haystack import make_document

    path = pyrestkv.default_model_path()
    rows = []
    for n in tqdm([int(x) for x in args.sizes.split(",")], desc="cache sizes"):
        llm = pyrestkv.Llama(path, kv_policy="full", n_ctx=n + 64, n_batch=512, n_threads=args.threads,
                             n_threads_batch=args.threads, verbose=False)
        ctx = B.pointer(llm.ctx)
        B.set_query_window(ctx, 32)
        llm.eval(llm.tokenize(make_document(llm, n + 200, [], seed=3).encode())[:n])
        n_layer, n_head = B.score_shape(ctx)
        n_select = n // 8
        out, times = {}, {}
        for kernel in ("fused", "composed"):
            B.set_score_kernel(ctx, kernel)
            t = []
            for _ in range(args.passes):
                t0 = time.perf_counter()
                out[kernel] = B.seq_score(ctx, llm._mem, 0.3, n_select)
                t.append(time.perf_counter() - t0)
            times[kernel] = statistics.median(t)
        llm.close()
        sc_f, sc_c = out["fused"][1], out["composed"][1]
        rows.append({
            "cells": n, "layers": n_layer, "heads": n_head,
            "fused_s": round(times["fused"], 4), "composed_s": round(times["composed"], 4),
            "speedup": round(times["composed"] / times["fused"], 2),
            "max_rel_diff": float(np.abs(sc_f - sc_c).max() / np.abs(sc_c).max()),
            "fused_scratch_mib_per_layer": round(fused_scratch_bytes(n, 32, 64, n_head) / 2**20, 2),
            "composed_scratch_mib_per_layer": round(composed_scratch_bytes(n, 32, 64, n_head) / 2**20, 2),
        })

    RESULTS.mkdir(exist_ok=True)
    dest = RESULTS / "score-kernel-smollm2.json"
    dest.write_text(json.dumps({"threads": args.threads, "passes": args.passes, "rows": rows}, indent=1))
    print("| cells | fused s/pass | composed s/pass | speedup | max rel. diff | fused scratch MiB/layer | composed scratch MiB/layer |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cells']} | {r['fused_s']} | {r['composed_s']} | {r['speedup']}x | {r['max_rel_diff']:.1e} | "
              f"{r['fused_scratch_mib_per_layer']} | {r['composed_scratch_mib_per_layer']} |")
    print(f"results: {dest}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()

"""pyrestkv on a device backend (CUDA, Metal) against the CPU, on a synthetic Llama-3.1-8B-shaped model.

    python bench/gpu/device_check.py --out DIR                       # GPU defaults: 8k, 32k, 128k cells
    python bench/gpu/device_check.py --out DIR --sizes 1024,2048 --layers 2 --budget 256 --n-batch 256

bench/gpu/device_check.sh runs it (after the standalone kernel check and, where needed, the CUDA
build); on a machine without a GPU both "device" and "host" are the CPU, which is how CI runs it.

1. The model: bench/gpu/synthetic_gguf.py (random Q4_0 weights; hidden 4096, 32 heads over 8 KV
   heads of 128). Its answers are noise: these are kernel and speed checks, never accuracy.
2. Checks, on a --check-cells prompt of random tokens, two contexts of the same model: "device"
   (every layer and the KV cache offloaded) and "host" (n_gpu_layers=0, the CPU backend):
   - the device's fused scoring op against the NumPy reference (pyrestkv/reference.py) on the
     device's own cache, read back: relative error <= 1e-3 (the CPU tests' bound), and the mean top
     positions within 1% of the cells;
   - the device's fused op against its composed graph on the same cache (<= 1e-3);
   - device against host on the same cache (the host loads the device's state, then each decodes
     the last window, whose queries score): the Gram matrices (<= 1e-3), the scores of all layers
     (<= 1e-2: the window's queries and cells are each backend's own arithmetic) and the mean top
     positions (within 1% of the cells);
   - eviction and decode: the same cells (chosen from the device's scores) are evicted in both, the
     device packs its cache in device memory, then both decode the same tokens; layer 0's keys after
     packing must agree (<= 1e-2: they depend on the tokens and positions alone), and the next-token
     logits must agree as closely as they did before the eviction (at most 2x that, plus 1e-3).
3. Timings at each of --sizes cells, on the device: prefill tok/s and decode tok/s with the full cache
   and with restkv at --budget; one scoring pass per layer, fused and composed (median of --passes);
   K/V bytes of each context and, with nvidia-smi, the GPU memory in use.
Writes DIR/device_check.json and prints a Markdown table. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import synthetic_gguf  # noqa: E402

from pyrestkv.policies import RestKVPolicy  # noqa: E402

DEFAULTS = RestKVPolicy()  # the checks score as restkv does by default
WINDOW = DEFAULTS.window  # scoring rows
ALPHA = DEFAULTS.alpha
N_DECODE = 32


def random_tokens(rng, n: int, n_vocab_plain: int) -> list:
    return rng.integers(0, n_vocab_plain, size=n).tolist()


def relative_error(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def gpu_memory_mib():
    """GPU memory in use (MiB) by nvidia-smi, or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return int(out.stdout.split()[0]) if out.returncode == 0 else None
    except (IndexError, ValueError):
        return None


def synchronize(llm) -> None:
    import llama_cpp

    llama_cpp.llama_synchronize(llm.ctx)


def last_logits(llm) -> np.ndarray:
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


class Arms:
    """Opens the model on the device or on the host with the run's shared settings."""

    def __init__(self, model: str, args):
        self.model, self.args = model, args

    def open(self, on_device: bool, **kwargs):
        import pyrestkv

        kwargs.setdefault("n_batch", self.args.n_batch)
        kwargs.setdefault("n_ubatch", min(self.args.n_batch, 512))
        return pyrestkv.Llama(
            self.model, n_gpu_layers=-1 if on_device else 0, offload_kqv=on_device, flash_attn=self.args.flash_attn,
            n_threads=self.args.threads, n_threads_batch=self.args.threads, verbose=False, **kwargs)


# ---------------------------------------------------------------------------------------- checks

def read_layer(B, ctx, il, shape):
    n_head, n_head_kv, d = shape
    k, kpos = B.debug_tensor(ctx, il, B.DEBUG_K)
    v, _ = B.debug_tensor(ctx, il, B.DEBUG_V)
    q, qpos = B.debug_tensor(ctx, il, B.DEBUG_Q_WINDOW)
    gram, _ = B.debug_tensor(ctx, il, B.DEBUG_GRAM)
    k = k.reshape(-1, n_head_kv, d)
    return (q.reshape(-1, n_head, d), qpos[: len(q) // (n_head * d)], k, v.reshape(-1, n_head_kv, d),
            kpos[: len(k)], gram.reshape(n_head, d, d))


def run_checks(arms: Arms, info: dict, args, rng) -> dict:
    from pyrestkv import _binding as B
    from pyrestkv import reference as R

    shape = (info["n_head"], info["n_head_kv"], info["head_dim"])
    n_layer, d = info["n_layer"], info["head_dim"]
    n = args.check_cells
    tokens = random_tokens(rng, n, args.n_vocab_plain)
    after = random_tokens(rng, 4, args.n_vocab_plain)
    layers = sorted({0, n_layer // 2, n_layer - 1})
    n_select = n // 4
    out, failures = {"cells": n, "layers_checked": layers}, []

    def check(name, value, bound):
        out[name] = {"value": value, "bound": bound}
        if not value <= bound:
            failures.append(f"{name} = {value:.3g} > {bound}")

    # the same cache in both: the device reads the prompt but its last window, the host loads the
    # device's state (K/V byte for byte), and each decodes the window itself (its queries are the
    # scoring rows, captured as they are decoded)
    arms_run, state = {}, None
    for arm in ("device", "host"):
        llm = arms.open(arm == "device", kv_policy="full", n_ctx=n + 64)
        ctx = B.pointer(llm.ctx)
        if state is None:
            llm.eval(tokens[:-WINDOW])
            synchronize(llm)
            state = llm.save_state()
        else:
            llm.load_state(state)
        B.set_query_window(ctx, WINDOW)
        llm.eval(tokens[-WINDOW:])
        synchronize(llm)
        logits0 = last_logits(llm)
        B.set_score_kernel(ctx, "fused")
        pos, scores, tpos = B.seq_score(ctx, llm._mem, ALPHA, n_select)
        arms_run[arm] = {"llm": llm, "ctx": ctx, "pos": pos, "scores": scores, "tpos": tpos, "logits0": logits0,
                         "n_fused": B.score_n_fused(ctx)}
    dev, host = arms_run["device"], arms_run["host"]
    out["device_layers_fused"] = dev["n_fused"]
    if dev["n_fused"] != n_layer:
        failures.append(f"the device scored {dev['n_fused']} of {n_layer} layers with the fused op")

    # the fused op on the device's own cache, against the reference
    worst, worst_top, worst_gram = 0.0, 0.0, 0.0
    for il in layers:
        q, qpos, k, v, kpos, gram = read_layer(B, dev["ctx"], il, shape)
        ref = R.restkv_scores(q, qpos, k, v, kpos, gram, shape[1], d**-0.5, ALPHA, qpos[0])
        worst = max(worst, relative_error(dev["scores"][il], ref))
        top = R.top_positions(q, qpos, k, kpos, shape[1], d**-0.5, n_select)
        worst_top = max(worst_top, float(np.abs(dev["tpos"][il] - top).max()) / n)
        host_gram, _ = B.debug_tensor(host["ctx"], il, B.DEBUG_GRAM)
        worst_gram = max(worst_gram, relative_error(gram.ravel(), host_gram))
    check("fused_vs_reference", worst, 1e-3)
    check("top_positions_vs_reference_share_of_cells", worst_top, 1e-2)
    check("gram_device_vs_host", worst_gram, 1e-3)

    B.set_score_kernel(dev["ctx"], "composed")
    _, composed, _ = B.seq_score(dev["ctx"], dev["llm"]._mem, ALPHA, n_select)
    check("fused_vs_composed", relative_error(dev["scores"], composed), 1e-3)
    check("scores_device_vs_host", relative_error(dev["scores"], host["scores"]), 1e-2)
    check("top_positions_device_vs_host_share_of_cells", float(np.abs(dev["tpos"] - host["tpos"]).max()) / n, 1e-2)
    top_dev = set(np.argsort(-dev["scores"].max(axis=(0, 1)))[:n_select].tolist())
    top_host = set(np.argsort(-host["scores"].max(axis=(0, 1)))[:n_select].tolist())
    out["top_cells_overlap_device_host"] = len(top_dev & top_host) / n_select

    # the same eviction in both, then decode the same tokens
    cell, _, _ = B.cell_scores(dev["scores"], dev["tpos"], shape[1], DEFAULTS.smoothing_width, DEFAULTS.beta)
    keep_always = np.zeros(n, dtype=np.uint8)
    keep_always[:DEFAULTS.sink] = 1
    keep_always[-WINDOW:] = 1
    evict = np.sort(dev["pos"][B.select_evict(cell, args.budget, keep_always)])
    logits_before = relative_error(dev["logits0"], host["logits0"])
    for arm in (dev, host):
        arm["llm"].kv_evict(evict)
        arm["cells"] = arm["llm"].kv_cells()[0]
        arm["k0"] = B.debug_tensor(arm["ctx"], 0, B.DEBUG_K)[0]
        arm["llm"].eval(after)
        synchronize(arm["llm"])
        arm["logits1"] = last_logits(arm["llm"])
    out["evicted"] = int(len(evict))
    if not np.array_equal(dev["cells"], host["cells"]) or len(dev["cells"]) != n - len(evict):
        failures.append("the device and the host keep different cells after the same eviction")
    check("keys_after_packing_device_vs_host", relative_error(dev["k0"], host["k0"]), 1e-2)
    out["logits_device_vs_host_before_eviction"] = logits_before
    check("logits_device_vs_host_after_eviction", relative_error(dev["logits1"], host["logits1"]),
          2 * logits_before + 1e-3)
    out["next_token_agrees"] = bool(dev["logits1"].argmax() == host["logits1"].argmax())
    for arm in (dev, host):
        arm["llm"].close()
    out["failures"] = failures
    return out


# --------------------------------------------------------------------------------------- timings

def time_size(arms: Arms, info: dict, args, rng, n: int) -> list:
    from pyrestkv import _binding as B

    tokens = random_tokens(rng, n, args.n_vocab_plain)
    decode = random_tokens(rng, 2 * N_DECODE, args.n_vocab_plain)
    rows = []
    for policy in ("full", "restkv"):
        if policy == "full":
            llm = arms.open(True, kv_policy="full", n_ctx=n + 2 * N_DECODE + 64)
        else:
            llm = arms.open(True, kv_policy="restkv", kv_budget=args.budget)
        mem0 = gpu_memory_mib()
        t = time.perf_counter()
        llm.eval(tokens)
        synchronize(llm)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        for tok in decode[:N_DECODE]:
            llm.eval([tok])
        synchronize(llm)
        decode_s = time.perf_counter() - t
        stats = llm.kv_stats()
        row = {"cells": n, "policy": policy, "budget": args.budget if policy == "restkv" else None,
               "n_ctx": stats["n_ctx"], "prefill_tok_s": n / prefill_s, "decode_tok_s": N_DECODE / decode_s,
               "kv_bytes": stats["kv_bytes"], "cells_peak": stats["cells_peak"],
               "gpu_mib_in_use": gpu_memory_mib(), "gpu_mib_before_prefill": mem0}
        if policy == "restkv":
            row.update(scoring_passes=stats["scoring_passes"], scoring_ms=stats["scoring_ms"],
                       evict_ms=stats["evict_ms"], scoring_fused_layers=stats["scoring_fused_layers"])
        else:
            # one scoring pass over the whole cache: the window first takes the last tokens' queries
            ctx = B.pointer(llm.ctx)
            B.set_query_window(ctx, WINDOW)
            for tok in decode[N_DECODE:]:
                llm.eval([tok])
            for kernel in ("fused", "composed"):
                B.set_score_kernel(ctx, kernel)
                B.seq_score(ctx, llm._mem, ALPHA, WINDOW)  # the first pass also computes the Gram matrices
                times = []
                for _ in range(args.passes):
                    t = time.perf_counter()
                    B.seq_score(ctx, llm._mem, ALPHA, WINDOW)
                    times.append(time.perf_counter() - t)
                row[f"score_{kernel}_ms_per_layer"] = 1e3 * statistics.median(times) / info["n_layer"]
                row[f"score_{kernel}_layers"] = B.score_n_fused(ctx) if kernel == "fused" else 0
        llm.close()
        rows.append(row)
        print(f"  {policy:6s} {n:7d} cells: prefill {row['prefill_tok_s']:.1f} tok/s, decode {row['decode_tok_s']:.1f} tok/s",
              flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["| cells | full prefill tok/s | restkv prefill tok/s | full decode tok/s | restkv decode tok/s | "
             "restkv/full decode | fused ms/layer | composed ms/layer | KV MiB full / restkv |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in result["timings"]:
        by.setdefault(r["cells"], {})[r["policy"]] = r
    for n, arm in sorted(by.items()):
        f, r = arm["full"], arm["restkv"]
        lines.append(
            f"| {n} | {f['prefill_tok_s']:.1f} | {r['prefill_tok_s']:.1f} | {f['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / f['decode_tok_s']:.2f}x | "
            f"{f['score_fused_ms_per_layer']:.2f} | {f['score_composed_ms_per_layer']:.2f} | "
            f"{f['kv_bytes'] / 2**20:.0f} / {r['kv_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for device_check.json")
    ap.add_argument("--model", default=None, help="an existing synthetic GGUF to use instead of writing one")
    ap.add_argument("--model-dir", default=tempfile.gettempdir(),
                    help="where to write the synthetic model (removed at the end) [the temporary folder]")
    ap.add_argument("--sizes", default="8192,32768,131072", help="cache sizes (cells) to time")
    ap.add_argument("--layers", type=int, default=8, help="layers of the synthetic model (Llama-3.1-8B has 32)")
    ap.add_argument("--n-ff", type=int, default=None, help="FFN width (default 14336, as the 8B)")
    ap.add_argument("--budget", type=int, default=2048, help="restkv's kv_budget")
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--check-cells", type=int, default=2048, help="the prompt of the device/host checks")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--llama-src", default=None, help="llama.cpp tree with gguf-py (default: the package build's)")
    ap.add_argument("--skip-timings", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.check_cells <= args.budget + WINDOW + 4:
        ap.error("--check-cells must exceed --budget plus the window and sinks, so that the check evicts")

    import pyrestkv  # before llama_cpp: it binds llama_cpp to pyrestkv's libllama

    import llama_cpp

    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    model = args.model
    t = time.perf_counter()
    try:
        if model is None:
            model = str(Path(args.model_dir) / f"synthetic-llama8b-shapes-{os.getpid()}.gguf")
            # a training context past the longest prompt and its decode, so that no arm renumbers positions
            info = synthetic_gguf.make_synthetic_gguf(model, synthetic_gguf.find_llama_src(args.llama_src), args.layers,
                                                      args.n_ff, max(131072, max(sizes)) + 8192)
        else:
            info = synthetic_gguf.describe(model)
        print(f"model: {info} ({time.perf_counter() - t:.1f} s)", flush=True)
        args.n_vocab_plain = min(info["n_vocab"], 128000)  # below llama-bpe's special tokens
        arms = Arms(model, args)
        rng = np.random.default_rng(0)

        result = {
            "device": "gpu" if gpu else "cpu (no GPU backend: device and host are both the CPU)",
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
            "machine": platform.node(), "model": info, "budget": args.budget, "n_batch": args.n_batch,
            "flash_attn": args.flash_attn, "pyrestkv": pyrestkv.__version__,
        }
        t = time.perf_counter()
        result["checks"] = run_checks(arms, info, args, rng)
        print(f"checks ({time.perf_counter() - t:.1f} s): " + json.dumps(result["checks"], default=float), flush=True)
        result["timings"] = []
        if not args.skip_timings:
            for n in sizes:
                result["timings"] += time_size(arms, info, args, rng, n)
            print(markdown(result))
    finally:
        if args.model is None:
            for f in (model, model + ".json"):
                if f and os.path.exists(f):
                    os.remove(f)
    (out / "device_check.json").write_text(json.dumps(result, indent=1, default=float))
    failures = result["checks"]["failures"]
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

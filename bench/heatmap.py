"""The NIAH grid over document lengths: a depth x length heatmap per arm, reading speed against
length, and their tables (written by bench/niah.py, bench/merge.py and bench/report.py through
evalkit.write for any NIAH result with several lengths).

    heatmap.write(result, "niah-gemma3-heatmap", RESULTS)   # -> niah-gemma3-heatmap-{heatmap,speed}.png

A cell is an arm, budget, document length and depth; its samples are the needle kinds (pooled).
Accuracy comes with its hits over samples ("k/n") and a 95% Wilson interval; reading speed is the
median tok/s of the answers (the document's tokens over the whole ask), with the interquartile range.
Cells with no answers are "not run" (yet), or "cannot run" where the full cache cannot hold the
document within the model's training context (the result's n_ctx_train, see evalkit.full_fits).
"""

from __future__ import annotations

import math
import statistics
import sys
from fractions import Fraction
from pathlib import Path

from evalkit import full_fits, pyplot, wilson

NOT_RUN, CANNOT_RUN = "not run", "cannot run"


def arm_label(arm: str, budget) -> str:
    return "full cache" if arm == "full" else f"{arm} {budget}"


def _budget_order(budget) -> float:
    return -1.0 if budget is None else float(Fraction(str(budget)))


def _parse_list(text, kind):
    return [kind(x) for x in str(text).split(",") if x.strip()] if text else []


def grid_axes(result: dict) -> dict:
    """The grid the result was meant to cover: the arms (with their budgets), kinds, lengths and
    depths found in its rows, together with those its command asked for (config), so that a length
    or an arm that has no answer yet still shows as not run."""
    from evalkit import parse_budgets

    rows, config = result["rows"], result.get("config", {})
    if config.get("grid"):  # a part of a preset grid (some of its lengths or arms): the rest is not run yet
        from niah import GRIDS

        preset = GRIDS[config["grid"]]  # the lists below skip empty items and repeats
        config = {**config, **{k: f"{preset[k]},{config.get(k) or ''}" for k in ("arms", "kinds", "lengths", "depths")}}
    runs = {(r["arm"], r.get("budget")) for r in rows}
    budgets = parse_budgets(config["budgets"]) if config.get("budgets") else []
    for arm in _parse_list(config.get("arms"), str):
        runs |= {(arm, None)} if arm == "full" else {(arm, b) for b in budgets}
    order = list(dict.fromkeys(r["arm"] for r in rows)) + _parse_list(config.get("arms"), str)
    runs = sorted(runs, key=lambda ab: (order.index(ab[0]) if ab[0] in order else len(order), _budget_order(ab[1])))
    kinds = list(dict.fromkeys([r["kind"] for r in rows] + _parse_list(config.get("kinds"), str)))
    lengths = sorted({r["length"] for r in rows} | set(_parse_list(config.get("lengths"), int)))
    depths = sorted({float(r["depth"]) for r in rows} | set(_parse_list(config.get("depths"), float)))
    return {"runs": runs, "kinds": kinds, "lengths": lengths, "depths": depths}


def cannot_run(result: dict, arm: str, length: int) -> bool:
    """Only the full cache grows with the document; the budget arms read any length."""
    max_tokens = result.get("config", {}).get("max_tokens", 32)
    return arm == "full" and not full_fits(length, max_tokens, result.get("n_ctx_train"))


def cells(result: dict) -> dict:
    """(arm, budget, length, depth) -> (hits, samples) over every cell of the grid (0 samples where
    none ran)."""
    axes = grid_axes(result)
    out = {(a, b, n, d): (0.0, 0) for a, b in axes["runs"] for n in axes["lengths"] for d in axes["depths"]}
    for r in result["rows"]:
        key = (r["arm"], r.get("budget"), r["length"], float(r["depth"]))
        k, n = out.get(key, (0.0, 0))
        out[key] = (k + r["score"], n + 1)
    return out


def missing(result: dict) -> dict:
    """The samples of the grid that have no answer, grouped: {"not run": {(arm, budget, length): m},
    "cannot run": {...}}, m being how many of that arm and length's samples (kinds x depths) are
    missing."""
    axes = grid_axes(result)
    have = {(r["arm"], r.get("budget"), r["kind"], r["length"], float(r["depth"])) for r in result["rows"]}
    out = {NOT_RUN: {}, CANNOT_RUN: {}}
    for arm, budget in axes["runs"]:
        for length in axes["lengths"]:
            m = sum((arm, budget, kind, length, depth) not in have
                    for kind in axes["kinds"] for depth in axes["depths"])
            if m:
                out[CANNOT_RUN if cannot_run(result, arm, length) else NOT_RUN][(arm, budget, length)] = m
    return out


def missing_lines(result: dict) -> list:
    """What of the grid was not run, in words: "not run: full cache at 16384, 32768; ..." (with a
    count where only part of an arm and length is missing); "cannot run" names the training context."""
    axes = grid_axes(result)
    per_cell = len(axes["kinds"]) * len(axes["depths"])
    lines = []
    for what, found in missing(result).items():
        if not found:
            continue
        parts = []
        for arm, budget in axes["runs"]:
            at = [f"{n}" + ("" if m == per_cell else f" ({m} of {per_cell})")
                  for (a, b, n), m in found.items() if (a, b) == (arm, budget)]
            if at:
                parts.append(f"{arm_label(arm, budget)} at {', '.join(at)}")
        why = (f" (the document does not fit the training context, {result.get('n_ctx_train')} tokens)"
               if what == CANNOT_RUN else "")
        lines.append(f"{what}{why}: " + "; ".join(parts))
    return lines or ["every cell of the grid was run"]


def accuracy_by_length(result: dict) -> dict:
    """(arm, budget, length) -> dict(k, n, accuracy, lo, hi) in percent, depths and kinds pooled."""
    groups = {}
    for r in result["rows"]:
        groups.setdefault((r["arm"], r.get("budget"), r["length"]), []).append(r["score"])
    out = {}
    for key, scores in groups.items():
        k, n = sum(scores), len(scores)
        lo, hi = wilson(k, n)
        out[key] = dict(k=k, n=n, accuracy=round(100.0 * k / n, 1), lo=round(100.0 * lo, 1), hi=round(100.0 * hi, 1))
    return out


def tok_s(row: dict) -> float | None:
    """The answer's reading speed; rows written before run_grid recorded tok_s have it from their
    seconds, by the same definition (the document's tokens over the whole ask)."""
    if row.get("tok_s") is not None:
        return row["tok_s"]
    if row.get("seconds"):
        return row["n_tokens"] / row["seconds"]
    return None


def speed_by_length(result: dict) -> dict:
    """(arm, budget, length) -> dict(median, q1, q3, n) of tok/s over that arm and length's answers."""
    groups = {}
    for r in result["rows"]:
        v = tok_s(r)
        if v is not None:
            groups.setdefault((r["arm"], r.get("budget"), r["length"]), []).append(v)
    out = {}
    for key, v in groups.items():
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0], v[0], v[0])
        out[key] = dict(median=round(statistics.median(v), 1), q1=round(q1, 1), q3=round(q3, 1), n=len(v))
    return out


def _table(result: dict, cell_text) -> str:
    axes = grid_axes(result)
    lines = ["| arm | " + " | ".join(f"{n} tokens" for n in axes["lengths"]) + " |",
             "|---|" + "---|" * len(axes["lengths"])]
    for arm, budget in axes["runs"]:
        texts = [cell_text(arm, budget, n) for n in axes["lengths"]]
        lines.append(f"| {arm_label(arm, budget)} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def _empty_cell(result, arm, length) -> str:
    return CANNOT_RUN if cannot_run(result, arm, length) else NOT_RUN


def accuracy_table(result: dict) -> str:
    """Arm x length: accuracy % [95% Wilson interval], hits/samples (depths and kinds pooled)."""
    acc = accuracy_by_length(result)

    def text(arm, budget, n):
        a = acc.get((arm, budget, n))
        if a is None:
            return _empty_cell(result, arm, n)
        return f"{a['accuracy']} [{a['lo']}–{a['hi']}], {a['k']:g}/{a['n']}"

    return _table(result, text)


def speed_table(result: dict) -> str:
    """Arm x length: median tok/s [interquartile range], answers."""
    speed = speed_by_length(result)

    def text(arm, budget, n):
        s = speed.get((arm, budget, n))
        return _empty_cell(result, arm, n) if s is None else f"{s['median']} [{s['q1']}–{s['q3']}], n={s['n']}"

    return _table(result, text)


def wins_by_length(result: dict, arm: str = "restkv") -> list:
    """Per length, the arms that `arm` beats or loses to beyond chance (the 95% intervals separate);
    everything else is within the intervals and is not called a win."""
    acc = accuracy_by_length(result)
    lines = []
    for length in grid_axes(result)["lengths"]:
        mine = [(b, a) for (x, b, n), a in acc.items() if x == arm and n == length]
        for budget, a in mine:
            beats = [arm_label(x, b) for (x, b, n), o in acc.items() if n == length and x != arm and a["lo"] > o["hi"]]
            loses = [arm_label(x, b) for (x, b, n), o in acc.items() if n == length and x != arm and o["lo"] > a["hi"]]
            lines.append(f"{length} tokens: {arm_label(arm, budget)} beats {', '.join(beats) or 'none'}"
                         f" and loses to {', '.join(loses) or 'none'} beyond chance")
    return lines


def _budgets_text(result: dict) -> str:
    budgets = sorted({b for _, b in grid_axes(result)["runs"] if b is not None}, key=_budget_order)
    return ", ".join(str(b) for b in budgets) or "none"


def _length_ticks(result: dict, lengths: list) -> list:
    return [f"{n}" + ("\n> n_ctx_train" if cannot_run(result, "full", n) else "") for n in lengths]


def plot_heatmap(result: dict, dest: Path) -> Path | None:
    """One panel per arm: x = document length, y = needle depth, colour = accuracy (one shared colour
    bar), each cell labelled hits/samples, "not run" or "cannot run" (grey); a dashed line where the
    documents stop fitting the training context."""
    plt = pyplot()
    if plt is None:
        return None
    import numpy as np

    axes_ = grid_axes(result)
    runs, lengths, depths = axes_["runs"], axes_["lengths"], axes_["depths"]
    counts = cells(result)
    ncols = min(3, len(runs))
    nrows = math.ceil(len(runs) / ncols)
    fig, axs = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                            figsize=(1.5 + 1.2 * len(lengths) * ncols, 0.8 + (1.0 + 0.45 * len(depths)) * nrows))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")  # cells with no answers
    beyond = [i for i, n in enumerate(lengths) if cannot_run(result, "full", n)]
    image = None
    for ax, (arm, budget) in zip(axs.flat, runs):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                k, m = counts[(arm, budget, n, d)]
                if m:
                    grid[i, j] = k / m
                label = f"{k:g}/{m}" if m else _empty_cell(result, arm, n).replace(" ", "\n")
                ax.text(j, i, label, ha="center", va="center", fontsize=7 if m else 6)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        if beyond:
            ax.axvline(beyond[0] - 0.5, color="black", linestyle="--", linewidth=1)
        ax.set_title(arm_label(arm, budget), fontsize=9)
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels(_length_ticks(result, lengths), fontsize=7)
        ax.set_yticks(range(len(depths)))
        ax.set_yticklabels([f"{d:g}%" for d in depths], fontsize=7)
        ax.set_xlabel("document length (tokens)", fontsize=8)
    for ax in axs[:, 0]:
        ax.set_ylabel("needle depth", fontsize=8)
    for ax in list(axs.flat)[len(runs):]:
        ax.axis("off")
    bar = fig.colorbar(image, ax=axs.ravel().tolist(), shrink=0.9)
    bar.set_label("accuracy (hits / samples)")
    kinds = ", ".join(axes_["kinds"])
    fig.suptitle(f"NIAH depth x length, {result['model']}, kv_budget {_budgets_text(result)} of the document "
                 f"(kinds pooled: {kinds})", fontsize=10)
    fig.savefig(dest, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return dest


def plot_speed(result: dict, dest: Path) -> Path | None:
    """Median reading speed (tok/s) against document length (log scale), one line per arm, the
    interquartile range as error bars, the answers per point in the legend; the full cache dashed."""
    plt = pyplot()
    if plt is None:
        return None
    speed = speed_by_length(result)
    if not speed:
        print("no answer records its speed: no speed plot", file=sys.stderr)
        return None
    runs = [ab for ab in grid_axes(result)["runs"] if any(k[:2] == ab for k in speed)]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (arm, budget) in enumerate(runs):
        pts = sorted((n, s) for (a, b, n), s in speed.items() if (a, b) == (arm, budget))
        dodge = 1.0 + 0.02 * (i - (len(runs) - 1) / 2)  # multiplicative: the x axis is logarithmic
        ns = sorted({s["n"] for _, s in pts})
        count = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}"
        style = dict(color="black", linestyle="--") if arm == "full" else {}
        ax.errorbar([n * dodge for n, _ in pts], [s["median"] for _, s in pts],
                    yerr=[[s["median"] - s["q1"] for _, s in pts], [s["q3"] - s["median"] for _, s in pts]],
                    marker="o", capsize=3, label=f"{arm_label(arm, budget)} ({count} per point)", **style)
    lengths = grid_axes(result)["lengths"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels(_length_ticks(result, lengths), fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("reading speed, median tok/s (IQR bars)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"NIAH reading speed, {result['model']}, kv_budget {_budgets_text(result)}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def markdown(result: dict) -> str:
    """The tables and the not-run listing, as the .md file and README show them."""
    derived = sum(r.get("tok_s") is None for r in result["rows"])
    note = (f" ({derived} of {len(result['rows'])} answers predate the tok_s field: theirs is the document's "
            "tokens over their seconds)" if derived else "")
    parts = ["Accuracy per arm and length, % [95% Wilson interval], hits/samples (depths and kinds pooled):", "",
             accuracy_table(result), "", *[f"- {w}" for w in wins_by_length(result)], "",
             f"Reading speed per arm and length, median tok/s [interquartile range], answers{note}:", "",
             speed_table(result), "", *[f"- {line}" for line in missing_lines(result)]]
    return "\n".join(parts)


def write(result: dict, stem: str, results_dir: Path) -> list:
    """<stem>-heatmap.png, <stem>-speed.png and the tables appended to <stem>.md."""
    made = [plot_heatmap(result, results_dir / f"{stem}-heatmap.png"),
            plot_speed(result, results_dir / f"{stem}-speed.png")]
    md = results_dir / f"{stem}.md"
    if md.exists():
        md.write_text(md.read_text() + "\n" + markdown(result) + "\n")
    return [p for p in made if p is not None]

"""bench/speed.py's arms and its ratios over rounds, without a model."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import speed  # noqa: E402


def args(policies: str, lengths: str = "1024,8000", budgets: str = "512,1024") -> argparse.Namespace:
    return argparse.Namespace(model="smollm2", lengths=lengths, budgets=budgets, policies=policies, n_batch=512,
                              threads=2, decode=64)


def test_arms_give_shift_the_same_memory_and_skip_documents_that_fit():
    todo = speed.arms(args("full,shift,streaming,restkv"))
    # 1024 tokens fit in either budget + one chunk: only the full cache reads them
    assert [(a["length"], a["policy"]) for a in todo if a["length"] == 1024] == [(1024, "full")]
    bounded = [(a["policy"], a["budget"], a["n_ctx"]) for a in todo if a["length"] == 8000 and a["policy"] != "full"]
    assert bounded == [("shift", 512, 1024), ("streaming", 512, None), ("restkv", 512, None),
                       ("shift", 1024, 1536), ("streaming", 1024, None), ("restkv", 1024, None)]


def test_arms_refuse_an_unknown_policy():
    with pytest.raises(SystemExit, match="choose from"):
        speed.arms(args("shift,restkvv"))


def test_ratios_pair_arms_of_the_same_round_and_take_the_median():
    rows = []
    # round 1 ran 20% faster throughout: each ratio is the same in both rounds, its median too
    for rnd, pace in ((0, 1.0), (1, 1.2), (2, 1.0)):
        for policy, tok_s in (("full", 50.0), ("shift", 100.0), ("streaming", 98.0), ("restkv", 90.0 + rnd)):
            rows.append({"round": rnd, "length": 8000, "budget": None if policy == "full" else 1024,
                         "policy": policy, "prefill_tok_s": tok_s * pace})
    got = {(x["policy"], x["against"]): x for x in speed.ratios(rows)}
    # rows without the read's split (older results) give no forward-pass ratio
    assert set(got) == {("streaming", "shift"), ("restkv", "shift"), ("restkv", "streaming")}
    assert all(x["measure"] == "prefill tok/s" for x in speed.ratios(rows))
    assert got[("streaming", "shift")]["per_round"] == [0.98, 0.98, 0.98]
    assert got[("restkv", "shift")]["per_round"] == [0.9, 0.91, 0.92]
    assert got[("restkv", "shift")]["median"] == 0.91
    assert got[("restkv", "streaming")]["median"] == round(91 / 98, 3)
    assert "restkv / shift prefill tok/s 0.900, 0.910, 0.920 (median 0.910)" in speed.ratio_lines(speed.ratios(rows))


def test_the_forward_pass_ratio_compares_restkv_and_streaming_without_scoring():
    rows = []
    for rnd in (0, 1):
        for policy, read_s, forward_s in (("shift", 20.0, 19.0), ("streaming", 22.0, 21.0), ("restkv", 24.0, 21.0 + rnd)):
            rows.append({"round": rnd, "length": 8000, "budget": 1024, "policy": policy,
                         "prefill_tok_s": 8000 / read_s, "read_decode_s": forward_s})
    forward = [x for x in speed.ratios(rows) if x["measure"] == "read forward passes"]
    # streaming's forward seconds over restkv's: 1.0 when restkv's passes are as fast, below when slower
    assert [(x["policy"], x["against"], x["per_round"]) for x in forward] == [("restkv", "streaming", [1.0, round(21 / 22, 3)])]
    assert "restkv / streaming read forward passes 1.000, 0.955" in speed.ratio_lines(forward)

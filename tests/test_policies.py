"""The policies on their own, without a model: every registered policy driven through a fake cache
(a CacheView with synthetic scoring-pass arrays of the right shapes). Fast."""

import dataclasses

import numpy as np
import pytest

from pyrestkv.policies import (
    BUDGET_POLICIES, POLICIES, SCORED_POLICIES, CacheView, ContextShiftPolicy, H2OPolicy, KVCacheFullError, ModelInfo,
    RestKVPolicy, ScoredPolicy, make_policy,
)

N_LAYER, N_HEAD, N_HEAD_KV = 3, 6, 3
MODEL = ModelInfo(n_ctx=512, add_bos=False, n_head_kv=N_HEAD_KV, n_ctx_train=8192)
BUDGET, WINDOW, SINK = 64, 8, 4
UNSCORED_BUDGET_POLICIES = tuple(p for p in BUDGET_POLICIES if p not in SCORED_POLICIES)


class FakeCache:
    """Cached positions and a scoring pass that returns random scores (or the given ones), in the
    shapes of the real pass: positions [n], scores [n_layer, n_head, n], tpos [n_layer, n_head, 2]."""

    def __init__(self, positions, scored=True, seed=0, score_of=None):
        self.positions = np.asarray(positions, dtype=np.int32)
        self.rng = np.random.default_rng(seed)
        self.scored = scored
        self.score_of = score_of  # position -> score, instead of random scores
        self.n_select = []  # one entry per scoring pass

    def view(self, n_incoming=0, n_ctx=512):
        return CacheView(positions=self.positions.copy(), n_ctx=n_ctx, n_incoming=n_incoming, score=self.score)

    def score(self, n_select):
        assert self.scored, "a policy that does not score ran a scoring pass"
        self.n_select.append(n_select)
        n = len(self.positions)
        if self.score_of is None:
            scores = self.rng.random((N_LAYER, N_HEAD, n)).astype(np.float32)
        else:
            scores = np.broadcast_to(self.score_of(self.positions), (N_LAYER, N_HEAD, n)).astype(np.float32)
        tpos = np.full((N_LAYER, N_HEAD, 2), np.nan, dtype=np.float32)
        if n_select:  # mean positions of the top cells: somewhere inside the cache
            tpos[:] = self.rng.uniform(self.positions[0], self.positions[-1], (N_LAYER, N_HEAD, 2))
        return self.positions.copy(), scores, tpos

    def decode(self, n):
        start = int(self.positions[-1]) + 1 if len(self.positions) else 0
        self.positions = np.concatenate([self.positions, np.arange(start, start + n, dtype=np.int32)])

    def apply(self, ev):
        assert np.isin(ev.positions, self.positions).all(), "evicted a position that is not cached"
        self.positions = self.positions[~np.isin(self.positions, ev.positions)]
        if ev.compact:
            self.positions = np.arange(len(self.positions), dtype=np.int32)


def bound(name, **keywords):
    policy = make_policy(name, **keywords)
    policy.bind(MODEL)
    return policy


def budget_policy(name, **keywords):
    return bound(name, kv_budget=BUDGET, kv_window=WINDOW, kv_sink=SINK, **keywords)


def n_lead(name):
    """The leading positions a budget policy always keeps: the sinks, or truncate's head."""
    return BUDGET // 2 if name == "truncate" else SINK


# ---------------------------------------------------------------- the evict-to-budget schedule


@pytest.mark.parametrize("name", BUDGET_POLICIES)
@pytest.mark.parametrize("holes", [False, True], ids=["dense", "with-holes"])
def test_evict_to_budget_keeps_the_budget_the_window_and_the_sinks(name, holes):
    positions = np.arange(0, 300, 3 if holes else 1)[:100]
    cache = FakeCache(positions, scored=name in SCORED_POLICIES)
    policy = budget_policy(name)
    ev = policy.after_chunk(cache.view(), n_decoded=36)
    assert ev is not None and len(ev.positions) == 100 - BUDGET
    cache.apply(ev)
    assert len(cache.positions) == BUDGET
    assert np.array_equal(cache.positions[:n_lead(name)], positions[:n_lead(name)])
    assert np.array_equal(cache.positions[-WINDOW:], positions[-WINDOW:])
    assert len(cache.n_select) == (1 if name in SCORED_POLICIES else 0)


@pytest.mark.parametrize("name", BUDGET_POLICIES)
def test_evicts_only_above_the_budget_and_only_after_a_prompt_chunk(name):
    policy = budget_policy(name)
    cache = FakeCache(np.arange(BUDGET), scored=name in SCORED_POLICIES)
    assert policy.after_chunk(cache.view(), n_decoded=32) is None  # at the budget: nothing to do
    cache.decode(1)
    assert policy.after_chunk(cache.view(), n_decoded=1) is None  # a generated token never evicts
    # generation filled the cache: back down to the budget at once
    cache.decode(BUDGET - 1)
    cache.apply(policy.make_room(cache.view(n_incoming=1, n_ctx=2 * BUDGET)))
    assert len(cache.positions) == BUDGET


@pytest.mark.parametrize("name", BUDGET_POLICIES)
@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_reading_a_long_prompt_in_chunks(name, positions):
    """1,000 tokens in chunks of 48: after every chunk at most the budget is left, the newest window
    and the leading cells are there, and positions are renumbered only with kv_positions='compact'."""
    policy = budget_policy(name, kv_positions=positions)
    cache = FakeCache([], scored=name in SCORED_POLICIES, seed=1)
    seen = 0
    for _ in range(21):
        cache.decode(48)
        seen += 48
        ev = policy.after_chunk(cache.view(), n_decoded=48)
        if ev is not None:
            assert ev.compact == (positions == "compact")
            cache.apply(ev)
        assert len(cache.positions) == min(seen, BUDGET)
    if positions == "keep":
        assert cache.positions[-1] == seen - 1
        assert np.array_equal(cache.positions[-WINDOW:], np.arange(seen - WINDOW, seen))
        assert np.array_equal(cache.positions[:n_lead(name)], np.arange(n_lead(name)))
    else:
        assert np.array_equal(cache.positions, np.arange(BUDGET))
    assert len(cache.n_select) == (20 if name in SCORED_POLICIES else 0)


@pytest.mark.parametrize("name", SCORED_POLICIES)
def test_scored_policies_keep_what_the_scores_rate_highest(name):
    # every layer and head rates the multiples of 7 highest, then the later cells; with no smoothing,
    # the budget left beside the sinks and the window goes to the best-rated cells
    score_of = lambda pos: (pos % 7 == 0) + 0.001 * pos  # noqa: E731
    cache = FakeCache(np.arange(200), score_of=score_of)
    policy = budget_policy(name, kv_kernel=1)
    cache.apply(policy.after_chunk(cache.view(), n_decoded=64))
    candidates = np.arange(SINK, 200 - WINDOW)
    best = np.sort(candidates[np.argsort(score_of(candidates))][-(BUDGET - SINK - WINDOW):])
    assert np.array_equal(cache.positions, np.r_[0:SINK, best, 200 - WINDOW:200])
    assert np.isin(np.arange(7, 192, 7), cache.positions).all()
    # scores that prefer the oldest cells instead: the choice follows them
    cache = FakeCache(np.arange(200), score_of=lambda pos: -pos.astype(np.float32))
    cache.apply(budget_policy(name, kv_kernel=1).after_chunk(cache.view(), n_decoded=64))
    assert np.array_equal(cache.positions, np.r_[0:BUDGET - WINDOW, 200 - WINDOW:200])


def test_restkv_asks_for_the_top_positions_only_where_smoothing_can_shift():
    # the adaptive smoothing offset is non-zero only once the cache spans at least beta positions
    policy = budget_policy("restkv", kv_beta=2000.0)
    near = FakeCache(np.arange(100))
    policy.after_chunk(near.view(), n_decoded=36)
    far = FakeCache(np.r_[0:50, 5000:5050])
    budget_policy("restkv", kv_beta=2000.0).after_chunk(far.view(), n_decoded=36)
    assert near.n_select == [0] and far.n_select == [BUDGET - WINDOW]


def test_h2o_accumulates_over_passes():
    pol = H2OPolicy(budget=40, window=4, sink=0)
    first = np.ones((1, 1, 6), dtype=np.float32)
    pos = np.arange(6, dtype=np.int32)
    assert np.array_equal(pol.accumulate(pos, first), first)
    pol.evicted(pos, np.array([1, 3]))  # keeps positions 0, 2, 4, 5
    pos2 = np.array([0, 2, 4, 5, 6, 7], dtype=np.int32)
    acc = pol.accumulate(pos2, np.full((1, 1, 6), 0.5, dtype=np.float32))
    np.testing.assert_allclose(acc[0, 0], [1.5, 1.5, 1.5, 1.5, 0.5, 0.5])
    # renumbered from outside: the sums start again rather than land on the wrong cells
    pol.evicted(pos2, np.array([], dtype=np.int64))
    acc = pol.accumulate(np.arange(6, dtype=np.int32), np.full((1, 1, 6), 0.5, dtype=np.float32))
    np.testing.assert_allclose(acc, 0.5)


@pytest.mark.parametrize("name", BUDGET_POLICIES)
def test_auto_positions_compact_before_the_training_context(name):
    policy = budget_policy(name)
    assert not policy.should_compact(pos_next=8000, n_incoming=192)
    assert policy.should_compact(pos_next=8000, n_incoming=193)
    assert not budget_policy(name, kv_positions="keep").should_compact(pos_next=8000, n_incoming=500)


# ---------------------------------------------------------------- full and shift


def test_full_never_evicts():
    policy = bound("full")
    cache = FakeCache(np.arange(512), scored=False)
    assert not policy.evicts and policy.scoring() is None
    assert policy.after_chunk(cache.view(), n_decoded=100) is None
    with pytest.raises(KVCacheFullError, match="the KV cache is full: 512 of n_ctx=512 cells"):
        policy.make_room(cache.view(n_incoming=3))


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("n_discard", [0, 50])
def test_shift_keeps_n_keep_and_discards_the_oldest_of_the_rest(add_bos, n_discard):
    policy = ContextShiftPolicy(n_keep=10, n_discard=n_discard)
    policy.bind(ModelInfo(n_ctx=256, add_bos=add_bos))
    cache = FakeCache(np.arange(256), scored=False)
    ev = policy.make_room(cache.view(n_incoming=16, n_ctx=256))
    kept = 10 + add_bos  # the BOS token is kept on top of n_keep, as llama.cpp's server does
    expect = n_discard or (256 - kept) // 2
    assert ev.compact and np.array_equal(ev.positions, np.arange(kept, kept + expect))
    assert policy.after_chunk(cache.view(), n_decoded=64) is None and policy.scoring() is None


# ---------------------------------------------------------------- configuration

CUSTOM = {  # a valid value, different from the default, for every keyword
    "kv_budget": 100, "kv_window": 16, "kv_sink": 2, "kv_positions": "keep", "kv_query": "What is it?",
    "kv_aggregate": "mean", "kv_kernel": 3, "kv_score_kernel": "composed", "kv_alpha": 0.5, "kv_beta": 1000.0,
    "n_keep": 7, "n_discard": 9,
}
DESCRIBED = {  # the policy's keys in kv_stats()
    "full": set(),
    "shift": {"n_keep", "n_discard"},
    "restkv": {"kv_window", "kv_sink", "kv_alpha", "kv_beta", "kv_kernel", "kv_query", "kv_positions", "kv_aggregate"},
    "snapkv": {"kv_window", "kv_sink", "kv_kernel", "kv_query", "kv_positions", "kv_aggregate"},
    "h2o": {"kv_window", "kv_sink", "kv_kernel", "kv_query", "kv_positions", "kv_aggregate"},
    "tova": {"kv_window", "kv_sink", "kv_kernel", "kv_query", "kv_positions", "kv_aggregate"},
    "streaming": {"kv_sink", "kv_positions"},
    "truncate": {"kv_head", "kv_positions"},
}


def test_every_registered_policy_is_described():
    assert set(DESCRIBED) == set(POLICIES)


@pytest.mark.parametrize("name", list(POLICIES))
def test_describe_returns_the_configuration(name):
    keywords = {kw: CUSTOM[kw] for kw in POLICIES[name].keywords()}
    policy = make_policy(name, **keywords)
    described = policy.describe()
    assert set(described) == DESCRIBED[name]
    for kw, value in described.items():
        assert value == (CUSTOM["kv_budget"] // 2 if kw == "kv_head" else keywords[kw])
    # a policy is its configuration: the same keywords make an equal policy, the class fields say it all
    assert make_policy(name, **keywords) == policy
    assert POLICIES[name](**{POLICIES[name].keywords()[kw]: v for kw, v in keywords.items()}) == policy


@pytest.mark.parametrize("name", list(POLICIES))
def test_defaults_are_the_documented_ones(name):
    policy = make_policy(name)
    if name in BUDGET_POLICIES:
        assert (policy.budget, policy.window, policy.sink, policy.positions) == (2048, 32, 4, "auto")
    if name in SCORED_POLICIES:
        assert (policy.query, policy.aggregate, policy.scoring_op) == ("tail", "max_rank", "auto")
        assert policy.smoothing_width == {"restkv": 21, "snapkv": 5}.get(name, 1)
    if name == "restkv":
        assert (policy.alpha, policy.beta) == (0.3, 2000.0)
    if name == "shift":
        assert (policy.n_keep, policy.n_discard) == (0, 0)


@pytest.mark.parametrize("name, output, rows", [
    ("restkv", "restkv", "ema"), ("snapkv", "attention", "mean"), ("h2o", "attention", "mean"),
    ("tova", "attention", "last"),
])
def test_scoring_spec(name, output, rows):
    spec = make_policy(name, kv_window=16, kv_score_kernel="composed").scoring()
    assert (spec.window, spec.output, spec.rows, spec.op) == (16, output, rows, "composed")
    assert spec.alpha == 0.3
    if name == "restkv":
        assert make_policy(name, kv_alpha=0.7).scoring().alpha == 0.7


def test_registry_lists_are_derived():
    assert set(BUDGET_POLICIES) == {"restkv", "snapkv", "h2o", "tova", "streaming", "truncate"}
    assert set(SCORED_POLICIES) == {"restkv", "snapkv", "h2o", "tova"}
    assert all(issubclass(POLICIES[p], ScoredPolicy) for p in SCORED_POLICIES)
    for name, cls in POLICIES.items():
        assert cls.name == name and (cls().scoring() is not None) == (name in SCORED_POLICIES)


SCORING_KEYWORDS = ("kv_alpha", "kv_beta", "kv_query", "kv_aggregate", "kv_kernel", "kv_score_kernel")


@pytest.mark.parametrize("name", ["full", "shift", "streaming", "truncate"])
@pytest.mark.parametrize("keyword", SCORING_KEYWORDS)
def test_policies_that_do_not_score_reject_scoring_parameters(name, keyword):
    takes = ", ".join(POLICIES[name].keywords()) or "no policy parameters"
    with pytest.raises(ValueError, match=f"kv_policy='{name}' does not take {keyword}; it takes {takes}$"):
        make_policy(name, **{keyword: CUSTOM[keyword]})


@pytest.mark.parametrize("name, keywords, error, match", [
    ("lru", {}, ValueError, "unknown kv_policy 'lru'; choose one of"),
    (RestKVPolicy, {}, TypeError, "a policy instance, e.g. RestKVPolicy\\(\\), not the class"),
    ("full", {"kv_budget": 10}, ValueError, "'full' does not take kv_budget"),
    ("shift", {"kv_budget": 10}, ValueError, "'shift' does not take kv_budget; it takes n_keep, n_discard"),
    ("restkv", {"n_keep": 4}, ValueError, "'restkv' does not take n_keep"),
    ("snapkv", {"kv_alpha": 0.5}, ValueError, "'snapkv' does not take kv_alpha"),
    ("h2o", {"kv_beta": 10.0}, ValueError, "'h2o' does not take kv_beta"),
    ("shift", {"n_keep": -1}, ValueError, "n_keep must be >= 0"),
    ("shift", {"n_keep": 1.5}, TypeError, "n_keep must be an integer"),
    ("shift", {"n_discard": -3}, ValueError, "n_discard must be >= 0"),
    ("streaming", {"kv_budget": 30}, ValueError, "kv_budget=30 must be at least kv_window \\+ kv_sink = 36"),
    ("truncate", {"kv_window": 0}, ValueError, "kv_window must be >= 1"),
    ("restkv", {"kv_window": 300}, ValueError, "kv_window must be <= 256"),
    ("tova", {"kv_sink": -1}, ValueError, "kv_sink must be >= 0"),
    ("restkv", {"kv_budget": "big"}, TypeError, "kv_budget must be an integer"),
    ("restkv", {"kv_alpha": 0.0}, ValueError, "kv_alpha must be in"),
    ("restkv", {"kv_beta": -1.0}, ValueError, "kv_beta must be positive"),
    ("snapkv", {"kv_kernel": 0}, ValueError, "kv_kernel \\(smoothing_width\\) must be >= 1"),
    ("streaming", {"kv_positions": "sometimes"}, ValueError, "kv_positions must be"),
    ("h2o", {"kv_aggregate": "median"}, ValueError, "kv_aggregate must be one of"),
    ("restkv", {"kv_score_kernel": "gpu"}, ValueError, "kv_score_kernel \\(scoring_op\\) must be one of"),
    ("tova", {"kv_query": 3.5}, ValueError, "kv_query must be 'tail', 'none', a question text or a token list"),
    ("restkv", {"kv_query": [1, "two"]}, ValueError, "kv_query as a list must hold token ids"),
])
def test_bad_parameters_raise(name, keywords, error, match):
    with pytest.raises(error, match=match):
        make_policy(name, **keywords)


def test_an_instance_is_its_whole_configuration():
    policy = RestKVPolicy(budget=100)
    assert make_policy(policy) is policy
    with pytest.raises(ValueError, match="RestKVPolicy instance, which is its whole configuration: give kv_budget"):
        make_policy(policy, kv_budget=200)


def test_a_policy_serves_one_model():
    policy = bound("h2o")
    with pytest.raises(ValueError, match="already serves another Llama"):
        policy.bind(MODEL)
    with pytest.raises(ValueError, match="already serves another Llama"):
        make_policy(policy)
    copy = dataclasses.replace(policy)  # the configuration, unbound
    assert copy == policy and copy.model is None
    copy.bind(MODEL)


def test_kv_kernel_none_means_the_default_and_kv_query_none_means_no_probe():
    assert make_policy("snapkv", kv_kernel=None).smoothing_width == 5
    assert make_policy("restkv", kv_query=None).query == "none"
    assert make_policy("restkv", kv_query=(5, 6)).describe()["kv_query"] == "tokens"


@pytest.mark.parametrize("name", BUDGET_POLICIES)
def test_budget_policies_size_the_context(name):
    policy = make_policy(name, kv_budget=512)
    assert policy.size_context(None, 512, 512) == (1024, 512, 512)  # budget + one prefill chunk
    assert policy.size_context(0, 256, 512) == (768, 256, 256)
    assert policy.size_context(768, 512, 512) == (768, 256, 256)  # a chunk must fit beside the budget
    with pytest.raises(ValueError, match="n_ctx=520 leaves no room to read past kv_budget=512"):
        policy.size_context(520, 512, 512)
    with pytest.raises(ValueError, match="kv_window=32 is larger than n_ubatch=16"):
        policy.size_context(None, 512, 16)


def test_shift_checks_n_keep_against_the_context():
    policy = ContextShiftPolicy(n_keep=256)
    assert policy.size_context(None, 512, 512) == (None, 512, 512)  # unknown yet: checked at bind
    with pytest.raises(ValueError, match="n_keep=256 must be smaller than n_ctx=256"):
        policy.size_context(256, 512, 512)
    with pytest.raises(ValueError, match="n_keep=256 must be smaller than n_ctx=256"):
        policy.bind(ModelInfo(n_ctx=256))

"""native/restkv_policy against the NumPy reference (pyrestkv/reference.py)."""

import numpy as np
import pytest

from pyrestkv import _binding, reference


@pytest.mark.parametrize(
    "t, kernel_min, beta, expected",
    [
        (0.0, 5, 2000.0, (5, 1)),  # quirk: t == 0 gives shift +1
        (1999.0, 5, 2000.0, (5, 0)),
        (2000.0, 5, 2000.0, (5, 1)),
        (-1.0, 5, 2000.0, (5, 0)),
        (-2000.0, 5, 2000.0, (5, 0)),  # quirk: exact negative multiple -m*beta gives 1 - m
        (-4000.0, 5, 2000.0, (5, -1)),
        (-4000.5, 5, 2000.0, (5, -2)),
        (6000.0, 5, 2000.0, (7, 3)),
        (45000.0, 21, 2000.0, (45, 22)),
        (-44000.0, 21, 2000.0, (45, -21)),
    ],
)
def test_aws_params(t, kernel_min, beta, expected):
    assert _binding.aws_params(t, kernel_min, beta) == expected
    assert reference.aws_params(t, kernel_min, beta) == expected


@pytest.mark.parametrize("n", [1, 2, 7, 21, 300])
@pytest.mark.parametrize("kernel, shift", [(1, 0), (5, 1), (5, -2), (21, 0), (21, 3), (45, -22), (301, 5)])
def test_aws_smooth_matches_reference(n, kernel, shift):
    x = np.random.default_rng(n * 100 + kernel).standard_normal(n).astype(np.float32)
    np.testing.assert_allclose(_binding.aws_smooth(x, kernel, shift), reference.aws_smooth(x, kernel, shift), rtol=1e-5, atol=1e-6)


def test_aws_smooth_kernel_longer_than_prefix():
    # every window covers the whole (replicated) sequence: the edges dominate
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    out = _binding.aws_smooth(x, 21, 0)
    # the window of 21 centred at i covers indices i-10..i+10, clamped to [0, 2]
    np.testing.assert_allclose(out, reference.aws_smooth(x, 21, 0), rtol=1e-6)
    np.testing.assert_allclose(out[0], (11 * 1 + 2 + 9 * 3) / 21, rtol=1e-6)
    np.testing.assert_allclose(out[2], (9 * 1 + 2 + 11 * 3) / 21, rtol=1e-6)


def test_aws_smooth_constant_is_unchanged():
    x = np.full(50, 0.25, dtype=np.float32)
    np.testing.assert_allclose(_binding.aws_smooth(x, 21, 4), x)


def test_max_rank_matches_reference():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((30, 257)).astype(np.float32)
    scores[3, :10] = 0.5  # ties
    np.testing.assert_allclose(_binding.max_rank(scores), reference.max_rank(scores))


def test_max_rank_keeps_what_one_layer_wants():
    scores = np.zeros((3, 5), dtype=np.float32)
    scores[:, :] = [1, 2, 3, 4, 5]
    scores[2, 0] = 100  # only layer 2 cares about cell 0
    out = _binding.max_rank(scores)
    assert out[0] == 1.0 and out[4] == 1.0 and out[1] == 0.25


@pytest.mark.parametrize("n_keep", [0, 1, 10, 99, 100, 150])
def test_select_evict_matches_reference(n_keep):
    rng = np.random.default_rng(n_keep)
    score = rng.random(100).astype(np.float32)
    score[20:30] = 0.5  # ties broken by index
    protect = np.zeros(100, dtype=np.uint8)
    protect[:4] = 1
    protect[-8:] = 1
    native = _binding.select_evict(score, n_keep, protect)
    ref = reference.select_evict(score, n_keep, protect)
    np.testing.assert_array_equal(native, ref)
    assert not np.isin(np.r_[0:4, 92:100], native).any()
    assert len(native) == max(0, 100 - max(n_keep, 12))


def test_select_evict_without_protection():
    score = np.array([0.1, 0.9, 0.5, 0.3], dtype=np.float32)
    np.testing.assert_array_equal(_binding.select_evict(score, 2), [0, 3])


@pytest.mark.parametrize(
    "call",
    [
        lambda: _binding.aws_params(1.0, 0, 2000.0),
        lambda: _binding.aws_params(1.0, 5, 0.0),
        lambda: _binding.aws_params(float("nan"), 5, 2000.0),
        lambda: _binding.aws_smooth(np.zeros(4), 0, 0),
        lambda: _binding.select_evict(np.zeros(4), -1),
        lambda: _binding.max_rank(np.zeros(4)),
        lambda: _binding.select_evict(np.zeros(4), 1, np.zeros(3)),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_cell_scores_native_matches_reference():
    rng = np.random.default_rng(3)
    scores = rng.random((30, 9, 400)).astype(np.float32)
    tpos = np.full((30, 9, 2), np.nan, dtype=np.float32)
    tpos[3] = [[5000.0, 1000.0]] * 9  # t = 4000: kernel 21, shift 2
    tpos[4] = [[100.0, 6100.0]] * 9  # t = -6000: kernel 21, shift -2
    native, kernels, shifts = _binding.cell_scores(scores, tpos, 3, 21, 2000.0)
    ref = reference.cell_scores(scores, tpos, 3, 21, 2000.0)
    assert kernels[3, 0] == 21 and shifts[3, 0] == 2 and shifts[4, 0] == -2 and shifts[0, 0] == 0
    # float32 sums in a different order can swap near-ties: ranks agree almost everywhere
    assert np.mean(np.abs(native - ref) < 1e-3) > 0.99

"""A readable NumPy reference of the ReST-KV policy math. Tests hold the native code against it.

Each function mirrors one step of `native/restkv_policy.h`; arrays are in cache position order.
The formulas follow the official ReST-KV code (see ../shared/docs/restkv-algorithm.md, section 1.3).
"""

from __future__ import annotations

import math

import numpy as np


def aws_params(t: float, kernel_min: int, beta: float) -> tuple[int, int]:
    """Kernel width and offset of adaptive-window spatial smoothing, quirks included."""
    kernel = max(kernel_min, 2 * int(math.floor(abs(t) / beta)) + 1)
    q = int(math.floor(t / beta))
    shift = q if t > 0 else q + 1
    return kernel, shift


def aws_smooth(x: np.ndarray, kernel: int, shift: int) -> np.ndarray:
    """Box mean of width `kernel` centred at i + shift, padding by replicating the edges
    (the official code's F.pad(mode='replicate') then unfold-mean)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    pad_l = kernel // 2 - shift  # the official code's left pad; its right pad is kernel // 2 + shift
    # window i covers padded[i : i + kernel], i.e. x[i - pad_l + j] for j < kernel, edges clamped
    idx = np.arange(n)[:, None] - pad_l + np.arange(kernel)[None, :]
    return x[np.clip(idx, 0, n - 1)].mean(axis=1).astype(np.float32)


def max_rank(scores: np.ndarray) -> np.ndarray:
    """One score per cell: max over layers of the cell's rank within its layer, scaled to [0, 1]."""
    scores = np.asarray(scores, dtype=np.float32)
    n_layer, n = scores.shape
    if n < 2:
        return np.zeros(n, dtype=np.float32)
    ranks = np.empty_like(scores)
    for il in range(n_layer):
        order = np.argsort(scores[il], kind="stable")
        ranks[il, order] = np.arange(n, dtype=np.float32) / (n - 1)
    return ranks.max(axis=0)


def select_evict(score: np.ndarray, n_keep: int, keep_always: np.ndarray | None = None) -> np.ndarray:
    """Indices to evict: all but the n_keep best, protected cells first and never evicted."""
    score = np.asarray(score, dtype=np.float32)
    n = len(score)
    protect = np.zeros(n, dtype=bool) if keep_always is None else np.asarray(keep_always, dtype=bool)
    # protected first, then higher score, then lower index
    order = np.lexsort((np.arange(n), -score, ~protect))
    evict = np.zeros(n, dtype=bool)
    evict[order[n_keep:]] = True
    evict &= ~protect
    return np.flatnonzero(evict).astype(np.int32)

"""A readable NumPy reference of the ReST-KV policy math. Tests hold the native code against it.

Each function mirrors one step of `native/restkv_policy.h`; arrays are in cache position order.
The formulas follow the ReST-KV paper (ICLR 2026) and its official code, quirks included (see
`aws_params`); each function's docstring states what it computes.
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


def rope_rotate(q: np.ndarray, delta: np.ndarray, freq_base: float, n_rot: int, neox: bool = False) -> np.ndarray:
    """Rotate post-RoPE rows q [R, n_head, d] further by delta[R] positions (RoPE composes additively).
    llama.cpp's NORM rope pairs dims (2i, 2i+1); NEOX pairs (i, i + n_rot/2)."""
    q = np.array(q, dtype=np.float64)
    half = n_rot // 2
    theta = freq_base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)
    ang = np.asarray(delta, dtype=np.float64)[:, None] * theta[None, :]  # [R, half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        x0, x1 = q[..., :half].copy(), q[..., half:n_rot].copy()
        q[..., :half], q[..., half:n_rot] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    else:
        x0, x1 = q[..., 0:n_rot:2].copy(), q[..., 1:n_rot:2].copy()
        q[..., 0:n_rot:2], q[..., 1:n_rot:2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return q


def row_weights(n_row: int, rows: str = "ema", alpha: float = 0.3) -> np.ndarray:
    """How the scoring rows (oldest first) are averaged: "ema" (the newest weighted alpha),
    "mean" (uniformly: SnapKV, H2O) or "last" (the newest row alone: TOVA)."""
    if rows == "mean":
        return np.full(n_row, 1.0 / n_row)
    if rows == "last":
        return np.eye(n_row)[n_row - 1]
    return np.array([(1.0 if j == 0 else alpha) * (1.0 - alpha) ** (n_row - 1 - j) for j in range(n_row)])


def window_attention(q, q_pos, k, k_pos, n_head_kv: int, kq_scale: float, rows: str = "ema",
                     alpha: float = 0.3) -> np.ndarray:
    """The rows' averaged attention per query head and cell, [n_head, n], clamped below 1: what
    SnapKV, H2O and TOVA rank by, and ReST-KV's `a`. Shapes as in restkv_scores."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    n_row, n_head, _ = q.shape
    g = n_head // n_head_kv
    visible = np.asarray(k_pos)[None, :] <= np.asarray(q_pos)[:, None]  # [R, n]
    w = row_weights(n_row, rows, alpha)
    out = np.empty((n_head, k.shape[0]))
    for h in range(n_head):
        logits = np.where(visible, (q[:, h] @ k[:, h // g].T) * kq_scale, -np.inf)
        a = np.exp(logits - logits.max(axis=1, keepdims=True))
        a /= a.sum(axis=1, keepdims=True)
        out[h] = np.minimum(w @ a, 1.0 - 1e-6)
    return out


def restkv_scores(q, q_pos, k, v, k_pos, gram, n_head_kv: int, kq_scale: float, alpha: float,
                  window_start: int) -> np.ndarray:
    """ReST-KV layer-wise output reconstruction scores of one layer, per query head and cached cell.

    q [R, n_head, d]: the scoring rows, oldest first (post-RoPE, as attention used them), at q_pos [R];
    k, v [n, n_head_kv, d]: the cached cells at k_pos [n]; gram [n_head, d, d] = W_O^h^T W_O^h.
    Row j attends causally (cells with k_pos <= q_pos[j]); the rows' attention is averaged by an EMA
    (the newest row weighted alpha); o_h sums the cells older than window_start. Returns [n_head, n]:
        a/(1-a) * ||W_O^h (o_h - v_n)||
    """
    v = np.asarray(v, dtype=np.float64)
    n_head = q.shape[1]
    g = n_head // n_head_kv
    prefix = (np.asarray(k_pos) < window_start).astype(np.float64)

    attention = window_attention(q, q_pos, k, k_pos, n_head_kv, kq_scale, "ema", alpha)
    out = np.empty((n_head, k.shape[0]))
    for h in range(n_head):
        vh = v[:, h // g]
        abar = attention[h]
        o = (abar * prefix) @ vh
        diff = o[None, :] - vh
        err = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", diff, gram[h], diff), 0.0))
        out[h] = abar / (1.0 - abar) * err
    return out


def top_positions(q, q_pos, k, k_pos, n_head_kv: int, kq_scale: float, n_select: int) -> np.ndarray:
    """The statistic behind ReST-KV's adaptive smoothing, per query head: the mean position of the
    n_select cells each row attends most, averaged over the first half of the rows and over the
    second half. Returns [n_head, 2] (front, rear); t = front - rear. Shapes as in restkv_scores."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    k_pos = np.asarray(k_pos)
    n_row, n_head, _ = q.shape
    g = n_head // n_head_kv
    half = n_row // 2
    visible = k_pos[None, :] <= np.asarray(q_pos)[:, None]
    out = np.empty((n_head, 2))
    for h in range(n_head):
        logits = np.where(visible, (q[:, h] @ k[:, h // g].T) * kq_scale, -np.inf)
        top = np.argsort(-logits, axis=1, kind="stable")[:, :n_select]  # softmax keeps the order
        mean_pos = k_pos[top].mean(axis=1)
        out[h] = mean_pos[:half].mean(), mean_pos[half:].mean()
    return out


def cell_scores(scores: np.ndarray, tpos: np.ndarray, n_head_kv: int, kernel_min: int, beta: float) -> np.ndarray:
    """Per-cell scores: AWS per head, mean over each KV head's query heads, summed over KV heads,
    then max over layers of the per-layer rank. scores [n_layer, n_head, n], tpos [n_layer, n_head, 2]."""
    n_layer, n_head, n = scores.shape
    g = n_head // n_head_kv
    layer_scores = np.zeros((n_layer, n), dtype=np.float64)
    for il in range(n_layer):
        for h in range(n_head):
            front, rear = tpos[il, h]
            kernel, shift = (kernel_min, 0) if np.isnan(front) or np.isnan(rear) else aws_params(
                float(front) - float(rear), kernel_min, beta)
            layer_scores[il] += aws_smooth(scores[il, h], kernel, shift) / g
    return max_rank(layer_scores.astype(np.float32))

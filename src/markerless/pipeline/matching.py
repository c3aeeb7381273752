"""Sparse matching: mutual nearest neighbour with Lowe's ratio test, as hloc's `nearest_neighbor` matcher.

Descriptors are unit-norm, so the squared L2 distance is 2 (1 - cosine). The ratio test (`d1 <= r * d2` on
distances) is applied in both directions and a match is kept only if it is each side's nearest neighbour.

All retrieved keyframes are matched together. References are zero-padded into batches and scored with one
matrix product per batch in the (B, N, M) layout (query rows), padding masked afterwards. The product is ~3/4
of the time, so it is computed once: query -> reference arg-maxes run along contiguous memory (NumPy's SIMD
arg-max is 3-7x faster than torch's `max` with indices, or than an arg-max across rows); the other direction
only needs, per reference keypoint, its best score (a max across rows, elementwise and as fast), which finds
the mutual candidates; only their columns are then gathered for the exact arg-max and second best. Results are
identical to brute force (ties included). Half precision is not used on a CPU: it is slower there or no faster,
and not exact (docs/measurements.md). With a GPU the same
algorithm runs in torch on the device, where arg-max reductions are cheap (`_match_group_torch`, tested on the
CPU for equality).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

confs: dict[str, dict[str, Any]] = {
    "NN-ratio": {
        "output": "matches-NN-mutual-ratio.8",
        "model": {"name": "nearest_neighbor", "do_mutual_check": True, "ratio_threshold": 0.8},
    },
    "NN-mutual": {
        "output": "matches-NN-mutual",
        "model": {"name": "nearest_neighbor", "do_mutual_check": True, "ratio_threshold": None},
    },
}

PAD_SCORE = -4.0  # below any cosine similarity


def _second(lines: np.ndarray, best_idx: np.ndarray) -> np.ndarray:
    """Second-best value of each row of `lines` (C, L) whose best is at `best_idx`; `lines` is a copy."""
    if lines.shape[1] < 2:
        return np.full(lines.shape[0], PAD_SCORE, dtype=lines.dtype)
    lines[np.arange(len(lines)), best_idx] = PAD_SCORE
    return lines.max(axis=1)


def _passes_ratio(best: np.ndarray, second: np.ndarray, ratio: float) -> np.ndarray:
    return (2.0 - 2.0 * best) <= ratio**2 * (2.0 - 2.0 * second)


def _pack(group: list[np.ndarray], d: int) -> np.ndarray:
    """References zero-padded into one (B, M_max, D) array."""
    batch = np.zeros((len(group), max(r.shape[0] for r in group), d), dtype=np.float32)
    for i, ref in enumerate(group):
        batch[i, : ref.shape[0]] = ref
    return batch


def _match_group(q: np.ndarray, group: list[np.ndarray], ratio: float | None) -> list[np.ndarray]:
    n, d = q.shape
    sizes = [r.shape[0] for r in group]
    if n == 0 or max(sizes) == 0:
        return [np.zeros((0, 2), dtype=np.int64) for _ in group]
    # torch's GEMM beats NumPy's on batched products; (B, N, M): query rows, contiguous along references
    sim = torch.matmul(torch.from_numpy(q), torch.from_numpy(_pack(group, d)).transpose(1, 2)).numpy()
    for i, m in enumerate(sizes):
        sim[i, :, m:] = PAD_SCORE
    idx0 = sim.argmax(axis=2)  # query -> reference
    best0 = np.take_along_axis(sim, idx0[..., None], axis=2)[..., 0]
    col_best = np.take_along_axis(sim.max(axis=1), idx0, axis=1)  # best query score of each query's reference
    b_idx, q_idx = np.nonzero((best0 > PAD_SCORE / 2) & (best0 >= col_best))  # mutual candidates (ties kept)
    r_idx, top = idx0[b_idx, q_idx], best0[b_idx, q_idx]
    if ratio is not None and len(b_idx):
        keep = _passes_ratio(top, _second(sim[b_idx, q_idx], r_idx), ratio)  # other references of this keypoint
        b_idx, q_idx, r_idx, top = b_idx[keep], q_idx[keep], r_idx[keep], top[keep]
    cols = sim[b_idx, :, r_idx]  # (C, N): every query keypoint's score for each candidate's reference keypoint
    keep = cols.argmax(axis=1) == q_idx  # mutual, ties resolved to the first index like an arg-max
    if ratio is not None and len(b_idx):
        keep &= _passes_ratio(top, _second(cols, q_idx), ratio)
    b_idx, q_idx, r_idx = b_idx[keep], q_idx[keep], r_idx[keep]
    pairs = np.stack([q_idx, r_idx], axis=1).astype(np.int64)
    bounds = np.searchsorted(b_idx, np.arange(len(group) + 1))
    return [pairs[bounds[i] : bounds[i + 1]] for i in range(len(group))]


def _match_group_torch(q: np.ndarray, group: list[np.ndarray], ratio: float | None, device: str) -> list[np.ndarray]:
    """The same algorithm with torch on `device` (a GPU: arg-max reductions are cheap there)."""
    n, d = q.shape
    sizes = [r.shape[0] for r in group]
    m_max = max(sizes)
    if n == 0 or m_max == 0:
        return [np.zeros((0, 2), dtype=np.int64) for _ in group]
    sim = torch.matmul(torch.from_numpy(_pack(group, d)).to(device), torch.from_numpy(q).to(device).T)  # (B, M, N)
    for i, m in enumerate(sizes):
        sim[i, m:, :] = PAD_SCORE
    best0, idx0 = sim.max(dim=1)  # query -> reference
    idx1 = sim.argmax(dim=2)  # reference -> query
    b_idx = torch.arange(len(group), device=device).repeat_interleave(n)
    q_idx = torch.arange(n, device=device).repeat(len(group))
    r_idx = idx0.reshape(-1)
    top = best0.reshape(-1)
    keep = (top > PAD_SCORE / 2) & (idx1[b_idx, r_idx] == q_idx)
    b_idx, q_idx, r_idx, top = b_idx[keep], q_idx[keep], r_idx[keep], top[keep]
    if ratio is not None and len(b_idx):
        rows = torch.arange(len(b_idx), device=device)
        col = sim[b_idx, :, q_idx]  # (C, M): other references for this query keypoint
        col[rows, r_idx] = PAD_SCORE
        row = sim[b_idx, r_idx, :]  # (C, N): other query keypoints for this reference keypoint
        row[rows, q_idx] = PAD_SCORE
        second0 = col.amax(dim=1) if m_max > 1 else torch.full_like(top, PAD_SCORE)
        second1 = row.amax(dim=1) if n > 1 else torch.full_like(top, PAD_SCORE)
        keep = _passes_ratio(top, second0, ratio) & _passes_ratio(top, second1, ratio)
        b_idx, q_idx, r_idx = b_idx[keep], q_idx[keep], r_idx[keep]
    pairs = torch.stack([q_idx, r_idx], dim=1).cpu().numpy().astype(np.int64)
    bounds = np.searchsorted(b_idx.cpu().numpy(), np.arange(len(group) + 1))
    return [pairs[bounds[i] : bounds[i + 1]] for i in range(len(group))]


def match_batch(
    query: np.ndarray,
    refs: list[np.ndarray],
    ratio: float | None = 0.8,
    max_chunk_bytes: int = 16 << 20,
    device: str | None = None,
) -> list[np.ndarray]:
    """Match query descriptors (N, D) with each reference (M_i, D), all float32 unit-norm.

    Returns one (K_i, 2) array of [query index, reference index] per reference, in order. `device` None runs
    the NumPy/CPU implementation; a torch device (a GPU) computes and reduces the similarities there, in chunks
    16x larger.
    """
    n = query.shape[0]
    q = np.ascontiguousarray(query, dtype=np.float32)
    if device is not None:
        max_chunk_bytes *= 16
    out: list[np.ndarray] = []
    start = 0
    while start < len(refs):
        end, m_max = start + 1, refs[start].shape[0]
        while end < len(refs) and (end - start + 1) * n * max(m_max, refs[end].shape[0]) * 4 <= max_chunk_bytes:
            m_max = max(m_max, refs[end].shape[0])
            end += 1
        if device is None:
            out.extend(_match_group(q, refs[start:end], ratio))
        else:
            out.extend(_match_group_torch(q, refs[start:end], ratio, device))
        start = end
    return out

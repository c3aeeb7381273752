"""Sparse matching: mutual nearest neighbour with Lowe's ratio test, as hloc's `nearest_neighbor` matcher.

Descriptors are unit-norm, so the squared L2 distance is 2 (1 - cosine). The ratio test (`d1 <= r * d2` on
distances) is applied in both directions and a match is kept only if it is each side's nearest neighbour.
All retrieved keyframes are matched in padded batches: one batched matrix product per chunk instead of K calls.
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


def _nn(sim: torch.Tensor, valid: torch.Tensor, ratio: float | None) -> torch.Tensor:
    """Best index along the last dim of sim (B, N, M), -1 where the ratio test fails; `valid` masks padding."""
    sim = sim.masked_fill(~valid, -2.0)
    k = 2 if ratio is not None and sim.shape[-1] >= 2 else 1
    top, idx = sim.topk(k, dim=-1)
    best = idx[..., 0]
    keep = top[..., 0] > -2.0
    if k == 2:
        dist = 2.0 * (1.0 - top)
        keep &= dist[..., 0] <= (ratio**2) * dist[..., 1]
    return torch.where(keep, best, torch.full_like(best, -1))


def match_batch(
    query: torch.Tensor, refs: list[torch.Tensor], ratio: float | None = 0.8, chunk: int = 16
) -> list[np.ndarray]:
    """Match query descriptors (N, D) against each reference (M_i, D) -> list of (K_i, 2) index arrays."""
    out: list[np.ndarray] = []
    n = query.shape[0]
    for start in range(0, len(refs), chunk):
        group = refs[start : start + chunk]
        m_max = max((r.shape[0] for r in group), default=0)
        if n == 0 or m_max == 0:
            out.extend(np.zeros((0, 2), dtype=np.int64) for _ in group)
            continue
        batch = query.new_zeros((len(group), m_max, query.shape[1]))
        valid_ref = torch.zeros((len(group), m_max), dtype=torch.bool, device=query.device)
        for i, ref in enumerate(group):
            batch[i, : ref.shape[0]] = ref
            valid_ref[i, : ref.shape[0]] = True
        sim = torch.einsum("nd,bmd->bnm", query, batch)  # (B, N, M)
        m0 = _nn(sim, valid_ref[:, None, :], ratio)  # query -> ref
        all_query = torch.ones((1, 1, n), dtype=torch.bool, device=query.device)
        m1 = _nn(sim.transpose(1, 2), all_query, ratio)  # ref -> query
        for i, ref in enumerate(group):
            idx0 = m0[i]
            q_idx = torch.nonzero(idx0 >= 0).squeeze(1)
            r_idx = idx0[q_idx]
            mutual = m1[i, r_idx] == q_idx
            pairs = torch.stack([q_idx[mutual], r_idx[mutual]], dim=1)
            out.append(pairs.cpu().numpy())
    return out

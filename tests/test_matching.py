"""Mutual-NN + ratio matching against a brute-force NumPy reference written independently."""

from __future__ import annotations

import numpy as np
import pytest

from markerless.pipeline.matching import match_batch


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = np.abs(rng.standard_normal((n, 32))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(q: np.ndarray, r: np.ndarray, ratio: float | None) -> set[tuple[int, int]]:
    if len(q) == 0 or len(r) == 0:
        return set()
    dist = np.sqrt(np.maximum(2 - 2 * q @ r.T, 0))
    out = set()
    for i in range(len(q)):
        order = np.argsort(dist[i], kind="stable")  # ties: first index, as an arg-max
        j = int(order[0])
        if ratio is not None and len(order) > 1 and dist[i, j] > ratio * dist[i, order[1]]:
            continue
        back = np.argsort(dist[:, j], kind="stable")
        if int(back[0]) != i:
            continue
        if ratio is not None and len(back) > 1 and dist[i, j] > ratio * dist[back[1], j]:
            continue
        out.add((i, j))
    return out


@pytest.mark.parametrize("device", [None, "cpu"])
@pytest.mark.parametrize("ratio", [0.8, None])
def test_matches_equal_brute_force(ratio: float | None, device: str | None) -> None:
    """Both implementations: NumPy (None) and torch (the GPU path, run here with torch on the CPU)."""
    rng = np.random.default_rng(1)
    q = _unit(rng, 200)
    refs = []
    for m in (150, 5, 0, 1, 310, 220):
        r = _unit(rng, m)
        k = min(m, 60)
        r[:k] = q[rng.choice(200, k, replace=False)] + 0.02 * _unit(rng, k)  # planted true matches
        refs.append(r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-9) if m else r)
    got = match_batch(q, refs, ratio=ratio, max_chunk_bytes=200_000, device=device)
    assert len(got) == len(refs)
    total = 0
    for r, g in zip(refs, got, strict=True):
        expected = _reference(q, r, ratio)
        assert {tuple(map(int, x)) for x in g} == expected
        total += len(expected)
    assert total > 100  # the planted matches are found


def test_empty_query() -> None:
    out = match_batch(np.zeros((0, 8), np.float32), [np.ones((3, 8), np.float32)])
    assert out[0].shape == (0, 2)


@pytest.mark.parametrize("device", [None, "cpu"])
@pytest.mark.parametrize("ratio", [0.8, None])
def test_duplicate_descriptors_match_once(ratio: float | None, device: str | None) -> None:
    """Tied scores resolve to the first index, as an arg-max does: a duplicated keypoint is matched once.

    Descriptors have four entries of 0.5 (unit norm), so every score is a multiple of 0.25 and exact in any
    summation order: ties are real ties for the matrix product too.
    """
    rng = np.random.default_rng(2)
    q = np.zeros((40, 32), np.float32)
    for row in q:
        row[rng.choice(32, 4, replace=False)] = 0.5
    q[7] = q[3]  # duplicated query keypoint
    ref = q[[3, 10, 20, 30, 10]]  # reference keypoints 1 and 4 are duplicates
    got = {tuple(map(int, x)) for x in match_batch(q, [ref], ratio=ratio, device=device)[0]}
    assert got == _reference(q, ref, ratio)
    assert {(3, 0), (10, 1), (20, 2), (30, 3)} <= got and not {(7, 0), (10, 4)} & got

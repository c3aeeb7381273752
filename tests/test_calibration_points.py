"""The calibration points sent to SceneScape: a bounded, well-spread, deterministic sample of inlier pairs."""

from __future__ import annotations

import numpy as np
import pytest

from markerless.service.calibration_points import MAX_POINTS, spread_sample


def pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p2 = rng.uniform([0, 0], [640, 480], (n, 2))
    return p2, np.column_stack([p2 / 100.0, rng.uniform(1, 3, n)])  # a scene point tied to its pixel


def test_sample_is_bounded_keeps_pairs_and_is_deterministic() -> None:
    p2, p3 = pairs(2000)
    s2, s3 = spread_sample(p2.tolist(), p3.tolist())
    assert len(s2) == len(s3) == MAX_POINTS
    index = {tuple(a): tuple(b) for a, b in zip(p2.tolist(), p3.tolist(), strict=True)}
    assert all(index[tuple(a)] == tuple(b) for a, b in zip(s2, s3, strict=True))  # pairs never mixed up
    assert len({tuple(a) for a in s2}) == len(s2)
    assert spread_sample(p2.tolist(), p3.tolist()) == (s2, s3)


def test_sample_covers_sparse_regions_a_random_sample_would_miss() -> None:
    """1000 inliers in one textured corner and 8 elsewhere: every one of the 8 is kept."""
    rng = np.random.default_rng(1)
    dense = rng.uniform([0, 0], [60, 60], (1000, 2))
    sparse = np.array([[600, 20], [620, 460], [20, 460], [320, 240], [320, 20], [600, 240], [20, 240], [320, 460]])
    p2 = np.vstack([dense, sparse]).astype(float)
    p3 = np.column_stack([p2, np.ones(len(p2))])
    s2, _ = spread_sample(p2.tolist(), p3.tolist(), count=16)
    assert {tuple(p) for p in sparse.astype(float).tolist()} <= {tuple(p) for p in s2}
    # and the dense corner stays covered: no inlier is farther from a sample than the corner is wide
    chosen = np.asarray(s2)
    radius = np.linalg.norm(p2[:, None] - chosen[None], axis=2).min(axis=1).max()
    assert radius < 60.0


def test_repeated_pixels_count_once_and_small_inputs_come_back_whole() -> None:
    p2 = [[10.0, 10.0], [10.0, 10.0], [20.0, 5.0]]
    p3 = [[1.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]]
    s2, s3 = spread_sample(p2, p3)
    assert sorted(map(tuple, s2)) == [(10.0, 10.0), (20.0, 5.0)] and len(s3) == 2
    assert spread_sample([], []) == ([], [])
    with pytest.raises(ValueError, match="pixels but"):
        spread_sample([[0.0, 0.0]], [])

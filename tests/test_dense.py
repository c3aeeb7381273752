"""Dense matching stage: preprocessing sizes, canvases, hloc keypoint quantisation, and the cached-feature matcher.

The matcher tests use a checkpoint written by `write_random_checkpoint` (official format, random weights: the real
files cannot be downloaded here) and a 0 match threshold, since random weights give no confidence above 0.1.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from markerless.errors import BadImageError, MarkerlessError
from markerless.models.qta_loftr import write_random_checkpoint
from markerless.pipeline.dense import (
    DenseMatcher,
    assign_keypoints,
    canvas_size,
    preprocess,
    quantize_matches,
    to_original,
    unique_matches,
)


@pytest.mark.parametrize(
    ("hw", "resize_max", "want_hw"),
    [
        ((375, 500), 832, (352, 480)),  # odd size: each side down to a multiple of 32
        ((80, 100), 832, (64, 96)),
        ((10, 20), 832, (32, 32)),  # smaller than one factor: enlarged, never a crash
        ((1080, 1920), 832, (448, 832)),  # downscaled to 832 x 468 first
        ((480, 640), 832, (480, 640)),  # never upscaled
    ],
)
def test_preprocess_sizes_and_scales(hw, resize_max, want_hw):
    rgb = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    prepared = preprocess(rgb, resize_max, 32)
    assert prepared.image.shape == want_hw
    assert prepared.image.dtype == np.float32 and 0 <= prepared.image.min() and prepared.image.max() <= 1
    np.testing.assert_allclose(prepared.scale, [hw[1] / want_hw[1], hw[0] / want_hw[0]])


def test_preprocess_rejects_non_images():
    with pytest.raises(BadImageError, match="shape"):
        preprocess(np.zeros((4, 4, 4), np.uint8), 832, 32)


def test_to_original_maps_pixel_centres_and_corners():
    scale = np.array([2.0, 4.0])
    # the centre of the first resized pixel covers original pixels 0..1 (x) and 0..3 (y)
    np.testing.assert_allclose(to_original(np.array([[0.0, 0.0]]), scale), [[0.5, 1.5]])
    # the top-left corner stays the corner
    np.testing.assert_allclose(to_original(np.array([[-0.5, -0.5]]), scale), [[-0.5, -0.5]])


def test_canvas_size():
    assert canvas_size([(60, 80), (44, 60)], 16 * 16) == (60, 80)
    assert canvas_size([(59, 80)], 1) == (60, 80)  # multiples of 4
    h, w = canvas_size([(8, 12)], 16 * 64)  # grows until the coarsest level holds top-K 64
    assert h % 4 == 0 and w % 4 == 0 and h * w >= 1024 and h >= 8 and w >= 12


def hloc_assign(kps, cell_size, max_error, scores):
    """hloc's assign_keypoints(update=True) + the final most_common per cell, transcribed as loops."""

    def cpt(k, ps):
        return tuple(np.round(np.round((k + 0.5) / ps) * ps - 0.5, 2)) if ps > 0 else tuple(k)

    ps = max(cell_size, max_error)
    cell_ids, bins, ids = {}, [], []
    for k, s in zip(kps, scores, strict=True):
        c = cpt(k, ps)
        if c not in cell_ids:
            cell_ids[c] = len(cell_ids)
            bins.append(Counter())
        bins[cell_ids[c]][cpt(k, int(max_error))] += s
        ids.append(cell_ids[c])
    return np.array([b.most_common(1)[0][0] for b in bins]), np.array(ids)


@pytest.mark.parametrize(("cell_size", "max_error"), [(1, 1), (8, 2), (4, 4), (0, 0)])
def test_assign_keypoints_agrees_with_hloc(cell_size, max_error):
    rng = np.random.default_rng(cell_size + max_error)
    base = rng.uniform(0, 60, (80, 2))
    kps = np.concatenate([base, base[:40] + rng.uniform(-1.5, 1.5, (40, 2)), base[:10]])  # near and exact repeats
    scores = rng.integers(1, 5, len(kps)).astype(float)  # integer scores: exact sums, ties possible
    got_pts, got_ids = assign_keypoints(kps, cell_size, max_error, scores)
    want_pts, want_ids = hloc_assign(kps, cell_size, max_error, scores)
    assert len(got_pts) == len(want_pts)
    np.testing.assert_allclose(got_pts[got_ids], want_pts[want_ids])  # same keypoint for every input
    if cell_size == 0:
        assert len(got_pts) == 120  # only the 10 exact repeats merge


def test_assign_keypoints_cells_on_half_pixels_like_hloc():
    pts, ids = assign_keypoints(np.array([[10.3, 20.9], [10.6, 20.1], [17.0, 3.2], [16.0, 3.2]]), 1, 1)
    # cell of x: round(x + 0.5) - 0.5, numpy rounding half to even (17.5 -> 18, 16.5 -> 16)
    np.testing.assert_allclose(pts[ids], [[10.5, 20.5], [10.5, 20.5], [17.5, 3.5], [15.5, 3.5]])
    assert ids[0] == ids[1] and len(pts) == 3


def test_unique_matches_keeps_the_best_of_many_to_one():
    ids0 = np.array([0, 0, 1, 2])
    ids1 = np.array([5, 6, 6, 7])
    scores = np.array([0.9, 0.5, 0.8, 0.1])
    # id0 0 -> match 0 (0.9 > 0.5); id1 6 -> match 2 (0.8 > 0.5); match 1 loses on both sides
    np.testing.assert_array_equal(unique_matches(ids0, ids1, scores), [0, 2, 3])


def test_quantize_matches_bins_the_keyframe_only():
    query = np.array([[1.25, 2.75], [9.1, 9.2], [30.3, 40.4]])
    keyframe = np.array([[100.2, 50.1], [100.4, 50.3], [7.0, 7.0]])  # first two in one 1-px cell
    scores = np.array([0.3, 0.6, 0.5], np.float32)
    q, k, s = quantize_matches(query, keyframe, scores, 1, 1)
    np.testing.assert_allclose(q, query[[1, 2]])  # exact query coordinates, the weaker duplicate dropped
    np.testing.assert_allclose(k, [[100.5, 50.5], [7.5, 7.5]])
    np.testing.assert_allclose(s, [0.6, 0.5])


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("weights")
    write_random_checkpoint(directory / "qta-indoor.ckpt", "qta_indoor")
    return directory


def test_matcher_on_odd_sizes(weights_dir: Path, tmp_path: Path):
    """500x375 and 100x80 keyframes against a 333x250 query: canvas padding, top-K growth, mapping back."""
    rng = np.random.default_rng(0)

    def smooth(h: int, w: int) -> np.ndarray:
        return np.repeat(np.repeat(rng.integers(0, 256, (h // 5 + 1, w // 5 + 1, 3)), 5, 0), 5, 1)[:h, :w]

    keyframes = [smooth(375, 500).astype(np.uint8), smooth(80, 100).astype(np.uint8)]
    matcher = DenseMatcher("qta_indoor", {"match_threshold": 0.0, "resize_max": 256}, "cpu", weights_dir)
    cache = tmp_path / "qta_loftr"
    matcher.cache_keyframes(keyframes, cache)
    assert sorted(p.name for p in cache.iterdir()) == ["kf00000.pt", "kf00001.pt", "meta.json"]
    query = keyframes[0][:250, :333].copy()
    results = matcher.match(query, [1, 0], cache)
    assert len(results) == 2
    for (q, k, s), (h, w) in zip(results, [(80, 100), (375, 500)], strict=True):
        assert q.shape == k.shape == (len(s), 2) and len(s) > 0
        assert q.dtype == k.dtype == np.float64 and s.dtype == np.float32
        assert (q >= -0.5).all() and (q[:, 0] <= 332.5).all() and (q[:, 1] <= 249.5).all()
        assert (k >= -0.5).all() and (k[:, 0] <= w - 0.5).all() and (k[:, 1] <= h - 0.5).all()
        assert len(np.unique(k, axis=0)) == len(k) and len(np.unique(q, axis=0)) == len(q)  # no many-to-one
    other = DenseMatcher("qta_indoor", {"resize_max": 320}, "cpu", weights_dir)
    with pytest.raises(MarkerlessError, match="resize_max cached 256 vs 320"):
        other.match(query, [0], cache)

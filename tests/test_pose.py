"""The pose solver counts a query keypoint once, however many keyframes matched it (real pycolmap, synthetic views)."""

from __future__ import annotations

import math

import numpy as np

from markerless.pipeline.pose import solve
from markerless.scene.camera import Camera

CAMERA = Camera(640, 480, 500.0, 500.0, 320.0, 240.0)
ANGLE = math.radians(1.75)


def _view(rng: np.random.Generator, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (camera convention, 0.3 px noise) of n points in front of a camera at the origin."""
    points = rng.uniform([-2.0, -1.5, 3.0], [2.0, 1.5, 6.0], (n, 3))
    pixels = points[:, :2] / points[:, 2:] * CAMERA.fx + [CAMERA.cx, CAMERA.cy]
    return pixels + rng.normal(0.0, 0.3, pixels.shape), points


def _solve(pixels, points, ids, keyframes, verified):
    return solve(pixels, points, ids, keyframes, verified, CAMERA, "fixed", ANGLE, 2000)


def test_copies_through_other_keyframes_do_not_move_the_pose() -> None:
    rng = np.random.default_rng(0)
    pixels, points = _view(rng)
    n = len(pixels)
    ids, ones = np.arange(n), np.ones(n, bool)
    alone = _solve(pixels, points, ids, np.zeros(n, int), ones)
    # the same keypoints matched again in 5 lower-ranked keyframes whose 3D points carry 3 cm of drift each
    copies = [points + rng.normal(0.0, 0.03, 3) for _ in range(5)]
    crowd = _solve(np.concatenate([pixels] * 6), np.concatenate([points, *copies]), np.tile(ids, 6),
                   np.repeat(np.arange(6), n), np.ones(6 * n, bool))
    assert alone is not None and crowd is not None
    np.testing.assert_allclose(crowd.cam_from_world.matrix(), alone.cam_from_world.matrix(), atol=1e-9)
    assert len(crowd.errors) == 6 * n and crowd.inliers[:n].all()  # errors and inliers cover every copy


def test_a_verified_copy_is_preferred_to_an_unverified_one() -> None:
    rng = np.random.default_rng(1)
    pixels, points = _view(rng)
    n = len(pixels)
    truth = _solve(pixels, points, np.arange(n), np.zeros(n, int), np.ones(n, bool))
    # the best-ranked keyframe matched every keypoint to a wrong 3D point, and its verification rejected them
    wrong = points + rng.normal(0.0, 0.5, points.shape)
    mixed = _solve(np.concatenate([pixels, pixels]), np.concatenate([wrong, points]), np.tile(np.arange(n), 2),
                   np.repeat([0, 1], n), np.repeat([False, True], n))
    assert truth is not None and mixed is not None
    np.testing.assert_allclose(mixed.cam_from_world.matrix(), truth.cam_from_world.matrix(), atol=1e-9)
    assert mixed.inliers[:n].mean() < 0.1  # the wrong copies are outliers of that pose (a few land near by chance)

"""Cameras the matches barely determine, on the real kitchen scan: a narrow lens and a strong barrel lens.

Frames are made here from the 20 kitchen queries (never stored; `markerless.demo.fixed_camera`), with exposure,
white balance, noise and JPEG 25-50 damage:
- narrow: 1280x960 at a 27 degree field of view (a varifocal zoomed in: a central crop enlarged, a soft image);
- barrel: 1280x960 through a strong barrel lens (k1 -0.4, k2 0.16).
What is asserted is the contract a scene controller acts on: the stated sigmas cover the error (at least 90 % of
returned poses within 3 sigma in position and in rotation, none more than 10 cm off outside 3 sigma) and refusals
are typed; and the accuracy bars where one frame's matches can meet them (figures: docs/measurements.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from markerless.demo.fixed_camera import STRONG_BARREL_LENS, fixed_camera_frame, narrow_camera
from markerless.errors import Reason
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import LocalizationResult
from markerless.scene.camera import Camera
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.scene.queries import load_queries


def _frames(kitchen_dir: Path, kind: str) -> list[tuple[np.ndarray, Camera, np.ndarray]]:
    rng = np.random.default_rng(8)
    frames = []
    for q in load_queries(kitchen_dir / "queries.json"):
        image = decode_image((kitchen_dir / q["image"]).read_bytes())
        camera = Camera.from_matrix(q["intrinsics"], 640, 480)
        if kind == "narrow":
            data, exact = fixed_camera_frame(image, camera, rng, target=narrow_camera(camera))
        else:
            data, exact = fixed_camera_frame(image, camera, rng, lens=STRONG_BARREL_LENS)
        frames.append((decode_image(data), exact, quat_trans_to_pose(q["quaternion"], q["translation"])))
    return frames


def _score(results: list[tuple[LocalizationResult, np.ndarray]]) -> tuple[int, float, list]:
    """(within 5 cm / 5 deg, share of returned poses whose position and rotation are both within 3 of their stated
    sigmas, report). A refusal must carry a typed reason a scene controller can act on, never an internal error."""
    within, covered, returned, report = 0, 0, 0, []
    for i, (result, truth) in enumerate(results):
        if not result.success:
            assert result.reason is not None and result.reason != Reason.INTERNAL_ERROR, (i, result.message)
            report.append((i, result.reason))
            continue
        t_err, r_err = pose_error(result.pose_matrix(), truth)
        within += t_err <= 0.05 and r_err <= 5
        returned += 1
        covered += t_err <= 3 * result.position_sigma_m and r_err <= 3 * result.rotation_sigma_deg
        report.append((i, round(t_err * 100, 1), round(result.position_sigma_m * 100, 1), round(r_err, 2),
                       round(result.rotation_sigma_deg, 2)))
    return within, covered / max(returned, 1), report


def test_narrow_lens(kitchen_scene, kitchen_localizer, kitchen_dir: Path) -> None:
    frames = _frames(kitchen_dir, "narrow")
    runs: dict[str, list] = {"fixed": [], "refine": [], "estimate": []}
    for i, (image, exact, truth) in enumerate(frames):
        f = (0.85, 1.15)[i % 2]  # a focal length 15 % off, either way
        wrong = Camera(exact.width, exact.height, exact.fx * f, exact.fy * f, exact.cx, exact.cy)
        runs["fixed"].append((kitchen_localizer.localize(kitchen_scene, image, exact, "fixed"), truth))
        runs["refine"].append((kitchen_localizer.localize(kitchen_scene, image, wrong, "refine"), truth))
        runs["estimate"].append((kitchen_localizer.localize(kitchen_scene, image, None, "estimate"), truth))
    scores = {mode: _score(results) for mode, results in runs.items()}
    assert scores["fixed"][0] >= 17, scores["fixed"]
    # without the exact focal length the soft 27 degree view determines it to 3-10 %, which moves the pose along
    # the optical axis by several cm at 2 m: the accuracy bars are what was measured, the contract is the point
    assert scores["refine"][0] >= 9 and scores["estimate"][0] >= 10, scores
    for mode, (_, covered, report) in scores.items():
        assert covered >= 0.9, (mode, report)
    for mode, results in runs.items():  # no pose more than 10 cm off outside 3 sigma
        for result, truth in results:
            if result.success:
                t_err = pose_error(result.pose_matrix(), truth)[0]
                assert t_err <= max(0.10, 3 * result.position_sigma_m), (mode, scores[mode][2])


def test_strong_barrel_lens(kitchen_scene, kitchen_localizer, kitchen_dir: Path) -> None:
    frames = _frames(kitchen_dir, "barrel")
    runs: dict[str, list] = {"refine": [], "estimate": []}
    for image, exact, truth in frames:
        spec = Camera(exact.width, exact.height, exact.fx, exact.fy, exact.cx, exact.cy)  # the spec focal, no lens
        runs["refine"].append((kitchen_localizer.localize(kitchen_scene, image, spec, "refine"), truth))
        runs["estimate"].append((kitchen_localizer.localize(kitchen_scene, image, None, "estimate"), truth))
    for mode, results in runs.items():
        within, covered, report = _score(results)
        assert within >= 19, (mode, report)
        assert covered >= 0.9, (mode, report)
        # no pose more than 10 cm off outside 3 sigma
        for result, truth in results:
            if result.success:
                t_err = pose_error(result.pose_matrix(), truth)[0]
                assert t_err <= max(0.10, 3 * result.position_sigma_m), (mode, report)

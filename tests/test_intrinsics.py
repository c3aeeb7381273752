"""Real cameras on the real kitchen scan: approximate or unknown intrinsics and lens distortion.

Fixed-camera frames are made here from the kitchen queries (never stored): 2x larger (1280x960, K doubles), through
a barrel lens (k1 -0.28, k2 0.09, small p1, p2, k3), with exposure, white balance, noise and JPEG 25-50 damage
(`markerless.demo.fixed_camera`). The ground-truth poses do not change. Thresholds below are the issue's bars
(measured: 20/20 in every mode, see the README's measured figures).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from markerless.demo.fixed_camera import fixed_camera_frame
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import LocalizationResult, Localizer
from markerless.pipeline.pose import design_effect
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.scene.queries import load_queries
from markerless.scene.store import SceneStore

FOCAL_FACTORS = (0.85, 0.9, 1.1, 1.15)  # the wrong focal lengths operators type


@pytest.fixture(scope="module")
def kitchen(kitchen_scene):
    return kitchen_scene


@pytest.fixture(scope="module")
def localizer(kitchen_localizer) -> Localizer:
    return kitchen_localizer


@pytest.fixture(scope="module")
def queries(kitchen_dir: Path) -> list[dict]:
    return load_queries(kitchen_dir / "queries.json")


@pytest.fixture(scope="module")
def fixed_camera_frames(kitchen_dir: Path, queries: list[dict]) -> list[tuple[np.ndarray, Camera, np.ndarray]]:
    """(image, its exact camera, ground-truth camera-to-world) for every query, seeded."""
    rng = np.random.default_rng(8)
    frames = []
    for q in queries:
        image = decode_image((kitchen_dir / q["image"]).read_bytes())
        data, camera = fixed_camera_frame(image, Camera.from_matrix(q["intrinsics"], 640, 480), rng)
        frames.append((decode_image(data), camera, quat_trans_to_pose(q["quaternion"], q["translation"])))
    return frames


def _within(result: LocalizationResult, truth: np.ndarray, metres: float = 0.05, degrees: float = 5.0) -> bool:
    if not result.success:
        return False
    t_err, r_err = pose_error(result.pose_matrix(), truth)
    return t_err <= metres and r_err <= degrees


def test_refine_recovers_focal_and_distortion_of_fixed_cameras(kitchen, localizer, fixed_camera_frames) -> None:
    """Focal 15% off either way and no distortion given: the returned camera is the real one, and the pose too."""
    within, within_3_sigma, focal_errors, lens_errors_px, report = 0, 0, [], [], []
    for i, (image, truth_camera, truth) in enumerate(fixed_camera_frames):
        f = FOCAL_FACTORS[i % len(FOCAL_FACTORS)]
        given = Camera(truth_camera.width, truth_camera.height, truth_camera.fx * f, truth_camera.fy * f,
                       truth_camera.cx, truth_camera.cy)
        result = localizer.localize(kitchen, image, given, "refine")
        within += _within(result, truth)
        report.append((i, result.reason, result.intrinsics_source))
        if result.success:
            assert result.intrinsics_source == "refined"
            focal = result.intrinsics[0][0]
            focal_errors.append(abs(focal / truth_camera.fx - 1))
            # k1 and k2 trade off where the inliers end: compare the radial displacement where they are
            shift, true_shift = _radial_shift(result.distortion), _radial_shift(truth_camera.distortion)
            assert shift < 0, f"frame {i}: barrel lens not recovered: {result.distortion}"
            lens_errors_px.append(abs(shift - true_shift) * LENS_CHECK_RADIUS * truth_camera.fx)
            assert result.position_sigma_m is not None and result.position_sigma_m > 0
            within_3_sigma += pose_error(result.pose_matrix(), truth)[0] <= 3 * result.position_sigma_m
    assert within >= 18, f"{within}/20 within (5 cm, 5 deg): {report}"
    # the stated uncertainty is honest: a 1-sigma bound that the errors exceed 3-fold would be a confident wrong pose
    assert within_3_sigma >= 18, f"{within_3_sigma}/20 within 3 sigma"
    assert float(np.median(focal_errors)) <= 0.02, focal_errors
    assert float(np.median(lens_errors_px)) <= 2.0, lens_errors_px


LENS_CHECK_RADIUS = 0.35  # normalised radius (370 px from the centre at 1280x960), well inside the inliers


def _radial_shift(distortion: list[float] | tuple[float, ...]) -> float:
    """Relative radial displacement k1 r^2 + k2 r^4 + k3 r^6 at LENS_CHECK_RADIUS."""
    k = list(distortion) + [0.0] * 5
    r2 = LENS_CHECK_RADIUS**2
    return k[0] * r2 + k[1] * r2**2 + k[4] * r2**3


def test_estimate_without_any_intrinsics(kitchen, localizer, fixed_camera_frames) -> None:
    within, report = 0, []
    for i, (image, truth_camera, truth) in enumerate(fixed_camera_frames):
        result = localizer.localize(kitchen, image, None, "estimate")
        within += _within(result, truth)
        report.append((i, result.reason))
        if result.success:
            assert result.intrinsics_source == "estimated"
            assert result.intrinsics[0][2] == truth_camera.width / 2  # principal point at the image centre
    assert within >= 17, f"{within}/20 within (5 cm, 5 deg): {report}"


def test_fixed_mode_with_a_wrong_focal_never_returns_a_confident_wrong_pose(kitchen, localizer, kitchen_dir,
                                                                           queries) -> None:
    """Focal 15% too long, declared exact: every pose more than 10 cm off carries a warning (or is refused)."""
    warned = 0
    for q in queries:
        image = decode_image((kitchen_dir / q["image"]).read_bytes())
        exact = Camera.from_matrix(q["intrinsics"], 640, 480)
        wrong = Camera(640, 480, exact.fx * 1.15, exact.fy * 1.15, exact.cx, exact.cy)
        result = localizer.localize(kitchen, image, wrong, "fixed")
        truth = quat_trans_to_pose(q["quaternion"], q["translation"])
        if result.success:
            assert result.intrinsics_source == "given" and result.intrinsics[0][0] == wrong.fx
            if not _within(result, truth, metres=0.10, degrees=180):
                assert any(w.startswith("intrinsics_mismatch:") for w in result.warnings), result.warnings
            warned += bool(result.warnings)
    assert warned >= 10  # the mismatch is visible in most frames, not only in the worst ones


def test_fixed_mode_with_the_right_camera_has_no_warnings(kitchen, localizer, fixed_camera_frames) -> None:
    image, camera, truth = fixed_camera_frames[0]
    result = localizer.localize(kitchen, image, camera, "fixed")
    assert _within(result, truth) and result.intrinsics_source == "given"
    assert result.warnings == []
    assert result.distortion == list(camera.distortion)


def test_fixed_mode_names_uncorrected_distortion(kitchen, localizer, fixed_camera_frames) -> None:
    image, camera, _ = fixed_camera_frames[5]
    pinhole = Camera(camera.width, camera.height, camera.fx, camera.fy, camera.cx, camera.cy)
    result = localizer.localize(kitchen, image, pinhole, "fixed")
    assert any(w.startswith(("uncorrected_distortion:", "intrinsics_mismatch:")) for w in result.warnings), result


@pytest.mark.parametrize("mode", ["fixed", "refine", "estimate"])
def test_foreign_images_are_rejected_in_every_mode(kitchen, localizer, kitchen_dir, queries, mode) -> None:
    camera = Camera.from_matrix(queries[0]["intrinsics"], 640, 480)
    for path in sorted((kitchen_dir / "foreign").glob("*.jpg")):
        result = localizer.localize(kitchen, decode_image(path.read_bytes()), camera, mode)
        assert not result.success and result.quaternion is None, (path.name, result.reason)


def test_default_mode_on_the_original_queries(kitchen, localizer, kitchen_dir, queries) -> None:
    """`refine` is the default and must not cost accuracy when the given camera is right."""
    within = 0
    for q in queries:
        image = decode_image((kitchen_dir / q["image"]).read_bytes())
        result = localizer.localize(kitchen, image, Camera.from_matrix(q["intrinsics"], 640, 480))
        within += _within(result, quat_trans_to_pose(q["quaternion"], q["translation"]))
        assert result.quaternion is None or result.quaternion[3] >= 0
        assert result.num_inliers <= result.num_matches
    assert within >= 19


def test_uncertain_pose_gate(kitchen_store: Path, localizer, kitchen_dir, queries) -> None:
    """`max_position_sigma_m` refuses a pose whose uncertainty is larger, with its own reason."""
    scene = SceneStore(kitchen_store).load("kitchen")
    q = queries[3]
    image = decode_image((kitchen_dir / q["image"]).read_bytes())
    camera = Camera.from_matrix(q["intrinsics"], 640, 480)
    sigma = localizer.localize(scene, image, camera).position_sigma_m
    assert sigma is not None and 0 < sigma < 0.1
    scene.config = SceneConfig(max_position_sigma_m=sigma / 2)
    refused = localizer.localize(scene, image, camera)
    assert refused.reason == "uncertain_pose" and "max_position_sigma_m" in refused.message
    scene.config = SceneConfig(max_position_sigma_m=sigma * 2)
    assert localizer.localize(scene, image, camera).success


def test_design_effect_grows_with_shared_errors() -> None:
    """Residuals shared within keyframes inflate the variance; independent ones do not."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 50)
    independent = rng.normal(0, 1, (1000, 2))
    assert design_effect(independent, groups) < 1.5
    shared = independent + np.repeat(rng.normal(0, 3, (20, 2)), 50, axis=0)
    assert design_effect(shared, groups) > 20  # 1 + 49 * 0.9


def test_cli_localize_estimates_without_intrinsics(kitchen_store: Path, fixed_camera_frames, tmp_path: Path) -> None:
    import cv2

    image, camera, _ = fixed_camera_frames[2]
    path = tmp_path / "frame.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    out = subprocess.run([sys.executable, "-m", "markerless.cli", "localize", str(path), "--scene", "kitchen",
                          "--store", str(kitchen_store), "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["intrinsics_source"] == "estimated" and isinstance(result["warnings"], list)
    assert math.isclose(result["intrinsics"][0][0], camera.fx, rel_tol=0.05)
    refused = subprocess.run([sys.executable, "-m", "markerless.cli", "localize", str(path), "--scene", "kitchen",
                              "--store", str(kitchen_store), "--intrinsics-mode", "fixed"],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "needs --intrinsics" in refused.stderr


def test_eval_queries_without_intrinsics_report_the_camera(kitchen, localizer, kitchen_dir, queries,
                                                          tmp_path: Path) -> None:
    """Queries files may omit intrinsics (estimated then); each outcome carries the camera and its uncertainty."""
    from markerless.pipeline.evaluation import localize_queries, summarise

    items = [{k: v for k, v in q.items() if k not in ("intrinsics", "distortion")}
             | {"true_intrinsics": q["intrinsics"]} for q in queries[:3]]
    outcomes = localize_queries(localizer, kitchen, items, kitchen_dir)
    for outcome in outcomes:
        assert outcome.success and outcome.intrinsics_source == "estimated"
        assert outcome.focal_error is not None and outcome.focal_error < 0.05
        assert outcome.position_sigma_m > 0 and isinstance(outcome.warnings, list)
    fixed = localize_queries(localizer, kitchen, queries[:1], kitchen_dir, mode="fixed")
    assert fixed[0].intrinsics_source == "given"
    summary = summarise(outcomes, [])
    assert summary["median_focal_error"] < 0.05


def test_estimate_matches_a_wide_angle_camera_at_the_scan_resolution(kitchen, localizer, kitchen_dir, queries) -> None:
    """A 101-degree camera (the kitchen query centred on a black 1280x960 sensor, f = 525 px) and no intrinsics: the
    60-degree prior would match it one octave coarser than the scan; the focal length found then does not confirm
    that guess, so the frame is matched again at full resolution, with as many matches as the original frame."""
    for q in queries[:3]:
        image = decode_image((kitchen_dir / q["image"]).read_bytes())
        wide = np.zeros((960, 1280, 3), np.uint8)
        wide[240:720, 320:960] = image
        result = localizer.localize(kitchen, wide, None, "estimate")
        original = localizer.localize(kitchen, image, Camera.from_matrix(q["intrinsics"], 640, 480), "fixed")
        assert result.success and _within(result, quat_trans_to_pose(q["quaternion"], q["translation"])), result
        assert abs(result.intrinsics[0][0] / 525.0 - 1) < 0.02 and result.intrinsics[0][2] == 640.0
        assert result.num_matches >= 0.7 * original.num_matches, (result.num_matches, original.num_matches)


def test_a_focal_length_given_for_another_resolution(kitchen, localizer, fixed_camera_frames) -> None:
    """Half the real focal length (as if given for a 640x480 stream): under it a wrong pose fits the matches of a
    central patch. `refine` finds the real camera anyway; `fixed` never returns such a pose without a warning."""
    within, report = 0, []
    for i, (image, truth_camera, truth) in enumerate(fixed_camera_frames):
        half = Camera(truth_camera.width, truth_camera.height, truth_camera.fx / 2, truth_camera.fy / 2,
                      truth_camera.cx, truth_camera.cy)
        refined = localizer.localize(kitchen, image, half, "refine")
        within += _within(refined, truth)
        report.append((i, refined.reason, refined.intrinsics_source))
        fixed = localizer.localize(kitchen, image, half, "fixed")
        if fixed.success and pose_error(fixed.pose_matrix(), truth)[0] > 0.10:
            assert any(w.startswith("intrinsics_mismatch:") for w in fixed.warnings), (i, fixed.warnings)
    assert within >= 18, f"{within}/20 within (5 cm, 5 deg): {report}"

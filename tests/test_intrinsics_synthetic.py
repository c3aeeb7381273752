"""Self-calibration where everything is exactly known: the synthetic room (exact keyframe and query poses, no
scan drift), queries resampled through a known barrel lens at twice the scan's resolution
(`markerless.demo.fixed_camera.render_through_lens`). Without the kitchen's scan inconsistency the returned camera
must match the lens closely, so these bars are much tighter than the kitchen's."""

from __future__ import annotations

import pytest

from markerless.demo import synth
from markerless.demo.fixed_camera import narrow_camera, render_as, render_through_lens
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.registration import register_scene
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.scene.queries import load_queries
from markerless.scene.store import SceneStore

LENS = (-0.28, 0.09, 0.0, 0.0, 0.0)  # radial only: the model `refine` fits, so it must be recovered exactly
RADIUS = 0.35  # normalised radius where the radial displacement is compared (well inside the inliers)


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory, feature_models):
    tmp = tmp_path_factory.mktemp("room")
    out = synth.generate(tmp / "room.zip", synth.SynthConf(num_keyframes=32, num_queries=6, num_foreign=0, seed=5))
    store = SceneStore(tmp / "store")
    register_scene(store, "room", out.zip_path, SceneConfig(), feature_models)
    frames, narrow = [], []
    for q in load_queries(out.queries_json):
        image = decode_image((out.queries_json.parent / q["image"]).read_bytes())
        original = Camera.from_matrix(q["intrinsics"], q["width"], q["height"])
        truth = quat_trans_to_pose(q["quaternion"], q["translation"])
        lensed, camera = render_through_lens(image, original, 2.0, LENS)
        frames.append((lensed, camera, truth))
        zoomed = narrow_camera(original, 27.0)
        narrow.append((render_as(image, original, zoomed), zoomed, truth))
    return store.load("room"), frames, narrow


def _shift_px(distortion: list[float], focal: float) -> float:
    k = list(distortion) + [0.0] * 5
    return (k[0] * RADIUS**2 + k[1] * RADIUS**4) * RADIUS * focal


@pytest.mark.parametrize("mode, focal_factor", [("refine", 0.9), ("refine", 1.1), ("estimate", None)])
def test_the_known_lens_and_pose_are_recovered(room, feature_models, mode: str, focal_factor: float | None) -> None:
    scene, frames, _ = room
    localizer = Localizer(feature_models)
    for i, (image, truth_camera, truth) in enumerate(frames):
        given = None
        if focal_factor is not None:  # a focal length off by 10 % and no distortion, as operators give them
            given = Camera(truth_camera.width, truth_camera.height, truth_camera.fx * focal_factor,
                           truth_camera.fy * focal_factor, truth_camera.cx, truth_camera.cy)
        result = localizer.localize(scene, image, given, mode)
        assert result.success, (i, result.message)
        t_err, r_err = pose_error(result.pose_matrix(), truth)
        focal = result.intrinsics[0][0]
        lens_err = abs(_shift_px(result.distortion, focal) - _shift_px(list(LENS), truth_camera.fx))
        report = f"frame {i}: {t_err * 100:.2f} cm {r_err:.2f} deg, focal {focal:.1f} vs {truth_camera.fx}, " \
                 f"lens {lens_err:.2f} px, sigma {result.position_sigma_m}"
        assert result.intrinsics_source == ("estimated" if mode == "estimate" else "refined"), report
        assert t_err < 0.02 and r_err < 0.5, report
        assert abs(focal / truth_camera.fx - 1) < 0.01, report
        assert lens_err < 1.0, report
        # exact ground truth: the stated 1-sigma bounds the error (3 sigma, the contract)
        assert t_err <= 3 * result.position_sigma_m, report


@pytest.mark.parametrize("mode, focal_factor", [("fixed", 1.0), ("refine", 0.85), ("refine", 1.15), ("estimate", None)])
def test_a_narrow_lens_states_the_uncertainty_it_has(room, feature_models, mode: str,
                                                     focal_factor: float | None) -> None:
    """A 27 degree view of the same room (the query's centre enlarged): focal length and distance along the optical
    axis trade off, so without the exact focal the pose is less certain; what is stated must cover the error."""
    scene, _, narrow = room
    localizer = Localizer(feature_models)
    returned, covered, report = 0, 0, []
    for image, truth_camera, truth in narrow:
        given = None
        if focal_factor is not None:
            given = Camera(truth_camera.width, truth_camera.height, truth_camera.fx * focal_factor,
                           truth_camera.fy * focal_factor, truth_camera.cx, truth_camera.cy)
        result = localizer.localize(scene, image, given, mode)
        if not result.success:
            report.append(result.reason)
            continue
        t_err, _ = pose_error(result.pose_matrix(), truth)
        returned += 1
        covered += t_err <= 3 * result.position_sigma_m
        report.append((round(t_err * 100, 2), round(result.position_sigma_m * 100, 2)))
    assert returned >= len(narrow) - 1, report
    assert covered >= 0.9 * returned, report

"""Localization on the real kitchen scan (7-Scenes redkitchen as a Polycam export) with real pycolmap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from markerless.errors import BadIntrinsicsError, DatasetError, SceneNotFoundError
from markerless.pipeline.evaluation import localize_foreign, localize_queries, summarise
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.registration import RegistrationOptions, needs_registration, register_scene
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.queries import load_queries
from markerless.scene.store import SceneStore


@pytest.fixture(scope="module")
def kitchen(kitchen_store: Path):
    return SceneStore(kitchen_store).load("kitchen")


@pytest.fixture(scope="module")
def localizer(feature_models):
    return Localizer(feature_models)


@pytest.fixture(scope="module")
def first_query(kitchen_dir: Path):
    item = load_queries(kitchen_dir / "queries.json")[0]
    image = decode_image((kitchen_dir / item["image"]).read_bytes())
    return image, Camera.from_matrix(item["intrinsics"], 640, 480)


def test_kitchen_recall_and_foreign_rejection(kitchen, localizer, kitchen_dir: Path) -> None:
    queries = load_queries(kitchen_dir / "queries.json")
    outcomes = localize_queries(localizer, kitchen, queries, kitchen_dir)
    foreign = localize_foreign(localizer, kitchen, kitchen_dir / "foreign", queries[0]["intrinsics"])
    summary = summarise(outcomes, foreign)
    print(json.dumps(summary, indent=1))
    assert len(outcomes) == 20
    assert summary["recall_5cm_5deg"] >= 0.95
    assert summary["foreign_total"] == 2 and summary["foreign_rejected"] == 2
    assert all(o.reason in ("no_verified_matches", "too_few_matches", "low_inlier_ratio") for o in foreign)
    for o in outcomes:  # the gates hold for every returned pose
        if o.success:
            assert o.num_matches >= 20 and o.inlier_ratio >= 0.5


def test_mesh_only_recall(tmp_path: Path, kitchen_dir: Path, feature_models, localizer) -> None:
    """Depth ignored: every 3D point comes from ray casting raw.glb (SceneScape's only method)."""
    store = SceneStore(tmp_path)
    info = register_scene(store, "mesh", kitchen_dir / "kitchen-poly.zip", SceneConfig(), feature_models,
                          options=RegistrationOptions(use_depth=False))
    assert not info.use_depth
    scene = store.load("mesh")
    outcomes = localize_queries(localizer, scene, load_queries(kitchen_dir / "queries.json"), kitchen_dir)
    assert summarise(outcomes, [])["recall_5cm_5deg"] >= 0.90


def test_result_fields_and_convention(kitchen, localizer, first_query) -> None:
    image, camera = first_query
    result = localizer.localize(kitchen, image, camera)
    assert result.success and result.reason is None
    q = np.asarray(result.quaternion)
    assert q.shape == (4,) and abs(np.linalg.norm(q) - 1) < 1e-9
    assert result.scene_id == "kitchen" and result.scene_version == kitchen.version
    assert len(result.retrieved) == 50 and set(result.verified) <= set(result.retrieved)
    assert result.reprojection_error_px is not None and result.reprojection_error_px < 4
    assert {"features", "retrieval", "matching", "verification", "pnp", "total"} <= set(result.timings_ms)
    data = result.to_dict()
    assert "inlier_points2d" not in data and data["num_inliers"] == result.num_inliers


def test_gates_report_precise_reasons(kitchen, localizer, first_query, kitchen_dir: Path) -> None:
    image, camera = first_query
    kitchen.config = SceneConfig(minimum_number_of_matches=10**6)
    try:
        result = localizer.localize(kitchen, image, camera)
        assert not result.success and result.reason == "too_few_matches"
        assert "minimum_number_of_matches" in result.message and result.quaternion is None
        kitchen.config = SceneConfig(inlier_threshold=1.0)
        for q in load_queries(kitchen_dir / "queries.json")[:6]:  # some verified matches miss the final pose
            result = localizer.localize(kitchen, decode_image((kitchen_dir / q["image"]).read_bytes()),
                                        Camera.from_matrix(q["intrinsics"], 640, 480))
            if result.num_inliers < result.num_matches:
                break
        assert not result.success and result.reason == "low_inlier_ratio" and result.translation is None
        kitchen.config = SceneConfig(number_of_localizations=500)  # clamped to the 100 keyframes
        assert len(localizer.localize(kitchen, image, camera).retrieved) == 100
    finally:
        kitchen.config = kitchen.info.config


def test_bad_inputs_get_reasons(kitchen, localizer, first_query, kitchen_store: Path) -> None:
    image, camera = first_query
    wrong_size = Camera(320, 240, 525, 525, 160, 120)
    assert localizer.localize(kitchen, image, wrong_size).reason == "bad_intrinsics"
    assert localizer.localize(kitchen, image[:, :, 0], camera).reason == "bad_image"
    blank = np.zeros_like(image)
    result = localizer.localize(kitchen, blank, camera)
    assert not result.success and result.reason == "no_features"
    with pytest.raises(SceneNotFoundError):
        SceneStore(kitchen_store).load("nope")
    for data in (b"", b"not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 50):
        with pytest.raises(Exception) as info:
            decode_image(data)
        assert getattr(info.value, "reason", None) == "bad_image"


@pytest.mark.parametrize(
    "K, dist, expected",
    [
        ([[525, 0, 320], [0, 525, 240]], (), "3x3 matrix"),
        ([[525, 0, 320], [0, 525, 240], [0, 0, 2]], (), "last row"),
        ([[float("nan"), 0, 320], [0, 525, 240], [0, 0, 1]], (), "non-finite"),
        ([[5, 0, 320], [0, 525, 240], [0, 0, 1]], (), "fx = 5 px is absurd"),
        ([[525, 0, 320], [0, 1e6, 240], [0, 0, 1]], (), r"fy = 1e\+06 px is absurd"),
        ([[525, 0, 9000], [0, 525, 240], [0, 0, 1]], (), "outside the 640x480 image"),
        ([[525, 3, 320], [0, 525, 240], [0, 0, 1]], (), "skewed"),
        ([[525, 0, 320], [0, 525, 240], [0, 0, 1]], (0.1, 0.2, 0.3), "0, 4, 5 or 8"),
        ([[525, 0, 320], [0, 525, 240], [0, 0, 1]], (50, 0, 0, 0), "out of range"),
        ([["a", 0, 320], [0, 525, 240], [0, 0, 1]], (), "numbers"),
    ],
)
def test_absurd_intrinsics_refused(K, dist, expected) -> None:
    with pytest.raises(BadIntrinsicsError, match=expected):
        Camera.from_matrix(K, 640, 480, dist)


def test_distortion_uses_opencv_model(kitchen, localizer, first_query) -> None:
    image, camera = first_query
    distorted = Camera(camera.width, camera.height, camera.fx, camera.fy, camera.cx, camera.cy, (0, 0, 0, 0))
    assert distorted.to_pycolmap().model.name == "OPENCV"
    a, b = localizer.localize(kitchen, image, camera), localizer.localize(kitchen, image, distorted)
    assert b.success and np.allclose(a.translation, b.translation, atol=1e-3)


def test_reregistration_is_atomic_and_failures_keep_old_version(kitchen_store: Path, kitchen_dir: Path,
                                                               feature_models, tmp_path: Path) -> None:
    store = SceneStore(kitchen_store)
    before = store.info("kitchen")
    assert not needs_registration(store, "kitchen", kitchen_dir / "kitchen-poly.zip", SceneConfig())
    assert needs_registration(store, "kitchen", kitchen_dir / "kitchen-poly.zip", SceneConfig(inlier_threshold=0.6))
    bogus = tmp_path / "bad.zip"
    bogus.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DatasetError):
        register_scene(store, "kitchen", bogus, SceneConfig(), feature_models)
    assert store.info("kitchen") == before
    assert not list((kitchen_store / "kitchen").glob(".staging-*"))


def test_hloc_files_written(kitchen) -> None:
    import h5py

    with h5py.File(kitchen.path / "feats-sift.h5") as fd:
        grp = fd["rgb"][kitchen.keyframes[0].stem + ".jpg"]
        n = grp["keypoints"].shape[0]
        assert grp["descriptors"].shape == (128, n) and grp["descriptors"].dtype == np.float16
        assert tuple(grp["image_size"][()]) == (640, 480)
    with h5py.File(kitchen.path / "global-feats-vlad.h5") as fd:
        assert fd["rgb"][kitchen.keyframes[0].stem + ".jpg"]["global_descriptor"].shape == (64 * 128,)
    manifest = json.loads((kitchen.path / "manifest.json").read_text())
    assert manifest["num_keyframes"] == 100 and len(manifest["dataset_sha256"]) == 64
    assert set(manifest["file_sha256"]) >= {"feats-sift.h5", "points3d-sift.h5", "global-feats-vlad.h5"}


def test_cli_register_and_localize(tmp_path: Path, kitchen_dir: Path, kitchen_store: Path) -> None:
    item = load_queries(kitchen_dir / "queries.json")[3]
    cmd = [sys.executable, "-m", "markerless.cli", "localize", str(kitchen_dir / item["image"]), "--scene", "kitchen",
           "--intrinsics", "525,525,320,240", "--store", str(kitchen_store), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["success"] and len(result["quaternion"]) == 4
    bad = subprocess.run(cmd[:-1] + ["--scene", "absent"], capture_output=True, text=True)
    assert bad.returncode == 1 and "scene_not_found" in bad.stderr
    bogus = tmp_path / "x.zip"
    bogus.write_text("nope")
    reg = subprocess.run([sys.executable, "-m", "markerless.cli", "register", str(bogus), "--scene", "x", "--store",
                          str(tmp_path / "s")], capture_output=True, text=True)
    assert reg.returncode == 1 and "not a zip archive" in reg.stderr
    cfg = subprocess.run([sys.executable, "-m", "markerless.cli", "register", str(bogus), "--scene", "x",
                          "--global-feature", "bogus"], capture_output=True, text=True)
    assert cfg.returncode != 0 and "supported: vlad, netvlad" in cfg.stderr


def test_cli_eval_writes_the_summary(tmp_path: Path, kitchen_dir: Path) -> None:
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "markerless.cli", "eval", str(kitchen_dir / "kitchen-poly.zip"),
         str(kitchen_dir / "queries.json"), "--foreign", str(kitchen_dir / "foreign"), "--json", str(out),
         "--number-of-localizations", "20"],
        capture_output=True, text=True, check=True,
    )
    summary = json.loads(out.read_text())
    for key in ("recall_5cm_5deg", "recall_10cm_10deg", "median_translation_cm", "median_rotation_deg",
                "foreign_rejected", "foreign_total", "latency_p50_s", "latency_p90_s", "register_s", "peak_rss_mb"):
        assert key in summary, key
    assert summary["config"]["number_of_localizations"] == 20
    assert summary["foreign_total"] == 2 and len(summary["queries"]) == 20
    assert summary["recall_10cm_10deg"] >= 0.9 and "recall_5cm_5deg" in proc.stdout


def test_a_sharper_camera_is_matched_at_the_scan_resolution(kitchen, localizer, first_query) -> None:
    """The same view from a camera with 2x the angular resolution (K doubled): SIFT runs at the scan's resolution,
    so it finds about the keypoints the scan can match, and the answer is in the frame's own pixels."""
    import cv2

    image, camera = first_query
    sharp = cv2.resize(image, (1280, 960), interpolation=cv2.INTER_CUBIC)
    sharp_camera = Camera(1280, 960, camera.fx * 2, camera.fy * 2, camera.cx * 2, camera.cy * 2)
    base = localizer.localize(kitchen, image, camera, "fixed")
    result = localizer.localize(kitchen, sharp, sharp_camera, "fixed")
    assert base.success and result.success, (base.message, result.message)
    assert abs(result.num_matches - base.num_matches) <= 0.25 * base.num_matches, (result.num_matches,
                                                                                   base.num_matches)
    assert np.linalg.norm(np.subtract(result.translation, base.translation)) < 0.02
    assert result.inlier_points2d is not None and np.max(np.asarray(result.inlier_points2d)[:, 0]) > 700

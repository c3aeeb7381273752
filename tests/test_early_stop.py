"""Best-first early stopping over the retrieved keyframes, on the real kitchen scan: fewer keyframes matched, the
same gates, and a frame that does not stop early ends exactly as the search of all K does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.options import LocalizationOptions
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.scene.queries import load_queries
from markerless.scene.store import SceneStore


@pytest.fixture(scope="module")
def kitchen(kitchen_store: Path):
    return SceneStore(kitchen_store).load("kitchen")


@pytest.fixture(scope="module")
def localizers(feature_models) -> tuple[Localizer, Localizer]:
    """(early stopping as configured by default, all K keyframes matched)."""
    return Localizer(feature_models), Localizer(feature_models, LocalizationOptions(early_stop_keyframes=0))


@pytest.fixture(scope="module")
def queries(kitchen_dir: Path) -> list[tuple[np.ndarray, Camera, np.ndarray]]:
    out = []
    for item in load_queries(kitchen_dir / "queries.json")[::5]:
        image = decode_image((kitchen_dir / item["image"]).read_bytes())
        truth = quat_trans_to_pose(item["quaternion"], item["translation"])
        out.append((image, Camera.from_matrix(item["intrinsics"], 640, 480), truth))
    return out


def test_stops_after_a_few_agreeing_keyframes(kitchen, localizers, queries) -> None:
    early, full = localizers
    for image, camera, truth in queries:
        result = early.localize(kitchen, image, camera)
        reference = full.localize(kitchen, image, camera)
        assert result.success, (result.reason, result.message)
        assert len(result.retrieved) == len(reference.retrieved) == 50  # K stays the bound
        assert 3 <= len(result.verified) < len(reference.verified)
        assert set(result.verified) <= set(reference.verified)  # best first: the top of the same ranking
        t_err, r_err = pose_error(result.pose_matrix(), truth)
        assert t_err < 0.05 and r_err < 5
        assert result.num_matches >= kitchen.config.minimum_number_of_matches
        assert result.inlier_ratio >= kitchen.config.inlier_threshold
        assert result.timings_ms["matching"] < reference.timings_ms["matching"]


def test_a_failing_gate_ends_as_the_full_search(kitchen, localizers, queries) -> None:
    """Early stopping only returns successes: when the gates refuse, every keyframe is visited and the answer is
    the full search's, counts included."""
    early, full = localizers
    image, camera, _ = queries[0]
    kitchen.config = SceneConfig(minimum_number_of_matches=10**6)
    try:
        result = early.localize(kitchen, image, camera)
        reference = full.localize(kitchen, image, camera)
    finally:
        kitchen.config = kitchen.info.config
    assert not result.success
    assert (result.reason, result.num_matches, result.num_inliers) == (
        reference.reason, reference.num_matches, reference.num_inliers)
    assert result.verified == reference.verified


def test_gates_count_the_keyframes_visited(kitchen, localizers, queries) -> None:
    """The inlier ratio is counted over the verified matches of the keyframes visited: an early pose passes
    `inlier_threshold` on those (all of them agree), and a stricter threshold than its ratio sends the search on."""
    early, _ = localizers
    results = [(early.localize(kitchen, image, camera), image, camera) for image, camera, _ in queries]
    assert all(r.success and r.inlier_ratio >= kitchen.config.inlier_threshold for r, _, _ in results)
    first, image, camera = min(results, key=lambda r: r[0].inlier_ratio)
    assert first.inlier_ratio < 1.0
    kitchen.config = SceneConfig(inlier_threshold=first.inlier_ratio + 1e-6)
    try:
        stricter = early.localize(kitchen, image, camera)
    finally:
        kitchen.config = kitchen.info.config
    assert len(stricter.verified) > len(first.verified)


def test_foreign_images_visit_all_keyframes_and_fail(kitchen, localizers, kitchen_dir: Path, queries) -> None:
    early, full = localizers
    camera = queries[0][1]
    for path in sorted((kitchen_dir / "foreign").glob("*.jpg")):
        image = decode_image(path.read_bytes())
        result, reference = early.localize(kitchen, image, camera), full.localize(kitchen, image, camera)
        assert not result.success
        assert (result.reason, result.verified) == (reference.reason, reference.verified)

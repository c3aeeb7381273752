"""The dense path end to end on the real kitchen scan: register with `local_feature: "-"`, then localize.

The official QTA-LoFTR weights cannot be downloaded here, so the checkpoint is written by `write_random_checkpoint`
(official format, random weights). Random weights give no match confidence above 0.1, hence `match_threshold: 0`
(every mutual nearest neighbour). Their coarse features are dominated by the positional encoding, so two images of
the same size match (nearly) pixel to the same pixel. A query that *is* a keyframe, at its size or rescaled, is
therefore matched correctly, and its pose must come out as that keyframe's: this checks the whole chain
(preprocessing scales, canvas, keypoints back to original pixels, quantisation, lifting, PnP, gates) without any
accuracy claim about the model. `resize_max: 320` keeps registration and matching cheap on 2 CPU cores; a 10-keyframe
subset of the scan keeps registration short.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from markerless.models.qta_loftr import write_random_checkpoint
from markerless.pipeline.features import FeatureModels
from markerless.pipeline.localization import Localizer
from markerless.pipeline.registration import register_scene
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.store import SceneStore


def _subset_zip(source: Path, out: Path, every: int) -> Path:
    """The kitchen zip with every `every`-th keyframe (all files of those keyframes, mesh and metadata kept)."""
    with zipfile.ZipFile(source) as zin:
        stems = sorted({Path(n).stem for n in zin.namelist() if "/keyframes/images/" in n})
        keep = set(stems[::every])
        with zipfile.ZipFile(out, "w") as zout:
            for info in zin.infolist():
                if "/keyframes/" in info.filename and Path(info.filename).stem not in keep:
                    continue
                zout.writestr(info, zin.read(info))
    return out


def _angle_deg(r_a: np.ndarray, r_b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(r_a.T @ r_b) - 1) / 2, -1, 1))))


@pytest.fixture(scope="module")
def dense_scene(tmp_path_factory: pytest.TempPathFactory, kitchen_dir: Path):
    root = tmp_path_factory.mktemp("dense")
    weights = root / "weights"
    write_random_checkpoint(weights / "qta-indoor.ckpt", "qta_indoor")
    dataset = _subset_zip(kitchen_dir / "kitchen-poly.zip", root / "kitchen-10.zip", every=10)
    config = SceneConfig(
        local_feature={"-": {}},
        matcher={"qta_indoor": {"match_threshold": 0.0, "resize_max": 320}},
        number_of_localizations=1,
    )
    models = FeatureModels(device="cpu", weights_dir=weights)
    store = SceneStore(root / "store")
    info = register_scene(store, "kitchen-dense", dataset, config, models)
    assert info.num_keyframes == 10
    return store.load("kitchen-dense"), models


@pytest.mark.parametrize("width", [640, 500])
def test_keyframe_as_query_gets_its_pose(dense_scene, width: int):
    scene, models = dense_scene
    i = 4
    image = scene.keyframe_image(i)
    kf = scene.keyframes[i]
    s = width / image.shape[1]
    height = round(image.shape[0] * s)
    if s != 1:
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    K = kf.camera.scaled(s).matrix  # COLMAP convention: scales as is
    result = Localizer(models).localize(scene, image, Camera.from_matrix(K, width, height))
    assert result.retrieved == [scene.keyframe_names[i]]
    assert result.success, (result.reason, result.message)
    assert result.num_matches >= 100 and "matching" in result.timings_ms
    est, gt = result.pose_matrix(), scene.keyframe_pose(i)
    assert np.linalg.norm(est[:3, 3] - gt[:3, 3]) < 0.05
    assert _angle_deg(est[:3, :3], gt[:3, :3]) < 2.0
    assert sorted(p.name for p in (scene.path / "qta_loftr").iterdir())[-1] == "meta.json"

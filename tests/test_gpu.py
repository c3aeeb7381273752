"""The CUDA and float16 paths against the CPU float32 ones (marker `gpu`; `bench/device_check.sh` runs them).

On a machine with CUDA they run there; with `--cpu` the same code paths run on the CPU, where the comparisons are
CPU against CPU (float16 autocast is CUDA-only by design): that proves the plumbing, not the GPU numerics.
Without CUDA and without `--cpu` they are skipped.

Test doubles: NetVLAD and QTA-LoFTR have random weights in the official file formats (the real files cannot be
downloaded here or on the device machine). Random weights still exercise every layer, so float16 rounding
shows up as it would with the real ones. Scenes are synthetic rooms (`markerless.demo.synth`) with exact poses.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from markerless.demo.synth import SynthConf, generate
from markerless.pipeline.dense import DenseMatcher
from markerless.pipeline.features import FeatureModels, SiftExtractor, confs, to_gray
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.matching import match_batch
from markerless.pipeline.registration import register_scene
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.scene.queries import load_queries
from markerless.scene.store import SceneStore

pytestmark = pytest.mark.gpu

DENSE_TEST_CONF = {"match_threshold": 0.0, "resize_max": 320}  # random weights: no confidence above 0.1


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic scan (16 keyframes) with 4 ground-truth queries and 1 foreign view, beside `room.zip`."""
    out = tmp_path_factory.mktemp("room") / "room.zip"
    generate(out, SynthConf(num_keyframes=16, num_queries=4, num_foreign=1))
    return out


@pytest.fixture(scope="module")
def room_images(room: Path) -> list[np.ndarray]:
    return [decode_image(p.read_bytes()) for p in sorted((room.parent / "queries").glob("*.jpg"))]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from markerless.models import netvlad, qta_loftr

    root = tmp_path_factory.mktemp("weights")
    netvlad.write_random_checkpoint(root / "VGG16-NetVLAD-Pitts30K.mat", seed=1)
    qta_loftr.write_random_checkpoint(root / "qta-indoor.ckpt", "qta_indoor")
    return root


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("half", [False, True])
def test_netvlad_on_device_agrees_with_cpu_fp32(gpu_device: str, weights_dir: Path, room_images: list[np.ndarray],
                                                half: bool) -> None:
    """Descriptors (and so retrieval) barely move: fp32 on CUDA (TF32 convolutions), fp16 autocast backbone."""
    from markerless.models.netvlad import NetVLADExtractor

    checkpoint = weights_dir / "VGG16-NetVLAD-Pitts30K.mat"
    images = [cv2.resize(im, (320, 240), interpolation=cv2.INTER_AREA) for im in room_images]
    reference = NetVLADExtractor(checkpoint, "cpu", {"half": False})(images)
    got = NetVLADExtractor(checkpoint, gpu_device, {"half": half})(images)
    assert got.shape == reference.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert _cosines(got, reference).min() > (0.99 if half else 0.999)
    # retrieval order among the images is unchanged
    assert np.array_equal(np.argsort(-(got @ got.T), axis=1), np.argsort(-(reference @ reference.T), axis=1))


def test_qta_loftr_fp16_matches_agree_with_fp32(gpu_device: str, weights_dir: Path, room: Path, tmp_path: Path,
                                                room_images: list[np.ndarray]) -> None:
    """float16 autocast (the CUDA default) against float32 on the same device: same keyframe cells, query
    keypoints within half a pixel, for nearly all matches."""
    keyframes = [decode_image(p.read_bytes()) for p in _keyframe_jpegs(room, tmp_path)[:2]]
    results = []
    for half in (False, True):
        matcher = DenseMatcher("qta_indoor", {**DENSE_TEST_CONF, "half": half}, gpu_device, weights_dir)
        matcher.cache_keyframes(keyframes, tmp_path / f"cache-{half}")
        results.append(matcher.match(room_images[0], [0, 1], tmp_path / f"cache-{half}"))
    for (q32, k32, _), (q16, k16, _) in zip(*results, strict=True):
        assert len(q32) > 100
        cells32 = {tuple(k): q for k, q in zip(np.round(k32, 3), q32, strict=True)}
        cells16 = {tuple(k): q for k, q in zip(np.round(k16, 3), q16, strict=True)}
        common = cells32.keys() & cells16.keys()
        assert len(common) >= 0.9 * max(len(cells32), len(cells16))
        shift = np.array([np.linalg.norm(cells32[c] - cells16[c]) for c in common])
        assert np.mean(shift < 0.5) >= 0.9


def _keyframe_jpegs(scan: Path, tmp_path: Path) -> list[Path]:
    import zipfile

    with zipfile.ZipFile(scan) as archive:
        names = sorted(n for n in archive.namelist() if "/keyframes/images/" in n and n.endswith(".jpg"))
        out = []
        for name in names:
            out.append(tmp_path / Path(name).name)
            out[-1].write_bytes(archive.read(name))
    return out


def test_torch_matcher_agrees_with_numpy(gpu_device: str, room: Path, room_images: list[np.ndarray],
                                         tmp_path: Path) -> None:
    """Real SIFT of the room, one query against 16 keyframes: the torch matcher on the device gives the NumPy
    matches (bit-identical on the CPU; on CUDA a different summation order may flip a near-tie or two)."""
    sift = SiftExtractor(confs["sift"])
    query = sift(to_gray(room_images[0]))["descriptors"]
    refs = [sift(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE))["descriptors"] for p in _keyframe_jpegs(room, tmp_path)]
    expected = match_batch(query, refs)
    got = match_batch(query, refs, device=gpu_device)
    total = sum(len(m) for m in expected)
    differ = sum(len({tuple(r) for r in a} ^ {tuple(r) for r in b}) for a, b in zip(expected, got, strict=True))
    assert total > 200
    assert differ <= (0 if gpu_device == "cpu" else 0.002 * total)


@pytest.fixture(scope="module")
def room_store(room: Path, weights_dir: Path, gpu_device: str, tmp_path_factory: pytest.TempPathFactory):
    """The room registered twice on the device under test: sparse (default config) and dense (QTA-LoFTR)."""
    store = SceneStore(tmp_path_factory.mktemp("store"))
    models = FeatureModels(device=gpu_device, weights_dir=weights_dir)
    register_scene(store, "sparse", room, SceneConfig(), models)
    dense = SceneConfig(local_feature={"-": {}}, matcher={"qta_indoor": DENSE_TEST_CONF}, number_of_localizations=1)
    register_scene(store, "dense", room, dense, models)
    return store, models


def test_sparse_localization_on_device(room: Path, room_store) -> None:
    """SIFT + the device's matcher: every synthetic query within 5 cm / 5 deg, the foreign view refused."""
    store, models = room_store
    scene, localizer = store.load("sparse"), Localizer(models)
    queries = load_queries(room.parent / "queries.json")
    for item in queries:
        image = decode_image((room.parent / item["image"]).read_bytes())
        result = localizer.localize(scene, image, Camera.from_matrix(item["intrinsics"], image.shape[1],
                                                                       image.shape[0]))
        assert result.success, (item["image"], result.reason, result.message)
        t_err, r_err = pose_error(result.pose_matrix(), quat_trans_to_pose(item["quaternion"], item["translation"]))
        assert t_err < 0.05 and r_err < 5, (item["image"], t_err, r_err)
    foreign = decode_image(next((room.parent / "foreign").glob("*.jpg")).read_bytes())
    result = localizer.localize(scene, foreign, Camera.from_matrix(queries[0]["intrinsics"], 640, 480))
    assert not result.success


def test_dense_localization_on_device(room_store) -> None:
    """QTA-LoFTR (random weights: positional matches) end to end: a keyframe as query gets its own pose."""
    store, models = room_store
    scene = store.load("dense")
    i = 5
    image = scene.keyframe_image(i)
    result = Localizer(models).localize(scene, image, scene.keyframes[i].camera, mode="fixed")
    assert result.retrieved == [scene.keyframe_names[i]]
    assert result.success, (result.reason, result.message)
    t_err, r_err = pose_error(result.pose_matrix(), scene.keyframe_pose(i))
    assert t_err < 0.05 and r_err < 2

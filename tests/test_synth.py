"""The synthetic scan is a valid Polycam export whose ground truth agrees with its images, depth and mesh.

The ground-truth checks do not reuse the renderer: they go through the project's Polycam ingestion, ray casting
of raw.glb with Embree, and an OpenCV SIFT + PnP solve, so a wrong convention anywhere (alignmentTransform order,
ARKit axes, depth pixel grid, principal-point convention) makes them fail.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import trimesh

from markerless.demo import synth
from markerless.scene.camera import HALF_PIXEL, Camera
from markerless.scene.geometry import MeshRaycaster, lift_with_depth, pose_error, quat_trans_to_pose
from markerless.scene.layout import load_depth
from markerless.scene.polycam import ingest
from markerless.scene.queries import load_queries

CONF = synth.SynthConf(num_keyframes=12, num_queries=3, num_foreign=1, seed=3)
CAMERA_KEYS = {"fx", "fy", "cx", "cy", "width", "height", "timestamp", "blur_score"} | {
    f"t_{i}{j}" for i in range(3) for j in range(4)
}


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthOutput:
    return synth.generate(tmp_path_factory.mktemp("synth") / "room.zip", CONF)


@pytest.fixture(scope="module")
def dataset(scan: synth.SynthOutput, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("dataset")
    return out, ingest(scan.zip_path, out).keyframes


def _rendered_pose(k: int, n: int) -> np.ndarray:
    """The keyframe pose the trajectory defines (no randomness involved), raw.glb frame, OpenCV axes."""
    return synth._look(*synth._trajectory(k / n, synth.SynthConf().room_size))


def test_layout_matches_polycam_raw_export(scan: synth.SynthOutput) -> None:
    with zipfile.ZipFile(scan.zip_path) as zf:
        names = set(zf.namelist())
        stems = {Path(n).stem for n in names if "/keyframes/images/" in n}
        assert len(stems) == CONF.num_keyframes
        for stem in stems:
            for sub, ext in (("images", "jpg"), ("cameras", "json"), ("depth", "png"), ("confidence", "png")):
                assert f"room-poly/keyframes/{sub}/{stem}.{ext}" in names
        assert {"room-poly/raw.glb", "room-poly/mesh_info.json", "room-poly/thumbnail.jpg"} <= names
        stem = sorted(stems)[0]
        camera = json.loads(zf.read(f"room-poly/keyframes/cameras/{stem}.json"))
        assert set(camera) == CAMERA_KEYS
        assert camera["timestamp"] == int(stem)
        image = cv2.imdecode(np.frombuffer(zf.read(f"room-poly/keyframes/images/{stem}.jpg"), np.uint8), 1)
        depth = cv2.imdecode(np.frombuffer(zf.read(f"room-poly/keyframes/depth/{stem}.png"), np.uint8), -1)
        conf = cv2.imdecode(np.frombuffer(zf.read(f"room-poly/keyframes/confidence/{stem}.png"), np.uint8), -1)
        info = json.loads(zf.read("room-poly/mesh_info.json"))
    assert image.shape == (480, 640, 3)
    assert depth.dtype == np.uint16 and depth.shape == (120, 160)
    assert 500 < np.median(depth) < 5000  # millimetres inside a 5 x 4 m room
    assert conf.dtype == np.uint8 and conf.shape == depth.shape and set(np.unique(conf)) <= {0, 127, 255}
    # Column-major storage: read as Polycam documents it, the matrix is rigid with its translation in column 3.
    a = np.asarray(info["alignmentTransform"]).reshape(4, 4).T
    assert np.allclose(a[3], [0, 0, 0, 1]) and np.linalg.norm(a[:3, 3]) > 0.1
    assert np.allclose(a[:3, :3] @ a[:3, :3].T, np.eye(3)) and not np.allclose(a[:3, :3], np.eye(3))
    assert np.allclose(a, scan.alignment)


def test_ingestion_recovers_the_rendered_poses(dataset: tuple[Path, list]) -> None:
    _, keyframes = dataset
    n = CONF.num_keyframes
    assert len(keyframes) == n and all(k.has_depth for k in keyframes)
    for k, kf in enumerate(keyframes):  # sorted by timestamp = trajectory order
        t_err, r_err = pose_error(kf.pose_matrix, _rendered_pose(k, n))
        assert t_err < 1e-6 and r_err < 1e-4
        assert abs(kf.camera.fx - synth.SynthConf().focal) < 5 and abs(kf.camera.cx - 320) < 5


def test_depth_back_projects_onto_the_mesh(dataset: tuple[Path, list]) -> None:
    """Every depth pixel, lifted with its keyframe's pose, lies where raw.glb is hit by the same viewing ray."""
    out, keyframes = dataset
    raycaster = MeshRaycaster.from_glb(out / "raw.glb")
    for kf in keyframes[::4]:
        depth, conf = load_depth(out, kf.stem)
        vd, ud = np.mgrid[0 : depth.shape[0], 0 : depth.shape[1]]
        pixels = np.stack([(ud.ravel() + 0.5) * 4 - 0.5, (vd.ravel() + 0.5) * 4 - 0.5], axis=1)
        points, valid = lift_with_depth(pixels, kf.camera, kf.pose_matrix, depth, conf)
        mesh_points, hit = raycaster.lift(pixels, kf.camera, kf.pose_matrix)
        both = valid & hit
        assert both.mean() > 0.8
        gap = np.linalg.norm(points[both] - mesh_points[both], axis=1)
        assert np.max(gap) < 0.003  # millimetre depth quantisation only


def test_mesh_faces_seen_from_the_keyframes_face_the_camera(dataset: tuple[Path, list]) -> None:
    """Walls point into the room and furniture outwards: every face a keyframe sees is a front face."""
    out, keyframes = dataset
    mesh = trimesh.load(out / "raw.glb", force="mesh", process=False)
    for kf in keyframes[::3]:
        v, u = np.mgrid[0:480:16, 0:640:16]
        dirs = kf.camera.rays(np.stack([u.ravel(), v.ravel()], 1).astype(float)) @ kf.pose_matrix[:3, :3].T
        origins = np.repeat(kf.pose_matrix[None, :3, 3], len(dirs), axis=0)
        tri, ray, _ = mesh.ray.intersects_id(origins, dirs, multiple_hits=False, return_locations=True)
        assert len(ray) == len(dirs)  # a closed room: every ray hits something
        assert np.all(np.einsum("ij,ij->i", mesh.face_normals[tri], dirs[ray]) < 0)


def _pnp(image: np.ndarray, camera: Camera, out: Path, keyframes: list) -> tuple[np.ndarray | None, int]:
    """OpenCV SIFT matches against every keyframe, lifted with depth, then PnP RANSAC: (pose, inliers)."""
    sift = cv2.SIFT_create()
    kq, dq = sift.detectAndCompute(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), None)
    matcher = cv2.BFMatcher()
    pts2d, pts3d = [], []
    for kf in keyframes:
        img = cv2.imread(str(out / kf.name))
        kk, dk = sift.detectAndCompute(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), None)
        good = [m for m, n in matcher.knnMatch(dq, dk, k=2) if m.distance < 0.75 * n.distance]
        if not good:
            continue
        pk = np.array([kk[m.trainIdx].pt for m in good])
        depth, conf = load_depth(out, kf.stem)
        xyz, valid = lift_with_depth(pk, kf.camera, kf.pose_matrix, depth, conf)
        pts2d.append(np.array([kq[m.queryIdx].pt for m in good])[valid])
        pts3d.append(xyz[valid])
    p2, p3 = np.concatenate(pts2d), np.concatenate(pts3d)
    k = camera.matrix
    k[:2, 2] -= HALF_PIXEL  # OpenCV's keypoints and K put the top-left pixel centre at (0, 0)
    ok, rvec, tvec, inliers = cv2.solvePnPRansac(p3, p2, k, None, reprojectionError=3.0, iterationsCount=2000)
    if not ok or inliers is None:
        return None, 0
    world_to_cam = np.eye(4)
    world_to_cam[:3, :3] = cv2.Rodrigues(rvec)[0]
    world_to_cam[:3, 3] = tvec.ravel()
    return np.linalg.inv(world_to_cam), len(inliers)


def test_query_ground_truth_agrees_with_the_query_images(scan: synth.SynthOutput,
                                                         dataset: tuple[Path, list]) -> None:
    out, keyframes = dataset
    data = json.loads(scan.queries_json.read_text())
    assert len(data["queries"]) == CONF.num_queries
    for query in data["queries"]:
        image = cv2.imread(str(scan.queries_json.parent / query["image"]))
        assert image.shape == (query["height"], query["width"], 3)
        k = np.asarray(query["intrinsics"])
        camera = Camera.from_matrix(k, query["width"], query["height"])
        truth = quat_trans_to_pose(query["quaternion"], query["translation"])
        nearest = sorted(keyframes, key=lambda kf: np.linalg.norm(kf.pose_matrix[:3, 3] - truth[:3, 3]))[:3]
        estimate, inliers = _pnp(image, camera, out, nearest)
        assert estimate is not None and inliers > 100, inliers
        t_err, r_err = pose_error(estimate, truth)
        assert t_err < 0.01 and r_err < 0.25, (query["image"], t_err, r_err)


def test_foreign_views_do_not_localize(scan: synth.SynthOutput, dataset: tuple[Path, list]) -> None:
    out, keyframes = dataset
    (foreign,) = scan.foreign
    image = cv2.imread(str(foreign))
    camera = Camera(640, 480, 520.0, 520.0, 320.0, 240.0)
    _, inliers = _pnp(image, camera, out, keyframes)
    assert inliers < 20, inliers


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    conf = synth.SynthConf(num_keyframes=2, num_queries=1, num_foreign=0, texels_per_metre=40, seed=11)
    a = synth.generate(tmp_path / "a" / "s.zip", conf)
    b = synth.generate(tmp_path / "b" / "s.zip", conf)
    assert a.zip_path.read_bytes() == b.zip_path.read_bytes()
    assert a.queries_json.read_text() == b.queries_json.read_text()


def test_unknown_conf_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_keyframe"):
        synth.generate(tmp_path / "s.zip", synth.SynthConf.from_dict({"num_keyframe": 3}))


def test_synth_command_writes_zip_and_queries(tmp_path: Path) -> None:
    from markerless.cli import demo as demo_cli

    parser = argparse.ArgumentParser()
    demo_cli.register(parser.add_subparsers())
    args = parser.parse_args(["synth", str(tmp_path / "x.zip"), "--keyframes", "3", "--queries", "2",
                              "--seed", "5"])
    assert args.func(args) == 0
    assert zipfile.is_zipfile(tmp_path / "x.zip")
    assert len(load_queries(tmp_path / "queries.json")) == 2
    assert len(list((tmp_path / "queries").glob("*.jpg"))) == 2

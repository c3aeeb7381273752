"""Localization of one camera frame against a registered scene: retrieve, match, verify, solve, gate.

Why pairwise verification: with K = 50 retrieved keyframes most of them show other parts of the site, and
their nearest-neighbour matches are noise. Pooling them all (SceneScape/hloc) dilutes the inlier ratio of a
correct pose below 0.5 and the quality gate rejects it. Here each retrieved keyframe's 2D-3D matches must first
agree on a camera pose by themselves (a PnP RANSAC per keyframe, like COLMAP's two-view verification of
matches); keyframes that fail contribute nothing. The pose is then solved on the union of verified matches
with LO-RANSAC + refinement (pycolmap), and the gates mean exactly:

- `num_matches`: verified 2D-3D matches, i.e. the inliers of each retrieved keyframe's own PnP (COLMAP counts
  "verified matches" the same way after two-view geometry), summed over the keyframes that passed
  (gate `minimum_number_of_matches`);
- `inlier_ratio` = PnP inliers of the final pose / `num_matches` (gate `inlier_threshold`), i.e. the share of
  the verified matches consistent with the returned pose.

An image of another place verifies no keyframe and fails with `no_verified_matches`, never with a pose.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from markerless.errors import BadImageError, BadIntrinsicsError, MarkerlessError
from markerless.pipeline.features import FeatureModels, to_gray
from markerless.scene.geometry import COLMAP_OFFSET
from markerless.pipeline.matching import confs as matcher_confs
from markerless.pipeline.matching import match_batch
from markerless.pipeline.retrieval import top_k, vlad
from markerless.scene.store import Scene

# Localization settings beyond SceneScape's six scene fields; plain dict, one comment per key.
# The PnP threshold must absorb the scan's own inconsistency, not only keypoint noise: keyframe poses of a real
# scan disagree by 1-2 degrees (tracking drift), so matches lifted from different keyframes scatter by ~10 px at
# 640 px. On the kitchen scan 12 px (hloc's default) splits correct matches into rival consensus sets (recall
# 0.95); 14-20 px all give 1.0 with foreign images still rejected; SceneScape uses 48 px.
default_conf: dict[str, Any] = {
    "ransac_max_error_px": 16.0,  # PnP inlier threshold at 640 px, scaled with image size (see below)
    "pair_min_matches": 12,  # a keyframe with fewer 2D-3D matches cannot be verified on its own
    "pair_min_inliers": 12,  # pairwise PnP inliers needed to accept a keyframe's matches
    "pair_min_inlier_ratio": 0.25,  # and the share of its matches they must be
    "pnp_max_points": 2000,  # correspondences sampled for the final LO-RANSAC + refinement
    "max_image_pixels": 40_000_000,  # refuse larger frames (decompression bombs)
}


def _reprojection_errors(camera, cam_from_world, points2d: np.ndarray, points3d: np.ndarray) -> np.ndarray:
    """Pixel distance between observed and projected points; infinite behind the camera."""
    in_cam = points3d @ np.asarray(cam_from_world.rotation.matrix()).T + np.asarray(cam_from_world.translation)
    errors = np.full(len(points2d), np.inf)
    front = in_cam[:, 2] > 1e-6
    if front.any():
        errors[front] = np.linalg.norm(camera.img_from_cam(in_cam[front]) - points2d[front], axis=1)
    return errors


@dataclass(frozen=True)
class QueryCamera:
    """The query camera's intrinsics (COLMAP pixel convention, like Polycam's) and OpenCV distortion."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion: tuple[float, ...] = ()  # k1, k2, p1, p2[, k3]

    @classmethod
    def from_matrix(
        cls, K: Sequence[Sequence[float]], width: int, height: int, distortion: Sequence[float] = ()
    ) -> QueryCamera:
        """Validate a 3x3 intrinsics matrix; raises BadIntrinsicsError naming what is wrong."""
        try:
            mat = np.asarray(K, dtype=float)
            dist = tuple(float(v) for v in (distortion or ()))
        except (TypeError, ValueError) as exc:
            raise BadIntrinsicsError(f"intrinsics must be a 3x3 matrix of numbers: {exc}") from exc
        if mat.shape != (3, 3):
            raise BadIntrinsicsError(f"intrinsics must be a 3x3 matrix, got shape {mat.shape}")
        if not np.all(np.isfinite(mat)) or not all(math.isfinite(v) for v in dist):
            raise BadIntrinsicsError("intrinsics or distortion contain a non-finite value")
        if not np.allclose(mat[2], [0, 0, 1]) or abs(mat[1, 0]) > 1e-9:
            raise BadIntrinsicsError(f"intrinsics last row must be [0, 0, 1], got {mat[2].tolist()}")
        if abs(mat[0, 1]) > 1e-6 * max(abs(mat[0, 0]), 1.0):
            raise BadIntrinsicsError(f"skewed intrinsics are not supported (K[0][1] = {mat[0, 1]})")
        camera = cls(int(width), int(height), mat[0, 0], mat[1, 1], mat[0, 2], mat[1, 2], dist)
        camera.validate()
        return camera

    def validate(self) -> None:
        size = max(self.width, self.height)
        if self.width <= 0 or self.height <= 0:
            raise BadIntrinsicsError(f"image size must be positive, got {self.width}x{self.height}")
        for name, f in (("fx", self.fx), ("fy", self.fy)):
            # 0.1 x size is a 157 deg field of view, 50 x size about 1 deg: beyond either it's a unit mistake
            if not (0.1 * size <= f <= 50 * size):
                raise BadIntrinsicsError(
                    f"{name} = {f:g} px is absurd for a {self.width}x{self.height} image (expected {0.1 * size:g}"
                    f"..{50 * size:g})"
                )
        if not (0 <= self.cx <= self.width and 0 <= self.cy <= self.height):
            raise BadIntrinsicsError(
                f"principal point ({self.cx:g}, {self.cy:g}) lies outside the {self.width}x{self.height} image"
            )
        if len(self.distortion) not in (0, 4, 5, 8):
            raise BadIntrinsicsError(f"distortion must have 0, 4, 5 or 8 OpenCV coefficients, got {len(self.distortion)}")
        if any(abs(v) > 10 for v in self.distortion):
            raise BadIntrinsicsError(f"distortion coefficients out of range: {list(self.distortion)}")

    def to_pycolmap(self):  # -> pycolmap.Camera
        import pycolmap

        d = list(self.distortion)
        if not d:
            model, params = "PINHOLE", [self.fx, self.fy, self.cx, self.cy]
        elif len(d) == 4:
            model, params = "OPENCV", [self.fx, self.fy, self.cx, self.cy, *d]
        else:  # k1 k2 p1 p2 k3 [k4 k5 k6]
            d = (d + [0.0] * 8)[:8]
            model, params = "FULL_OPENCV", [self.fx, self.fy, self.cx, self.cy, *d]
        return pycolmap.Camera(model=model, width=self.width, height=self.height, params=params)


@dataclass
class LocalizationResult:
    """Outcome of one query. Pose: camera-to-world in the scene (raw.glb) frame, OpenCV axes, xyzw, metres."""

    success: bool
    reason: str | None
    message: str
    quaternion: list[float] | None = None
    translation: list[float] | None = None
    num_matches: int = 0
    num_inliers: int = 0
    inlier_ratio: float = 0.0
    reprojection_error_px: float | None = None
    retrieved: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    scene_id: str = ""
    scene_version: str = ""
    inlier_points2d: list[list[float]] | None = None  # query pixels of the inliers (hloc convention), for reports

    def to_dict(self, include_points: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not include_points:
            data.pop("inlier_points2d")
        return data

    def pose_matrix(self) -> np.ndarray | None:
        from markerless.scene.geometry import quat_trans_to_pose

        if self.quaternion is None or self.translation is None:
            return None
        return quat_trans_to_pose(self.quaternion, self.translation)


class _Laps:
    """Records the time since the previous lap under each stage name, in milliseconds."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.clock = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = (now - self.clock) * 1e3
        self.clock = now


class Localizer:
    """Localizes frames against scenes with resident models; one instance per worker thread."""

    def __init__(self, models: FeatureModels, conf: dict[str, Any] | None = None) -> None:
        self.models = models
        self.conf = {**default_conf, **(conf or {})}

    def localize(self, scene: Scene, image: np.ndarray, camera: QueryCamera) -> LocalizationResult:
        """Never raises for bad input or a failed gate: returns success=False with a reason."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        try:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise BadImageError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
            if (image.shape[1], image.shape[0]) != (camera.width, camera.height):
                raise BadIntrinsicsError(
                    f"intrinsics are for {camera.width}x{camera.height} but the image is "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
            camera.validate()
            result = self._localize(scene, image, camera, timings)
        except MarkerlessError as exc:
            result = LocalizationResult(False, exc.reason, str(exc))
        result.scene_id, result.scene_version, result.timings_ms = scene.scene_id, scene.version, timings
        timings["total"] = (time.perf_counter() - start) * 1e3
        return result

    def _localize(
        self, scene: Scene, image: np.ndarray, camera: QueryCamera, timings: dict[str, float]
    ) -> LocalizationResult:
        config = scene.config
        if config.dense:
            return self._localize_dense(scene, image, camera, timings)
        lap = _Laps(timings)
        feats = self.models.sift()(to_gray(image))
        lap("features")
        if len(feats["keypoints"]) < 4:
            return LocalizationResult(False, "no_features", f"only {len(feats['keypoints'])} keypoints in the image")

        retrieved = self._retrieve(scene, image, feats["descriptors"])
        lap("retrieval")

        ratio = matcher_confs[config.matcher_name]["model"]["ratio_threshold"]
        ratio = config.matcher[config.matcher_name].get("ratio_threshold", ratio)
        device = None if self.models.device == "cpu" else self.models.device  # NumPy is fastest on a CPU
        matches = match_batch(feats["descriptors"], [scene.descriptors[i] for i in retrieved], ratio=ratio,
                              device=device)
        lap("matching")
        kp_colmap = feats["keypoints"].astype(np.float64) + COLMAP_OFFSET
        pairs = [
            (i, kp_colmap[m[:, 0]], scene.points3d[i][m[:, 1]]) for i, m in zip(retrieved, matches) if len(m)
        ]
        return self._solve(scene, camera, pairs, [scene.keyframe_names[i] for i in retrieved], lap)

    def _retrieve(self, scene: Scene, image: np.ndarray, descriptors: np.ndarray) -> list[int]:
        k = scene.config.number_of_localizations
        if scene.global_name == "vlad":
            query = vlad(descriptors, scene.vocabulary)
        else:
            query = self.models.netvlad()([image])[0]
        # exactly K keyframes (hloc's min_score = 0 would drop some: VLAD similarities can be negative)
        idx, _ = top_k(query, scene.global_descriptors, k, min_score=-np.inf)
        return [int(i) for i in idx]

    def _localize_dense(
        self, scene: Scene, image: np.ndarray, camera: QueryCamera, timings: dict[str, float]
    ) -> LocalizationResult:
        lap = _Laps(timings)
        config = scene.config
        if scene.global_name == "vlad":
            descriptors = self.models.sift()(to_gray(image))["descriptors"]
            lap("features")
            retrieved = self._retrieve(scene, image, descriptors)
        else:
            retrieved = self._retrieve(scene, image, np.zeros((0, 128), np.float32))
        lap("retrieval")
        matcher = self.models.dense(config.matcher_name, config.matcher[config.matcher_name])
        dense = matcher.match(image, retrieved, scene.path / "qta_loftr")
        lap("matching")
        pairs = []
        for i, (kq, kr, _) in zip(retrieved, dense):
            if len(kq) == 0:
                continue
            pts, valid = scene.lift(i, kr)
            pairs.append((i, kq[valid].astype(np.float64) + COLMAP_OFFSET, pts[valid]))
        lap("lift")
        return self._solve(scene, camera, pairs, [scene.keyframe_names[i] for i in retrieved], lap)

    def _solve(
        self,
        scene: Scene,
        camera: QueryCamera,
        pairs: list[tuple[int, np.ndarray, np.ndarray]],
        retrieved_names: list[str],
        lap: _Laps,
    ) -> LocalizationResult:
        """Pairwise verification, then LO-RANSAC PnP + refinement on the verified matches, then the gates."""
        import pycolmap

        config = scene.config
        cam = camera.to_pycolmap()
        max_error = self.conf["ransac_max_error_px"] * max(camera.width, camera.height) / 640.0
        est = pycolmap.AbsolutePoseEstimationOptions()
        est.ransac.max_error = max_error
        est.ransac.random_seed = 0  # reproducible poses for the same frame
        pair_est = pycolmap.AbsolutePoseEstimationOptions()
        pair_est.ransac.max_error = max_error
        pair_est.ransac.random_seed = 0
        pair_est.ransac.max_num_trials = 1000

        raw_matches = sum(len(p2) for _, p2, _ in pairs)
        verified_2d, verified_3d, verified = [], [], []
        for i, p2, p3 in pairs:
            if len(p2) < self.conf["pair_min_matches"]:
                continue
            ret = pycolmap.estimate_absolute_pose(p2, p3, cam, estimation_options=pair_est)
            if ret is None:
                continue
            inliers = np.asarray(ret["inlier_mask"], dtype=bool)
            n_in = int(inliers.sum())
            if n_in >= self.conf["pair_min_inliers"] and n_in >= self.conf["pair_min_inlier_ratio"] * len(p2):
                verified_2d.append(p2[inliers])
                verified_3d.append(p3[inliers])
                verified.append(scene.keyframe_names[i])
        lap("verification")
        common = {"retrieved": retrieved_names, "verified": verified}
        num_matches = sum(len(p) for p in verified_2d)
        if raw_matches == 0:
            return LocalizationResult(
                False, "no_matches", "no feature matches with any retrieved keyframe", **common
            )
        if num_matches == 0:
            return LocalizationResult(
                False,
                "no_verified_matches",
                f"none of the {len(retrieved_names)} retrieved keyframes shares geometrically consistent matches "
                f"with the image ({raw_matches} raw matches, all inconsistent): the camera probably does not see "
                "this scene",
                **common,
            )
        if num_matches < config.minimum_number_of_matches:
            return LocalizationResult(
                False,
                "too_few_matches",
                f"{num_matches} verified matches, fewer than minimum_number_of_matches = "
                f"{config.minimum_number_of_matches}",
                num_matches=num_matches,
                **common,
            )
        p2 = np.concatenate(verified_2d)
        p3 = np.concatenate(verified_3d)
        # RANSAC + refinement on a fixed-seed sample (verified matches are redundant: one query keypoint often
        # matches the same 3D point in several keyframes); inliers are then counted over all of them.
        sample = np.random.default_rng(0).permutation(len(p2))[: self.conf["pnp_max_points"]]
        ret = pycolmap.estimate_and_refine_absolute_pose(p2[sample], p3[sample], cam, estimation_options=est)
        lap("pnp")
        if ret is None:
            return LocalizationResult(
                False, "pnp_failed", f"no pose found from {num_matches} verified matches", num_matches=num_matches,
                **common,
            )
        cam_from_world = ret["cam_from_world"]
        errors = _reprojection_errors(cam, cam_from_world, p2, p3)
        mask = errors <= max_error
        num_inliers = int(mask.sum())
        ratio = num_inliers / num_matches
        world_from_cam = cam_from_world.inverse()
        quat = [float(v) for v in world_from_cam.rotation.quat]
        trans = [float(v) for v in world_from_cam.translation]
        reproj = float(errors[mask].mean()) if num_inliers else None
        stats = {
            "num_matches": num_matches,
            "num_inliers": num_inliers,
            "inlier_ratio": ratio,
            "reprojection_error_px": reproj,
            **common,
        }
        if ratio < config.inlier_threshold:
            return LocalizationResult(
                False,
                "low_inlier_ratio",
                f"only {num_inliers} of {num_matches} verified matches ({ratio:.2f}) agree with the best pose; "
                f"inlier_threshold is {config.inlier_threshold}",
                **stats,
            )
        return LocalizationResult(
            True,
            None,
            f"localized with {num_inliers} inliers of {num_matches} verified matches",
            quaternion=quat,
            translation=trans,
            inlier_points2d=(p2[mask] - COLMAP_OFFSET).tolist(),
            **stats,
        )

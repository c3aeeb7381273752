"""Localization of one camera frame against a registered scene: retrieve, match, verify, solve, gate.

Why pairwise verification: with K = 50 retrieved keyframes most of them show other parts of the site, and
their nearest-neighbour matches are noise. Pooling them all (SceneScape/hloc) dilutes the inlier ratio of a
correct pose below 0.5 and the quality gate rejects it. Here each retrieved keyframe's 2D-3D matches must first
agree on a camera pose by themselves (a PnP RANSAC per keyframe, like COLMAP's two-view verification of
matches); keyframes that fail contribute nothing. The pose, and the intrinsics the mode asks for, are then
solved on the union of verified matches (`pipeline.pose`), and the gates mean exactly:

- `num_matches`: distinct query keypoints with a verified 2D-3D match. A keypoint matched in several
  keyframes is one observation, counted once (gate `minimum_number_of_matches`);
- `num_inliers`: those of them whose 3D point reprojects within the inlier threshold under the returned pose
  and camera; `inlier_ratio` = `num_inliers` / `num_matches` (gate `inlier_threshold`);
- `position_sigma_m`: 1-sigma uncertainty of the camera centre along its worst axis (optional gate
  `max_position_sigma_m`).

Matching runs against every keypoint of a keyframe, with or without a 3D point: the ratio test needs all of a
keyframe's look-alikes; matches without a 3D point are dropped afterwards.

The inlier threshold is an angle: pixels = angle x focal length, so it means the same for every resolution and
lens. It must absorb the scan's own inconsistency, not only keypoint noise: keyframe poses of a real scan
disagree by 1-2 degrees (tracking drift), so matches lifted from different keyframes scatter by that much. A
tighter threshold splits correct matches into rival consensus sets. The default lies in the range that localized
every kitchen query and still rejected foreign images (the figures, and SceneScape's threshold:
docs/measurements.md).

An image of another place verifies no keyframe and fails with `no_verified_matches`, never with a pose.

Features at the scan's angular resolution (sparse path): a frame whose pixels subtend a smaller angle than the
keyframes' (a 1280x960 or 4K site camera against a 640x480 scan) is shrunk by whole octaves (halvings, SIFT's own
scale steps) until its focal length in pixels is within a factor sqrt(2) of the scan's. Its finer detail has no
counterpart in any keyframe: those keypoints cost extraction and matching and only add look-alikes to the ratio
test. Whole octaves make the choice insensitive to a focal length given 15 % off (`refine` extracts what `fixed`
with the exact camera does), and a halving is an exact 2x2 average. In `estimate` the focal length is unknown, so
the prior's 60 degree guess decides only when the focal length the matches give confirms it; otherwise the frame is
matched again at that focal length's octaves (or, when no pose was found, as for the widest fixed-camera lens, 110
degrees), so that a wide-angle camera is never matched coarser than the scan. Matching is most of the time, and it
grows with the frame's keypoints, so this makes high-resolution frames several times faster at the same accuracy
(docs/measurements.md). Keypoints are returned in the frame's own pixels; a frame is never enlarged.

Best first, with early stopping (sparse path): matching is most of the time, and retrieval ranks the keyframes
that see the query first. Keyframes are matched and verified in rounds down the ranking (3, 3, 6, 12, ...) and
the search stops as soon as at least 3 keyframes are verified, every one of them agrees with the pose (most of
its verified matches are inliers), the pose passes every gate, and it would still pass them whatever the
unvisited keyframes held: `minimum_number_of_matches` only gets easier with more keyframes, and the inliers are
at least `inlier_threshold` x all query keypoints, so even if every other query keypoint were verified later and
disagreed, the inlier ratio would hold. Early stopping therefore never weakens a gate: it returns only a pose the
full search's gates could not refuse on the counts, and a frame that does not stop early ends exactly as a search
of all K does (a foreign image, which verifies nothing, visits all K and fails the same way). K stays the bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np

from markerless.errors import BadImageError, BadIntrinsicsError, MarkerlessError, Reason
from markerless.pipeline.features import FeatureModels, to_gray
from markerless.pipeline.identity import check_served
from markerless.pipeline.matching import match_batch
from markerless.pipeline.options import LocalizationOptions
from markerless.pipeline.pose import (
    INTRINSICS_MODES,
    PRIOR_FOCAL_FACTOR,
    WIDEST_FOCAL_FACTOR,
    PoseSolution,
    solve,
    verify_pair,
)
from markerless.pipeline.retrieval import top_k, vlad
from markerless.pipeline.stage_confs import StageConfs, stage_confs
from markerless.scene.camera import Camera, from_camera_pixels, to_camera_pixels
from markerless.scene.store import Scene


@dataclass
class LocalizationResult:
    """Outcome of one query. Pose: camera-to-world in the scene (raw.glb) frame, OpenCV axes, xyzw with w >= 0,
    metres. `intrinsics` (3x3, COLMAP pixel convention) and `distortion` (OpenCV) are the camera the pose was
    solved with; `intrinsics_source` says whether it was `given`, `refined` or `estimated`."""

    success: bool
    reason: Reason | None
    message: str
    quaternion: list[float] | None = None
    translation: list[float] | None = None
    num_matches: int = 0
    num_inliers: int = 0
    inlier_ratio: float = 0.0
    reprojection_error_px: float | None = None
    intrinsics: list[list[float]] | None = None
    distortion: list[float] | None = None
    intrinsics_source: str | None = None
    position_sigma_m: float | None = None
    rotation_sigma_deg: float | None = None
    focal_sigma: float | None = None  # relative 1-sigma of the returned focal length (posterior)
    warnings: list[str] = field(default_factory=list)
    retrieved: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    scene_id: str = ""
    scene_version: str = ""
    # the verified correspondences the gates judged, for overlays and SceneScape's calibration points: query pixels
    # (hloc convention) of the inliers and of the rest, and the inliers' scene points (m)
    inlier_points2d: list[list[float]] | None = None
    inlier_points3d: list[list[float]] | None = None
    outlier_points2d: list[list[float]] | None = None

    def to_dict(self, include_points: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not include_points:
            for key in ("inlier_points2d", "inlier_points3d", "outlier_points2d"):
                data.pop(key)
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

    def add(self, stage: str) -> None:
        """Like a lap, summed over the stage's repeats (keyframes are visited in rounds)."""
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + (now - self.clock) * 1e3
        self.clock = now


@dataclass
class _Verified:
    """All 2D-3D matches of the keyframes verified so far (one array per keyframe, with the mask of the verified
    ones) and every visited keyframe's raw match ids."""

    ids: list[np.ndarray] = field(default_factory=list)  # query keypoint ids
    p2: list[np.ndarray] = field(default_factory=list)  # query pixels, camera convention
    p3: list[np.ndarray] = field(default_factory=list)
    keyframes: list[np.ndarray] = field(default_factory=list)  # keyframe index of each match
    masks: list[np.ndarray] = field(default_factory=list)  # inliers of the keyframe's own PnP: the verified ones
    names: list[str] = field(default_factory=list)  # verified keyframes
    raw_ids: list[np.ndarray] = field(default_factory=list)  # query keypoint ids of every keyframe's matches

    def distinct(self) -> int:
        """Distinct query keypoints with a verified match."""
        if not self.ids:
            return 0
        return len(np.unique(np.concatenate([ids[mask] for ids, mask in zip(self.ids, self.masks, strict=True)])))


class Localizer:
    """Localizes frames against scenes with resident models; one instance per worker thread."""

    def __init__(self, models: FeatureModels, options: LocalizationOptions | None = None) -> None:
        self.models = models
        self.options = options or LocalizationOptions()
        self._served: WeakKeyDictionary[Scene, StageConfs] = WeakKeyDictionary()

    def _confs(self, scene: Scene) -> StageConfs:
        """The stage confs of `scene`, its identity checked at its first frame: a loaded scene does not change, so
        later frames reuse them (a scene that fails the check is checked again at each frame, and fails again)."""
        confs = self._served.get(scene)
        if confs is None:
            confs = stage_confs(scene.config)
            check_served(scene.info, confs)
            self._served[scene] = confs
        return confs

    def localize(
        self, scene: Scene, image: np.ndarray, camera: Camera | None, mode: str = "refine"
    ) -> LocalizationResult:
        """Never raises for bad input or a failed gate: returns success=False with a reason.

        `camera` is the given camera (exact in `fixed`, a starting point in `refine`); `estimate` uses only the
        image size and may be given None.
        """
        timings: dict[str, float] = {}
        start = time.perf_counter()
        try:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise BadImageError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
            camera = self._prior(image, camera, mode)
            result = self._localize_at_scan_resolution(scene, image, camera, mode, timings)
        except MarkerlessError as exc:
            result = LocalizationResult(False, exc.reason, str(exc))
        result.scene_id, result.scene_version, result.timings_ms = scene.scene_id, scene.version, timings
        timings["total"] = (time.perf_counter() - start) * 1e3
        return result

    @staticmethod
    def _prior(image: np.ndarray, camera: Camera | None, mode: str) -> Camera:
        """The camera to start from: the given one, or for `estimate` a generic one of the image's size."""
        if mode not in INTRINSICS_MODES:
            raise BadIntrinsicsError(f"unknown intrinsics_mode {mode!r}; supported: {', '.join(INTRINSICS_MODES)}")
        height, width = image.shape[:2]
        if mode == "estimate":
            focal = PRIOR_FOCAL_FACTOR * max(width, height)
            return Camera(width, height, focal, focal, width / 2, height / 2)
        if camera is None:
            raise BadIntrinsicsError(f"intrinsics_mode {mode!r} needs intrinsics; use 'estimate' without them")
        if (width, height) != (camera.width, camera.height):
            raise BadIntrinsicsError(
                f"intrinsics are for {camera.width}x{camera.height} but the image is {width}x{height}"
            )
        camera.validate()
        return camera

    def _localize_at_scan_resolution(
        self, scene: Scene, image: np.ndarray, camera: Camera, mode: str, timings: dict[str, float]
    ) -> LocalizationResult:
        """Features from the frame shrunk by whole octaves to the scan's angular resolution (see the module notes).

        In `fixed` the given focal length decides. Otherwise the focal length is only known to its prior, and a
        frame shrunk for a focal length too long is coarser than the scan (its matches are lost; a finer one only
        costs time). The first pass uses the given focal length (`refine`) or the 60 degree guess (`estimate`).
        The frame is matched again at the octaves of the shortest focal length the matches allow (2 sigma, so
        that a focal length the prior holds confirms nothing) when that is finer than the first pass (in
        `estimate` also when coarser: the guess is no measurement), or, when the first pass found no pose, at the
        octaves of the prior's short end: 2 sigma below a given focal length, the widest lens (110 degrees) in
        `estimate`.
        """
        confs = self._confs(scene)
        if mode == "fixed" or scene.config.dense:  # dense matching has its own resolution (`resize_max`)
            return self._localize(scene, confs, image, camera, mode, timings, _octaves(camera.focal, scene))
        focal = camera.focal
        guess = _octaves(focal, scene)
        if mode == "estimate":
            fallback = _octaves(WIDEST_FOCAL_FACTOR * max(camera.width, camera.height), scene)
        else:
            fallback = _octaves(focal * math.exp(-2 * self.options.refine_focal_tolerance), scene)
        if guess == fallback:
            return self._localize(scene, confs, image, camera, mode, timings, guess)
        first = self._localize(scene, confs, image, camera, mode, timings, guess)
        if first.success and first.intrinsics and first.focal_sigma is not None:
            # the shortest focal length the matches allow (2 sigma): a focal the prior holds does not confirm
            confirmed = _octaves(first.intrinsics[0][0] * math.exp(-2 * first.focal_sigma), scene)
        else:
            confirmed = fallback
        if confirmed == guess or (mode == "refine" and confirmed > guess):
            return first
        timings.clear()  # the stages of the pass that answers
        return self._localize(scene, confs, image, camera, mode, timings, confirmed)

    def _localize(self, scene: Scene, confs: StageConfs, image: np.ndarray, camera: Camera, mode: str,
                  timings: dict[str, float], octaves: int) -> LocalizationResult:
        config = scene.config
        if config.dense:
            return self._localize_dense(scene, confs, image, camera, mode, timings)
        lap = _Laps(timings)
        feats = self.models.sift(confs.sift)(to_gray(image), max_scale=0.5**octaves)
        lap("features")
        if len(feats["keypoints"]) < 4:
            return LocalizationResult(False, Reason.NO_FEATURES,
                                      f"only {len(feats['keypoints'])} keypoints in the image")

        retrieved = self._retrieve(scene, image, feats["descriptors"])
        lap("retrieval")

        device = None if self.models.device == "cpu" else self.models.device  # NumPy is fastest on a CPU
        kp_camera = to_camera_pixels(feats["keypoints"])
        names = [scene.keyframe_names[i] for i in retrieved]
        enough = self.options.early_stop_keyframes
        verified, start, attempted = _Verified(), 0, 0
        while start < len(retrieved):
            # rounds of first_round, first_round, then as many as visited so far: at most ~log2(K) pose attempts
            size = max(self.options.early_stop_first_round, start) if enough else len(retrieved)
            chunk = retrieved[start : start + size]
            start += len(chunk)
            matches = match_batch(feats["descriptors"], [scene.descriptors[i] for i in chunk], ratio=confs.ratio,
                                  device=device)
            lap.add("matching")
            pairs = []
            for i, m in zip(chunk, matches, strict=True):
                m = m[scene.has_point[i][m[:, 1]]]  # the ratio test saw every keypoint; only 3D points localize
                if len(m):
                    pairs.append((i, m[:, 0], kp_camera[m[:, 0]], scene.points3d[i][m[:, 1]]))
            self._verify(scene, camera, mode, pairs, verified)
            lap.add("verification")
            # an attempt only with newly verified keyframes, and only when enough query keypoints are verified for
            # the stopping rule below to hold at all (inliers are a subset of them)
            if (enough and start < len(retrieved) and len(verified.names) >= max(enough, attempted + 1)
                    and verified.distinct() >= config.inlier_threshold * len(kp_camera)):
                attempted = len(verified.names)
                result, agreeing = self._solve(scene, camera, mode, verified, names, lap)
                # no visited keyframe dissents, and the ratio gate would hold even if every other query keypoint
                # were verified later and disagreed: the full search could not refuse this pose on the gates
                if (result.success and agreeing == len(verified.names)
                        and result.num_inliers >= config.inlier_threshold * len(kp_camera)):
                    return result
        return self._solve(scene, camera, mode, verified, names, lap)[0]

    def _retrieve(self, scene: Scene, image: np.ndarray, descriptors: np.ndarray) -> list[int]:
        k = scene.config.number_of_localizations
        if scene.global_name == "vlad":
            query = vlad(descriptors, scene.vocabulary)
        else:
            query = self.models.netvlad()([image])[0]
        # exactly K keyframes (hloc's min_score = 0 would drop some: VLAD similarities can be negative)
        idx, _ = top_k(query, scene.global_descriptors, k, min_score=-np.inf)
        return [int(i) for i in idx]

    def _localize_dense(self, scene: Scene, confs: StageConfs, image: np.ndarray, camera: Camera, mode: str,
                        timings: dict[str, float]) -> LocalizationResult:
        lap = _Laps(timings)
        config = scene.config
        if scene.global_name == "vlad":
            descriptors = self.models.sift(confs.sift)(to_gray(image))["descriptors"]
            lap("features")
            retrieved = self._retrieve(scene, image, descriptors)
        else:
            retrieved = self._retrieve(scene, image, np.zeros((0, 128), np.float32))
        lap("retrieval")
        matcher = self.models.dense(config.matcher_name, config.matcher_overrides)
        dense = matcher.match(image, retrieved, scene.path / "qta_loftr")
        lap("matching")
        pairs = []
        for i, (kq, kr, _) in zip(retrieved, dense, strict=True):
            if len(kq) == 0:
                continue
            pts, valid = scene.lift(i, kr)
            # a dense query keypoint is its (quantised) pixel: the pixel identifies it across keyframes
            ids = np.round(kq[valid] * 100).astype(np.int64) @ np.array([1, 1 << 31], np.int64)
            pairs.append((i, ids, to_camera_pixels(kq[valid]), pts[valid]))
        lap("lift")
        verified = _Verified()
        self._verify(scene, camera, mode, pairs, verified)
        lap("verification")
        return self._solve(scene, camera, mode, verified, [scene.keyframe_names[i] for i in retrieved], lap)[0]

    def _verify(self, scene: Scene, camera: Camera, mode: str,
                pairs: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]], verified: _Verified) -> None:
        """Pairwise verification: adds to `verified` the matches of each keyframe that agree on a pose by themselves.

        `pairs` holds, per keyframe, (keyframe index, query keypoint ids, query pixels in the camera convention,
        3D points).
        """
        opts = self.options
        angle = math.radians(opts.inlier_angle_deg)
        for i, ids, p2, p3 in pairs:
            verified.raw_ids.append(ids)
            if len(p2) < opts.pair_min_matches:
                continue
            inliers = verify_pair(p2, p3, camera, angle, mode, opts.pair_max_trials)
            if inliers is None:
                continue
            n_in = int(inliers.sum())
            if n_in >= opts.pair_min_inliers and n_in >= opts.pair_min_inlier_ratio * len(p2):
                verified.ids.append(ids)
                verified.p2.append(p2)
                verified.p3.append(p3)
                verified.keyframes.append(np.full(len(ids), i))
                verified.masks.append(inliers)
                verified.names.append(scene.keyframe_names[i])

    def _solve(
        self,
        scene: Scene,
        camera: Camera,
        mode: str,
        verified: _Verified,
        retrieved_names: list[str],
        lap: _Laps,
    ) -> tuple[LocalizationResult, int]:
        """Pose and intrinsics on the verified matches, then the gates; also how many verified keyframes agree
        with the pose (most of their verified matches are its inliers)."""
        config, opts = scene.config, self.options
        angle = math.radians(opts.inlier_angle_deg)
        kept_ids, kept_2d, kept_3d, kept_kf = verified.ids, verified.p2, verified.p3, verified.keyframes
        raw_matches = len(np.unique(np.concatenate(verified.raw_ids))) if verified.raw_ids else 0
        common = {"retrieved": retrieved_names, "verified": list(verified.names)}
        if raw_matches == 0:
            no_matches = "no feature matches with any retrieved keyframe"
            return LocalizationResult(False, Reason.NO_MATCHES, no_matches, **common), 0
        if not kept_ids:
            return LocalizationResult(
                False,
                Reason.NO_VERIFIED_MATCHES,
                f"none of the {len(retrieved_names)} retrieved keyframes shares geometrically consistent matches "
                f"with the image ({raw_matches} matched keypoints, all inconsistent): the camera probably does not "
                "see this scene",
                **common,
            ), 0
        ids, p2, p3 = np.concatenate(kept_ids), np.concatenate(kept_2d), np.concatenate(kept_3d)
        mask = np.concatenate(verified.masks)
        num_matches = len(np.unique(ids[mask]))
        if num_matches < config.minimum_number_of_matches:
            return LocalizationResult(
                False,
                Reason.TOO_FEW_MATCHES,
                f"{num_matches} verified matches, fewer than minimum_number_of_matches = "
                f"{config.minimum_number_of_matches}",
                num_matches=num_matches,
                **common,
            ), 0
        keyframes = np.concatenate(kept_kf)
        solution = solve(p2, p3, ids, keyframes, mask, camera, mode, angle, opts.pnp_max_points,
                         opts.refine_focal_tolerance)
        lap.add("pnp")
        if solution is None:
            return LocalizationResult(
                False, Reason.PNP_FAILED, f"no pose found from {num_matches} verified matches", num_matches=num_matches,
                **common,
            ), 0
        agreeing = int(sum(solution.inliers[mask & (keyframes == k)].mean() >= 0.5 for k in np.unique(keyframes)))
        return self._gate(scene, solution, ids[mask], p2[mask], p3[mask], solution.inliers[mask], num_matches,
                          common), agreeing

    @staticmethod
    def _gate(scene: Scene, solution: PoseSolution, ids: np.ndarray, p2: np.ndarray, p3: np.ndarray,
              inliers: np.ndarray, num_matches: int, common: dict[str, Any]) -> LocalizationResult:
        """Gates on the verified matches (`ids`, `p2`, `p3`) and which of them are `inliers` of the solution."""
        config = scene.config
        num_inliers = len(np.unique(ids[inliers]))
        ratio = num_inliers / num_matches
        world_from_cam = solution.cam_from_world.inverse()
        quat = np.asarray(world_from_cam.rotation.quat, dtype=float)
        quat = quat if quat[3] >= 0 else -quat  # same rotation; w >= 0 on the wire
        cam = solution.camera
        stats = {
            "num_matches": num_matches,
            "num_inliers": num_inliers,
            "inlier_ratio": ratio,
            "reprojection_error_px": float(solution.errors[solution.inliers].mean()) if num_inliers else None,
            "intrinsics": cam.matrix.tolist(),
            "distortion": list(cam.distortion),
            "intrinsics_source": solution.source,
            "position_sigma_m": _finite_or_none(solution.position_sigma_m),
            "rotation_sigma_deg": _finite_or_none(solution.rotation_sigma_deg),
            "focal_sigma": _finite_or_none(solution.focal_sigma),
            "warnings": solution.warnings,
            "inlier_points2d": from_camera_pixels(p2[inliers]).tolist(),
            "inlier_points3d": p3[inliers].tolist(),
            "outlier_points2d": from_camera_pixels(p2[~inliers]).tolist(),
            **common,
        }
        if ratio < config.inlier_threshold:
            return LocalizationResult(
                False,
                Reason.LOW_INLIER_RATIO,
                f"only {num_inliers} of {num_matches} verified matches ({ratio:.2f}) agree with the best pose; "
                f"inlier_threshold is {config.inlier_threshold}",
                **stats,
            )
        limit = config.max_position_sigma_m
        if limit is not None and not solution.position_sigma_m <= limit:
            return LocalizationResult(
                False,
                Reason.UNCERTAIN_POSE,
                f"position uncertainty {solution.position_sigma_m:.3f} m (1 sigma) exceeds max_position_sigma_m = "
                f"{limit} m",
                **stats,
            )
        return LocalizationResult(
            True,
            None,
            f"localized with {num_inliers} inliers of {num_matches} verified matches",
            quaternion=[float(v) for v in quat],
            translation=[float(v) for v in world_from_cam.translation],
            **stats,
        )


def _octaves(focal: float, scene: Scene) -> int:
    """Halvings that bring a frame of focal length `focal` (px) within sqrt(2) of the scan's; never negative."""
    return max(0, round(math.log2(focal / scene.focal_px)))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None

"""The camera's pose and, unless its intrinsics are declared exact, its focal length and radial distortion.

Everything is solved by pycolmap: LO-RANSAC with the P4Pf minimal solver when the focal length is unknown
(`estimate_focal_length`), then non-linear refinement of pose, focal length and distortion, and the pose
covariance. What this module adds is the decision of what the matches can determine, and honesty about it.

Camera model, chosen by what a single view can determine (see docs/intrinsics.md for the measurements):
- one focal length (square pixels, as on every current sensor): fx and fy apart are not separable from one view;
- the principal point stays where it was given, or at the image centre: it is poorly determined from one view
  and trades off against the pose;
- radial distortion k1, k2 (COLMAP `RADIAL`, the same formula as OpenCV's k1, k2): it holds most of a real lens;
  the small tangential and k3 terms are below the inlier threshold and would only fit noise.
A camera given with tangential or higher-order terms keeps them and only its focal length is refined.

What the matches determine: focal length and distortion need inliers that spread over the image and reach its
borders (distortion grows with the radius; from a patch in the centre both are undetermined). `coverage` measures
that. A refinement the inliers cannot support is not made: `refine` keeps the given camera and says so,
`estimate` refuses.

Uncertainty: pycolmap returns the 6x6 covariance of the pose (rotation then translation of cam_from_world, the
rotation perturbed on the left), marginalised over the refined intrinsics, for unit-variance residuals under its
robust loss. It is recomputed here on the inliers (one correspondence per query keypoint, as everything is solved:
see `solve`) with a quadratic loss, and scaled by the residual variance of those inliers, then propagated to the
camera centre. Residuals are not independent either: every 3D point of a keyframe carries that keyframe's pose error
(scan drift), so errors come in clusters. The variance is inflated by the design effect 1 + (m - 1) rho of cluster
sampling (m correspondences per keyframe, rho the share of residual variance shared within a keyframe, estimated
from the residuals themselves): on a drifting scan the pose is known about as well as the keyframes agree, not as
well as thousands of points would suggest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from markerless.errors import IntrinsicsUndeterminedError
from markerless.scene.camera import Camera

IntrinsicsMode = Literal["fixed", "refine", "estimate"]
INTRINSICS_MODES: tuple[str, ...] = ("fixed", "refine", "estimate")

# Prior focal length for `estimate`, as a multiple of the larger image side: a 60 degree field of view, the middle
# of fixed cameras' 30-110 degrees. P4Pf does not need it to be right; it only scales the first inlier threshold.
PRIOR_FOCAL_FACTOR = 0.87
# The widest of those lenses, 110 degrees: in `estimate` a frame is shrunk only as far as this focal length allows,
# since shrinking a wide-angle frame for a 60 degree guess would leave it coarser than the scan.
WIDEST_FOCAL_FACTOR = 0.35
# The coverage bounds below were set from the geometry before any measurement, not tuned: on the kitchen frames the
# inliers spread over 0.67-0.72 of each side and reach 0.64 of the half-diagonal, clear of both bounds.
FOCAL_ONLY_SPREAD = 0.3  # inlier extent (5-95 % box, as a share of each image side) that determines the focal
DISTORTION_REACH = 0.55  # 90th percentile inlier radius, as a share of the half-diagonal, that determines k1, k2
MIN_INLIERS_FOR_INTRINSICS = 40  # distinct inliers; 3 intrinsics + 6 pose parameters need ample redundancy
# Significance at which the matches reject the given camera in `refine`. The conventional 5 %: 1 % was tried first
# and one fixed-camera frame (statistic 3.9 against 3.8) sat on the line; seen on the kitchen, so check elsewhere.
GIVEN_CAMERA_TEST_LEVEL = 0.05
REFINE_ROUNDS = 3  # re-collect inliers with the refined camera: correcting distortion brings border matches back


@dataclass
class Coverage:
    """How well inliers cover the image: extent of the 5-95 % box per side and radial reach."""

    spread: float
    reach: float
    count: int

    def determines_focal(self) -> bool:
        return self.count >= MIN_INLIERS_FOR_INTRINSICS and self.spread >= FOCAL_ONLY_SPREAD

    def determines_distortion(self) -> bool:
        return self.determines_focal() and self.reach >= DISTORTION_REACH


def coverage(points2d: np.ndarray, camera: Camera) -> Coverage:
    """Coverage of the image by inlier pixels (camera pixel convention)."""
    if len(points2d) == 0:
        return Coverage(0.0, 0.0, 0)
    lo, hi = np.percentile(points2d, [5, 95], axis=0)
    spread = float(min((hi[0] - lo[0]) / camera.width, (hi[1] - lo[1]) / camera.height))
    centre = np.array([camera.cx, camera.cy])
    half_diagonal = 0.5 * math.hypot(camera.width, camera.height)
    reach = float(np.percentile(np.linalg.norm(points2d - centre, axis=1), 90) / half_diagonal)
    return Coverage(spread, reach, len(points2d))


@dataclass
class PoseSolution:
    """A pose with the camera it was solved with, inliers over all input correspondences and its uncertainty."""

    cam_from_world: Any  # pycolmap.Rigid3d
    camera: Camera
    source: str  # given | refined | estimated
    errors: np.ndarray  # reprojection error (px) of every input correspondence under `camera`
    inliers: np.ndarray  # errors <= the inlier threshold
    position_sigma_m: float = math.inf
    rotation_sigma_deg: float = math.inf
    warnings: list[str] = field(default_factory=list)


def reprojection_errors(camera: Any, cam_from_world: Any, points2d: np.ndarray, points3d: np.ndarray) -> np.ndarray:
    """Pixel distance between observed and projected points; infinite behind the camera. `camera` is pycolmap's."""
    in_cam = points3d @ np.asarray(cam_from_world.rotation.matrix()).T + np.asarray(cam_from_world.translation)
    errors = np.full(len(points2d), np.inf)
    front = in_cam[:, 2] > 1e-6
    if front.any():
        errors[front] = np.linalg.norm(camera.img_from_cam(in_cam[front]) - points2d[front], axis=1)
    return errors


def from_pycolmap(camera: Any) -> Camera:
    """pycolmap camera (PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, FULL_OPENCV) -> Camera with OpenCV distortion."""
    p = [float(v) for v in camera.params]
    name = camera.model.name
    w, h = int(camera.width), int(camera.height)
    if name == "PINHOLE":
        return Camera(w, h, p[0], p[1], p[2], p[3])
    if name in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        radial = (p[3:] + [0.0, 0.0])[:2] if name != "SIMPLE_PINHOLE" else [0.0, 0.0]
        dist = (radial[0], radial[1], 0.0, 0.0, 0.0) if any(radial) else ()
        return Camera(w, h, p[0], p[0], p[1], p[2], dist)
    if name == "OPENCV":
        return Camera(w, h, p[0], p[1], p[2], p[3], tuple(p[4:8]))
    if name == "FULL_OPENCV":
        return Camera(w, h, p[0], p[1], p[2], p[3], tuple(p[4:12]))
    raise ValueError(f"unsupported camera model {name}")


def _radial_camera(camera: Camera) -> Any:
    """The RADIAL pycolmap camera to refine from `camera` (one focal length, its k1, k2)."""
    import pycolmap

    k1, k2 = (list(camera.distortion[:2]) + [0.0, 0.0])[:2]
    f = math.sqrt(camera.fx * camera.fy)
    return pycolmap.Camera(model="RADIAL", width=camera.width, height=camera.height,
                           params=[f, camera.cx, camera.cy, k1, k2])


def _radial_only(camera: Camera) -> bool:
    return not any(camera.distortion[2:])


def _options(max_error: float, estimate_focal: bool, trials: int | None = None) -> Any:
    import pycolmap

    est = pycolmap.AbsolutePoseEstimationOptions()
    est.ransac.max_error = max_error
    est.ransac.random_seed = 0  # the same frame gets the same pose
    est.estimate_focal_length = estimate_focal
    if trials is not None:
        est.ransac.max_num_trials = trials
    return est


def _refinement(focal: bool, extra: bool, loss_scale: float | None = None) -> Any:
    import pycolmap

    ref = pycolmap.AbsolutePoseRefinementOptions()
    ref.refine_focal_length = focal
    ref.refine_extra_params = extra
    if loss_scale is not None:
        ref.loss_function_scale = loss_scale
    return ref


def verify_pair(points2d: np.ndarray, points3d: np.ndarray, camera: Camera, angle: float, mode: str,
                trials: int) -> np.ndarray | None:
    """Inlier mask of one keyframe's matches agreeing on a pose by themselves, or None.

    In `estimate` the focal length is free (P4Pf): the prior may be far off, and correct keyframes must not be
    rejected for it. A given focal length, even 15-20 % off, only needs the pose to shift along the optical axis
    to fit one keyframe's patch within the angular threshold, so `fixed` and `refine` verify with it (P3P, about
    a third of P4Pf's cost, measured on 1280x960 frames).
    """
    import pycolmap

    estimate = mode == "estimate"
    cam = _radial_camera(camera) if estimate and _radial_only(camera) else camera.to_pycolmap()
    free_focal = estimate and cam.model.name == "RADIAL"
    est = _options(angle * math.sqrt(camera.fx * camera.fy), free_focal, trials)
    ret = pycolmap.estimate_absolute_pose(points2d, points3d, cam, estimation_options=est)
    return None if ret is None else np.asarray(ret["inlier_mask"], dtype=bool)


def solve(points2d: np.ndarray, points3d: np.ndarray, keypoint_ids: np.ndarray, keyframes: np.ndarray,
          verified: np.ndarray, camera: Camera, mode: str, angle: float, max_points: int) -> PoseSolution | None:
    """Pose (and intrinsics per `mode`) from the matches of verified keyframes; None when no pose is found.

    `points2d` are in the camera's pixel convention, `keypoint_ids` name the query keypoint of each
    correspondence and `keyframes` the keyframe that lifted its 3D point; `verified` marks the inliers of each
    keyframe's own PnP. `camera` is the given one (or the prior for `estimate`), `angle` the inlier threshold in
    radians (pixels = angle x focal length). The returned errors and inliers cover every correspondence.

    One observation per query keypoint: a keypoint matched in several keyframes is one measurement, and its
    copies carry the 3D points of keyframes that disagree by the scan's drift. Solving on all copies weighted each
    keypoint by how many keyframes see it and pulled the pose towards the largest cluster; solving on one
    correspondence per keypoint (`_one_per_keypoint`) halved the pose time at 640x480, cut it 5x on 1280x960
    frames matched in 38 keyframes, and lowered the kitchen errors (median 0.77 -> 0.61 cm, worst 4.8 -> 2.1 cm).
    """
    pick = _one_per_keypoint(keypoint_ids, verified)
    p2, p3 = points2d[pick], points3d[pick]
    solution = _solve_distinct(p2, p3, keyframes[pick], verified[pick], camera, mode, angle, max_points)
    if solution is None:
        return None
    _uncertainty(p2, p3, keyframes[pick], solution, refine=solution.source != "given")
    cam = solution.camera
    camera_model = _radial_camera(cam) if _radial_only(cam) else cam.to_pycolmap()
    solution.errors = reprojection_errors(camera_model, solution.cam_from_world, points2d, points3d)
    solution.inliers = solution.errors <= angle * math.sqrt(cam.fx * cam.fy)
    return solution


def _one_per_keypoint(keypoint_ids: np.ndarray, verified: np.ndarray) -> np.ndarray:
    """Index of one correspondence per query keypoint: a verified one when there is one, and among those the one
    from the best-ranked keyframe (correspondences come in retrieval order), the view most like the query's."""
    order = np.lexsort((~verified, keypoint_ids))  # stable: retrieval order within each keypoint
    _, first = np.unique(keypoint_ids[order], return_index=True)
    return np.sort(order[first])


def _solve_distinct(points2d: np.ndarray, points3d: np.ndarray, keyframes: np.ndarray, verified: np.ndarray,
                    camera: Camera, mode: str, angle: float, max_points: int) -> PoseSolution | None:
    """`solve` on one correspondence per query keypoint.

    RANSAC draws from the verified correspondences; refinements collect inliers among all of them, since
    verification with a camera that lacks the lens's distortion rejects matches near the image border, the very
    ones that determine the distortion.

    `fixed` and `refine` start alike, from a RANSAC with the given camera: `refine` treats it as a starting point
    and refines focal length and distortion from there (P4Pf's larger sample would cost more RANSAC trials for the
    pose the given camera already leads to); `fixed` refits a copy only to check the given camera.
    """
    candidates = np.flatnonzero(verified)
    sample = candidates[np.random.default_rng(0).permutation(len(candidates))[:max_points]]
    if mode == "estimate":
        return _solve_free(points2d, points3d, sample, camera, mode, angle)
    given = _solve_fixed(points2d, points3d, sample, camera, angle)
    if given is None:
        # no consensus with the given camera; in `refine` it may be far enough off that only P4Pf finds one
        if mode == "refine" and _radial_only(camera):
            return _solve_free(points2d, points3d, sample, camera, mode, angle)
        return None
    # refit from the given camera's own inliers: `fixed` checks the camera with it, `refine` tests it
    fit = _refit(points2d, points3d, given.cam_from_world, camera, angle, 1)
    if fit.refined == 0:
        free = _patch_check(points2d, points3d, sample, camera, angle, given)
        if free is not None:
            if mode == "fixed":
                given.warnings.append(_patch_mismatch(camera, given, fit, free))
                return given
            return free.solution("refined", _distortion_note(free))
        if mode == "refine":
            given.warnings.append(f"intrinsics_not_refined: {_short_of(fit.cover)}; the given intrinsics were used "
                                  "as they are")
        return given
    warnings = _mismatch(camera, fit, angle)
    if mode == "fixed":
        given.warnings += warnings
        return given
    if warnings or _rejects_given(points2d, points3d, keyframes, angle, given, fit):
        # the matches reject the given camera: collect the inliers again under the refined one
        fit = _refit(points2d, points3d, fit.cam_from_world, fit.camera, angle, REFINE_ROUNDS - 1, fit.refined)
        return fit.solution("refined", _distortion_note(fit))
    return given


def _solve_fixed(points2d: np.ndarray, points3d: np.ndarray, sample: np.ndarray, camera: Camera,
                 angle: float) -> PoseSolution | None:
    import pycolmap

    cam = camera.to_pycolmap()
    max_error = angle * math.sqrt(camera.fx * camera.fy)
    ret = pycolmap.estimate_and_refine_absolute_pose(points2d[sample], points3d[sample], cam,
                                                      estimation_options=_options(max_error, False))
    if ret is None:
        return None
    errors = reprojection_errors(cam, ret["cam_from_world"], points2d, points3d)
    return PoseSolution(ret["cam_from_world"], camera, "given", errors, errors <= max_error)


@dataclass
class _Fit:
    """A pose refined with free intrinsics, its inliers over all correspondences and their coverage."""

    cam_from_world: Any  # pycolmap.Rigid3d
    camera: Camera
    errors: np.ndarray
    inliers: np.ndarray
    cover: Coverage
    refined: int = 0  # intrinsic parameters refined: focal length, and k1, k2 when the inliers reach far enough

    def solution(self, source: str, warnings: list[str]) -> PoseSolution:
        return PoseSolution(self.cam_from_world, self.camera, source, self.errors, self.inliers, warnings=warnings)


def _refit(points2d: np.ndarray, points3d: np.ndarray, cam_from_world: Any, camera: Camera, angle: float, rounds: int,
           refined: int = 0) -> _Fit:
    """Refine pose, focal length and (when the inliers reach far enough) k1, k2, starting from `camera`.

    Each round refines on the current inliers, then collects them again under the refined camera: correcting
    the distortion brings border matches back. Rounds stop once the inliers no longer change. A camera given with
    tangential or higher-order terms keeps them and only its focal length is refined. `refined` says what
    `camera` already holds from earlier rounds.
    """
    import pycolmap

    radial = _radial_only(camera)
    cam = _radial_camera(camera) if radial else camera.to_pycolmap()

    def measure(pose: Any, refined: int) -> _Fit:
        current = from_pycolmap(cam)
        errors = reprojection_errors(cam, pose, points2d, points3d)
        inliers = errors <= angle * math.sqrt(current.fx * current.fy)
        return _Fit(pose, current, errors, inliers, coverage(points2d[inliers], current), refined)

    fit = measure(cam_from_world, refined)
    for _ in range(rounds):
        if not fit.cover.determines_focal():
            break
        distortion = radial and fit.cover.determines_distortion()
        ref = pycolmap.refine_absolute_pose(fit.cam_from_world, points2d, points3d, fit.inliers, cam,
                                            _refinement(True, distortion))
        if ref is None:
            break
        previous, fit = fit.inliers, measure(ref["cam_from_world"], 3 if distortion else 1)
        if np.array_equal(previous, fit.inliers):
            break
    return fit


def _solve_free(points2d: np.ndarray, points3d: np.ndarray, sample: np.ndarray, camera: Camera, mode: str,
                angle: float) -> PoseSolution | None:
    """Focal length by P4Pf RANSAC from `camera` (the prior, or a given camera without tangential terms that found
    no pose itself), then focal and distortion as far as the inliers allow. Inliers that do not determine the
    focal length give no pose: `estimate` says why, `refine` has nothing else to fall back on."""
    fit = _p4pf_fit(points2d, points3d, sample, camera, angle)
    if fit is None:
        return None
    if not fit.cover.determines_focal():
        if mode == "estimate":
            raise IntrinsicsUndeterminedError(f"the matches do not determine the focal length: {_short_of(fit.cover)}")
        return None
    return fit.solution("estimated" if mode == "estimate" else "refined", _distortion_note(fit))


def _p4pf_fit(points2d: np.ndarray, points3d: np.ndarray, sample: np.ndarray, camera: Camera,
              angle: float) -> _Fit | None:
    """P4Pf LO-RANSAC (focal length free) from `camera` (radial only), then the refinement rounds."""
    import pycolmap

    cam = _radial_camera(camera)
    est = _options(angle * cam.params[0], True)
    ret = pycolmap.estimate_and_refine_absolute_pose(points2d[sample], points3d[sample], cam, est,
                                                      _refinement(True, False))
    if ret is None:
        return None
    return _refit(points2d, points3d, ret["cam_from_world"], from_pycolmap(cam), angle, REFINE_ROUNDS)


def _patch_check(points2d: np.ndarray, points3d: np.ndarray, sample: np.ndarray, camera: Camera, angle: float,
                 given: PoseSolution) -> _Fit | None:
    """The given camera's consensus covers too little of the image to check the camera by: is it a patch that a
    wrong focal length fits? A focal length far off (e.g. given for another resolution) still fits the matches of
    a small region with a wrong pose. Returns the free focal length's consensus when it covers enough of the image
    to determine the focal length and explains more matches, else None."""
    if not _radial_only(camera):
        return None
    free = _p4pf_fit(points2d, points3d, sample, camera, angle)
    if free is None or not free.cover.determines_focal() or free.inliers.sum() <= given.inliers.sum():
        return None
    return free


def _patch_mismatch(camera: Camera, given: PoseSolution, fit: _Fit, free: _Fit) -> str:
    """`fixed`: the warning for a given camera whose inliers are a patch, with a free focal length agreeing wider."""
    f_given = math.sqrt(camera.fx * camera.fy)
    return (f"intrinsics_mismatch: the given camera's inliers cover {fit.cover.spread:.0%} of the image; with a focal "
            f"length of {free.camera.fx:.1f} px ({100 * (free.camera.fx / f_given - 1):+.0f}% from the given "
            f"{f_given:.1f} px) {free.inliers.sum() / given.inliers.sum():.1f}x as many matches agree, over "
            f"{free.cover.spread:.0%}; use intrinsics_mode 'refine' or correct the camera")


def _distortion_note(fit: _Fit) -> list[str]:
    if fit.refined == 3 or not _radial_only(fit.camera):
        return []
    return [f"distortion_not_estimated: inliers reach {fit.cover.reach:.0%} of the half-diagonal (needs "
            f"{DISTORTION_REACH:.0%}); radial distortion kept at the given values"]


def _rejects_given(points2d: np.ndarray, points3d: np.ndarray, keyframes: np.ndarray, angle: float,
                   given: PoseSolution, fit: _Fit) -> bool:
    """`refine`: do the matches reject the given camera in favour of the one refitted from its inliers?

    Freeing focal length and distortion always lowers the residuals a little; on a real scan part of that is the
    scan's own inconsistency being fitted. The given camera is rejected by an F-test of the refined parameters on
    the truncated squared residuals (one correspondence per query keypoint), at the 5 % level, with the residual
    variance inflated by the design effect of keyframe clusters (see `design_effect`). The test is made on the
    first refit, the one from the given camera's own inliers; further rounds only improve a camera already needed.
    """
    from scipy.special import fdtri

    threshold = angle * math.sqrt(given.camera.fx * given.camera.fy)
    cost_given = float(np.sum(np.minimum(given.errors, threshold) ** 2))
    cost_refined = float(np.sum(np.minimum(fit.errors, threshold) ** 2))
    dof = 2 * len(points2d) - 6 - fit.refined
    inliers = fit.inliers
    if dof <= 0 or cost_refined <= 0 or inliers.sum() < 2:
        return True
    cam = _radial_camera(fit.camera) if _radial_only(fit.camera) else fit.camera.to_pycolmap()
    deff = design_effect(_residual_vectors(cam, fit.cam_from_world, points2d[inliers], points3d[inliers]),
                         keyframes[inliers])
    statistic = (cost_given - cost_refined) / fit.refined / (cost_refined / dof) / deff
    return bool(statistic > fdtri(fit.refined, dof, 1.0 - GIVEN_CAMERA_TEST_LEVEL))


def _short_of(cover: Coverage) -> str:
    return (f"{cover.count} distinct inliers covering {cover.spread:.0%} of the image (needs "
            f"{MIN_INLIERS_FOR_INTRINSICS} covering {FOCAL_ONLY_SPREAD:.0%})")


def _mismatch(camera: Camera, fit: _Fit, angle: float) -> list[str]:
    """Do the inliers contradict the given camera? Compares it with the camera refitted from its own inliers.

    A focal error e moves a point at the image border (half-diagonal r px) by about e * r; a distortion the
    camera lacks moves it by its radial displacement there. Either is reported once it exceeds half the inlier
    threshold: beyond that the given camera costs inliers and biases the pose.
    """
    if fit.refined == 0 or not _radial_only(camera):
        return []
    refined, cover = fit.camera, fit.cover
    f_given, f_est = math.sqrt(camera.fx * camera.fy), refined.fx
    half_diagonal = 0.5 * math.hypot(camera.width, camera.height)
    tolerance = 0.5 * angle * f_given
    warnings = []
    focal_shift = abs(f_est / f_given - 1.0) * half_diagonal
    if focal_shift > tolerance:
        warnings.append(
            f"intrinsics_mismatch: the matches give a focal length of {f_est:.1f} px, "
            f"{100 * (f_est / f_given - 1):+.1f}%"
            f" from the given {f_given:.1f} px; use intrinsics_mode 'refine' or correct the camera"
        )
    if not camera.distortion and fit.refined == 3:
        k1, k2 = refined.distortion[:2] if refined.distortion else (0.0, 0.0)
        r = half_diagonal * cover.reach / f_est  # normalised radius the inliers reach
        shift = abs(k1 * r**2 + k2 * r**4) * r * f_est
        if shift > tolerance:
            warnings.append(
                f"uncorrected_distortion: the matches show radial distortion (k1 {k1:.3f}, k2 {k2:.3f}) moving "
                f"points by {shift:.0f} px at {cover.reach:.0%} of the half-diagonal, and none was given; use "
                "intrinsics_mode 'refine' or give the lens distortion"
            )
    return warnings


def _uncertainty(points2d: np.ndarray, points3d: np.ndarray, keyframes: np.ndarray, solution: PoseSolution,
                 refine: bool) -> None:
    """Fill the 1-sigma position (m) and rotation (deg) uncertainty of the largest axis."""
    import pycolmap

    p2, p3, groups = points2d[solution.inliers], points3d[solution.inliers], keyframes[solution.inliers]
    n_params = 6 + (3 if refine else 0)
    if len(p2) * 2 <= n_params:
        return
    cam = _radial_camera(solution.camera) if refine and _radial_only(solution.camera) else solution.camera.to_pycolmap()
    # quadratic loss: a loss scale far above any inlier residual
    ret = pycolmap.refine_absolute_pose(solution.cam_from_world, p2, p3, np.ones(len(p2), bool), cam,
                                        _refinement(refine, refine and bool(solution.camera.distortion), 1e6),
                                        return_covariance=True)
    if ret is None or ret.get("covariance") is None:
        return
    residuals = _residual_vectors(cam, ret["cam_from_world"], p2, p3)
    variance = float(np.sum(residuals**2) / (2 * len(p2) - n_params))
    cov = np.asarray(ret["covariance"]) * variance * design_effect(residuals, groups)
    solution.rotation_sigma_deg = math.degrees(math.sqrt(max(np.linalg.eigvalsh(cov[:3, :3]).max(), 0.0)))
    jac = _centre_jacobian(solution.cam_from_world)
    solution.position_sigma_m = math.sqrt(max(np.linalg.eigvalsh(jac @ cov @ jac.T).max(), 0.0))


def _residual_vectors(camera: Any, cam_from_world: Any, points2d: np.ndarray, points3d: np.ndarray) -> np.ndarray:
    in_cam = points3d @ np.asarray(cam_from_world.rotation.matrix()).T + np.asarray(cam_from_world.translation)
    return camera.img_from_cam(in_cam) - points2d


def design_effect(residuals: np.ndarray, groups: np.ndarray) -> float:
    """Variance inflation 1 + (m - 1) rho for residual vectors (N, 2) that come in correlated groups.

    rho (intra-class correlation) = between-group variance of the group means, less what within-group noise
    explains, over the total; m = mean group size. One-way random-effects ANOVA estimates, pooled over x and y.
    """
    labels, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if len(labels) < 2 or len(residuals) <= len(labels):
        return 1.0
    means = np.zeros((len(labels), 2))
    np.add.at(means, inverse, residuals)
    means /= sizes[:, None]
    within = float(np.sum((residuals - means[inverse]) ** 2) / (2 * (len(residuals) - len(labels))))
    grand = residuals.mean(axis=0)
    between_ms = float(np.sum(sizes[:, None] * (means - grand) ** 2) / (2 * (len(labels) - 1)))
    m0 = (len(residuals) - np.sum(sizes**2) / len(residuals)) / (len(labels) - 1)
    between = max(0.0, (between_ms - within) / m0)
    rho = between / (between + within) if between + within > 0 else 0.0
    return 1.0 + (float(np.mean(sizes)) - 1.0) * rho


def _centre_jacobian(cam_from_world: Any) -> np.ndarray:
    """d(camera centre) / d(rotation (left), translation) of cam_from_world, centre = -R^T t."""
    rot = np.asarray(cam_from_world.rotation.matrix())
    t = np.asarray(cam_from_world.translation)
    jac = np.zeros((3, 6))
    # R' = exp([d]x) R  =>  C' = -R^T exp(-[d]x) t = C + R^T [d]x t = C - R^T [t]x d
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    jac[:, :3] = -rot.T @ tx
    jac[:, 3:] = -rot.T
    return jac

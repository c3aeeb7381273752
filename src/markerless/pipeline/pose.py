"""The camera's pose and its focal length and radial distortion: one maximum a posteriori estimator, every mode
a prior.

pycolmap solves the minimal cases inside LO-RANSAC: P3P with the given camera, P4Pf (`estimate_focal_length`) with
a free focal length. From a RANSAC pose, `map_refine` solves pose, focal length and k1, k2 together by
maximising the posterior: robust (Cauchy) reprojection residuals of one correspondence per query keypoint, plus
prior residuals on ln f (heavy-tailed: a focal length given for another resolution must not hold the solution)
and on k1, k2 (Gaussian), by scipy's least squares. Each `intrinsics_mode` is a prior
(`camera_prior`):
- `fixed`: the given camera, used as it is, with a tight prior (a calibrated lens repeats to about 0.5 % in focal
  length) that its sigmas count;
- `refine`: flat within a spec-sheet tolerance of the given focal length (`refine_focal_tolerance`, 20 %);
- `estimate`: flat over the fields of view of fixed cameras (20-110 degrees);
- distortion, unless given exactly: zero-mean k1, k2 with the spread of real lenses.
When the matches determine a parameter, the data win; when they barely do (a narrow lens, inliers in the
centre), the prior holds it, and the posterior covariance says so. No coverage switch decides what is refined.

Camera model, chosen by what a single view can determine (docs/intrinsics.md): one focal length (square pixels),
the principal point where it was given or at the image centre (it trades off against rotation), radial k1, k2
(OpenCV's polynomial). Tangential and higher-order terms of a given lens are kept as given.

Robust start: `refine` tries both the given camera's and a free-focal (P4Pf) consensus and keeps the one the same
correspondences support better after refinement (MSAC), so a focal length given far enough off to lose the border
matches cannot trap it; the free-focal consensus is skipped when the matches alone confirm the given camera's
solution (`_confirmed`).

Uncertainty, the contract a scene controller acts on: `position_sigma_m` and `rotation_sigma_deg` are the
1-sigma standard deviations along the worst axis of the posterior covariance of the camera centre and rotation,
marginalised over every intrinsic parameter (a camera kept at its prior is not an exact camera). The likelihood
uses the residual variance of the inliers inflated by the design effect of keyframe clusters (`design_effect`):
every 3D point of a keyframe carries that keyframe's pose error, so on a drifting scan the pose is known about
as well as the keyframes agree. In `fixed`, when the matches contradict the given camera, the bias that camera
introduces (the pose difference to the solution with the matches' own camera) is added to the sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np

from markerless.errors import IntrinsicsUndeterminedError
from markerless.pipeline.intrinsics_mode import IntrinsicsMode
from markerless.scene.camera import HALF_PIXEL, Camera

INTRINSICS_MODES: tuple[str, ...] = get_args(IntrinsicsMode)

# Starting focal length for `estimate`, as a multiple of the larger image side: a 60 degree field of view, the
# middle of fixed cameras' 30-110 degrees (P4Pf does not need it to be right: it scales the first inlier threshold
# and the octave of the first pass). The prior itself is flat over the fields of view of fixed cameras, from a
# 2.8 mm lens (110 degrees, 0.35x) to a varifocal zoomed in (20 degrees, 2.84x).
PRIOR_FOCAL_FACTOR = 0.87
ESTIMATE_FOCAL_RANGE = (0.35, 2.84)
# Beyond the range a prior allows (a spec-sheet tolerance, the range of fixed-camera lenses), a focal length becomes
# implausible over a tenth of its value; the walls are heavy-tailed (Cauchy), so matches that clearly contradict a
# given value (a focal length given for another resolution) still win.
FOCAL_WALL_SIGMA = 0.1
# The widest of those lenses, 110 degrees: in `estimate` a frame is shrunk only as far as this focal length allows,
# since shrinking a wide-angle frame for a 60 degree guess would leave it coarser than the scan.
WIDEST_FOCAL_FACTOR = 0.35
# A camera declared exact (`fixed`): what a checkerboard calibration of a fixed lens repeats to.
FIXED_FOCAL_SIGMA = 0.005
FIXED_DISTORTION_SIGMA = (0.005, 0.005)
# Radial distortion of real lenses (k1, k2 of OpenCV's polynomial, normalised coordinates): from telephoto lenses
# (|k1| < 0.05) to 2.8 mm CCTV lenses of 100-110 degrees (k1 -0.3 to -0.45, k2 0.1 to 0.2): zero-mean, with
# the strongest lenses near 2 sigma.
LENS_DISTORTION_SIGMA = (0.3, 0.2)
REFINE_ROUNDS = 3  # re-collect inliers with the refined camera: correcting distortion brings border matches back
# A parameter is determined by the matches when they carry at least as much information on it as its prior
# (posterior variance at most half the prior's); otherwise the prior decides it: `estimate` refuses and says so,
# `refine` warns, `fixed` cannot check the given value.
DETERMINED_VARIANCE_RATIO = 0.5


@dataclass(frozen=True)
class CameraPrior:
    """Prior on the refined intrinsics; other parameters are held.

    ln f: flat within `focal_halfwidth` of ln `focal` (a tolerance or a range says "somewhere in here", not "most
    likely the middle": a focal length 15 % off within a 20 % tolerance is not pulled back), with Cauchy walls of
    scale `focal_sigma` beyond; a half-width of 0 makes it a Gaussian of sigma `focal_sigma` (`fixed`).
    k1, k2: Gaussian.
    """

    focal: float
    focal_halfwidth: float
    focal_sigma: float
    distortion: tuple[float, float]
    distortion_sigma: tuple[float, float]

    @property
    def focal_spread(self) -> float:
        """Standard deviation of ln f under the prior (its flat part as a uniform distribution)."""
        return math.sqrt(self.focal_halfwidth**2 / 3 + self.focal_sigma**2)


def camera_prior(camera: Camera, mode: str, focal_tolerance: float) -> CameraPrior:
    """The prior of `mode` around `camera` (the given camera, or in `estimate` the generic one of the image size)."""
    focal = camera.focal
    k = (list(camera.distortion[:2]) + [0.0, 0.0])[:2]
    if mode == "fixed":
        return CameraPrior(focal, 0.0, FIXED_FOCAL_SIGMA, (k[0], k[1]), FIXED_DISTORTION_SIGMA)
    if mode == "refine":
        return CameraPrior(focal, focal_tolerance, FOCAL_WALL_SIGMA, (k[0], k[1]), LENS_DISTORTION_SIGMA)
    side = max(camera.width, camera.height)
    short, long = (factor * side for factor in ESTIMATE_FOCAL_RANGE)
    return CameraPrior(math.sqrt(short * long), 0.5 * math.log(long / short), FOCAL_WALL_SIGMA, (0.0, 0.0),
                       LENS_DISTORTION_SIGMA)


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
    # posterior covariance of (rotation perturbation in radians, camera centre in metres), marginalised over the
    # intrinsics; None when there were too few inliers to compute it
    covariance: np.ndarray | None = None
    # posterior sigma of ln f and of k1, with their prior's, to tell what the matches determined
    focal_sigma: float = math.inf
    k1_sigma: float = math.inf
    prior: CameraPrior | None = None

    @property
    def focal_determined(self) -> bool:
        return self.prior is not None and self.focal_sigma**2 <= DETERMINED_VARIANCE_RATIO * self.prior.focal_spread**2

    @property
    def distortion_determined(self) -> bool:
        return (self.prior is not None
                and self.k1_sigma**2 <= DETERMINED_VARIANCE_RATIO * self.prior.distortion_sigma[0] ** 2)

    @property
    def centre(self) -> np.ndarray:
        return -np.asarray(self.cam_from_world.rotation.matrix()).T @ np.asarray(self.cam_from_world.translation)


def threshold_px(angle: float, focal: float) -> float:
    """The inlier threshold in pixels of a camera of focal length `focal` (px): the angle `angle` (radians) is the
    threshold, so that it means the same for every resolution and lens."""
    return angle * focal


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
    return pycolmap.Camera(model="RADIAL", width=camera.width, height=camera.height,
                           params=[camera.focal, camera.cx, camera.cy, k1, k2])


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
    to fit one keyframe's patch within the angular threshold, so `fixed` and `refine` verify with it (P3P, cheaper
    than P4Pf: docs/measurements.md).
    """
    import pycolmap

    estimate = mode == "estimate"
    cam = _radial_camera(camera) if estimate and _radial_only(camera) else camera.to_pycolmap()
    free_focal = estimate and cam.model.name == "RADIAL"
    est = _options(threshold_px(angle, camera.focal), free_focal, trials)
    ret = pycolmap.estimate_absolute_pose(points2d, points3d, cam, estimation_options=est)
    return None if ret is None else np.asarray(ret["inlier_mask"], dtype=bool)


def solve(points2d: np.ndarray, points3d: np.ndarray, keypoint_ids: np.ndarray, keyframes: np.ndarray,
          verified: np.ndarray, camera: Camera, mode: str, angle: float, max_points: int,
          focal_tolerance: float = 0.2) -> PoseSolution | None:
    """Pose and camera (the MAP under `mode`'s prior) from the matches of verified keyframes; None when no pose is
    found.

    `points2d` are in the camera's pixel convention, `keypoint_ids` name the query keypoint of each
    correspondence and `keyframes` the keyframe that lifted its 3D point; `verified` marks the inliers of each
    keyframe's own PnP. `camera` is the given one (or the generic one for `estimate`), `angle` the inlier threshold
    in radians (pixels = angle x focal length), `focal_tolerance` the relative 1-sigma of a focal length given in
    `refine`. The returned errors and inliers cover every correspondence.

    One observation per query keypoint: a keypoint matched in several keyframes is one measurement, and its
    copies carry the 3D points of keyframes that disagree by the scan's drift; solving on all copies weighted each
    keypoint by how many keyframes see it and pulled the pose towards the largest cluster.
    """
    pick = _one_per_keypoint(keypoint_ids, verified)
    p2, p3, groups = points2d[pick], points3d[pick], keyframes[pick]
    candidates = np.flatnonzero(verified[pick])
    sample = candidates[np.random.default_rng(0).permutation(len(candidates))[:max_points]]
    prior = camera_prior(camera, mode, focal_tolerance)
    if mode == "estimate":
        solution = _solve_estimate(p2, p3, groups, sample, camera, prior, angle)
    elif mode == "refine":
        solution = _solve_refine(p2, p3, groups, sample, camera, prior, angle)
    else:
        solution = _solve_given(p2, p3, groups, sample, camera, prior, angle, focal_tolerance)
    if solution is None:
        return None
    # errors and inliers over every correspondence, copies included, under the returned camera
    cam = solution.camera
    solution.errors = reprojection_errors(cam.to_pycolmap(), solution.cam_from_world, points2d, points3d)
    solution.inliers = solution.errors <= threshold_px(angle, cam.focal)
    return solution


def _one_per_keypoint(keypoint_ids: np.ndarray, verified: np.ndarray) -> np.ndarray:
    """Index of one correspondence per query keypoint: a verified one when there is one, and among those the one
    from the best-ranked keyframe (correspondences come in retrieval order), the view most like the query's."""
    order = np.lexsort((~verified, keypoint_ids))  # stable: retrieval order within each keypoint
    _, first = np.unique(keypoint_ids[order], return_index=True)
    return np.sort(order[first])


def _solve_estimate(p2: np.ndarray, p3: np.ndarray, groups: np.ndarray, sample: np.ndarray, camera: Camera,
                    prior: CameraPrior, angle: float) -> PoseSolution | None:
    """P4Pf consensus from the generic camera, then the MAP under the broad prior; refused when the matches carry
    less information on the focal length than the prior (it would be the prior's guess, not an estimate)."""
    start = _p4pf(p2, p3, sample, camera, angle)
    if start is None:
        return None
    solution = map_refine(p2, p3, groups, start[0], start[1], prior, angle, "estimated")
    if solution is not None and not solution.focal_determined:
        raise IntrinsicsUndeterminedError(
            f"the matches do not determine the focal length: {_focal_note(solution)}")
    return solution


def _solve_refine(p2: np.ndarray, p3: np.ndarray, groups: np.ndarray, sample: np.ndarray, camera: Camera,
                  prior: CameraPrior, angle: float) -> PoseSolution | None:
    """The given camera's and a free-focal consensus, each refined under the spec-sheet prior; the one the same
    correspondences support better wins. The free-focal consensus is skipped when the given camera's solution is
    confirmed by the matches alone (`_confirmed`): it can only find what the data already placed."""
    given = _p3p(p2, p3, sample, camera, angle)
    first = None if given is None else map_refine(p2, p3, groups, given, camera, prior, angle, "refined")
    if first is not None and _confirmed(first, prior):
        return first
    candidates = [first]
    if _radial_only(camera):
        free = _p4pf(p2, p3, sample, camera, angle)
        if free is not None:
            candidates.append(map_refine(p2, p3, groups, free[0], free[1], prior, angle, "refined"))
    candidates = [c for c in candidates if c is not None]
    if not candidates:
        return None
    # along a narrow lens's focal-depth valley the posterior has several modes, and each start finds its own:
    # the one the correspondences support better wins (MSAC: truncated squared errors over all of them)
    best = min(candidates, key=lambda c: _msac(c, angle))
    if not best.focal_determined:
        best.warnings.append(f"intrinsics_not_refined: the matches barely determine the focal length "
                             f"({_focal_note(best)}); it stays near the given value, and the sigmas include that")
    return best


def _confirmed(solution: PoseSolution, prior: CameraPrior) -> bool:
    """The matches alone place the focal length well inside the prior's flat part (3 posterior sigmas from its
    walls), so the walls played no part. A focal length given far off looks otherwise (its consensus is a central
    patch that leaves the focal length undetermined, or pushes it against a wall)."""
    offset = abs(math.log(solution.camera.focal / prior.focal))
    return solution.focal_determined and offset + 3 * solution.focal_sigma <= prior.focal_halfwidth


def _solve_given(p2: np.ndarray, p3: np.ndarray, groups: np.ndarray, sample: np.ndarray, camera: Camera,
                 prior: CameraPrior, angle: float, focal_tolerance: float) -> PoseSolution | None:
    """`fixed`: the MAP under the tight prior, checked against the camera the matches themselves give (the same
    inliers under the spec-sheet prior). A contradiction is reported, and the pose difference it makes is added
    to the sigmas: that is the error the given camera introduces."""
    pose = _p3p(p2, p3, sample, camera, angle)
    if pose is None:
        return None
    solution = map_refine(p2, p3, groups, pose, camera, prior, angle, "given", hold=True)
    if solution is None:
        return None
    loose = camera_prior(camera, "refine", focal_tolerance)
    check = map_refine(p2, p3, groups, solution.cam_from_world, camera, loose, angle, "refined",
                       inliers=solution.inliers)
    if check is not None and not check.focal_determined and _radial_only(camera):
        # the given camera's consensus cannot check it (a central patch): does a free focal length agree wider?
        free = _p4pf(p2, p3, sample, camera, angle)
        wider = None if free is None else map_refine(p2, p3, groups, free[0], free[1], loose, angle, "refined")
        if wider is not None and wider.focal_determined and wider.inliers.sum() > solution.inliers.sum():
            solution.warnings.append(_patch_mismatch(camera, solution, wider))
            _add_bias(solution, wider)
        return solution
    if check is not None:
        warnings = _mismatch(camera, check, p2[check.inliers], angle)
        if warnings:
            solution.warnings += warnings
            _add_bias(solution, check)
    return solution


def _msac(solution: PoseSolution, angle: float) -> float:
    threshold = threshold_px(angle, solution.camera.focal)
    return float(np.sum(np.minimum(solution.errors, threshold) ** 2) / threshold**2)


def _p3p(p2: np.ndarray, p3: np.ndarray, sample: np.ndarray, camera: Camera, angle: float) -> Any | None:
    """LO-RANSAC pose with the given camera (P3P), or None."""
    import pycolmap

    est = _options(threshold_px(angle, camera.focal), False)
    ret = pycolmap.estimate_and_refine_absolute_pose(p2[sample], p3[sample], camera.to_pycolmap(),
                                                      estimation_options=est)
    return None if ret is None else ret["cam_from_world"]


def _p4pf(p2: np.ndarray, p3: np.ndarray, sample: np.ndarray, camera: Camera,
          angle: float) -> tuple[Any, Camera] | None:
    """LO-RANSAC pose and focal length (P4Pf) from `camera` (radial only), or None."""
    import pycolmap

    cam = _radial_camera(camera)
    est = _options(threshold_px(angle, camera.focal), True)
    ret = pycolmap.estimate_and_refine_absolute_pose(p2[sample], p3[sample], cam, est, _refinement(True, False))
    return None if ret is None else (ret["cam_from_world"], from_pycolmap(cam))


def map_refine(p2: np.ndarray, p3: np.ndarray, groups: np.ndarray, cam_from_world: Any, camera: Camera,
               prior: CameraPrior, angle: float, source: str, inliers: np.ndarray | None = None,
               rounds: int = REFINE_ROUNDS, hold: bool = False) -> PoseSolution | None:
    """Pose, ln f, k1 and k2 at the posterior's maximum, starting from `cam_from_world` and `camera`; None when
    fewer inliers than parameters remain.

    Each round solves on the current inliers (Cauchy loss on the residuals in units of their own sigma, the
    likelihood divided by the design effect; quadratic prior residuals), then collects the inliers again under the
    new camera (correcting distortion brings border matches back). The first round takes no design effect: the
    residuals of the start camera hold its misfit (an unmodelled lens), which clusters like scan drift but is not.
    From the second round on, the noise comes from the previous solution; rounds stop once the inliers stay.
    The posterior covariance is taken at the last solution with a quadratic loss on its inliers. `hold` keeps
    the intrinsics at the prior's mean (`fixed`: the given camera is used as it is) while the covariance still
    counts their prior spread (a consider covariance: a kept camera is not an exact camera).
    """
    from scipy.optimize import least_squares

    model = _Model(camera, prior, hold)
    x = model.start(cam_from_world, camera)
    threshold = threshold_px(angle, model.focal(x))
    errors = np.linalg.norm(model.residuals(x, p2, p3), axis=1)
    current = errors <= threshold if inliers is None else inliers.copy()
    for round_ in range(rounds):
        if current.sum() * 2 <= len(x) + 3:
            return None
        q2, q3 = p2[current], p3[current]
        sigma, deff = _noise(model.residuals(x, q2, q3), groups[current])
        if round_ == 0:
            deff = 1.0  # the start camera's misfit (a lens not yet modelled) is not the scan's drift
        n = 2 * len(q2)

        def fun(v: np.ndarray, q2: np.ndarray = q2, q3: np.ndarray = q3, sigma: float = sigma) -> np.ndarray:
            return np.concatenate([model.residuals(v, q2, q3).ravel() / sigma, model.prior_residuals(v)])

        def jac(v: np.ndarray, q3: np.ndarray = q3, sigma: float = sigma) -> np.ndarray:
            return np.vstack([model.jacobian(v, q3) / sigma, model.prior_jacobian(v)])

        def loss(z: np.ndarray, n: int = n, deff: float = deff) -> np.ndarray:
            out = np.empty((3, len(z)))
            out[0, :n] = np.log1p(z[:n]) / deff  # Cauchy, scale 1 sigma
            out[1, :n] = 1.0 / (1.0 + z[:n]) / deff
            out[2, :n] = -1.0 / (1.0 + z[:n]) ** 2 / deff
            # the focal length prior's walls are heavy-tailed (Cauchy): a value given far off (for another
            # resolution) stops counting once the matches contradict it; the lens priors are Gaussian
            out[0, n], out[1, n], out[2, n] = np.log1p(z[n]), 1.0 / (1.0 + z[n]), -1.0 / (1.0 + z[n]) ** 2
            out[0, n + 1:], out[1, n + 1:], out[2, n + 1:] = z[n + 1:], 1.0, 0.0
            return out

        x = least_squares(fun, x, jac, loss=loss, method="trf", x_scale="jac", max_nfev=50).x
        errors = np.linalg.norm(model.residuals(x, p2, p3), axis=1)
        previous, current = current, errors <= threshold_px(angle, model.focal(x))
        if round_ > 0 and np.array_equal(previous, current):
            break  # the noise was estimated at a solution, and the inliers stay
    if current.sum() * 2 <= len(x) + 3:
        return None
    return model.solution(x, p2[current], p3[current], groups[current], errors, current, source)


class _Model:
    """Projection of scene points through cam_from_world (rotation vector, translation) and a camera whose focal
    length (ln of its scale) and k1, k2 are free: OpenCV's model, so its analytic Jacobians serve."""

    def __init__(self, camera: Camera, prior: CameraPrior, hold: bool = False) -> None:
        self.base = camera
        self.prior = prior
        self.hold = hold  # solve with the intrinsics held at the prior's mean (they still count in `solution`)
        n = len(camera.distortion)
        size = next(k for k in (4, 5, 8, 12, 14) if k >= n)
        self.dist = np.zeros(size)
        self.dist[:n] = camera.distortion

    def start(self, cam_from_world: Any, camera: Camera) -> np.ndarray:
        import cv2

        rvec = cv2.Rodrigues(np.asarray(cam_from_world.rotation.matrix()))[0].ravel()
        k = (list(camera.distortion[:2]) + [0.0, 0.0])[:2]
        scale = math.log(camera.focal / self.base.focal)
        return np.concatenate([rvec, np.asarray(cam_from_world.translation, float), [scale, k[0], k[1]]])

    def focal(self, x: np.ndarray) -> float:
        return self.base.focal * math.exp(x[6])

    def _k_and_dist(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b, s = self.base, math.exp(x[6])
        k = np.array([[b.fx * s, 0, b.cx - HALF_PIXEL], [0, b.fy * s, b.cy - HALF_PIXEL], [0, 0, 1]])
        dist = self.dist.copy()
        dist[:2] = x[7:9]
        return k, dist

    def _project(self, x: np.ndarray, p3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        k, dist = self._k_and_dist(x)
        pixels, jac = cv2.projectPoints(p3.reshape(-1, 1, 3), x[:3], x[3:6], k, dist)
        return pixels.reshape(-1, 2) + HALF_PIXEL, jac

    def residuals(self, x: np.ndarray, p2: np.ndarray, p3: np.ndarray) -> np.ndarray:
        """(N, 2) pixel residuals; points behind the camera get a large one (they are never inliers)."""
        out = self._project(x, p3)[0] - p2
        import cv2

        depth = p3 @ cv2.Rodrigues(x[:3])[0][2] + x[5]
        out[depth <= 1e-6] = 1e6
        return out

    def jacobian(self, x: np.ndarray, p3: np.ndarray) -> np.ndarray:
        """d residuals (2N, interleaved u, v) / d (rvec, t, ln scale, k1, k2)."""
        jac = self._project(x, p3)[1]
        k, _ = self._k_and_dist(x)
        d_scale = jac[:, 6:7] * k[0, 0] + jac[:, 7:8] * k[1, 1]
        return np.hstack([jac[:, :6], d_scale, jac[:, 10:12]])

    def _prior_sigmas(self, solving: bool) -> np.ndarray:
        p = self.prior
        sigmas = np.array([p.focal_sigma, *p.distortion_sigma])
        return sigmas * 1e-6 if solving and self.hold else sigmas

    def _offsets(self, x: np.ndarray) -> np.ndarray:
        """Distances from the prior: ln f beyond its flat part, k1 and k2 from their means."""
        p = self.prior
        d = math.log(self.focal(x) / p.focal)
        excess = math.copysign(max(0.0, abs(d) - p.focal_halfwidth), d)
        return np.array([excess, x[7] - p.distortion[0], x[8] - p.distortion[1]])

    def prior_residuals(self, x: np.ndarray, solving: bool = True) -> np.ndarray:
        return self._offsets(x) / self._prior_sigmas(solving)

    def prior_jacobian(self, x: np.ndarray, solving: bool = True) -> np.ndarray:
        jac = np.zeros((3, 9))
        jac[0, 6], jac[1, 7], jac[2, 8] = 1 / self._prior_sigmas(solving)
        if self._offsets(x)[0] == 0.0 and self.prior.focal_halfwidth > 0:
            jac[0, 6] = 0.0  # inside the flat part
        return jac

    def camera(self, x: np.ndarray) -> Camera:
        if self.hold:
            return self.base
        b, s = self.base, math.exp(x[6])
        dist = self.dist.copy()
        dist[:2] = x[7:9]
        keep = len(self.base.distortion) or (2 if np.any(x[7:9]) else 0)
        distortion = tuple(float(v) for v in dist[: max(keep, 4 if keep else 0)])
        return Camera(b.width, b.height, b.fx * s, b.fy * s, b.cx, b.cy, distortion)

    def solution(self, x: np.ndarray, q2: np.ndarray, q3: np.ndarray, groups: np.ndarray, errors: np.ndarray,
                 inliers: np.ndarray, source: str) -> PoseSolution:
        """The solution at `x` with its posterior covariance from the inliers `q2`, `q3`."""
        import cv2
        import pycolmap

        rot = cv2.Rodrigues(x[:3])[0]
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(rot), x[3:6].copy())
        sigma, deff = _noise(self.residuals(x, q2, q3), groups)
        jac = self.jacobian(x, q3)
        prior = self.prior_jacobian(x, solving=False)
        # the Cauchy wall's weight at the solution: a focal prior the matches contradict adds little information
        prior[0] *= math.sqrt(1.0 / (1.0 + self.prior_residuals(x, solving=False)[0] ** 2))
        information = jac.T @ jac / (sigma**2 * deff) + prior.T @ prior
        try:
            cov = np.linalg.inv(information)
        except np.linalg.LinAlgError:
            cov = None
        solution = PoseSolution(pose, self.camera(x), source, errors, inliers, prior=self.prior)
        if cov is not None and np.all(np.isfinite(cov)):
            out = _pose_jacobian(x) @ cov[:6, :6] @ _pose_jacobian(x).T  # (rotation, centre)
            solution.covariance = out
            solution.rotation_sigma_deg = math.degrees(math.sqrt(max(np.linalg.eigvalsh(out[:3, :3]).max(), 0.0)))
            solution.position_sigma_m = math.sqrt(max(np.linalg.eigvalsh(out[3:, 3:]).max(), 0.0))
            solution.focal_sigma = math.sqrt(max(cov[6, 6], 0.0))
            solution.k1_sigma = math.sqrt(max(cov[7, 7], 0.0))
        return solution


def _noise(residuals: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Residual sigma (px, per coordinate; 9 parameters taken out) and the design effect of keyframe clusters."""
    dof = max(2 * len(residuals) - 9, 1)
    sigma = math.sqrt(max(float(np.sum(residuals**2)) / dof, 1e-4))
    return sigma, design_effect(residuals, groups)


def _pose_jacobian(x: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """d (rotation perturbation on the left, camera centre) / d (rvec, t), numerically: centre = -R^T t."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_rotvec(x[:3])

    def observe(v: np.ndarray) -> np.ndarray:
        # scipy, not cv2.Rodrigues: the latter returns exactly zero for rotations below about 1e-5 rad
        r = Rotation.from_rotvec(v[:3])
        return np.concatenate([(r * rot.inv()).as_rotvec(), -r.as_matrix().T @ v[3:6]])

    base = observe(x[:6])
    jac = np.zeros((6, 6))
    for i in range(6):
        step = x[:6].copy()
        step[i] += eps
        jac[:, i] = (observe(step) - base) / eps
    return jac


def _add_bias(solution: PoseSolution, reference: PoseSolution) -> None:
    """Add the pose difference to `reference` (the matches' own camera) to `solution`'s sigmas, in quadrature."""
    shift = float(np.linalg.norm(solution.centre - reference.centre))
    rotation = math.degrees(solution.cam_from_world.rotation.angle_to(reference.cam_from_world.rotation))
    solution.position_sigma_m = math.hypot(solution.position_sigma_m, shift)
    solution.rotation_sigma_deg = math.hypot(solution.rotation_sigma_deg, rotation)


def _focal_note(solution: PoseSolution) -> str:
    prior = solution.prior
    assert prior is not None
    return f"posterior +-{solution.focal_sigma:.0%} against the prior's +-{prior.focal_spread:.0%}"


def _patch_mismatch(camera: Camera, given: PoseSolution, free: PoseSolution) -> str:
    """`fixed`: the warning for a given camera whose inliers are a patch, with a free focal length agreeing wider."""
    f_given = camera.focal
    return (f"intrinsics_mismatch: the given camera's inliers cannot check it; with a focal length of "
            f"{free.camera.fx:.1f} px ({100 * (free.camera.fx / f_given - 1):+.0f}% from the given {f_given:.1f} px) "
            f"{free.inliers.sum() / max(given.inliers.sum(), 1):.1f}x as many matches agree; use intrinsics_mode "
            "'refine' or correct the camera")


def _mismatch(camera: Camera, check: PoseSolution, inlier_pixels: np.ndarray, angle: float) -> list[str]:
    """Do the inliers contradict the given camera? Compares it with the camera the matches give (`check`).

    A focal error e moves a point at the image border (half-diagonal r px) by about e * r; a distortion the
    camera lacks moves it by its radial displacement where the inliers reach. Either is reported once it exceeds
    half the inlier threshold, and only for what the matches determine: beyond that the given camera costs
    inliers and biases the pose.
    """
    if not _radial_only(camera):
        return []
    refined = check.camera
    f_given, f_est = camera.focal, refined.fx
    half_diagonal = 0.5 * math.hypot(camera.width, camera.height)
    tolerance = 0.5 * threshold_px(angle, f_given)
    warnings = []
    if check.focal_determined and abs(f_est / f_given - 1.0) * half_diagonal > tolerance:
        warnings.append(
            f"intrinsics_mismatch: the matches give a focal length of {f_est:.1f} px, "
            f"{100 * (f_est / f_given - 1):+.1f}% from the given {f_given:.1f} px; use intrinsics_mode 'refine' or "
            "correct the camera"
        )
    if not camera.distortion and check.distortion_determined and len(inlier_pixels):
        k1, k2 = refined.distortion[:2] if refined.distortion else (0.0, 0.0)
        reach = np.percentile(np.linalg.norm(inlier_pixels - [camera.cx, camera.cy], axis=1), 90)
        r = reach / f_est  # normalised radius the inliers reach
        shift = abs(k1 * r**2 + k2 * r**4) * r * f_est
        if shift > tolerance:
            warnings.append(
                f"uncorrected_distortion: the matches show radial distortion (k1 {k1:.3f}, k2 {k2:.3f}) moving "
                f"points by {shift:.0f} px at {reach / half_diagonal:.0%} of the half-diagonal, and none was given; "
                "use intrinsics_mode 'refine' or give the lens distortion"
            )
    return warnings


def design_effect(residuals: np.ndarray, groups: np.ndarray) -> float:
    """Variance inflation 1 + (m - 1) rho for residual vectors (N, 2) that come in correlated groups.

    rho (intra-class correlation) = between-group variance of the group means, less what within-group noise
    explains, over the total; m = the size-weighted mean group size sum(m_i^2) / sum(m_i) (Kish's design effect
    for clusters of unequal size: one large keyframe cluster weighs as what it is, not as the average).
    One-way random-effects ANOVA estimates, pooled over x and y.
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
    return 1.0 + (float(np.sum(sizes**2) / np.sum(sizes)) - 1.0) * rho

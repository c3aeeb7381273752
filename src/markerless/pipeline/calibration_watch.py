"""A camera's calibration over its stream of frames: consistency test, fusion, and the calibrated / moved / lost /
recalibrated states, as pure functions on dataclasses (no I/O: the service reads and writes the store).

Why these rules (derivations in `docs/calibration.md`):

- **Consistency test.** A frame's pose and the calibration's differ by a camera-centre vector d and a rotation
  vector r. A frame's error is the scan's share (its keyframes' 3D points and poses: the same for every frame of one
  view, so it cancels in d and r) plus an independent share (image noise, occluders). With each 1-sigma isotropic
  at its worst axis (conservative), under "the camera did not move" |d|^2 / var_p + |r|^2 / var_r is chi-square
  with 6 degrees of freedom, var = rho^2 (sigma_frame^2 + 1 / sum_i sigma_i^-2) + floor^2: rho^2 is the
  independent share of the variance, measured (95 % upper bound, at most 1) from how much the calibration's own
  frames scatter about their mean relative to their sigmas; the floor is the scan's repeatability, what two
  localizations of one unmoved camera differ by when they rest on different keyframes (each keyframe pose has its
  own tracking error). A frame is inconsistent when the statistic exceeds the (1 - false_alarm) quantile.
- **Moved needs two frames.** One inconsistent frame only goes to `pending`; the next frame confirms `moved` when it
  is consistent with the pending frame and not with the calibration, and is dropped (replaced) otherwise. A false
  `moved` then needs two consecutive false alarms that agree with each other: at most false_alarm^2 per frame.
- **Fusion.** A static camera's frames measure one pose. The fused pose is the inverse-variance weighted mean of the
  per-frame poses (centres; rotations by the weighted quaternion mean) of the last `window` consistent frames,
  started from the medoid frame and without frames inconsistent with it (robust to the odd bad frame). Each frame's
  pose is already the maximum-likelihood fit of its own correspondences with its covariance, so the weighted mean is
  the joint estimate to first order, at O(window) storage instead of every frame's correspondences.
- **Fused sigma.** Frames of one view reuse the same keyframe 3D points, so the scan's share of each frame's error
  is common to all of them and does not average out; only the image noise does. Their split is unknown, so the
  fused calibration claims no more than a typical single frame of its view: the median of the frames' sigmas (the
  smallest one would be an outlier of the frames' own sigma estimates, which scatter 4x between captures of one
  view), scaled up by the Birge ratio sqrt(chi^2 / dof) of the frames' scatter about the mean when they scatter
  more than their sigmas say. It is never below the smallest frame's.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
from scipy.spatial.transform import Rotation
from scipy.stats import chi2

from markerless.errors import Reason
from markerless.pipeline.options import WatchOptions

if TYPE_CHECKING:
    from markerless.pipeline.localization import LocalizationResult

__all__ = ["Calibration", "Estimate", "Event", "Frame", "Fused", "Outcome", "WatchOptions", "consistent", "difference",
           "fuse", "observe", "observe_failure", "observe_result", "test_statistic"]

State = Literal["calibrated", "pending", "lost"]
EventKind = Literal["calibrated", "moved", "lost", "recalibrated"]
# what a frame that reached the localizer can fail with: evidence that the camera is blocked, dark or pointed
# elsewhere; a refusal of the request (timeout, superseded, scene registering, ...) says nothing about the camera
CAMERA_FAILURES = frozenset({
    Reason.NO_FEATURES, Reason.NO_MATCHES, Reason.NO_VERIFIED_MATCHES, Reason.TOO_FEW_MATCHES, Reason.PNP_FAILED,
    Reason.LOW_INLIER_RATIO, Reason.UNCERTAIN_POSE, Reason.INTRINSICS_UNDETERMINED, Reason.BAD_IMAGE,
})


@dataclass(frozen=True)
class Estimate:
    """A camera-to-world pose in the scene (raw.glb) frame, the camera it was solved with and its 1-sigma (worst
    axis): what a frame, a fusion of frames and a calibration each are, so one definition reads and carries it."""

    quaternion: tuple[float, float, float, float]
    translation: tuple[float, float, float]
    intrinsics: tuple[tuple[float, float, float], ...]
    distortion: tuple[float, ...]
    intrinsics_source: str
    position_sigma_m: float
    rotation_sigma_deg: float

    def estimate(self) -> dict[str, Any]:
        """These fields alone, to carry this estimate into another (a fusion into a calibration)."""
        return {f.name: getattr(self, f.name) for f in fields(Estimate)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Read back from JSON (`asdict`): the lists become the tuples the fields hold."""
        return cls(**{**data, "quaternion": tuple(data["quaternion"]), "translation": tuple(data["translation"]),
                      "intrinsics": tuple(tuple(r) for r in data["intrinsics"]),
                      "distortion": tuple(data["distortion"]), "position_sigma_m": float(data["position_sigma_m"]),
                      "rotation_sigma_deg": float(data["rotation_sigma_deg"])})


@dataclass(frozen=True)
class Frame(Estimate):
    """One localized frame as evidence: its estimate, the scene version, and when (ISO 8601 UTC)."""

    scene_id: str
    scene_version: str
    at: str

    @classmethod
    def from_result(cls, result: LocalizationResult, at: str) -> Frame | None:
        """The evidence of a successful localization; None when it has no pose or no finite sigmas (a frame whose
        uncertainty is unknown cannot be weighed)."""
        sp, sr = result.position_sigma_m, result.rotation_sigma_deg
        if (not result.success or result.quaternion is None or result.translation is None or result.intrinsics is None
                or sp is None or sr is None or not (math.isfinite(sp) and math.isfinite(sr))):
            return None
        return cls(tuple(result.quaternion), tuple(result.translation),  # type: ignore[arg-type]
                   tuple(tuple(row) for row in result.intrinsics), tuple(result.distortion or ()),
                   result.intrinsics_source or "given", float(sp), float(sr), result.scene_id, result.scene_version,
                   at)


@dataclass(frozen=True)
class Calibration(Estimate):
    """A camera's current calibration: the fused estimate, tied to the scene version it was solved in.

    `frames` counts every frame it rests on (fused ones: the last `window` of them in `evidence`); `state` is
    `calibrated`, `pending` (the last frame disagreed: one more that agrees with it means moved) or `lost` (the
    last `lost_after` frames failed to localize; `last_failure` says why). `revision` grows with every change, so
    a consumer can drop an older message that arrives late."""

    camera_id: str
    scene_id: str
    scene_version: str
    frames: int
    first_solved_at: str
    updated_at: str
    state: State = "calibrated"
    evidence: tuple[Frame, ...] = ()
    pending: tuple[Frame, ...] = ()
    failures: int = 0
    last_failure: str | None = None
    last_failure_message: str | None = None
    revision: int = 0

    def to_dict(self) -> dict[str, Any]:
        # camera and scene first, the order stored files and `markerless cameras --json` have always had
        return {"camera_id": self.camera_id, "scene_id": self.scene_id, "scene_version": self.scene_version,
                **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return super().from_dict({**data, "evidence": tuple(Frame.from_dict(f) for f in data.get("evidence", ())),
                                  "pending": tuple(Frame.from_dict(f) for f in data.get("pending", ()))})


@dataclass(frozen=True)
class Event:
    """Something a scene controller must hear about. `displacement_m` / `rotation_deg`: from the previous
    calibration to the new one (moved, recalibrated); `reason` / `message`: why frames fail (lost)."""

    event: EventKind
    camera_id: str
    scene_id: str
    scene_version: str
    at: str
    frames: int
    displacement_m: float | None = None
    rotation_deg: float | None = None
    reason: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What one frame did: the calibration to store (None: none), events to publish, and for a localized frame
    whether it agreed with the calibration (`consistent`) and whether it confirmed that the camera moved."""

    calibration: Calibration | None
    events: list[Event] = field(default_factory=list)
    consistent: bool | None = None
    moved: bool = False
    changed: bool = True


def difference(a_quat: Any, a_trans: Any, b_quat: Any, b_trans: Any) -> tuple[float, float]:
    """(camera-centre distance in metres, rotation angle in degrees) between two camera-to-world poses."""
    dp = float(np.linalg.norm(np.subtract(a_trans, b_trans)))
    dr = float(np.degrees((Rotation.from_quat(a_quat).inv() * Rotation.from_quat(b_quat)).magnitude()))
    return dp, dr


def test_statistic(cal_quat: Any, cal_trans: Any, cal_sp: float, cal_sr: float, frame: Frame,
                   options: WatchOptions) -> float:
    """q of the consistency test (chi-square with 6 dof when the camera did not move)."""
    dp, dr = difference(cal_quat, cal_trans, frame.quaternion, frame.translation)
    var_p = cal_sp**2 + frame.position_sigma_m**2 + options.floor_position_m**2
    var_r = cal_sr**2 + frame.rotation_sigma_deg**2 + options.floor_rotation_deg**2
    return dp**2 / max(var_p, 1e-24) + dr**2 / max(var_r, 1e-24)


def consistent(calibration: Calibration, frame: Frame, options: WatchOptions) -> bool:
    """Does `frame` agree with `calibration` (the consistency test at `options.false_alarm`)?

    The scan's share of the error is common to the frames of one view and cancels in their difference, so only the
    independent share is tested, with the floor for a change of keyframes: var = rho^2 (sigma_frame^2 +
    1 / sum(1 / sigma_i^2)) + floor^2, where rho^2 <= 1 is the (upper bound of the) independent fraction measured
    from the scatter of the calibration's own frames. With one frame rho = 1: both sigmas in full."""
    if not calibration.evidence:
        return test_statistic(calibration.quaternion, calibration.translation, calibration.position_sigma_m,
                              calibration.rotation_sigma_deg, frame, options) <= options.threshold
    fused = fuse(calibration.evidence, options)
    dp, dr = difference(calibration.quaternion, calibration.translation, frame.quaternion, frame.translation)
    var_p = fused.rho2_p * (frame.position_sigma_m**2 + 1.0 / fused.info_p) + options.floor_position_m**2
    var_r = fused.rho2_r * (frame.rotation_sigma_deg**2 + 1.0 / fused.info_r) + options.floor_rotation_deg**2
    return dp**2 / max(var_p, 1e-24) + dr**2 / max(var_r, 1e-24) <= options.threshold


# One-sided confidence of the upper bound on the independent fraction rho^2 (chi-square on the frames' scatter).
_RHO_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Fused(Estimate):
    """The joint estimate of a set of frames of one unmoved camera, and the frames it kept."""

    kept: int
    rho2_p: float  # upper bound of the independent share of the frames' position variance (1 with one frame)
    rho2_r: float
    info_p: float  # sum of 1 / sigma^2 of the kept frames (m^-2, deg^-2)
    info_r: float


def fuse(frames: tuple[Frame, ...] | list[Frame], options: WatchOptions) -> Fused:
    """Robust weighted mean of the frames' poses and cameras, with a sigma the evidence supports (module doc)."""
    if not frames:
        raise ValueError("fuse needs at least one frame")
    frames = list(frames)

    def q(a: Frame, b: Frame) -> float:
        return test_statistic(a.quaternion, a.translation, a.position_sigma_m, a.rotation_sigma_deg, b, options)

    # Medoid start: the frame the others agree with best; then only the frames consistent with it.
    medoid = min(frames, key=lambda a: float(np.median([q(a, b) for b in frames])))
    kept = [f for f in frames if f is medoid or q(medoid, f) <= options.threshold]
    wp = np.array([1.0 / f.position_sigma_m**2 if f.position_sigma_m > 0 else 1e12 for f in kept])
    wr = np.array([1.0 / f.rotation_sigma_deg**2 if f.rotation_sigma_deg > 0 else 1e12 for f in kept])
    centres = np.array([f.translation for f in kept], dtype=float)
    centre = (wp[:, None] * centres).sum(0) / wp.sum()
    rotations = Rotation.from_quat(np.array([f.quaternion for f in kept], dtype=float))
    mean_rot = rotations.mean(weights=wr)
    quat = mean_rot.as_quat()
    if quat[3] < 0:
        quat = -quat
    sp = float(np.median([f.position_sigma_m for f in kept]))
    sr = float(np.median([f.rotation_sigma_deg for f in kept]))
    m = len(kept)
    rho2_p = rho2_r = 1.0
    if m >= 2:
        dof = 3 * (m - 1)
        chi_p = float((wp * ((centres - centre) ** 2).sum(1)).sum())
        chi_r = float((wr * np.degrees((mean_rot.inv() * rotations).magnitude()) ** 2).sum())
        # Birge ratio: inflate when the frames scatter more than their sigmas say
        sp *= math.sqrt(max(1.0, chi_p / dof))
        sr *= math.sqrt(max(1.0, chi_r / dof))
        bound = float(chi2.ppf(1.0 - _RHO_CONFIDENCE, dof))
        rho2_p, rho2_r = min(1.0, chi_p / bound), min(1.0, chi_r / bound)
    intrinsics = np.average(np.array([f.intrinsics for f in kept], dtype=float), axis=0, weights=wp)
    width = max(len(f.distortion) for f in kept)
    dist = np.array([list(f.distortion) + [0.0] * (width - len(f.distortion)) for f in kept], dtype=float)
    distortion = np.average(dist, axis=0, weights=wp) if width else np.zeros(0)
    source = Counter(f.intrinsics_source for f in kept).most_common(1)[0][0]
    return Fused(tuple(float(v) for v in quat), tuple(float(v) for v in centre),  # type: ignore[arg-type]
                 tuple(tuple(float(v) for v in row) for row in intrinsics), tuple(float(v) for v in distortion),
                 source, float(sp), float(sr), m, rho2_p, rho2_r, float(wp.sum()), float(wr.sum()))


def _new(camera_id: str, frames: tuple[Frame, ...], options: WatchOptions, first_solved_at: str,
         revision: int) -> Calibration:
    fused = fuse(frames, options)
    last = frames[-1]
    return Calibration(**fused.estimate(), camera_id=camera_id, scene_id=last.scene_id,
                       scene_version=last.scene_version, frames=len(frames), first_solved_at=first_solved_at,
                       updated_at=last.at, evidence=frames[-options.window:], revision=revision + 1)


def _event(kind: EventKind, cal: Calibration, old: Calibration | None = None, at: str | None = None,
           **extra: Any) -> Event:
    moved: dict[str, float] = {}
    if old is not None:
        dp, dr = difference(old.quaternion, old.translation, cal.quaternion, cal.translation)
        moved = {"displacement_m": dp, "rotation_deg": dr}
    return Event(kind, cal.camera_id, cal.scene_id, cal.scene_version, at or cal.updated_at, cal.frames, **moved,
                 **extra)


def observe(calibration: Calibration | None, camera_id: str, frame: Frame, options: WatchOptions) -> Outcome:
    """A localized frame of `camera_id`: the calibration it leaves and what to announce.

    - none yet: the frame is the first calibration (`calibrated`);
    - solved in another scene or scene version: re-solved from this frame (`recalibrated`: a new scan may have a
      new frame of reference);
    - consistent: fused in (a pending frame it contradicts is dropped; a lost camera is calibrated again);
    - inconsistent, nothing pending: pending;
    - inconsistent, consistent with the pending frame: `moved`, a new calibration from those two frames;
    - inconsistent with both: it replaces the pending frame.
    """
    cal = calibration
    if cal is None:
        new = _new(camera_id, (frame,), options, frame.at, 0)
        return Outcome(new, [_event("calibrated", new)], consistent=None)
    if (cal.scene_id, cal.scene_version) != (frame.scene_id, frame.scene_version):
        new = _new(camera_id, (frame,), options, frame.at, cal.revision)
        return Outcome(new, [_event("recalibrated", new, cal)], consistent=None)
    if consistent(cal, frame, options):
        evidence = (*cal.evidence, frame)[-options.window:]
        fused = fuse(evidence, options)
        new = replace(cal, **fused.estimate(), frames=cal.frames + 1, updated_at=frame.at, state="calibrated",
                      evidence=evidence, pending=(), failures=0, last_failure=None, last_failure_message=None,
                      revision=cal.revision + 1)
        return Outcome(new, [], consistent=True)
    if cal.pending:
        candidate = fuse(cal.pending, options)
        q = test_statistic(candidate.quaternion, candidate.translation, candidate.position_sigma_m,
                           candidate.rotation_sigma_deg, frame, options)
        if q <= options.threshold:
            new = _new(camera_id, (*cal.pending, frame), options, cal.pending[0].at, cal.revision)
            return Outcome(new, [_event("moved", new, cal)], consistent=False, moved=True)
    new = replace(cal, state="pending", pending=(frame,), failures=0, revision=cal.revision + 1)
    return Outcome(new, [], consistent=False)


def observe_failure(calibration: Calibration | None, reason: str, message: str, at: str,
                    options: WatchOptions) -> Outcome:
    """A frame of the camera that did not localize (blocked, dark, pointed elsewhere: `reason` says which).
    After `lost_after` in a row a calibrated camera is `lost`; a camera never calibrated has nothing to lose."""
    cal = calibration
    if cal is None:
        return Outcome(None, [], changed=False)
    failures = cal.failures + 1
    lost = failures >= options.lost_after
    new = replace(cal, failures=failures, last_failure=reason, last_failure_message=message,
                  state="lost" if lost else cal.state, pending=() if lost else cal.pending, revision=cal.revision + 1)
    events = [_event("lost", new, at=at, reason=reason, message=message)] if lost and cal.state != "lost" else []
    return Outcome(new, events)


def observe_result(calibration: Calibration | None, camera_id: str, result: LocalizationResult, at: str,
                   options: WatchOptions) -> Outcome | None:
    """A frame that ran through the localizer, as evidence: a pose is observed, a failure that says something about
    the camera counts towards `lost`; None when the frame is no evidence (a pose without finite sigmas cannot be
    weighed, a refusal of the request says nothing about the camera). The service and the replay both use it."""
    if result.success:
        frame = Frame.from_result(result, at)
        return None if frame is None else observe(calibration, camera_id, frame, options)
    reason = result.reason or Reason.INTERNAL_ERROR
    if reason not in CAMERA_FAILURES:
        return None
    return observe_failure(calibration, str(reason), result.message, at, options)

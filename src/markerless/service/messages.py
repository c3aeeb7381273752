"""Every MQTT payload of the service, as pydantic models, and their JSON Schemas.

Inbound models validate at the edge (the network thread) so a malformed message becomes a typed error reply
instead of an exception deep in the pipeline. Outbound models keep SceneScape's field names and types exactly
(`error` is the *string* "True"/"False", quaternion [x, y, z, w], constant `scale`, `message` on failure) and add
optional fields SceneScape clients ignore. Raw-string payloads (`isAlive`, `running`, `register`, `update`,
`online`/`offline`/`stopped`) are SceneScape's and stay raw.

`service.asyncapi` writes them, with the AsyncAPI document, to `docs/`.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator, model_validator

from markerless.errors import Reason
from markerless.pipeline.intrinsics_mode import IntrinsicsMode, IntrinsicsSource
from markerless.scene.config import SceneConfig

if TYPE_CHECKING:
    from markerless.pipeline.localization import LocalizationResult

# Raw strings of SceneScape's protocol.
IS_ALIVE = "isAlive"
RUNNING = "running"
REGISTER = "register"
UPDATE = "update"
FORGET = "forget"  # operator: drop a camera's calibration (ours, not SceneScape's)
ONLINE, OFFLINE, STOPPED = "online", "offline", "stopped"
STALLED = "stalled"  # availability while the watchdog sees the worker stuck

SCENESCAPE_FAILURE_MESSAGE = "Weak or insufficient matches. This camera might not belong to this scene."


def utc_now() -> str:
    """ISO 8601 UTC timestamp for replies."""
    return datetime.now(UTC).isoformat()


def dumps(model: BaseModel) -> bytes:
    """Wire form: JSON without the unset optional fields (SceneScape omits e.g. `quaternion` on failure)."""
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


_Finite = Annotated[float, Field(allow_inf_nan=False)]
_Id = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^/#+\x00-\x1f\x7f]+$")]
_RequestId = Annotated[StrictStr, Field(min_length=1, max_length=128)]


class _Inbound(BaseModel):
    # Camera pipelines add fields over time (Percebro vs DL Streamer differ): ignore unknown ones, type the rest.
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Outbound(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- inbound -------------------------------------------------------------------------------------------------


class CalibrationFrame(_Inbound):
    """A frame on `image/calibration/camera/{camera_id}` (Percebro / DL Streamer shape, plus our extras)."""

    calibrate: StrictBool = Field(
        title="Calibrate", description="Only `true` frames are calibration requests (the topic also carries others)."
    )
    image: StrictStr = Field(
        min_length=1, title="Image", description="Base64 JPEG or PNG; line breaks (MIME, 76 columns) are allowed."
    )
    id: _Id | None = Field(None, title="Camera id", description="SceneScape's camera id; must match the topic's.")
    timestamp: StrictStr | float | None = Field(None, title="Timestamp", description="Capture time (not used).")
    intrinsics: (
        Annotated[list[Annotated[list[_Finite], Field(min_length=3, max_length=3)]], Field(min_length=3, max_length=3)]
        | None
    ) = Field(None, title="Intrinsics", description="3x3 K; when absent, the camera's from scenes.yaml.")
    distortion: Annotated[list[_Finite], Field(max_length=8)] | None = Field(
        None, title="Distortion", description="OpenCV k1, k2, p1, p2[, k3]; empty or absent means none."
    )
    request_id: _RequestId | None = Field(None, title="Request id", description="Echoed in the reply.")
    scene_id: _Id | None = Field(None, title="Scene id", description="Scene to localize in; default: the camera's.")
    intrinsics_mode: IntrinsicsMode | None = Field(
        None, title="Intrinsics mode",
        description="fixed: intrinsics and distortion are exact; refine: a starting point, focal length and radial "
        "distortion estimated when the matches determine them; estimate: unknown (intrinsics may be absent). "
        "Default: the camera's in scenes.yaml, else refine.",
    )

    def image_bytes(self) -> bytes:
        """The decoded image. Whitespace is dropped first: `base64.encodebytes`, MIME encoders and many HTTP
        bridges break lines every 76 characters, and SceneScape accepts that. Anything else outside the base64
        alphabet raises ValueError (binascii.Error)."""
        return base64.b64decode(self.image.encode("ascii").translate(None, b" \t\r\n"), validate=True)


class RegisterRequest(_Inbound):
    """JSON form of a registration request on `cmd/autocalibration/scene/{scene_id}` (the plain string `register`
    is SceneScape's form and registers the configured dataset when it changed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Literal["register"] = Field(title="Command", description="Always 'register'.")
    dataset: Path | None = Field(
        None, title="Dataset", description="Polycam zip on the service's disk; default: the scene's in scenes.yaml."
    )
    config: SceneConfig | None = Field(None, title="Scene config", description="Default: the scene's in scenes.yaml.")
    force: StrictBool = Field(False, title="Force", description="Register even when dataset and config are unchanged.")
    request_id: _RequestId | None = Field(None, title="Request id", description="Echoed in every status reply.")


class CameraCommand(_Inbound):
    """An operator command on `cmd/autocalibration/camera/{camera_id}`: `forget` drops the camera's calibration
    (re-aimed on purpose); its next frame starts a new one. The plain string `forget` works too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Literal["forget"] = Field(title="Command", description="Always 'forget'.")
    request_id: _RequestId | None = Field(None, title="Request id", description="Echoed in the reply.")


# --- outbound ------------------------------------------------------------------------------------------------


class PoseResult(_Outbound):
    """Reply on `autocalibration/camera/pose/{camera_id}`: SceneScape's fields first, then ours."""

    timestamp: str = Field(title="Timestamp", description="ISO 8601 UTC time of the reply.")
    name: str = Field(title="Name", description="The camera id (SceneScape).")
    camera_id: str = Field(title="Camera id", description="The camera id.")
    error: Literal["True", "False"] = Field(title="Error", description="SceneScape's string flag: 'False' on success.")
    success: bool = Field(title="Success", description="Boolean twin of `error`.")
    quaternion: Annotated[list[float], Field(min_length=4, max_length=4)] | None = Field(
        None, title="Quaternion", description="Camera-to-scene rotation [x, y, z, w], OpenCV camera axes."
    )
    translation: Annotated[list[float], Field(min_length=3, max_length=3)] | None = Field(
        None, title="Translation", description="Camera centre in scene coordinates, metres."
    )
    scale: Annotated[list[float], Field(min_length=3, max_length=3)] | None = Field(
        None, title="Scale", description="Always [1, 1, 1] on success (SceneScape)."
    )
    message: str | None = Field(None, title="Message", description="Human-readable failure.")
    request_id: str | None = Field(None, title="Request id", description="The request's `request_id`, when given.")
    reason: Reason | None = Field(None, title="Reason", description="Machine-readable failure code.")
    num_matches: int = Field(0, ge=0, title="Matches", description="Verified 2D-3D matches.")
    num_inliers: int = Field(0, ge=0, title="Inliers", description="PnP inliers.")
    inlier_ratio: float = Field(0.0, ge=0.0, le=1.0, title="Inlier ratio", description="Inliers / matches.")
    scene_id: str | None = Field(None, title="Scene id", description="Scene localized in.")
    scene_version: str | None = Field(None, title="Scene version", description="Registration version used.")
    timings_ms: dict[str, float] = Field(default_factory=dict, title="Timings", description="Per stage, ms.")
    intrinsics: (
        Annotated[list[Annotated[list[float], Field(min_length=3, max_length=3)]], Field(min_length=3, max_length=3)]
        | None
    ) = Field(None, title="Intrinsics", description="3x3 K of the camera the pose was solved with (COLMAP pixel "
              "convention: the top-left pixel centre is at 0.5, 0.5), or None when no pose was solved.")
    distortion: list[float] | None = Field(None, title="Distortion", description="OpenCV k1, k2, p1, p2[, k3] used.")
    intrinsics_source: IntrinsicsSource | None = Field(
        None, title="Intrinsics source", description="Whether `intrinsics` were given, refined or estimated."
    )
    position_sigma_m: float | None = Field(
        None, ge=0, title="Position sigma", description="1-sigma uncertainty of the camera centre, worst axis, m."
    )
    rotation_sigma_deg: float | None = Field(
        None, ge=0, title="Rotation sigma", description="1-sigma uncertainty of the rotation, worst axis, degrees."
    )
    warnings: list[str] = Field(
        default_factory=list, title="Warnings",
        description="'code: message' strings, e.g. 'intrinsics_mismatch: ...'; empty when there is nothing to say.",
    )
    camera_moved: bool | None = Field(
        None, title="Camera moved",
        description="True when this frame confirmed that the camera moved (a `moved` event was published); false "
        "otherwise; absent when the camera's calibration is not watched.",
    )
    calibration_frames: int | None = Field(
        None, ge=0, title="Calibration frames",
        description="Frames the camera's calibration rests on after this frame (the retained calibration's `frames`).",
    )
    calibration_state: Literal["calibrated", "pending", "lost"] | None = Field(
        None, title="Calibration state",
        description="The calibration's state after this frame: pending when this frame disagreed with it.",
    )
    calibration_points_2d: list[Annotated[list[float], Field(min_length=2, max_length=2)]] | None = Field(
        None, title="Calibration points 2D",
        description="Success: up to 64 inlier pixels spread over the image by farthest-point sampling (x, y; the "
        "top-left pixel's centre is 0, 0), for SceneScape's calibration page. Pairs with calibration_points_3d.",
    )
    calibration_points_3d: list[Annotated[list[float], Field(min_length=3, max_length=3)]] | None = Field(
        None, title="Calibration points 3D",
        description="Success: the scene points (m, scene coordinates) of calibration_points_2d, in the same order.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PoseResult:
        if self.success != (self.error == "False"):
            raise ValueError("error must be 'False' exactly when success is true")
        if self.success and (self.quaternion is None or self.translation is None or self.scale is None):
            raise ValueError("a success carries quaternion, translation and scale")
        if not self.success and (self.message is None or self.reason is None):
            raise ValueError("a failure carries message and reason")
        if len(self.calibration_points_2d or []) != len(self.calibration_points_3d or []):
            raise ValueError("calibration_points_2d and calibration_points_3d pair up: same length")
        return self

    @classmethod
    def failure(
        cls, camera_id: str, reason: Reason, message: str, request_id: str | None = None, **extra: Any
    ) -> PoseResult:
        """A failure reply with SceneScape's flags set."""
        return cls(
            timestamp=utc_now(),
            name=camera_id,
            camera_id=camera_id,
            error="True",
            success=False,
            message=message,
            reason=reason,
            request_id=request_id,
            **extra,
        )

    @classmethod
    def from_result(cls, camera_id: str, result: LocalizationResult, request_id: str | None,
                    timings_ms: dict[str, float], **extra: Any) -> PoseResult:
        """The reply to a localization result: its figures and camera; on failure its reason and message
        (SceneScape's when it has none). `timings_ms` adds the service's stages to the localizer's. A success's
        pose comes in `extra` (`quaternion`, `translation`), as the service places it in the scene."""
        figures: dict[str, Any] = dict(
            num_matches=result.num_matches, num_inliers=result.num_inliers, inlier_ratio=result.inlier_ratio,
            scene_id=result.scene_id, scene_version=result.scene_version,
            timings_ms={**result.timings_ms, **timings_ms}, intrinsics=result.intrinsics,
            distortion=result.distortion, intrinsics_source=result.intrinsics_source,
            position_sigma_m=result.position_sigma_m, rotation_sigma_deg=result.rotation_sigma_deg,
            warnings=result.warnings,
        )
        if not result.success:
            return cls.failure(camera_id, result.reason or Reason.INTERNAL_ERROR,
                               result.message or SCENESCAPE_FAILURE_MESSAGE, request_id, **figures, **extra)
        return cls(timestamp=utc_now(), name=camera_id, camera_id=camera_id, error="False", success=True,
                   scale=[1.0, 1.0, 1.0], request_id=request_id, **figures, **extra)  # SceneScape's constant scale


class RegistrationStatus(_Outbound):
    """Reply on `cmd/autocalibration/scene/{scene_id}`. As in SceneScape, `status` is 'registering', 'busy',
    'success', or on failure the human error text itself (SceneScape's UI shows it as a tooltip); `reason` is set
    exactly on failures."""

    status: str = Field(min_length=1, title="Status", description="registering | busy | success | <error text>.")
    scene_id: str | None = Field(None, title="Scene id", description="The scene concerned (busy: the running one).")
    scene_name: str | None = Field(None, title="Scene name", description="Busy: name of the running scene.")
    scene_version: str | None = Field(None, title="Scene version", description="Success: the version now serving.")
    progress: float | None = Field(None, ge=0.0, le=1.0, title="Progress", description="Registering: 0..1.")
    stage: str | None = Field(None, title="Stage", description="Registering: current stage name.")
    queued: int | None = Field(None, ge=0, title="Queued", description="Busy: requests waiting, this one included.")
    message: str | None = Field(None, title="Message", description="Human-readable detail.")
    reason: Reason | None = Field(None, title="Reason", description="Failure code (absent unless failed).")
    request_id: str | None = Field(None, title="Request id", description="The request's `request_id`, when given.")

    @model_validator(mode="after")
    def _reason_iff_failure(self) -> RegistrationStatus:
        ok = self.status in ("registering", "busy", "success")
        if ok == (self.reason is not None):
            raise ValueError("reason is set exactly when status is an error text")
        return self

    @field_validator("status")
    @classmethod
    def _not_a_request(cls, value: str) -> str:
        # The topic is shared with requests: a reply must never read as one.
        if value == REGISTER:
            raise ValueError("status cannot be the request string 'register'")
        return value


class SceneVersion(_Outbound):
    """Retained on `sys/autocalibration/version/{scene_id}` when a registration commits: every replica (not only
    the one that registered) loads the new version from the shared store at once."""

    scene_id: str = Field(title="Scene id", description="The scene registered.")
    version: str = Field(title="Version", description="The version now current in the store.")


_Vector3 = Annotated[list[float], Field(min_length=3, max_length=3)]


class CameraCalibration(_Outbound):
    """Retained on `autocalibration/camera/calibration/{camera_id}`: the camera's calibration, fused over the frames
    it rests on, in scene coordinates (the scene pose applied, as in pose replies). A scene controller that
    (re)starts gets it at once; an empty retained message means the calibration was forgotten."""

    camera_id: str = Field(title="Camera id", description="The camera.")
    scene_id: str = Field(title="Scene id", description="Scene it was solved in.")
    scene_version: str = Field(title="Scene version", description="Registration version it was solved in.")
    quaternion: Annotated[list[float], Field(min_length=4, max_length=4)] = Field(
        title="Quaternion", description="Camera-to-scene rotation [x, y, z, w], OpenCV camera axes."
    )
    translation: _Vector3 = Field(title="Translation", description="Camera centre in scene coordinates, metres.")
    intrinsics: Annotated[list[_Vector3], Field(min_length=3, max_length=3)] = Field(
        title="Intrinsics", description="3x3 K (COLMAP pixel convention), fused over the frames."
    )
    distortion: list[float] = Field(title="Distortion", description="OpenCV k1, k2, p1, p2[, k3].")
    intrinsics_source: IntrinsicsSource = Field(
        title="Intrinsics source", description="How most of the frames' cameras were obtained."
    )
    position_sigma_m: float = Field(
        ge=0, title="Position sigma", description="1-sigma of the camera centre, worst axis, m: a typical frame's (the "
        "median), never shrunk by the number of frames (frames of one view share the scan's error).",
    )
    rotation_sigma_deg: float = Field(ge=0, title="Rotation sigma", description="1-sigma of the rotation, degrees.")
    frames: int = Field(ge=1, title="Frames", description="Frames this calibration rests on.")
    first_solved_at: str = Field(title="First solved at", description="ISO 8601 UTC time of its first frame.")
    updated_at: str = Field(title="Updated at", description="ISO 8601 UTC time of the last frame that confirmed it.")
    state: Literal["calibrated", "pending", "lost"] = Field(
        title="State", description="calibrated; pending: the last frame disagreed (one more that agrees with it is "
        "a move); lost: the last frames failed to localize (`last_failure` says why).",
    )
    last_failure: Reason | None = Field(None, title="Last failure", description="Reason of the last failed frame.")
    revision: int = Field(ge=0, title="Revision", description="Grows with every change: drop an older message.")


class CalibrationEvent(_Outbound):
    """On `autocalibration/camera/event/{camera_id}` (not retained)."""

    event: Literal["calibrated", "moved", "lost", "recalibrated"] = Field(
        title="Event", description="calibrated: first calibration; moved: two frames in a row agreed on another pose; "
        "lost: frames stopped localizing; recalibrated: re-solved after the scene was registered again.",
    )
    camera_id: str = Field(title="Camera id", description="The camera.")
    scene_id: str = Field(title="Scene id", description="Scene of the calibration.")
    scene_version: str = Field(title="Scene version", description="Registration version of the calibration.")
    timestamp: str = Field(title="Timestamp", description="ISO 8601 UTC time of the frame that raised it.")
    frames: int = Field(ge=0, title="Frames", description="Frames the (new) calibration rests on.")
    displacement_m: float | None = Field(
        None, ge=0, title="Displacement", description="moved, recalibrated: camera-centre distance, old to new, m."
    )
    rotation_deg: float | None = Field(
        None, ge=0, title="Rotation", description="moved, recalibrated: rotation angle, old to new, degrees."
    )
    reason: Reason | None = Field(None, title="Reason", description="lost: why the last frame failed.")
    message: str | None = Field(None, title="Message", description="lost: the failure's message.")


class CameraCommandStatus(_Outbound):
    """Reply on `cmd/autocalibration/camera/{camera_id}`: `status` is 'forgotten' (there was a calibration),
    'unknown' (there was none) or the error text; `reason` is set exactly on failures."""

    status: str = Field(min_length=1, title="Status", description="forgotten | unknown | <error text>.")
    camera_id: str = Field(title="Camera id", description="The camera.")
    reason: Reason | None = Field(None, title="Reason", description="Failure code (absent unless failed).")
    request_id: str | None = Field(None, title="Request id", description="The command's `request_id`, when given.")

    @model_validator(mode="after")
    def _reason_iff_failure(self) -> CameraCommandStatus:
        if (self.status in ("forgotten", "unknown")) == (self.reason is not None):
            raise ValueError("reason is set exactly when status is an error text")
        return self


# --- JSON Schemas ----------------------------------------------------------------------------------------------

SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "CalibrationFrame": CalibrationFrame,
    "RegisterRequest": RegisterRequest,
    "PoseResult": PoseResult,
    "RegistrationStatus": RegistrationStatus,
    "SceneVersion": SceneVersion,
    "CameraCommand": CameraCommand,
    "CameraCalibration": CameraCalibration,
    "CalibrationEvent": CalibrationEvent,
    "CameraCommandStatus": CameraCommandStatus,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every payload model (inbound in validation mode, outbound in serialization mode)."""
    out: dict[str, dict[str, Any]] = {}
    for name, model in SCHEMA_MODELS.items():
        mode = "serialization" if issubclass(model, _Outbound) else "validation"
        out[name] = model.model_json_schema(mode=mode)
    return out

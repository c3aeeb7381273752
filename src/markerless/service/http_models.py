"""Every payload of the HTTP front door (SceneScape's REST v1 and its Socket.IO events), as pydantic models.

Field names are SceneScape's where it has them (`cameraId`, `sceneId`, `status`, `message`, `quaternion`,
`translation`, `calibration_points_2d/3d`, errors `{"code", "message"}`); what markerless adds is optional, and the
full MQTT pose reply rides along as `details` (SceneScape's own markerless result did the same). The OpenAPI
document (docs/openapi.yaml) is generated from the app built on these models (http_api.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from markerless.errors import Reason
from markerless.pipeline.intrinsics_mode import IntrinsicsMode
from markerless.service.messages import CalibrationFrame, PoseResult, RegistrationStatus

ID_PATTERN = r"^[a-zA-Z0-9\-_.]+$"  # SceneScape's REST id rule, 1..255 characters
ID_MAX = 255

_Finite = Annotated[float, Field(allow_inf_nan=False)]
_Row = Annotated[list[_Finite], Field(min_length=3, max_length=3)]
_Matrix3 = Annotated[list[_Row], Field(min_length=3, max_length=3)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorBody(_Model):
    """Every error: SceneScape's `{code, message}`, plus markerless's machine-readable reason when it has one."""

    code: int = Field(title="Code", description="The HTTP status code.")
    message: str = Field(title="Message", description="What is wrong, naming the field or id at fault.")
    reason: Reason | None = Field(None, title="Reason", description="markerless's failure code, when it has one.")


class ServiceStatus(_Model):
    status: Literal["running", "error"] = Field(
        title="Status", description="'running' while the worker takes requests; 'error' when stalled or stopping."
    )
    version: str = Field(title="Version", description="markerless version.")


class PinholeIntrinsics(_Model):
    """Intrinsics as parameters (what SceneScape's camera records hold), in the 3x3 matrix's pixel convention."""

    fx: _Finite = Field(gt=0, title="fx", description="Focal length along x, pixels.")
    fy: _Finite = Field(gt=0, title="fy", description="Focal length along y, pixels.")
    cx: _Finite = Field(title="cx", description="Principal point x, pixels.")
    cy: _Finite = Field(title="cy", description="Principal point y, pixels.")

    def matrix(self) -> list[list[float]]:
        return [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]]


class CalibrationBody(_Model):
    """`POST /v1/cameras/{cameraId}/calibration`: SceneScape's `image` and optional `intrinsics`, plus the MQTT
    frame's optional fields. Unknown fields are refused (400), so a typo is not silently ignored."""

    image: StrictStr = Field(
        min_length=1, title="Image", description="Base64 JPEG or PNG; line breaks (MIME, 76 columns) are allowed."
    )
    intrinsics: _Matrix3 | PinholeIntrinsics | None = Field(
        None, title="Intrinsics",
        description="3x3 K (COLMAP pixel convention, as on MQTT) or {fx, fy, cx, cy}; absent: the camera's in "
        "scenes.yaml.",
    )
    distortion: Annotated[list[_Finite], Field(max_length=8)] | None = Field(
        None, title="Distortion", description="OpenCV k1, k2, p1, p2[, k3]; absent: the camera's in scenes.yaml."
    )
    intrinsics_mode: IntrinsicsMode | None = Field(
        None, title="Intrinsics mode", description="As on MQTT; default: the camera's in scenes.yaml, else refine."
    )
    request_id: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = Field(
        None, title="Request id", description="Echoed in the result; default: one is made up."
    )

    def frame(self, request_id: str) -> CalibrationFrame:
        """The same request as an MQTT frame, so both front doors resolve it alike."""
        intrinsics = self.intrinsics.matrix() if isinstance(self.intrinsics, PinholeIntrinsics) else self.intrinsics
        return CalibrationFrame(calibrate=True, image=self.image, intrinsics=intrinsics, distortion=self.distortion,
                                intrinsics_mode=self.intrinsics_mode, request_id=request_id)


CalibrationStatus = Literal["calibrating", "success", "error", "not_started"]


class CalibrationState(_Model):
    """A camera's latest HTTP calibration: `calibrating` from acceptance to its one result, then `success` or
    `error` (with `reason` and `message`); `not_started` before any."""

    cameraId: str = Field(title="Camera id", description="The camera.")
    sceneId: str | None = Field(None, title="Scene id", description="The scene it was localized in.")
    status: CalibrationStatus = Field(title="Status", description="calibrating | success | error | not_started.")
    message: str = Field(title="Message", description="Human-readable state or failure.")
    reason: Reason | None = Field(None, title="Reason", description="Failure code (error only).")
    request_id: str | None = Field(None, title="Request id", description="The request this state is about.")
    quaternion: list[float] | None = Field(
        None, title="Quaternion", description="Success: camera-to-scene rotation [x, y, z, w], OpenCV camera axes."
    )
    translation: list[float] | None = Field(
        None, title="Translation", description="Success: camera centre in scene coordinates, metres."
    )
    calibration_points_2d: list[list[float]] | None = Field(
        None, title="Calibration points 2D", description="Success: as in the MQTT pose reply (pairs with _3d)."
    )
    calibration_points_3d: list[list[float]] | None = Field(
        None, title="Calibration points 3D", description="Success: as in the MQTT pose reply."
    )
    details: PoseResult | None = Field(
        None, title="Details", description="The full pose reply, as MQTT carries it (sigmas, camera used, warnings)."
    )

    @classmethod
    def of(cls, result: PoseResult) -> CalibrationState:
        """The final state carrying `result`."""
        return cls(cameraId=result.camera_id, sceneId=result.scene_id, status="success" if result.success else "error",
                   message=result.message or "Calibration succeeded", reason=result.reason,
                   request_id=result.request_id, quaternion=result.quaternion, translation=result.translation,
                   calibration_points_2d=result.calibration_points_2d,
                   calibration_points_3d=result.calibration_points_3d, details=result)


RegistrationStatusValue = Literal["registering", "busy", "success", "error", "not_started"]


class RegistrationState(_Model):
    """A scene's latest registration status (from either front door): `registering` / `busy` (queued behind
    another scene) until `success` or `error`; `not_started` for a configured scene never registered."""

    sceneId: str = Field(title="Scene id", description="The scene.")
    status: RegistrationStatusValue = Field(title="Status", description="registering | busy | success | error.")
    message: str | None = Field(None, title="Message", description="Human-readable detail or failure.")
    reason: Reason | None = Field(None, title="Reason", description="Failure code (error only).")
    progress: float | None = Field(None, ge=0.0, le=1.0, title="Progress", description="Registering: 0..1.")
    stage: str | None = Field(None, title="Stage", description="Registering: current stage.")
    scene_version: str | None = Field(None, title="Scene version", description="Success: the version serving.")
    request_id: str | None = Field(None, title="Request id", description="The registration this is about.")

    @classmethod
    def of(cls, scene_id: str, status: RegistrationStatus) -> RegistrationState:
        """The HTTP form of a status the registrar published (its error text becomes `message`)."""
        failed = status.reason is not None
        return cls(sceneId=scene_id, status="error" if failed else status.status,  # type: ignore[arg-type]
                   message=status.status if failed else status.message, reason=status.reason,
                   progress=status.progress, stage=status.stage, scene_version=status.scene_version,
                   request_id=status.request_id)


# --- Socket.IO (/v1/socket.io): SceneScape's events --------------------------------------------------------------


class ServiceReady(_Model):
    """Pushed to each client on connect."""

    status: Literal["running", "error"] = Field(title="Status", description="As GET /v1/status.")
    version: str = Field(title="Version", description="markerless version.")


class RegisterScene(_Model):
    """Client event `register_scene`: receive this scene's `register_result` pushes."""

    scene_id: str = Field(min_length=1, max_length=ID_MAX, pattern=ID_PATTERN, title="Scene id")


class RegisterCamera(_Model):
    """Client event `register_camera`: receive this camera's `calibration_result` pushes."""

    camera_id: str = Field(min_length=1, max_length=ID_MAX, pattern=ID_PATTERN, title="Camera id")


class RegisterResult(_Model):
    """Pushed `register_result`: a scene's registration status changed."""

    scene_id: str = Field(title="Scene id")
    data: RegistrationState = Field(title="Data")


class CalibrationResult(_Model):
    """Pushed `calibration_result`: a camera's HTTP calibration finished."""

    camera_id: str = Field(title="Camera id")
    result: CalibrationState = Field(title="Result")


SOCKET_EVENTS: dict[str, type[BaseModel]] = {
    "service_ready": ServiceReady,
    "register_scene": RegisterScene,
    "register_camera": RegisterCamera,
    "register_result": RegisterResult,
    "calibration_result": CalibrationResult,
}

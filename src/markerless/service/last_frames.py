"""Each camera's last frames as the worker finished them, from either front door (MQTT or HTTP): what the console
shows, what an overlay is drawn from, and what Recalibrate runs again.

Per camera it keeps the attempt of its current calibration (the last success: a later failure does not undo a
calibration, as in SceneScape) and, when a newer attempt failed, that one too (its reason for the console, its
frame for Recalibrate); a success drops the failed one. Frames are kept as the bytes that came in (JPEG or PNG,
decoded again only to draw an overlay), so memory is at most two received frames per camera, for at most the
cameras of scenes.yaml plus `extra` others (frames naming their scene), the least recently seen dropped first.
Written by the worker thread, read by the HTTP threads.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from markerless.service.requests import CalibrationRequest

if TYPE_CHECKING:
    from markerless.pipeline.localization import LocalizationResult

EXTRA_CAMERAS = 64  # cameras outside scenes.yaml remembered at once


@dataclass(frozen=True)
class Attempt:
    """One frame the worker finished: the request as resolved, and its outcome."""

    seq: int  # increasing, unique in this process: the attempt's id (an overlay is drawn once per attempt)
    camera_id: str
    scene_id: str
    request_id: str | None
    origin: str  # "mqtt" or "http"
    at: datetime  # when the worker finished it (UTC)
    image: bytes
    intrinsics: list[list[float]] | None
    distortion: list[float]
    intrinsics_mode: str
    width: int | None  # the decoded frame's size (None: it failed before it was decoded)
    height: int | None
    result: LocalizationResult | None  # None: it failed before localization (timeout, scene, image)
    reason: str | None  # of a failure
    message: str

    @property
    def success(self) -> bool:
        return self.result is not None and self.result.success


@dataclass(frozen=True)
class CameraFrames:
    """A camera's current calibration (None: never calibrated) and a newer failed attempt (None: none)."""

    calibrated: Attempt | None
    failed: Attempt | None

    @property
    def latest(self) -> Attempt:
        latest = self.failed or self.calibrated
        assert latest is not None  # a CameraFrames exists only once an attempt was recorded
        return latest


class LastFrames:
    """The registry; `known` are the cameras of scenes.yaml (never dropped)."""

    def __init__(self, known: frozenset[str] = frozenset(), extra: int = EXTRA_CAMERAS) -> None:
        self._known = known
        self._extra = extra
        self._cameras: OrderedDict[str, CameraFrames] = OrderedDict()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    def localized(self, request: CalibrationRequest, result: LocalizationResult, width: int, height: int) -> None:
        """The localizer's outcome for `request` (success or a failed gate)."""
        self._record(request, width, height, result, None if result.success else str(result.reason),
                     result.message)

    def failed(self, request: CalibrationRequest, reason: str, message: str) -> None:
        """`request` failed before the localizer answered it (timeout, unregistered scene, bad image, a bug)."""
        self._record(request, None, None, None, str(reason), message)

    def get(self, camera_id: str) -> CameraFrames | None:
        with self._lock:
            return self._cameras.get(camera_id)

    def camera_ids(self) -> list[str]:
        with self._lock:
            return list(self._cameras)

    def _record(self, request: CalibrationRequest, width: int | None, height: int | None,
                result: LocalizationResult | None, reason: str | None, message: str) -> None:
        attempt = Attempt(next(self._seq), request.camera_id, request.scene_id, request.request_id, request.origin,
                          datetime.now(UTC), request.image, request.intrinsics, list(request.distortion),
                          request.intrinsics_mode, width, height, result, reason, message)
        with self._lock:
            held = self._cameras.pop(attempt.camera_id, None)
            calibrated = held.calibrated if held else None
            self._cameras[attempt.camera_id] = (CameraFrames(attempt, None) if attempt.success
                                                else CameraFrames(calibrated, attempt))
            others = [c for c in self._cameras if c not in self._known]
            for camera_id in others[:max(0, len(others) - self._extra)]:  # least recently seen first
                del self._cameras[camera_id]

"""What the HTTP front door remembers between a request and its polls: each camera's latest calibration and each
scene's latest registration status, and the Socket.IO pushes when they change.

SceneScape's REST calibration is asynchronous: POST answers 202 `calibrating`, the client polls GET (or listens on
Socket.IO) for `success` / `error`. A POST becomes a `CalibrationRequest` whose reply sink is this board: the
worker's one reply per request lands here (on the worker's thread) under the camera's current ticket, so a reply
to a request superseded by a newer POST of the camera never overwrites the newer one's state. Registration
statuses come from the registrar's listener, whichever front door started the registration.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

from markerless.service.http_models import CalibrationResult, CalibrationState, RegisterResult, RegistrationState
from markerless.service.messages import PoseResult, RegistrationStatus

Push = Callable[[str, dict[str, Any], str], None]  # (event, data, room), thread-safe


def camera_room(camera_id: str) -> str:
    return f"camera:{camera_id}"


def scene_room(scene_id: str) -> str:
    return f"scene:{scene_id}"


class HttpResults:
    """Latest calibration per camera and registration per scene; `push` sends Socket.IO events (set by the server
    once its loop runs; until then nothing is pushed, as nobody can be connected)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calibrations: dict[str, tuple[str, CalibrationState]] = {}  # camera -> (ticket, state)
        self._registrations: dict[str, RegistrationState] = {}
        self.push: Push | None = None

    # -- calibrations ---------------------------------------------------------------------------------------------
    def calibrating(self, camera_id: str, scene_id: str, request_id: str) -> tuple[str, CalibrationState]:
        """A request accepted for `camera_id`: its ticket and its `calibrating` state (now the camera's)."""
        ticket = uuid.uuid4().hex
        state = CalibrationState(cameraId=camera_id, sceneId=scene_id, status="calibrating",
                                 message="Calibration started", request_id=request_id)
        with self._lock:
            self._calibrations[camera_id] = (ticket, state)
        return ticket, state

    def withdraw(self, camera_id: str, ticket: str) -> None:
        """The request of `ticket` was refused after all (queue full, stopping): forget its `calibrating`."""
        with self._lock:
            if self._calibrations.get(camera_id, ("",))[0] == ticket:
                del self._calibrations[camera_id]

    def sink(self, camera_id: str, ticket: str) -> Callable[[PoseResult], None]:
        """Where the worker's reply to the request of `ticket` goes."""

        def deliver(result: PoseResult) -> None:
            state = CalibrationState.of(result)
            with self._lock:
                if self._calibrations.get(camera_id, ("",))[0] != ticket:
                    return  # superseded by a newer request of this camera: its state stays
                self._calibrations[camera_id] = (ticket, state)
            self._send("calibration_result", CalibrationResult(camera_id=camera_id, result=state).model_dump(
                mode="json", exclude_none=True), camera_room(camera_id))

        return deliver

    def calibration(self, camera_id: str) -> CalibrationState | None:
        with self._lock:
            held = self._calibrations.get(camera_id)
        return held[1] if held else None

    # -- registrations --------------------------------------------------------------------------------------------
    def registration_status(self, scene_id: str, status: RegistrationStatus) -> None:
        """The registrar's listener: every status of every scene, from either front door."""
        state = RegistrationState.of(scene_id, status)
        with self._lock:
            self._registrations[scene_id] = state
        self._send("register_result", RegisterResult(scene_id=scene_id, data=state).model_dump(
            mode="json", exclude_none=True), scene_room(scene_id))

    def registering(self, scene_id: str, request_id: str) -> RegistrationState:
        """A registration accepted over HTTP: `registering` until the registrar says more."""
        state = RegistrationState(sceneId=scene_id, status="registering", message="Registration started",
                                  request_id=request_id)
        with self._lock:
            held = self._registrations.get(scene_id)
            if held is not None and held.request_id == request_id:
                return held  # the registrar already reported on it (busy: queued behind another scene)
            self._registrations[scene_id] = state
        return state

    def registration(self, scene_id: str) -> RegistrationState | None:
        with self._lock:
            return self._registrations.get(scene_id)

    def _send(self, event: str, data: dict[str, Any], room: str) -> None:
        push = self.push
        if push is not None:
            push(event, data, room)

"""The dispatcher, on paho's network thread: parse topic and payload, validate, route, refuse.

It never decodes images or touches models, so heartbeats and keepalives never wait on vision: a valid frame
becomes a `CalibrationRequest` in the worker's queue, a valid register or update command a `RegistrationJob` for
the registrar, and anything invalid is answered at once with a reason.

Every route gets the message's `ack` and must see it called exactly when the message is dealt with: at once for
what needs no reply, on delivery of the reply otherwise (`Replies.refuse`, `Replies.reply`,
`Registrar.status_error`, or by the registrar once the job is journaled).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
from pydantic import ValidationError

from markerless.errors import Reason
from markerless.scene.config import SceneConfig
from markerless.service.messages import (
    FORGET,
    IS_ALIVE,
    REGISTER,
    RUNNING,
    UPDATE,
    CalibrationFrame,
    CameraCommand,
    CameraCommandStatus,
    RegisterRequest,
    dumps,
)
from markerless.service.registrar import Registrar, RegistrationJob
from markerless.service.replies import Replies
from markerless.service.requests import CalibrationRequest, Refusal, RequestQueue, resolve_frame
from markerless.service.scenes_file import ScenesFile
from markerless.service.settings import Settings
from markerless.service.topics import TopicKind, TopicRef, Topics
from markerless.service.transport import Ack, MqttTransport
from markerless.service.watch import CalibrationWatch
from markerless.service.watchdog import Watchdog
from markerless.service.worker import Worker

log = logging.getLogger(__name__)


class Dispatcher:
    """Routes each received message by its parsed topic (`on_message` is the transport's handler)."""

    def __init__(self, settings: Settings, scenes: ScenesFile, topics: Topics, transport: MqttTransport,
                 queue: RequestQueue, replies: Replies, registrar: Registrar, worker: Worker, watchdog: Watchdog,
                 clock: Callable[[], float], watch: CalibrationWatch | None = None) -> None:
        self.settings = settings
        self._scenes = scenes
        self._topics = topics
        self._transport = transport
        self._queue = queue
        self._replies = replies
        self._registrar = registrar
        self._worker = worker
        self._watchdog = watchdog
        self._clock = clock
        self._watch = watch
        self._routes = {
            TopicKind.CALIBRATION_FRAME: self._on_frame,
            TopicKind.REGISTER_SCENE: self._on_register,
            TopicKind.SCENE_UPDATE: self._on_update,
            TopicKind.STATUS: self._on_status,
            TopicKind.SCENE_VERSION: self._on_scene_version,
            TopicKind.CAMERA_COMMAND: self._on_camera_command,
        }

    def on_message(self, topic: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        ref = self._topics.parse(topic)
        if ref is None:
            log.warning("ignoring a message on %r: not a topic of ours", topic[:300])
            return ack()
        if not ref.valid:
            return self._on_bad_id(ref, payload, ack)
        self._routes[ref.kind](ref.id, payload, duplicate, ack)

    def _on_bad_id(self, ref: TopicRef, payload: bytes, ack: Ack) -> None:
        """A request whose id cannot be one topic level (`a/b`, reaching us through the `#` subscriptions): refused
        on the topic matching the one it came on, so its sender hears why."""
        why = (f"{ref.id[:300]!r} is not a usable id: it must be one topic level (no '/', '+', '#' or control "
               "characters, 1 to 255 characters)")
        try:
            data = orjson.loads(payload) if len(payload) <= self.settings.worker.max_payload_bytes else None
        except orjson.JSONDecodeError:
            data = None
        if ref.kind is TopicKind.SCENE_VERSION or (ref.kind is TopicKind.REGISTER_SCENE and _is_status(data)):
            return ack()  # not a request (a version announcement), or our own refusal echoed back
        raw_id = data.get("request_id") if isinstance(data, dict) else None
        request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 128 else None
        topic = self._topics.reply_to(ref)
        if ref.kind is TopicKind.CAMERA_COMMAND:
            if isinstance(data, dict) and "status" in data and "command" not in data:
                return ack()  # our own refusal, echoed back by the topic
            reply = CameraCommandStatus(status=f"camera id {why}", camera_id=ref.id, reason=Reason.BAD_REQUEST,
                                        request_id=request_id)
            return self._transport.publish(topic, dumps(reply), on_delivered=ack)
        if ref.kind is TopicKind.CALIBRATION_FRAME:
            return self._replies.refuse(ref.id, request_id, Reason.BAD_REQUEST, f"camera id {why}", ack, topic=topic)
        self._registrar.status_error(ref.id, Reason.BAD_SCENE_ID, f"scene id {why}", request_id=request_id, ack=ack,
                                     topic=topic)

    # -- heartbeat and scene versions ----------------------------------------------------------------------------
    def _on_status(self, _: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        ack()
        if payload == IS_ALIVE.encode() and self._watchdog.alive:
            self._transport.publish(self._topics.status, RUNNING)
        # a stalled worker gets no `running`; anything else (our own `running` included) is not addressed to us

    def _on_scene_version(self, scene_id: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        ack()
        self._worker.announce(scene_id)

    # -- calibration frames ----------------------------------------------------------------------------------------
    def _on_frame(self, camera_id: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        request_id: str | None = None
        key = (camera_id, "sha256:" + hashlib.sha256(payload).hexdigest())
        if duplicate and self._replies.redelivered(key, ack):
            return log.info("redelivered frame of %s (%s) already accepted: not handled twice", camera_id, key[1])
        refused = self._replies.settle(key, ack)  # a refusal is an answer too: remembered, then acknowledged
        refuse = self._replies.refuse
        try:
            if len(payload) > self.settings.worker.max_payload_bytes:
                return refuse(camera_id, None, Reason.TOO_LARGE, f"frame of {len(payload)} bytes exceeds "
                              f"worker.max_payload_bytes={self.settings.worker.max_payload_bytes}", refused)
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                return refuse(camera_id, None, Reason.BAD_REQUEST, f"frame is not UTF-8 JSON: {exc}", refused)
            if not isinstance(data, dict):
                return refuse(camera_id, None, Reason.BAD_REQUEST,
                              f"frame must be a JSON object, got {type(data).__name__}", refused)
            raw_id = data.get("request_id")
            request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 128 else None
            if data.get("calibrate") is None or data.get("calibrate") is False:
                ack()  # not a request: nothing to answer
                return log.debug("frame of %s without calibrate: true: not a calibration request", camera_id)
            try:
                frame = CalibrationFrame.model_validate(data)
            except ValidationError as exc:
                return refuse(camera_id, request_id, *_validation_failure(exc), refused)
            self._accept(camera_id, frame, key, ack, refused)
        except Exception:  # noqa: BLE001 - never die of a message: reply and log the traceback
            log.exception("internal error handling a frame of camera %s", camera_id)
            refuse(camera_id, request_id, Reason.INTERNAL_ERROR, "internal error (see the service log)", refused)

    def _accept(self, camera_id: str, frame: CalibrationFrame, key: tuple[str, str], ack: Ack,
                refused: Callable[[], None]) -> None:
        rid = frame.request_id
        try:
            resolved = resolve_frame(camera_id, frame, self._scenes)
        except Refusal as exc:
            return self._replies.refuse(camera_id, rid, exc.reason, exc.message, refused)
        now = self._clock()
        request = CalibrationRequest(camera_id, resolved.scene_id, resolved.image, resolved.intrinsics,
                                     resolved.distortion, resolved.intrinsics_mode, rid, now,
                                     now + self.settings.worker.deadline_s, key, acks=[ack])
        self._replies.track(request)
        refusal, superseded = self._queue.put(request)
        if superseded is not None:
            self._replies.reply_failure(superseded, Reason.SUPERSEDED,
                                        "a newer frame from this camera replaced this one")
        if refusal == Reason.OVERLOADED:
            self._replies.reply_failure(request, refusal, f"calibration queue full ({self.settings.worker.queue_size})")
        elif refusal is not None:
            self._replies.reply_failure(request, refusal, "the service is stopping")

    # -- registration commands -----------------------------------------------------------------------------------
    def _on_register(self, scene_id: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        status_error = self._registrar.status_error
        try:
            if payload == REGISTER.encode():
                return self._register_configured(scene_id, force=False, request_id=None, ack=ack)
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return status_error(scene_id, Reason.BAD_REQUEST,
                                    "Unrecognized request: send 'register' or a JSON register request", ack=ack)
            if _is_status(data):
                return ack()  # a status reply (ours, echoed back by the shared topic)
            try:
                request = RegisterRequest.model_validate(data)
            except ValidationError as exc:
                rid = data.get("request_id") if isinstance(data, dict) else None
                _, message = _validation_failure(exc)
                return status_error(scene_id, Reason.BAD_REQUEST, message, ack=ack,
                                    request_id=rid if isinstance(rid, str) and len(rid) <= 128 else None)
            self._register_request(scene_id, request, ack)
        except Exception:  # noqa: BLE001
            log.exception("internal error handling a register request for %s", scene_id)
            status_error(scene_id, Reason.INTERNAL_ERROR, "internal error (see the service log)", ack=ack)

    def _on_update(self, scene_id: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        status_error = self._registrar.status_error
        try:
            if payload != UPDATE.encode():
                return status_error(scene_id, Reason.BAD_REQUEST, f"Unrecognized scene update: expected {UPDATE!r}",
                                    ack=ack)
            self._register_configured(scene_id, force=False, request_id=None, ack=ack)
        except Exception:  # noqa: BLE001
            log.exception("internal error handling an update for %s", scene_id)
            status_error(scene_id, Reason.INTERNAL_ERROR, "internal error (see the service log)", ack=ack)

    # -- camera commands -----------------------------------------------------------------------------------------
    def _on_camera_command(self, camera_id: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        """`forget` (plain or JSON): drop the camera's calibration. Done on a thread of its own: it takes the
        camera's lock in the store, which the worker may hold while it waits for the network thread."""
        request_id: str | None = None
        try:
            if payload != FORGET.encode():
                try:
                    data = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    return self._camera_reply(camera_id, "Unrecognized command: send 'forget' or "
                                              '{"command": "forget"}', Reason.BAD_REQUEST, None, ack)
                if isinstance(data, dict) and "status" in data and "command" not in data:
                    return ack()  # a status reply (ours, echoed back by the topic)
                raw_id = data.get("request_id") if isinstance(data, dict) else None
                request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 128 else None
                try:
                    request_id = CameraCommand.model_validate(data).request_id
                except ValidationError as exc:
                    return self._camera_reply(camera_id, _validation_failure(exc)[1] + " (send 'forget' or "
                                              '{"command": "forget"})', Reason.BAD_REQUEST, request_id, ack)
            if self._watch is None:
                return self._camera_reply(camera_id, "calibrations are not kept by this service",
                                          Reason.BAD_REQUEST, request_id, ack)
            watch, rid = self._watch, request_id

            def forget() -> None:
                try:
                    status = "forgotten" if watch.forget(camera_id) else "unknown"
                    self._camera_reply(camera_id, status, None, rid, ack)
                except Exception:  # noqa: BLE001
                    log.exception("internal error forgetting camera %s", camera_id)
                    self._camera_reply(camera_id, "internal error (see the service log)", Reason.INTERNAL_ERROR,
                                       rid, ack)

            threading.Thread(target=forget, name="markerless-forget", daemon=True).start()
        except Exception:  # noqa: BLE001
            log.exception("internal error handling a command for camera %s", camera_id)
            self._camera_reply(camera_id, "internal error (see the service log)", Reason.INTERNAL_ERROR, request_id,
                               ack)

    def _camera_reply(self, camera_id: str, status: str, reason: Reason | None, request_id: str | None,
                      ack: Ack) -> None:
        log.info("camera %s: command: %s", camera_id, status)
        reply = CameraCommandStatus(status=status, camera_id=camera_id, reason=reason, request_id=request_id)
        self._transport.publish(self._topics.camera_command(camera_id), dumps(reply), on_delivered=ack)

    def _register_configured(self, scene_id: str, force: bool, request_id: str | None, ack: Ack) -> None:
        self._registrar.submit(RegistrationJob.configured(self._scenes, scene_id, force, request_id), ack)

    def _register_request(self, scene_id: str, request: RegisterRequest, ack: Ack) -> None:
        entry = self._scenes.scenes.get(scene_id)
        dataset = request.dataset or (entry.dataset if entry else None)
        rid = request.request_id
        if dataset is None:
            return self._registrar.status_error(
                scene_id, Reason.SCENE_NOT_FOUND, f"Polycam zip file not found: scene {scene_id!r} has no dataset "
                "in scenes.yaml and the request names none", request_id=rid, ack=ack)
        if request.dataset is not None and not self._dataset_allowed(request.dataset, entry.dataset if entry else None):
            return self._registrar.status_error(
                scene_id, Reason.FORBIDDEN_PATH, f"dataset {str(request.dataset)!r} is outside "
                "registration.dataset_dirs", request_id=rid, ack=ack)
        config = request.config or (entry.config if entry else SceneConfig())
        self._registrar.submit(RegistrationJob(scene_id, dataset, config, request.force, rid), ack)

    def _dataset_allowed(self, dataset: Path, configured: Path | None) -> bool:
        path = dataset.resolve()
        if configured is not None and path == configured.resolve():
            return True
        return any(path.is_relative_to(d.resolve()) for d in self.settings.registration.dataset_dirs)


def _is_status(data: object) -> bool:
    """A registration status (ours, echoed back: requests and replies share the register topic), not a request."""
    return isinstance(data, dict) and "status" in data and "command" not in data


def _validation_failure(exc: ValidationError) -> tuple[Reason, str]:
    """(reason, message) of a payload validation error; intrinsics problems get their own reason."""
    errors = exc.errors(include_url=False)
    fields = {str(e["loc"][0]) for e in errors if e["loc"]}
    reason = Reason.BAD_INTRINSICS if fields and fields <= {"intrinsics", "distortion"} else Reason.BAD_REQUEST
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in itertools.islice(errors, 5)]
    return reason, "invalid request: " + "; ".join(parts)

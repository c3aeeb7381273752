"""The long-running service: dispatcher (MQTT thread), calibration worker, background registration.

Threads and ownership:
- paho's network thread runs `Daemon._on_message`: it only parses, validates and enqueues (or replies at once to
  a bad request). It never decodes images or touches models, so heartbeats and keepalives never wait on vision.
- The worker thread owns `FeatureModels`, the `Localizer` and the scene cache. It takes requests from a bounded
  queue where a newer frame of a camera replaces its queued older one (which gets `superseded`) and a request
  past its deadline gets `timeout`. It reloads a scene when the store reports a new version, so a re-registration
  is picked up between two requests and the old version serves until the swap.
- The registration thread runs one registration at a time with its own models; later requests get `busy` and
  wait in its queue (SceneScape dropped them). The store swaps versions atomically, so a crash keeps the old one.
  A file lock per scene in the store keeps replicas sharing the store from registering one scene twice; a commit
  is announced on a retained topic so every replica reloads the new version at once.
- The watchdog thread marks the worker stalled (no `running` heartbeat, availability `stalled`, metric 0) when it
  has not come back for a request within `worker.stall_s`.

Every accepted calibration request gets exactly one reply on its camera's pose topic; every registration request
gets exactly one terminal status (success or error) after any `busy` / `registering` / progress messages.
A request is acknowledged to the broker only once its reply has been delivered, so the broker redelivers what a
crash left unanswered; redeliveries of answered requests (by camera and payload digest, remembered across
restarts in the state directory) are acknowledged without a second reply. Registrations accepted but unfinished when the
service died are reported `interrupted` at the next start.
"""

from __future__ import annotations

import binascii
import fcntl
import hashlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from markerless.errors import MarkerlessError, Reason, SceneOutdatedError
from markerless.scene.config import SceneConfig
from markerless.service.messages import (
    IS_ALIVE,
    ONLINE,
    REGISTER,
    RUNNING,
    SCENESCAPE_FAILURE_MESSAGE,
    STALLED,
    UPDATE,
    CalibrationFrame,
    PoseResult,
    RegisterRequest,
    RegistrationStatus,
    SceneVersion,
    dumps,
    utc_now,
)
from markerless.service.metrics import Metrics
from markerless.service.settings import ScenePose, ScenesFile, Settings
from markerless.service.state import AnsweredLog, JournalEntry, RegistrationJournal, client_state_dir
from markerless.service.topics import TopicKind, Topics
from markerless.service.transport import Ack, MqttTransport

log = logging.getLogger(__name__)

_ANSWERED_KEPT = 4096  # (camera, payload digest) pairs remembered to drop redeliveries of answered frames
_SCALE = [1.0, 1.0, 1.0]  # SceneScape's constant `scale`


@dataclass(frozen=True)
class Backend:
    """The vision core as the daemon calls it. `Backend.real` wires the real one; tests may swap parts of it."""

    store: Any  # SceneStore: info(scene_id), load(scene_id), scene_ids()
    new_models: Callable[[], Any]  # FeatureModels, built on the thread that will use them
    new_localizer: Callable[[Any], Any]  # Localizer(models)
    decode_image: Callable[[bytes], Any]  # bytes -> HxWx3 uint8 RGB, raises BadImageError
    make_camera: Callable[[Sequence[Sequence[float]], int, int, Sequence[float]], Any]  # raises BadIntrinsicsError
    register_scene: Callable[..., Any]  # (store, scene_id, dataset, config, models, progress) -> SceneInfo
    needs_registration: Callable[[Any, str, Path, SceneConfig], bool]

    @classmethod
    def real(cls, settings: Settings) -> Backend:
        """The real core (imports torch/pycolmap, hence not at module import)."""
        from markerless.pipeline.features import FeatureModels
        from markerless.pipeline.image_decoding import decode_image
        from markerless.pipeline.localization import Localizer
        from markerless.pipeline.registration import needs_registration, register_scene
        from markerless.scene.camera import Camera
        from markerless.scene.store import SceneStore

        return cls(
            store=SceneStore(settings.store.root),
            new_models=lambda: FeatureModels(device=settings.worker.device, weights_dir=settings.worker.weights_dir),
            new_localizer=lambda models: Localizer(models, settings.localization),
            decode_image=decode_image,
            make_camera=Camera.from_matrix,
            register_scene=register_scene,
            needs_registration=needs_registration,
        )


# --- requests and the queue -----------------------------------------------------------------------------------


@dataclass
class CalibrationRequest:
    """An accepted frame, validated, waiting for the worker."""

    camera_id: str
    scene_id: str
    image: bytes
    intrinsics: list[list[float]] | None  # None only in `estimate` mode
    distortion: list[float]
    intrinsics_mode: str
    request_id: str | None
    received: float
    deadline: float
    key: tuple[str, str]  # (camera, payload digest): a redelivery is byte-identical
    acks: list[Ack] = field(default_factory=list, repr=False)  # the message and its redeliveries
    _replied: bool = False
    _delivered: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def claim_reply(self) -> bool:
        """True exactly once: whoever gets True publishes the reply."""
        with self._lock:
            if self._replied:
                return False
            self._replied = True
            return True

    def add_ack(self, ack: Ack) -> bool:
        """Attach a redelivery's ack; False when the reply is already delivered (the caller acks at once)."""
        with self._lock:
            if self._delivered:
                return False
            self.acks.append(ack)
            return True

    def delivered(self) -> None:
        """The reply reached the broker: acknowledge the request and its redeliveries."""
        with self._lock:
            self._delivered = True
            acks = list(self.acks)
        for ack in acks:
            ack()


class RequestQueue:
    """Bounded FIFO with one slot per camera: a newer frame takes its camera's queued older frame's place."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._items: OrderedDict[str, CalibrationRequest] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, request: CalibrationRequest) -> tuple[Reason | None, CalibrationRequest | None]:
        """Enqueue. Returns (refusal reason or None, superseded request or None)."""
        with self._cond:
            if self._closed:
                return Reason.SHUTTING_DOWN, None
            older = self._items.get(request.camera_id)
            if older is None and len(self._items) >= self._maxsize:
                return Reason.OVERLOADED, None
            self._items[request.camera_id] = request  # an existing key keeps its position: no queue jumping lost
            self._cond.notify()
            return None, older

    def get(self, timeout: float) -> CalibrationRequest | None:
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if not self._items:
                return None
            return self._items.popitem(last=False)[1]

    def close(self) -> list[CalibrationRequest]:
        """Refuse further requests and hand back the queued ones (they get `shutting_down`)."""
        with self._cond:
            self._closed = True
            items = list(self._items.values())
            self._items.clear()
            self._cond.notify_all()
            return items

    def wake(self) -> None:
        """Make a waiting `get` return now (the worker has other work: announced scene versions)."""
        with self._cond:
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


@dataclass(frozen=True)
class RegistrationJob:
    scene_id: str
    dataset: Path | None  # None: scene not in scenes.yaml (only an up-to-date check against the store is possible)
    config: SceneConfig
    force: bool
    request_id: str | None
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class _Cancelled(Exception):
    """Raised from the progress callback to abandon a registration when the service stops."""


# --- the daemon -------------------------------------------------------------------------------------------------


class Daemon:
    """`markerless serve` as an object: `start()`, `stop()`, `wait()`. Constructing does nothing."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend | None = None,
        scenes: ScenesFile | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.topics = Topics(settings.mqtt.topic_prefix)
        self._given_backend = backend
        self._given_scenes = scenes
        self._backend: Backend | None = None
        self._scenes = ScenesFile()
        self._clock = clock
        self._queue = RequestQueue(settings.worker.queue_size)
        self._transport = MqttTransport(settings.mqtt, self.topics, self._on_message)
        self.metrics = Metrics(lambda: len(self._queue))
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._worker_ready = threading.Event()
        self._threads: list[threading.Thread] = []
        # accepted calibration requests not yet answered-and-delivered, by key
        self._inflight: dict[tuple[str, str], CalibrationRequest] = {}
        self._inflight_lock = threading.Lock()
        self._answered: AnsweredLog | None = None
        self._journal: RegistrationJournal | None = None
        # watchdog: the worker's last sign of life, and whether it is currently seen as alive
        self._worker_tick = clock()
        self._alive = True
        self._reload: set[str] = set()  # scenes announced with a new version, for the worker to load
        self._reload_lock = threading.Lock()
        # registration state, guarded by _reg_cond
        self._reg_cond = threading.Condition()
        self._reg_queue: deque[RegistrationJob] = deque()
        self._reg_running: RegistrationJob | None = None
        self._routes = {
            TopicKind.CALIBRATION_FRAME: self._on_frame,
            TopicKind.REGISTER_SCENE: self._on_register,
            TopicKind.SCENE_UPDATE: self._on_update,
            TopicKind.STATUS: self._on_status,
            TopicKind.SCENE_VERSION: self._on_scene_version,
        }

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect (raises TransportError on TLS/credential failure), then start the worker and the registrar."""
        self._scenes = self._given_scenes or ScenesFile.load(self.settings.scenes_file)
        self._backend = self._given_backend or Backend.real(self.settings)
        state = client_state_dir(self.settings.state_dir or self.settings.store.root / ".service",
                                 self.settings.mqtt.client_id)
        self._answered = AnsweredLog(state, _ANSWERED_KEPT)
        self._journal = RegistrationJournal(state)
        if self.settings.metrics.port is not None:
            self.metrics.serve(self.settings.metrics.host, self.settings.metrics.port)
        self.metrics.worker_alive.set(1)
        self._transport.start()
        for entry in self._journal.interrupted:
            self._report_interrupted(entry)
        for name, target in (("markerless-worker", self._work), ("markerless-registrar", self._register_loop),
                             ("markerless-watchdog", self._watch)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.settings.registration.on_start:
            for scene_id, entry in self._scenes.scenes.items():
                self._submit_registration(RegistrationJob(scene_id, entry.dataset, entry.config, False, None))

    def stop(self) -> None:
        """Answer queued requests with `shutting_down`, abandon a running registration, publish `stopped`."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for request in self._queue.close():
            self._reply_failure(request, Reason.SHUTTING_DOWN, "the service stopped before handling this request")
        with self._reg_cond:
            dropped = list(self._reg_queue)
            self._reg_queue.clear()
            self._reg_cond.notify_all()
        for job in dropped:
            self._status_error(job.scene_id, Reason.SHUTTING_DOWN, "The service stopped before registering", job)
        for thread in self._threads:
            thread.join(timeout=30.0)
        self._transport.stop()
        self.metrics.close()
        if self._answered is not None:
            self._answered.close()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped; True when stopped."""
        return self._stopped.wait(timeout)

    @property
    def _core(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("Daemon.start() was not called")
        return self._backend

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the worker has built its models and loaded the registered scenes."""
        return self._worker_ready.wait(timeout)

    # -- dispatcher (network thread) ---------------------------------------------------------------------------
    # Every route gets the message's `ack` and must see it called exactly when the message is dealt with: at once
    # for what needs no reply, on delivery of the reply otherwise (`_refuse`, `_reply`, `_status_error`).
    def _on_message(self, topic: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        ref = self.topics.parse(topic)
        if ref is None:
            log.warning("ignoring a message on %r: not a topic of ours or an unusable id", topic[:300])
            return ack()
        self._routes[ref.kind](ref.id, payload, duplicate, ack)

    def _on_status(self, _: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        ack()
        if payload == IS_ALIVE.encode() and self._alive:
            self._transport.publish(self.topics.status, RUNNING)
        # a stalled worker gets no `running`; anything else (our own `running` included) is not addressed to us

    def _on_scene_version(self, scene_id: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        ack()
        with self._reload_lock:
            self._reload.add(scene_id)
        self._queue.wake()

    def _on_frame(self, camera_id: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        request_id: str | None = None
        key = (camera_id, "sha256:" + hashlib.sha256(payload).hexdigest())
        if duplicate and self._redelivered(key, ack):
            return log.info("redelivered frame of %s (%s) already accepted: not handled twice", camera_id, key[1])
        refused = self._settle(key, ack)  # a refusal is an answer too: remembered, then acknowledged
        try:
            if len(payload) > self.settings.worker.max_payload_bytes:
                return self._refuse(camera_id, None, Reason.TOO_LARGE, f"frame of {len(payload)} bytes exceeds "
                                    f"worker.max_payload_bytes={self.settings.worker.max_payload_bytes}", refused)
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                return self._refuse(camera_id, None, Reason.BAD_REQUEST, f"frame is not UTF-8 JSON: {exc}", refused)
            if not isinstance(data, dict):
                return self._refuse(camera_id, None, Reason.BAD_REQUEST,
                                    f"frame must be a JSON object, got {type(data).__name__}", refused)
            raw_id = data.get("request_id")
            request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 128 else None
            if data.get("calibrate") is None or data.get("calibrate") is False:
                ack()  # not a request: nothing to answer
                return log.debug("frame of %s without calibrate: true: not a calibration request", camera_id)
            try:
                frame = CalibrationFrame.model_validate(data)
            except ValidationError as exc:
                return self._refuse(camera_id, request_id, *_validation_failure(exc), refused)
            self._accept(camera_id, frame, key, ack, refused)
        except Exception:  # noqa: BLE001 - never die of a message: reply and log the traceback
            log.exception("internal error handling a frame of camera %s", camera_id)
            self._refuse(camera_id, request_id, Reason.INTERNAL_ERROR, "internal error (see the service log)", refused)

    def _accept(self, camera_id: str, frame: CalibrationFrame, key: tuple[str, str], ack: Ack,
                refused: Callable[[], None]) -> None:
        rid = frame.request_id
        if frame.id is not None and frame.id != camera_id:
            return self._refuse(camera_id, rid, Reason.CAMERA_MISMATCH,
                                f"frame id {frame.id!r} does not match the topic's camera {camera_id!r}", refused)
        camera = self._scenes.cameras.get(camera_id)
        scene_id = frame.scene_id or (camera.scene if camera else None)
        if scene_id is None:
            return self._refuse(camera_id, rid, Reason.UNKNOWN_CAMERA,
                                f"camera {camera_id!r} is not in scenes.yaml and the frame names no scene_id", refused)
        intrinsics = frame.intrinsics if frame.intrinsics is not None else (camera.intrinsics if camera else None)
        mode = frame.intrinsics_mode or (camera.intrinsics_mode if camera else "refine")
        if intrinsics is None and mode != "estimate":
            return self._refuse(camera_id, rid, Reason.BAD_INTRINSICS,
                                f"no intrinsics in the frame and none configured for camera {camera_id!r} (send "
                                "intrinsics, or intrinsics_mode 'estimate' to have them estimated)", refused)
        if frame.distortion is not None:
            distortion = frame.distortion
        else:
            distortion = camera.distortion if camera else []
        try:
            image = frame.image_bytes()
        except (binascii.Error, ValueError) as exc:
            return self._refuse(camera_id, rid, Reason.BAD_IMAGE, f"image is not valid base64: {exc}", refused)
        now = self._clock()
        request = CalibrationRequest(camera_id, scene_id, image, intrinsics, list(distortion), mode, rid, now,
                                     now + self.settings.worker.deadline_s, key, acks=[ack])
        with self._inflight_lock:
            self._inflight[key] = request
        refusal, superseded = self._queue.put(request)
        if superseded is not None:
            self._reply_failure(superseded, Reason.SUPERSEDED, "a newer frame from this camera replaced this one")
        if refusal == Reason.OVERLOADED:
            self._reply_failure(request, refusal, f"calibration queue full ({self.settings.worker.queue_size})")
        elif refusal is not None:
            self._reply_failure(request, refusal, "the service is stopping")

    def _settle(self, key: tuple[str, str], ack: Ack) -> Callable[[], None]:
        """Run once a frame's answer is delivered: remember it as answered, then acknowledge it."""

        def settle() -> None:
            if self._answered is not None:
                self._answered.add(key)
            ack()

        return settle

    def _redelivered(self, key: tuple[str, str], ack: Ack) -> bool:
        """A QoS 1 redelivery (DUP flag) of a request already accepted: True when it must not be handled again.
        Answered (also before a restart): acknowledge now. Still in work: acknowledge with the original's reply.
        A redelivery is byte-identical, so the key is the payload's digest: frames without a request id too."""
        with self._inflight_lock:
            pending = self._inflight.get(key)
        if pending is not None and pending.add_ack(ack):
            return True
        if pending is not None or (self._answered is not None and key in self._answered):
            ack()
            return True
        return False

    def _on_register(self, scene_id: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        try:
            if payload == REGISTER.encode():
                return self._register_configured(scene_id, force=False, request_id=None, ack=ack)
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return self._status_error(scene_id, Reason.BAD_REQUEST,
                                          "Unrecognized request: send 'register' or a JSON register request", ack=ack)
            if isinstance(data, dict) and "status" in data and "command" not in data:
                return ack()  # a status reply (ours, echoed back by the shared topic)
            try:
                request = RegisterRequest.model_validate(data)
            except ValidationError as exc:
                rid = data.get("request_id") if isinstance(data, dict) else None
                _, message = _validation_failure(exc)
                return self._status_error(scene_id, Reason.BAD_REQUEST, message, ack=ack,
                                          request_id=rid if isinstance(rid, str) and len(rid) <= 128 else None)
            self._register_request(scene_id, request, ack)
        except Exception:  # noqa: BLE001
            log.exception("internal error handling a register request for %s", scene_id)
            self._status_error(scene_id, Reason.INTERNAL_ERROR, "internal error (see the service log)", ack=ack)

    def _on_update(self, scene_id: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        try:
            if payload != UPDATE.encode():
                return self._status_error(scene_id, Reason.BAD_REQUEST,
                                          f"Unrecognized scene update: expected {UPDATE!r}", ack=ack)
            self._register_configured(scene_id, force=False, request_id=None, ack=ack)
        except Exception:  # noqa: BLE001
            log.exception("internal error handling an update for %s", scene_id)
            self._status_error(scene_id, Reason.INTERNAL_ERROR, "internal error (see the service log)", ack=ack)

    def _register_configured(self, scene_id: str, force: bool, request_id: str | None, ack: Ack) -> None:
        entry = self._scenes.scenes.get(scene_id)
        if entry is None:
            # Not configured: only an already registered scene can be confirmed; the registrar checks the store.
            job = RegistrationJob(scene_id, None, SceneConfig(), False, request_id)
        else:
            job = RegistrationJob(scene_id, entry.dataset, entry.config, force, request_id)
        self._submit_registration(job, ack)

    def _register_request(self, scene_id: str, request: RegisterRequest, ack: Ack) -> None:
        entry = self._scenes.scenes.get(scene_id)
        dataset = request.dataset or (entry.dataset if entry else None)
        rid = request.request_id
        if dataset is None:
            return self._status_error(scene_id, Reason.SCENE_NOT_FOUND,
                                      f"Polycam zip file not found: scene {scene_id!r} has no dataset in scenes.yaml "
                                      "and the request names none", request_id=rid, ack=ack)
        if request.dataset is not None and not self._dataset_allowed(request.dataset, entry.dataset if entry else None):
            return self._status_error(scene_id, Reason.FORBIDDEN_PATH,
                                      f"dataset {str(request.dataset)!r} is outside registration.dataset_dirs",
                                      request_id=rid, ack=ack)
        config = request.config or (entry.config if entry else SceneConfig())
        self._submit_registration(RegistrationJob(scene_id, dataset, config, request.force, rid), ack)

    def _dataset_allowed(self, dataset: Path, configured: Path | None) -> bool:
        path = dataset.resolve()
        if configured is not None and path == configured.resolve():
            return True
        return any(path.is_relative_to(d.resolve()) for d in self.settings.registration.dataset_dirs)

    def _submit_registration(self, job: RegistrationJob, ack: Ack | None = None) -> None:
        """Queue a registration. The command is acknowledged once the job is in the journal (a crash from then on
        is reported `interrupted` at the next start), not when it finishes: registrations take minutes."""
        with self._reg_cond:
            if self._stopping.is_set():
                refusal = (Reason.SHUTTING_DOWN, "The service is stopping")
            elif len(self._reg_queue) >= self.settings.registration.queue_size:
                refusal = (Reason.BUSY, f"Registration queue full ({self.settings.registration.queue_size})")
            else:
                refusal = None
                running = self._reg_running or (self._reg_queue[0] if self._reg_queue else None)
                self._journaled(job)
                self._reg_queue.append(job)
                queued = len(self._reg_queue)
                self._reg_cond.notify()
        if refusal is not None:
            return self._status_error(job.scene_id, refusal[0], refusal[1], ack=ack, request_id=job.request_id)
        if ack is not None:
            ack()
        if running is not None:
            entry = self._scenes.scenes.get(running.scene_id)
            self._status(job.scene_id, RegistrationStatus(
                status="busy", scene_id=running.scene_id, scene_name=entry.name if entry else None, queued=queued,
                message=f"Registration of {running.scene_id!r} is running; this request is queued",
                request_id=job.request_id))

    def _journaled(self, job: RegistrationJob) -> None:
        if self._journal is not None:
            self._journal.add(JournalEntry(job.job_id, job.scene_id, job.request_id))

    def _report_interrupted(self, entry: JournalEntry) -> None:
        log.warning("registration of %s (request %s) was interrupted by the previous run's end", entry.scene_id,
                    entry.request_id)
        journal = self._journal
        self._transport.publish(
            self.topics.register(entry.scene_id),
            dumps(RegistrationStatus(status="Registration interrupted: the service stopped abruptly while it was "
                                     "accepted or running; send the command again", scene_id=entry.scene_id,
                                     reason=Reason.INTERRUPTED, request_id=entry.request_id)),
            on_delivered=(lambda: journal.remove(entry.job_id)) if journal is not None else None)
        self.metrics.answered("registration", Reason.INTERRUPTED)

    def registering(self, scene_id: str) -> bool:
        """True while a registration of `scene_id` runs or waits."""
        with self._reg_cond:
            jobs = [*self._reg_queue, *([self._reg_running] if self._reg_running else [])]
        return any(j.scene_id == scene_id for j in jobs)

    # -- registrar thread ----------------------------------------------------------------------------------------
    def _register_loop(self) -> None:
        models = None
        while True:
            with self._reg_cond:
                while not self._reg_queue and not self._stopping.is_set():
                    self._reg_cond.wait()
                if self._stopping.is_set():
                    return
                job = self._reg_queue.popleft()
                self._reg_running = job
            try:
                models = self._run_registration(job, models)
            except _Cancelled:
                self._status_error(job.scene_id, Reason.SHUTTING_DOWN, "Registration abandoned: service stopping", job)
            except MarkerlessError as exc:
                log.error("registration of %s failed: %s", job.scene_id, exc)
                self._status_error(job.scene_id, exc.reason, str(exc), job)
            except Exception:  # noqa: BLE001
                log.exception("registration of %s crashed", job.scene_id)
                self._status_error(job.scene_id, Reason.INTERNAL_ERROR, "Registration failed: internal error", job)
            finally:
                with self._reg_cond:
                    self._reg_running = None

    def _run_registration(self, job: RegistrationJob, models: Any) -> Any:
        backend = self._core
        info = backend.store.info(job.scene_id)
        if job.dataset is None:
            if info is None:
                raise MarkerlessError(f"Polycam zip file not found: scene {job.scene_id!r} is not in scenes.yaml "
                                      "and was never registered", reason=Reason.SCENE_NOT_FOUND)
            self._status_success(job, info.version, "already registered")
            return models
        if not job.dataset.is_file():
            raise MarkerlessError(f"Polycam zip file not found: {job.dataset}", reason=Reason.BAD_DATASET)
        with self._scene_lock(job):
            info = backend.store.info(job.scene_id)  # another replica may have registered it while we waited
            if not job.force and info is not None and not backend.needs_registration(
                backend.store, job.scene_id, job.dataset, job.config
            ):
                self._status_success(job, info.version, "unchanged: dataset and config already registered")
                return models
            self._status(job.scene_id, RegistrationStatus(status="registering", scene_id=job.scene_id, progress=0.0,
                                                          request_id=job.request_id))
            if models is None:
                models = backend.new_models()
            last = [0.0]

            def progress(stage: str, fraction: float) -> None:
                if self._stopping.is_set():
                    raise _Cancelled
                now = time.monotonic()
                if now - last[0] >= self.settings.registration.progress_interval_s:
                    last[0] = now
                    self._status(job.scene_id, RegistrationStatus(
                        status="registering", scene_id=job.scene_id, progress=min(max(float(fraction), 0.0), 1.0),
                        stage=stage, request_id=job.request_id))

            log.info("registering scene %s from %s", job.scene_id, job.dataset)
            started = time.monotonic()
            new = backend.register_scene(backend.store, job.scene_id, job.dataset, job.config, models,
                                         progress=progress)
            self.metrics.registration_seconds.observe(time.monotonic() - started)
        log.info("scene %s registered: version %s", job.scene_id, new.version)
        self._transport.publish(self.topics.scene_version(job.scene_id),
                                dumps(SceneVersion(scene_id=job.scene_id, version=new.version)), retain=True)
        self._status_success(job, new.version, None)
        return models

    @contextmanager
    def _scene_lock(self, job: RegistrationJob) -> Iterator[None]:
        """Hold the store's lock file of `job.scene_id` (flock: released by the kernel if this process dies), so
        replicas sharing the store never register one scene at the same time. Waiting is announced as `busy`."""
        folder = self.settings.store.root / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{job.scene_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            announced = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not announced:
                        announced = True
                        self._status(job.scene_id, RegistrationStatus(
                            status="busy", scene_id=job.scene_id, request_id=job.request_id,
                            message="another replica is registering this scene; waiting for it"))
                    if self._stopping.wait(0.2):
                        raise _Cancelled from None
            yield
        finally:
            os.close(fd)  # releases the lock

    def _status_success(self, job: RegistrationJob, version: str, message: str | None) -> None:
        self.metrics.answered("registration", None)
        self._status(job.scene_id, RegistrationStatus(status="success", scene_id=job.scene_id, scene_version=version,
                                                      message=message, request_id=job.request_id),
                     self._finished(job))

    def _status_error(self, scene_id: str, reason: Reason, message: str, job: RegistrationJob | None = None,
                      request_id: str | None = None, ack: Ack | None = None) -> None:
        self.metrics.answered("registration", reason)
        self._status(scene_id, RegistrationStatus(status=message, scene_id=scene_id, reason=reason,
                                                  request_id=job.request_id if job else request_id),
                     self._finished(job) if job else ack)

    def _finished(self, job: RegistrationJob) -> Callable[[], None] | None:
        """Drop `job` from the journal once its terminal status is delivered."""
        journal = self._journal
        return None if journal is None else (lambda: journal.remove(job.job_id))

    def _status(self, scene_id: str, status: RegistrationStatus,
                on_delivered: Callable[[], None] | None = None) -> None:
        self._transport.publish(self.topics.register(scene_id), dumps(status), on_delivered=on_delivered)

    # -- watchdog thread -----------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Every ~second: is the worker alive? A change flips heartbeat, availability and the metric."""
        stall_s = self.settings.worker.stall_s
        worker = next(t for t in self._threads if t.name == "markerless-worker")
        while not self._stopping.wait(min(1.0, stall_s / 4)):
            alive = worker.is_alive() and time.monotonic() - self._worker_tick < stall_s
            if alive == self._alive:
                continue
            self._alive = alive
            self.metrics.worker_alive.set(1 if alive else 0)
            if alive:
                log.warning("worker takes requests again")
            else:
                log.error("worker stalled: no progress for %.0f s (worker.stall_s); heartbeat withheld", stall_s)
            self._transport.set_availability(ONLINE if alive else STALLED)

    # -- worker thread ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        backend = self._core
        localizer, startup_error = None, None
        cache: dict[str, Any] = {}
        try:
            localizer = backend.new_localizer(backend.new_models())
            for scene_id in backend.store.scene_ids():
                try:
                    self._cache_scene(cache, backend.store.load(scene_id))
                except SceneOutdatedError as exc:  # its frames get this reason until it is registered again
                    log.warning("scene %s not served: %s", scene_id, exc)
        except MarkerlessError as exc:
            startup_error = exc
            log.error("worker start-up failed; every request will get this error: %s", exc)
        except Exception as exc:  # noqa: BLE001
            startup_error = MarkerlessError(f"worker start-up failed: {exc}")
            log.exception("worker start-up failed")
        self._worker_ready.set()
        while not self._stopping.is_set():
            self._worker_tick = time.monotonic()
            if startup_error is None:
                self._reload_announced(cache)
            request = self._queue.get(timeout=0.5)
            if request is None:
                continue
            self._worker_tick = time.monotonic()
            if self._clock() > request.deadline:
                self._reply_failure(request, Reason.TIMEOUT,
                                    f"not handled within worker.deadline_s={self.settings.worker.deadline_s}")
                continue
            started = time.monotonic()
            try:
                if startup_error is not None:
                    raise startup_error
                result = self._calibrate(request, localizer, cache)
            except MarkerlessError as exc:
                self._reply_failure(request, exc.reason, str(exc))
            except Exception:  # noqa: BLE001
                log.exception("internal error calibrating camera %s (request %s)", request.camera_id,
                              request.request_id)
                self._reply_failure(request, Reason.INTERNAL_ERROR, "internal error (see the service log)")
            else:
                self._reply(request, result)
            self.metrics.localization_seconds.observe(time.monotonic() - started)

    def _cache_scene(self, cache: dict[str, Any], scene: Any) -> Any:
        cache[scene.info.scene_id] = scene
        self.metrics.loaded(scene.info.scene_id, scene.info.version)
        log.info("scene %s: serving version %s", scene.info.scene_id, scene.info.version)
        return scene

    def _reload_announced(self, cache: dict[str, Any]) -> None:
        """Load the versions announced on the version topic now, not at the next frame of their scene."""
        with self._reload_lock:
            scene_ids, self._reload = self._reload, set()
        store = self._core.store
        for scene_id in scene_ids:
            try:
                info = store.info(scene_id)
                held = cache.get(scene_id)
                if info is not None and (held is None or held.info.version != info.version):
                    self._cache_scene(cache, store.load(scene_id))
            except Exception:  # noqa: BLE001 - a bad announcement must not stop the worker
                log.exception("reloading announced scene %s failed", scene_id)

    def _calibrate(self, request: CalibrationRequest, localizer: Any, cache: dict[str, Any]) -> PoseResult:
        backend = self._core
        started = self._clock()
        info = backend.store.info(request.scene_id)
        if info is None:
            if self.registering(request.scene_id):
                raise MarkerlessError(f"scene {request.scene_id!r} is still registering",
                                      reason=Reason.SCENE_REGISTERING)
            raise MarkerlessError(f"scene {request.scene_id!r} is not registered", reason=Reason.SCENE_NOT_FOUND)
        scene = cache.get(request.scene_id)
        if scene is None or scene.info.version != info.version:
            scene = self._cache_scene(cache, backend.store.load(request.scene_id))  # swapped between two requests
        image = backend.decode_image(request.image)
        height, width = image.shape[:2]
        camera = None
        if request.intrinsics is not None:
            camera = backend.make_camera(request.intrinsics, width, height, request.distortion)
        result = localizer.localize(scene, image, camera, request.intrinsics_mode)
        timings = {**result.timings_ms, "queue": 1000.0 * (started - request.received),
                   "total": 1000.0 * (self._clock() - request.received)}
        common = dict(request_id=request.request_id, num_matches=result.num_matches, num_inliers=result.num_inliers,
                      inlier_ratio=result.inlier_ratio, scene_id=result.scene_id, scene_version=result.scene_version,
                      timings_ms=timings, intrinsics=result.intrinsics, distortion=result.distortion,
                      intrinsics_source=result.intrinsics_source, position_sigma_m=result.position_sigma_m,
                      rotation_sigma_deg=result.rotation_sigma_deg, warnings=result.warnings)
        if not result.success:
            return PoseResult.failure(request.camera_id, result.reason or Reason.INTERNAL_ERROR,
                                      result.message or SCENESCAPE_FAILURE_MESSAGE, **common)
        entry = self._scenes.scenes.get(request.scene_id)
        pose = entry.pose if entry else ScenePose()
        quaternion, translation = pose.apply(result.quaternion, result.translation)
        return PoseResult(timestamp=utc_now(), name=request.camera_id, camera_id=request.camera_id, error="False",
                          success=True, quaternion=quaternion, translation=translation, scale=_SCALE, **common)

    # -- replies -------------------------------------------------------------------------------------------------
    def _reply(self, request: CalibrationRequest, result: PoseResult) -> None:
        if not request.claim_reply():
            log.error("second reply to request %s of %s suppressed", request.request_id, request.camera_id)
            return
        if result.success:
            log.info("camera %s: pose (request %s, %d inliers)", request.camera_id, request.request_id,
                     result.num_inliers)
        else:
            log.info("camera %s: %s (request %s): %s", request.camera_id, result.reason, request.request_id,
                     result.message)
        self.metrics.answered("calibration", result.reason)
        self._transport.publish(self.topics.pose(request.camera_id), dumps(result),
                                on_delivered=lambda: self._delivered(request))

    def _delivered(self, request: CalibrationRequest) -> None:
        """The reply reached the broker: remember the request as answered, then acknowledge it."""
        key = request.key
        if self._answered is not None:
            self._answered.add(key)
        with self._inflight_lock:
            if self._inflight.get(key) is request:
                del self._inflight[key]
        request.delivered()

    def _reply_failure(self, request: CalibrationRequest, reason: Reason, message: str) -> None:
        self._reply(request, PoseResult.failure(request.camera_id, reason, message, request.request_id,
                                                scene_id=request.scene_id))

    def _refuse(self, camera_id: str, request_id: str | None, reason: Reason, message: str,
                ack: Callable[[], None]) -> None:
        """Reply to a frame refused before it became a request; acknowledge it once the reply is delivered."""
        log.info("camera %s: refused (%s): %s", camera_id, reason, message)
        self.metrics.answered("calibration", reason)
        self._transport.publish(self.topics.pose(camera_id),
                                dumps(PoseResult.failure(camera_id, reason, message, request_id)), on_delivered=ack)


def _validation_failure(exc: ValidationError) -> tuple[Reason, str]:
    """(reason, message) of a payload validation error; intrinsics problems get their own reason."""
    errors = exc.errors(include_url=False)
    fields = {str(e["loc"][0]) for e in errors if e["loc"]}
    reason = Reason.BAD_INTRINSICS if fields and fields <= {"intrinsics", "distortion"} else Reason.BAD_REQUEST
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in itertools.islice(errors, 5)]
    return reason, "invalid request: " + "; ".join(parts)

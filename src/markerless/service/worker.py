"""The calibration worker: the one thread that owns the models, the `Localizer` and the scene cache.

It takes requests from the `RequestQueue`, answers `timeout` to a request past its deadline, localizes the others
and replies. It reloads a scene when the store reports a new version, so a re-registration is picked up between
two requests and the old version serves until the swap; versions announced on the version topic are loaded at
once. `tick` is its sign of life for the watchdog.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic

import numpy as np

from markerless.errors import MarkerlessError, Reason, SceneOutdatedError
from markerless.service.backend import Backend, FrameLocalizer, SceneT
from markerless.service.calibration_points import spread_sample
from markerless.service.last_frames import LastFrames
from markerless.service.messages import PoseResult
from markerless.service.metrics import Metrics
from markerless.service.replies import Replies
from markerless.service.requests import CalibrationRequest, RequestQueue
from markerless.service.scenes_file import ScenePose, ScenesFile
from markerless.service.settings import Settings
from markerless.service.watch import CalibrationWatch

if TYPE_CHECKING:
    from markerless.pipeline.localization import LocalizationResult

log = logging.getLogger(__name__)


class Worker(Generic[SceneT]):
    """The worker thread's body (`run`) and the state it shares: `tick`, `announce`."""

    def __init__(self, settings: Settings, backend: Backend[SceneT, Any], scenes: ScenesFile, queue: RequestQueue,
                 replies: Replies, metrics: Metrics, registering: Callable[[str], bool], ready: threading.Event,
                 stopping: threading.Event, clock: Callable[[], float], watch: CalibrationWatch | None = None,
                 last_frames: LastFrames | None = None) -> None:
        self.settings = settings
        self._backend = backend
        self._scenes = scenes
        self._queue = queue
        self._replies = replies
        self._metrics = metrics
        self._registering = registering  # is this scene being registered (or waiting to be)?
        self._ready = ready  # set once the models are built and the registered scenes loaded
        self._stopping = stopping
        self._clock = clock
        self._watch = watch  # each camera's calibration, fed with every localized frame
        self._last_frames = last_frames  # each camera's last frames, for the HTTP console (None: not kept)
        self.tick = clock()  # the worker's last sign of life (time.monotonic once it runs), read by the watchdog
        self._reload: set[str] = set()  # scenes announced with a new version, for the worker to load
        self._reload_lock = threading.Lock()

    def announce(self, scene_id: str) -> None:
        """A new version of `scene_id` was announced (network thread): load it before the next request."""
        with self._reload_lock:
            self._reload.add(scene_id)
        self._queue.wake()

    def run(self) -> None:
        backend = self._backend
        localizer: FrameLocalizer[SceneT] | None = None
        startup_error: MarkerlessError | None = None
        cache: dict[str, SceneT] = {}
        try:
            localizer = backend.new_localizer(backend.new_models())
            for scene_id in backend.store.scene_ids():
                if self._stopping.is_set():  # stopped during start-up: the scenes left are never needed
                    break
                log.info("scene %s: loading", scene_id)
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
        self._ready.set()
        while not self._stopping.is_set():
            self.tick = time.monotonic()
            if startup_error is None:
                self._reload_announced(cache)
            request = self._queue.get(timeout=0.5)
            if request is None:
                continue
            self.tick = time.monotonic()
            if self._clock() > request.deadline:
                self._failed(request, Reason.TIMEOUT,
                             f"not handled within worker.deadline_s={self.settings.worker.deadline_s}")
                continue
            started = time.monotonic()
            try:
                if startup_error is not None:
                    raise startup_error
                assert localizer is not None  # start-up succeeded
                result = self._calibrate(request, localizer, cache)
            except MarkerlessError as exc:
                self._failed(request, exc.reason, str(exc))
            except Exception:  # noqa: BLE001
                log.exception("internal error calibrating camera %s (request %s)", request.camera_id,
                              request.request_id)
                self._failed(request, Reason.INTERNAL_ERROR, "internal error (see the service log)")
            else:
                self._replies.reply(request, result)
            self._metrics.localization_seconds.observe(time.monotonic() - started)

    def _failed(self, request: CalibrationRequest, reason: Reason, message: str) -> None:
        if self._last_frames is not None:
            self._last_frames.failed(request, reason, message)
        self._replies.reply_failure(request, reason, message)

    def _cache_scene(self, cache: dict[str, SceneT], scene: SceneT) -> SceneT:
        cache[scene.info.scene_id] = scene
        self._metrics.loaded(scene.info.scene_id, scene.info.version)
        log.info("scene %s: serving version %s", scene.info.scene_id, scene.info.version)
        return scene

    def _reload_announced(self, cache: dict[str, SceneT]) -> None:
        """Load the versions announced on the version topic now, not at the next frame of their scene."""
        with self._reload_lock:
            scene_ids, self._reload = self._reload, set()
        store = self._backend.store
        for scene_id in scene_ids:
            try:
                info = store.info(scene_id)
                held = cache.get(scene_id)
                if info is not None and (held is None or held.info.version != info.version):
                    self._cache_scene(cache, store.load(scene_id))
            except Exception:  # noqa: BLE001 - a bad announcement must not stop the worker
                log.exception("reloading announced scene %s failed", scene_id)

    def _calibrate(self, request: CalibrationRequest, localizer: FrameLocalizer[SceneT],
                   cache: dict[str, SceneT]) -> PoseResult:
        backend = self._backend
        started = self._clock()
        info = backend.store.info(request.scene_id)
        if info is None:
            if self._registering(request.scene_id):
                raise MarkerlessError(f"scene {request.scene_id!r} is still registering",
                                      reason=Reason.SCENE_REGISTERING)
            raise MarkerlessError(f"scene {request.scene_id!r} is not registered", reason=Reason.SCENE_NOT_FOUND)
        scene = cache.get(request.scene_id)
        if scene is None or scene.info.version != info.version:
            scene = self._cache_scene(cache, backend.store.load(request.scene_id))  # swapped between two requests
        try:
            image = backend.decode_image(request.image)
        except MarkerlessError as exc:
            self._watched(request, exc)
            raise
        height, width = image.shape[:2]
        camera = None
        if request.intrinsics is not None:
            camera = backend.make_camera(request.intrinsics, width, height, request.distortion)
        result = localizer.localize(scene, image, camera, request.intrinsics_mode)
        if self._last_frames is not None:  # before the reply: whoever sees the reply finds its frame
            self._last_frames.localized(request, result, width, height)
        timings = {"queue": 1000.0 * (started - request.received), "total": 1000.0 * (self._clock() - request.received)}
        calibration = self._watched(request, result)
        if not result.success:
            return PoseResult.from_result(request.camera_id, result, request.request_id, timings, **calibration)
        entry = self._scenes.scenes.get(request.scene_id)
        pose = entry.pose if entry else ScenePose()
        assert result.quaternion is not None and result.translation is not None  # a success has a pose
        quaternion, translation = pose.apply(result.quaternion, result.translation)
        points2d, points3d = spread_sample(result.inlier_points2d or [], result.inlier_points3d or [])
        if points3d:  # scene points go where the pose went: through the scene pose
            matrix = pose.matrix()
            points3d = (np.asarray(points3d) @ matrix[:3, :3].T + matrix[:3, 3]).tolist()
        return PoseResult.from_result(request.camera_id, result, request.request_id, timings, quaternion=quaternion,
                                      translation=translation, calibration_points_2d=points2d or None,
                                      calibration_points_3d=points3d or None, **calibration)

    def _watched(self, request: CalibrationRequest, seen: LocalizationResult | MarkerlessError) -> dict[str, Any]:
        """Feed the frame (what the localizer made of it, or why it failed before) to the camera's calibration
        watch; the pose reply's calibration fields. A failure of the watch is logged and never fails the reply."""
        if self._watch is None:
            return {}
        try:
            if isinstance(seen, MarkerlessError):
                outcome = self._watch.failed(request.camera_id, seen.reason, str(seen))
            else:
                outcome = self._watch.localized(request.camera_id, seen)
        except Exception:  # noqa: BLE001
            log.exception("calibration watch failed for camera %s", request.camera_id)
            return {}
        if outcome is None or outcome.calibration is None:
            return {}
        cal = outcome.calibration
        return {"camera_moved": outcome.moved, "calibration_frames": cal.frames, "calibration_state": cal.state}

"""The long-running service: `Daemon` builds its parts, starts their threads and stops them.

Threads and ownership:
- paho's network thread runs the `Dispatcher` (dispatcher.py): it only parses, validates and enqueues (or replies
  at once to a bad request), so heartbeats and keepalives never wait on vision.
- The `Worker` thread (worker.py) owns the models, the `Localizer` and the scene cache; it takes requests from the
  bounded per-camera `RequestQueue` (requests.py).
- The `Registrar` thread (registrar.py) runs one registration at a time with its own models.
- The `Watchdog` thread (watchdog.py) withholds the heartbeat while the worker is stuck.
- With `http.port` set, the `HttpServer` thread (http_server.py) serves SceneScape's REST v1 and Socket.IO: another
  front door to the same queue, worker, registrar and store (its replies go to `HttpResults`, not to MQTT).

Every accepted calibration request gets exactly one reply on its camera's pose topic (replies.py); every
registration request gets exactly one terminal status (success or error) after any `busy` / `registering` /
progress messages. A request is acknowledged to the broker only once its reply has been delivered, so the broker
redelivers what a crash left unanswered; redeliveries of answered requests (by camera and payload digest,
remembered across restarts in the state directory) are acknowledged without a second reply. Registrations
accepted but unfinished when the service died are reported `interrupted` at the next start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from markerless.errors import Reason
from markerless.service.backend import Backend
from markerless.service.dispatcher import Dispatcher
from markerless.service.http_results import HttpResults
from markerless.service.last_frames import LastFrames
from markerless.service.metrics import Metrics
from markerless.service.overlays import Overlays
from markerless.service.registrar import Registrar, RegistrationJob
from markerless.service.replies import Replies
from markerless.service.requests import RequestQueue
from markerless.service.scenes_file import ScenesFile
from markerless.service.settings import Settings
from markerless.service.state import AnsweredLog, RegistrationJournal, client_state_dir
from markerless.service.topics import Topics
from markerless.service.transport import Ack, MqttTransport
from markerless.service.watch import CalibrationWatch
from markerless.service.watchdog import Watchdog
from markerless.service.worker import Worker

if TYPE_CHECKING:
    from markerless.service.http_server import HttpServer

__all__ = ["Backend", "Daemon"]

_ANSWERED_KEPT = 4096  # (camera, payload digest) pairs remembered to drop redeliveries of answered frames


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
        self._clock = clock
        self._queue = RequestQueue(settings.worker.queue_size)
        self._transport = MqttTransport(settings.mqtt, self.topics, self._on_message)
        self.metrics = Metrics(lambda: len(self._queue))
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._worker_ready = threading.Event()
        self._threads: list[threading.Thread] = []
        # the parts, built by start()
        self._replies: Replies | None = None
        self._registrar: Registrar | None = None
        self._dispatcher: Dispatcher | None = None
        self.http: HttpServer | None = None  # with http.port set (more routes: http_api.create_app's routers)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, cancel: threading.Event | None = None) -> bool:
        """Connect (raises TransportError on TLS/credential failure), then start the worker and the registrar.

        Returns False, having started nothing more, when `cancel` is set before it is done (a SIGTERM during
        start-up): `stop()` then ends what was begun, publishing `stopped` only if `online` was."""
        cancel = cancel or threading.Event()
        scenes = self._given_scenes or ScenesFile.load(self.settings.scenes_file)
        backend = self._given_backend or Backend.real(self.settings)
        if cancel.is_set():
            return False
        state = client_state_dir(self.settings.state_dir or self.settings.store.root / ".service",
                                 self.settings.mqtt.client_id)
        replies = self._replies = Replies(self._transport, self.topics, self.metrics,
                                          AnsweredLog(state, _ANSWERED_KEPT))
        registrar = self._registrar = Registrar(self.settings, backend, scenes, RegistrationJournal(state),
                                                self._transport, self.topics, self.metrics, self._stopping)
        watch = CalibrationWatch(self.settings, scenes, self._transport, self.topics)
        self._transport.on_connected.append(watch.republish_all)
        http_on = self.settings.http.port is not None
        last_frames = LastFrames(frozenset(scenes.cameras)) if http_on else None  # the console's, kept for it only
        worker = Worker(self.settings, backend, scenes, self._queue, replies, self.metrics, registrar.registering,
                        self._worker_ready, self._stopping, self._clock, watch, last_frames)
        watchdog = Watchdog(self.settings, worker, self._transport, self.metrics, self._stopping)
        self._dispatcher = Dispatcher(self.settings, scenes, self.topics, self._transport, self._queue, replies,
                                      registrar, worker, watchdog, self._clock, watch)
        if self.settings.metrics.port is not None:
            self.metrics.serve(self.settings.metrics.host, self.settings.metrics.port)
        self.metrics.worker_alive.set(1)
        if not self._transport.start(cancel) or cancel.is_set():
            return False
        if last_frames is not None:  # after the broker: a refused broker leaves no port bound
            self._start_http(scenes, backend, replies, registrar, watchdog, last_frames)
        registrar.report_interrupted()
        worker_thread = threading.Thread(target=worker.run, name="markerless-worker", daemon=True)
        for thread in (worker_thread,
                       threading.Thread(target=registrar.run, name="markerless-registrar", daemon=True),
                       threading.Thread(target=watchdog.run, args=(worker_thread,), name="markerless-watchdog",
                                        daemon=True)):
            thread.start()
            self._threads.append(thread)
        if self.settings.registration.on_start:
            for scene_id, entry in scenes.scenes.items():
                registrar.submit(RegistrationJob(scene_id, entry.dataset, entry.config, False, None))
        return True

    def stop(self) -> None:
        """Answer queued requests with `shutting_down`, abandon a running registration, publish `stopped`."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        queued = self._queue.close()
        if self._replies is not None:  # None: start() failed before building the parts (nothing was queued)
            for request in queued:
                self._replies.reply_failure(request, Reason.SHUTTING_DOWN,
                                            "the service stopped before handling this request")
        if self._registrar is not None:
            self._registrar.close()
        for thread in self._threads:
            thread.join(timeout=30.0)
        if self.http is not None:  # after the worker: what it answered meanwhile reached HttpResults (and pushes)
            self.http.stop()
        self._transport.stop()
        self.metrics.close()
        if self._replies is not None:
            self._replies.close()
        self._stopped.set()

    def _start_http(self, scenes: ScenesFile, backend: Backend, replies: Replies, registrar: Registrar,
                    watchdog: Watchdog, last_frames: LastFrames) -> None:
        """The HTTP front door over the same parts, with the console (imported here: FastAPI and uvicorn only load
        when it is on)."""
        from markerless.service.http_api import HttpCore
        from markerless.service.http_console import console_routers
        from markerless.service.http_server import HttpServer

        results = HttpResults()
        registrar.add_listener(results.registration_status)
        core = HttpCore(self.settings, scenes, self._queue, replies, registrar, backend, results,
                        lambda: watchdog.alive, self._stopping, self._clock, self.settings.http.token(),
                        last_frames=last_frames, overlays=Overlays(last_frames, backend.store, backend.decode_image),
                        connected=self._transport.connected.is_set, started=self._clock())
        self.http = HttpServer(core, console_routers())
        self.http.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped; True when stopped."""
        return self._stopped.wait(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the worker has built its models and loaded the registered scenes."""
        return self._worker_ready.wait(timeout)

    def _on_message(self, topic: str, payload: bytes, duplicate: bool, ack: Ack) -> None:
        """The transport's handler (paho's network thread); the dispatcher exists before the transport connects."""
        if self._dispatcher is None:
            raise RuntimeError("Daemon.start() was not called")
        self._dispatcher.on_message(topic, payload, duplicate, ack)

"""Background registration: one job at a time on its own thread, with its own models, and its status messages.

Later requests get `busy` and wait in a bounded queue (SceneScape dropped them). A job is journaled when accepted,
so a registration cut short by a crash is reported `interrupted` at the next start. The store swaps versions
atomically, so a crash keeps the old version. A file lock per scene in the store keeps replicas sharing the store
from registering one scene twice; a commit is announced on a retained topic so every replica reloads the new
version at once. Every registration request gets exactly one terminal status (success or error) after any
`busy` / `registering` / progress messages. Statuses go to the scene's MQTT register topic and to every listener
(`add_listener`: the HTTP front door keeps them for its polls and Socket.IO pushes).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markerless.errors import MarkerlessError, Reason
from markerless.scene.config import SceneConfig
from markerless.service.backend import Backend
from markerless.service.messages import RegistrationStatus, SceneVersion, dumps
from markerless.service.metrics import Metrics
from markerless.service.scenes_file import ScenesFile
from markerless.service.settings import Settings
from markerless.service.state import JournalEntry, RegistrationJournal
from markerless.service.topics import Topics
from markerless.service.transport import Ack, MqttTransport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistrationJob:
    scene_id: str
    dataset: Path | None  # None: scene not in scenes.yaml (only an up-to-date check against the store is possible)
    config: SceneConfig
    force: bool
    request_id: str | None
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def configured(cls, scenes: ScenesFile, scene_id: str, force: bool, request_id: str | None) -> RegistrationJob:
        """The scene's job as scenes.yaml has it; a scene not configured can only be confirmed against the store."""
        entry = scenes.scenes.get(scene_id)
        if entry is None:
            return cls(scene_id, None, SceneConfig(), False, request_id)
        return cls(scene_id, entry.dataset, entry.config, force, request_id)


class _Cancelled(Exception):
    """Raised from the progress callback to abandon a registration when the service stops."""


class Registrar:
    """The registration queue and the thread (`run`) that works it; statuses go to the scene's register topic."""

    def __init__(self, settings: Settings, backend: Backend, scenes: ScenesFile, journal: RegistrationJournal,
                 transport: MqttTransport, topics: Topics, metrics: Metrics, stopping: threading.Event) -> None:
        self.settings = settings
        self._backend = backend
        self._scenes = scenes
        self._journal = journal
        self._transport = transport
        self._topics = topics
        self._metrics = metrics
        self._stopping = stopping
        # registration state, guarded by _cond
        self._cond = threading.Condition()
        self._queue: deque[RegistrationJob] = deque()
        self._running: RegistrationJob | None = None
        self._listeners: list[Callable[[str, RegistrationStatus], None]] = []

    def add_listener(self, listener: Callable[[str, RegistrationStatus], None]) -> None:
        """`listener(scene_id, status)` gets every status published from now on (call before the threads start)."""
        self._listeners.append(listener)

    # -- accepting jobs (network thread, start-up) ------------------------------------------------------------------
    def submit(self, job: RegistrationJob, ack: Ack | None = None) -> tuple[Reason, str] | None:
        """Queue a registration; returns the refusal (also published as the job's error status) or None. The
        command is acknowledged once the job is in the journal (a crash from then on is reported `interrupted` at
        the next start), not when it finishes: registrations take minutes."""
        with self._cond:
            if self._stopping.is_set():
                refusal = (Reason.SHUTTING_DOWN, "The service is stopping")
            elif len(self._queue) >= self.settings.registration.queue_size:
                refusal = (Reason.BUSY, f"Registration queue full ({self.settings.registration.queue_size})")
            else:
                refusal = None
                running = self._running or (self._queue[0] if self._queue else None)
                self._journal.add(JournalEntry(job.job_id, job.scene_id, job.request_id))
                self._queue.append(job)
                queued = len(self._queue)
                self._cond.notify()
        if refusal is not None:
            self.status_error(job.scene_id, refusal[0], refusal[1], ack=ack, request_id=job.request_id)
            return refusal
        if ack is not None:
            ack()
        if running is not None:
            entry = self._scenes.scenes.get(running.scene_id)
            self._status(job.scene_id, RegistrationStatus(
                status="busy", scene_id=running.scene_id, scene_name=entry.name if entry else None, queued=queued,
                message=f"Registration of {running.scene_id!r} is running; this request is queued",
                request_id=job.request_id))
        return None

    def report_interrupted(self) -> None:
        """Report the jobs the previous run accepted but did not finish (read from the journal at start)."""
        for entry in self._journal.interrupted:
            self._report_interrupted(entry)

    def _report_interrupted(self, entry: JournalEntry) -> None:
        log.warning("registration of %s (request %s) was interrupted by the previous run's end", entry.scene_id,
                    entry.request_id)
        journal = self._journal
        self._status(entry.scene_id, RegistrationStatus(
            status="Registration interrupted: the service stopped abruptly while it was accepted or running; send "
            "the command again", scene_id=entry.scene_id, reason=Reason.INTERRUPTED, request_id=entry.request_id),
            lambda: journal.remove(entry.job_id))
        self._metrics.answered("registration", Reason.INTERRUPTED)

    def registering(self, scene_id: str) -> bool:
        """True while a registration of `scene_id` runs or waits."""
        with self._cond:
            jobs = [*self._queue, *([self._running] if self._running else [])]
        return any(j.scene_id == scene_id for j in jobs)

    def close(self) -> None:
        """The service stops: queued jobs get `shutting_down` (a running one is abandoned at its next progress)."""
        with self._cond:
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in dropped:
            self.status_error(job.scene_id, Reason.SHUTTING_DOWN, "The service stopped before registering", job)

    # -- registrar thread ----------------------------------------------------------------------------------------
    def run(self) -> None:
        models = None
        while True:
            with self._cond:
                while not self._queue and not self._stopping.is_set():
                    self._cond.wait()
                if self._stopping.is_set():
                    return
                job = self._queue.popleft()
                self._running = job
            try:
                models = self._run_registration(job, models)
            except _Cancelled:
                self.status_error(job.scene_id, Reason.SHUTTING_DOWN, "Registration abandoned: service stopping", job)
            except MarkerlessError as exc:
                log.error("registration of %s failed: %s", job.scene_id, exc)
                self.status_error(job.scene_id, exc.reason, str(exc), job)
            except Exception:  # noqa: BLE001
                log.exception("registration of %s crashed", job.scene_id)
                self.status_error(job.scene_id, Reason.INTERNAL_ERROR, "Registration failed: internal error", job)
            finally:
                with self._cond:
                    self._running = None

    def _run_registration(self, job: RegistrationJob, models: Any) -> Any:
        backend = self._backend
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
            self._metrics.registration_seconds.observe(time.monotonic() - started)
        log.info("scene %s registered: version %s", job.scene_id, new.version)
        self._transport.publish(self._topics.scene_version(job.scene_id),
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

    # -- statuses ------------------------------------------------------------------------------------------------
    def _status_success(self, job: RegistrationJob, version: str, message: str | None) -> None:
        self._metrics.answered("registration", None)
        self._status(job.scene_id, RegistrationStatus(status="success", scene_id=job.scene_id, scene_version=version,
                                                      message=message, request_id=job.request_id),
                     self._finished(job))

    def status_error(self, scene_id: str, reason: Reason, message: str, job: RegistrationJob | None = None,
                     request_id: str | None = None, ack: Ack | None = None, topic: str | None = None) -> None:
        """A terminal error status (on `topic`, default the scene's register topic): of `job` (dropped from the
        journal once delivered), or of a refused command (acknowledged with `ack` once delivered)."""
        self._metrics.answered("registration", reason)
        status = RegistrationStatus(status=message, scene_id=scene_id, reason=reason,
                                    request_id=job.request_id if job else request_id)
        on_delivered = self._finished(job) if job else ack
        if topic is not None:
            self._transport.publish(topic, dumps(status), on_delivered=on_delivered)
        else:
            self._status(scene_id, status, on_delivered)

    def _finished(self, job: RegistrationJob) -> Callable[[], None]:
        """Drop `job` from the journal once its terminal status is delivered."""
        journal = self._journal
        return lambda: journal.remove(job.job_id)

    def _status(self, scene_id: str, status: RegistrationStatus,
                on_delivered: Callable[[], None] | None = None) -> None:
        self._transport.publish(self._topics.register(scene_id), dumps(status), on_delivered=on_delivered)
        for listener in self._listeners:
            try:
                listener(scene_id, status)
            except Exception:  # noqa: BLE001 - a front door's failure must not stop a registration
                log.exception("registration status listener failed for %s", scene_id)

"""Prometheus metrics of the service (prometheus_client), served on `metrics.port` when set.

Each daemon has its own registry, so several daemons in one process (tests) do not collide. `markerless health`
and the container HEALTHCHECK read `markerless_worker_alive` from the same endpoint: one liveness for both.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

WORKER_ALIVE = "markerless_worker_alive"

_LOCALIZATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_REGISTRATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Metrics:
    """The service's metrics. Constructing registers them; `serve(host, port)` exposes them over HTTP."""

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("markerless_queue_depth", "Calibration requests waiting for the worker.",
                                 registry=r)
        self.queue_depth.set_function(queue_depth)
        self.requests = Counter("markerless_requests", "Requests answered, by kind, outcome and reason.",
                                ["kind", "outcome", "reason"], registry=r)
        self.localization_seconds = Histogram(
            "markerless_localization_seconds", "Worker time per localized frame (decode to pose).",
            buckets=_LOCALIZATION_BUCKETS, registry=r)
        self.registration_seconds = Histogram(
            "markerless_registration_seconds", "Duration of completed scene registrations.",
            buckets=_REGISTRATION_BUCKETS, registry=r)
        self.scene_version = Gauge("markerless_scene_version_loaded",
                                   "1 for each scene version the worker holds in memory.", ["scene_id", "version"],
                                   registry=r)
        self.worker_alive = Gauge(WORKER_ALIVE, "1 while the worker takes requests, 0 when the watchdog sees it "
                                  "stalled.", registry=r)
        self._loaded: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: object | None = None

    def answered(self, kind: str, reason: str | None) -> None:
        """Count one answered request (`reason` None: success)."""
        self.requests.labels(kind, "success" if reason is None else "failure", reason or "").inc()

    def loaded(self, scene_id: str, version: str) -> None:
        """The worker now serves `version` of `scene_id` (the previous version's series is removed)."""
        with self._lock:
            old = self._loaded.get(scene_id)
            if old is not None and old != version:
                self.scene_version.remove(scene_id, old)
            self._loaded[scene_id] = version
            self.scene_version.labels(scene_id, version).set(1)

    def serve(self, host: str, port: int) -> None:
        try:
            server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics endpoint {host}:{port} (metrics.port): {exc.strerror}") from exc
        self._server = server
        log.info("metrics on http://%s:%s/metrics", host, port)

    def close(self) -> None:
        server = self._server
        self._server = None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]

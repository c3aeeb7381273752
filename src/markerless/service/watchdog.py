"""The watchdog: withholds the heartbeat while the calibration worker is stuck.

The worker is stalled when its thread died or it has not come back for a request within `worker.stall_s`. Then
the `running` heartbeat is withheld, availability is `stalled` and the `worker_alive` metric 0; all three flip
back when the worker takes requests again.
"""

from __future__ import annotations

import logging
import threading
import time

from markerless.service.messages import ONLINE, STALLED
from markerless.service.metrics import Metrics
from markerless.service.settings import Settings
from markerless.service.transport import MqttTransport
from markerless.service.worker import Worker

log = logging.getLogger(__name__)


class Watchdog:
    """The watchdog thread's body (`run`); `alive` says whether the worker is seen as alive now."""

    def __init__(self, settings: Settings, worker: Worker, transport: MqttTransport, metrics: Metrics,
                 stopping: threading.Event) -> None:
        self.settings = settings
        self._worker = worker
        self._transport = transport
        self._metrics = metrics
        self._stopping = stopping
        self.alive = True

    def run(self, worker_thread: threading.Thread) -> None:
        """Every ~second: is the worker alive? A change flips heartbeat, availability and the metric."""
        stall_s = self.settings.worker.stall_s
        while not self._stopping.wait(min(1.0, stall_s / 4)):
            alive = worker_thread.is_alive() and time.monotonic() - self._worker.tick < stall_s
            if alive == self.alive:
                continue
            self.alive = alive
            self._metrics.worker_alive.set(1 if alive else 0)
            if alive:
                log.warning("worker takes requests again")
            else:
                log.error("worker stalled: no progress for %.0f s (worker.stall_s); heartbeat withheld", stall_s)
            self._transport.set_availability(ONLINE if alive else STALLED)

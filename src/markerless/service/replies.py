"""Answering calibration frames: exactly one reply per request, and the request acknowledged once it is delivered.

A reply goes where the request says (`reply_to`: the HTTP front door's results), by default to the camera's MQTT
pose topic. An MQTT request is acknowledged to the broker only once that reply has been delivered, so the broker
redelivers what a crash left unanswered. Accepted requests are tracked until then by
(camera, payload digest); answered ones are remembered across restarts in the `AnsweredLog`, so a redelivery
(QoS 1 DUP flag) of an answered or still pending request is acknowledged without a second reply.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from markerless.errors import Reason
from markerless.service.messages import PoseResult, dumps
from markerless.service.metrics import Metrics
from markerless.service.requests import CalibrationRequest
from markerless.service.state import AnsweredLog
from markerless.service.topics import Topics
from markerless.service.transport import Ack, MqttTransport

log = logging.getLogger(__name__)


class Replies:
    """Publishes pose replies and settles each request (remembered as answered, then acknowledged) on delivery."""

    def __init__(self, transport: MqttTransport, topics: Topics, metrics: Metrics, answered: AnsweredLog) -> None:
        self._transport = transport
        self._topics = topics
        self._metrics = metrics
        self._answered = answered
        # accepted calibration requests not yet answered-and-delivered, by key
        self._inflight: dict[tuple[str, str], CalibrationRequest] = {}
        self._inflight_lock = threading.Lock()

    def track(self, request: CalibrationRequest) -> None:
        """An accepted request: pending until its reply is delivered (a redelivery then waits for that reply)."""
        with self._inflight_lock:
            self._inflight[request.key] = request

    def redelivered(self, key: tuple[str, str], ack: Ack) -> bool:
        """A QoS 1 redelivery (DUP flag) of a request already accepted: True when it must not be handled again.
        Answered (also before a restart): acknowledge now. Still in work: acknowledge with the original's reply.
        A redelivery is byte-identical, so the key is the payload's digest: frames without a request id too."""
        with self._inflight_lock:
            pending = self._inflight.get(key)
        if pending is not None and pending.add_ack(ack):
            return True
        if pending is not None or key in self._answered:
            ack()
            return True
        return False

    def settle(self, key: tuple[str, str], ack: Ack) -> Callable[[], None]:
        """Run once a frame's answer is delivered: remember it as answered, then acknowledge it."""

        def settle() -> None:
            self._answered.add(key)
            ack()

        return settle

    def reply(self, request: CalibrationRequest, result: PoseResult) -> None:
        if not request.claim_reply():
            log.error("second reply to request %s of %s suppressed", request.request_id, request.camera_id)
            return
        if result.success:
            log.info("camera %s: pose (request %s, %d inliers)", request.camera_id, request.request_id,
                     result.num_inliers)
        else:
            log.info("camera %s: %s (request %s): %s", request.camera_id, result.reason, request.request_id,
                     result.message)
        self._metrics.answered("calibration", result.reason)
        if request.reply_to is not None:  # another front door: nothing to acknowledge or remember for redelivery
            try:
                request.reply_to(result)
            except Exception:  # noqa: BLE001 - a front door's failure must not stop the worker
                log.exception("delivering the reply to request %s of %s failed", request.request_id,
                              request.camera_id)
            return
        self._transport.publish(self._topics.pose(request.camera_id), dumps(result),
                                on_delivered=lambda: self.delivered(request))

    def delivered(self, request: CalibrationRequest) -> None:
        """The reply reached the broker: remember the request as answered, then acknowledge it."""
        key = request.key
        self._answered.add(key)
        with self._inflight_lock:
            if self._inflight.get(key) is request:
                del self._inflight[key]
        request.delivered()

    def reply_failure(self, request: CalibrationRequest, reason: Reason, message: str) -> None:
        self.reply(request, PoseResult.failure(request.camera_id, reason, message, request.request_id,
                                               scene_id=request.scene_id))

    def refuse(self, camera_id: str, request_id: str | None, reason: Reason, message: str,
               ack: Callable[[], None]) -> None:
        """Reply to a frame refused before it became a request; acknowledge it once the reply is delivered."""
        log.info("camera %s: refused (%s): %s", camera_id, reason, message)
        self._metrics.answered("calibration", reason)
        self._transport.publish(self._topics.pose(camera_id),
                                dumps(PoseResult.failure(camera_id, reason, message, request_id)), on_delivered=ack)

    def close(self) -> None:
        self._answered.close()

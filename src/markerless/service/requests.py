"""A calibration request between the dispatcher and the worker, and the bounded per-camera queue that holds it.

The queue keeps one slot per camera and front door: a newer frame of a camera takes its queued older frame's place
(the older one is answered `superseded`), a full queue refuses (`overloaded`), a closed one refuses
(`shutting_down`). The worker answers `timeout` to a request taken past its `deadline`. A request carries where
its reply goes (`reply_to`; None: the camera's MQTT pose topic), so the worker and `Replies` serve every front door
alike; an MQTT and an HTTP request of one camera have their own slots (two requesters, neither replaces the other).
"""

from __future__ import annotations

import binascii
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from markerless.errors import Reason
from markerless.service.messages import CalibrationFrame
from markerless.service.scenes_file import ScenesFile
from markerless.service.transport import Ack

ReplySink = Callable[[Any], None]  # receives the request's PoseResult (messages.py) on the worker's thread


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
    reply_to: ReplySink | None = field(default=None, repr=False)  # None: published on the MQTT pose topic
    origin: str = "mqtt"  # the front door it came through: its queue slot is (origin, camera)
    _replied: bool = False
    _delivered: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def slot(self) -> tuple[str, str]:
        """Its queue slot: a newer request of the same camera through the same front door replaces it."""
        return self.origin, self.camera_id

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


class Refusal(Exception):
    """A frame refused before it became a request: `reason` and a message naming the fault."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ResolvedFrame:
    """What a frame asks once the camera's entry in scenes.yaml filled in what the frame left out."""

    scene_id: str
    intrinsics: list[list[float]] | None
    distortion: list[float]
    intrinsics_mode: str
    image: bytes


def resolve_frame(camera_id: str, frame: CalibrationFrame, scenes: ScenesFile) -> ResolvedFrame:
    """The frame's scene, intrinsics, distortion and mode (the frame's own, else its camera's), and its decoded
    base64 image; raises `Refusal`. Every front door resolves frames here, so they answer one frame alike."""
    if frame.id is not None and frame.id != camera_id:
        raise Refusal(Reason.CAMERA_MISMATCH, f"frame id {frame.id!r} does not match the topic's camera {camera_id!r}")
    camera = scenes.cameras.get(camera_id)
    scene_id = frame.scene_id or (camera.scene if camera else None)
    if scene_id is None:
        raise Refusal(Reason.UNKNOWN_CAMERA,
                      f"camera {camera_id!r} is not in scenes.yaml and the frame names no scene_id")
    intrinsics = frame.intrinsics if frame.intrinsics is not None else (camera.intrinsics if camera else None)
    mode = frame.intrinsics_mode or (camera.intrinsics_mode if camera else "refine")
    if intrinsics is None and mode != "estimate":
        raise Refusal(Reason.BAD_INTRINSICS, f"no intrinsics in the frame and none configured for camera "
                      f"{camera_id!r} (send intrinsics, or intrinsics_mode 'estimate' to have them estimated)")
    if frame.distortion is not None:
        distortion = list(frame.distortion)
    else:
        distortion = list(camera.distortion) if camera else []
    try:
        image = frame.image_bytes()
    except (binascii.Error, ValueError) as exc:
        raise Refusal(Reason.BAD_IMAGE, f"image is not valid base64: {exc}") from exc
    return ResolvedFrame(scene_id, [list(r) for r in intrinsics] if intrinsics is not None else None, distortion,
                         mode, image)


class RequestQueue:
    """Bounded FIFO with one slot per (front door, camera): a newer frame takes the queued older one's place."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._items: OrderedDict[tuple[str, str], CalibrationRequest] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, request: CalibrationRequest) -> tuple[Reason | None, CalibrationRequest | None]:
        """Enqueue. Returns (refusal reason or None, superseded request or None)."""
        with self._cond:
            if self._closed:
                return Reason.SHUTTING_DOWN, None
            older = self._items.get(request.slot)
            if older is None and len(self._items) >= self._maxsize:
                return Reason.OVERLOADED, None
            self._items[request.slot] = request  # an existing key keeps its position: no queue jumping lost
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

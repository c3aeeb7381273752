"""A calibration request between the dispatcher and the worker, and the bounded per-camera queue that holds it.

The queue keeps one slot per camera: a newer frame of a camera takes its queued older frame's place (the older one
is answered `superseded`), a full queue refuses (`overloaded`), a closed one refuses (`shutting_down`). The worker
answers `timeout` to a request taken past its `deadline`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from markerless.errors import Reason
from markerless.service.transport import Ack


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

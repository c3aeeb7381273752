"""Every MQTT topic of the service, built and parsed in one place.

Topic strings follow SceneScape's `scene_common/mqtt.py` templates under a configurable prefix (default
`scenescape`). An incoming topic is parsed once into a `TopicRef` (kind + id) and the dispatcher routes on the
kind, never on string suffixes. Request topics are subscribed with `#`, not `+`: an id with a slash (`../x`) is
several topic levels, and a `+` filter would drop it without a word; with `#` it reaches the dispatcher, which
refuses it on the matching reply topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

# An id becomes one topic level of a reply: printable, no wildcard, no separator, bounded (SceneScape's REST
# era allowed [A-Za-z0-9-_.]{1,255}; UUIDs and names like "camera1" both fit the wider rule here).
_ID = re.compile(r"^[^/#+\x00-\x1f\x7f]{1,255}$")


class TopicKind(StrEnum):
    """What an incoming message is, by its topic."""

    CALIBRATION_FRAME = "calibration_frame"  # image/calibration/camera/{camera_id}
    REGISTER_SCENE = "register_scene"  # cmd/autocalibration/scene/{scene_id} (requests and our own replies)
    SCENE_UPDATE = "scene_update"  # cmd/scene/update/{scene_id}
    STATUS = "status"  # sys/autocalibration/status (isAlive / running)
    SCENE_VERSION = "scene_version"  # sys/autocalibration/version/{scene_id} (retained: version now served)
    CAMERA_COMMAND = "camera_command"  # cmd/autocalibration/camera/{camera_id} (forget; and our own replies)


@dataclass(frozen=True)
class TopicRef:
    """A parsed incoming topic. `id` is the camera or scene id as received ('' for the status topic); `valid`
    is False when it cannot be one topic level of a reply (several levels, empty, too long, control characters)."""

    kind: TopicKind
    id: str
    valid: bool = True


def valid_id(value: str) -> bool:
    """True when `value` can be one level of a topic we publish."""
    return bool(_ID.match(value))


class Topics:
    """Builds and parses the service's topics under one prefix."""

    def __init__(self, prefix: str = "scenescape") -> None:
        self.prefix = prefix.rstrip("/")
        self._inbound = {
            f"{self.prefix}/image/calibration/camera/": TopicKind.CALIBRATION_FRAME,
            f"{self.prefix}/cmd/autocalibration/scene/": TopicKind.REGISTER_SCENE,
            f"{self.prefix}/cmd/scene/update/": TopicKind.SCENE_UPDATE,
            f"{self.prefix}/sys/autocalibration/version/": TopicKind.SCENE_VERSION,
            f"{self.prefix}/cmd/autocalibration/camera/": TopicKind.CAMERA_COMMAND,
        }

    # -- subscriptions ---------------------------------------------------------------------------------------
    def subscriptions(self, shared_group: str | None = None) -> list[str]:
        """Topic filters the service subscribes to. With a shared group, requests and `isAlive` are shared (one
        replica gets each); version announcements are not (every replica must reload)."""
        share = f"$share/{shared_group}/" if shared_group else ""
        requests = [f"{head}#" for head, kind in self._inbound.items() if kind is not TopicKind.SCENE_VERSION]
        return [*(share + f for f in [*requests, self.status]), self.scene_version("+")]

    # -- published -------------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """Heartbeat: `isAlive` in, `running` out (SceneScape's plain strings)."""
        return f"{self.prefix}/sys/autocalibration/status"

    @property
    def availability(self) -> str:
        """Retained `online` / `offline` (last will) / `stopped` (clean exit)."""
        return f"{self.prefix}/sys/autocalibration/availability"

    def replica_availability(self, client_id: str) -> str:
        """Per-replica availability when replicas share a group (client id made a valid topic level)."""
        return f"{self.availability}/{self._id(''.join('_' if c in '/#+' else c for c in client_id))}"

    def scene_version(self, scene_id: str) -> str:
        """Retained `{"scene_id", "version"}` published when a registration commits: every replica reloads."""
        head = f"{self.prefix}/sys/autocalibration/version/"
        return head + ("+" if scene_id == "+" else self._id(scene_id))

    def pose(self, camera_id: str) -> str:
        """Pose results for one camera."""
        return f"{self.prefix}/autocalibration/camera/pose/{self._id(camera_id)}"

    def calibration(self, camera_id: str) -> str:
        """Retained: the camera's current calibration (an empty retained message once it is forgotten)."""
        return f"{self.prefix}/autocalibration/camera/calibration/{self._id(camera_id)}"

    def calibration_event(self, camera_id: str) -> str:
        """calibrated / moved / lost / recalibrated events of one camera."""
        return f"{self.prefix}/autocalibration/camera/event/{self._id(camera_id)}"

    def camera_command(self, camera_id: str) -> str:
        """Operator commands for one camera (forget its calibration) and their replies."""
        return f"{self.prefix}/cmd/autocalibration/camera/{self._id(camera_id)}"

    def register(self, scene_id: str) -> str:
        """Registration requests and status replies for one scene (shared, as in SceneScape)."""
        return f"{self.prefix}/cmd/autocalibration/scene/{self._id(scene_id)}"

    def frame(self, camera_id: str) -> str:
        """Where a camera publishes calibration frames (used by clients and tests)."""
        return f"{self.prefix}/image/calibration/camera/{self._id(camera_id)}"

    def reply_to(self, ref: TopicRef) -> str:
        """Where a request on `ref` is answered, with its id as received: a refused multi-level id is answered on
        the matching multi-level topic, the one its sender watches."""
        if ref.kind is TopicKind.CALIBRATION_FRAME:
            return f"{self.prefix}/autocalibration/camera/pose/{ref.id}"
        if ref.kind in (TopicKind.REGISTER_SCENE, TopicKind.SCENE_UPDATE):
            return f"{self.prefix}/cmd/autocalibration/scene/{ref.id}"
        if ref.kind is TopicKind.CAMERA_COMMAND:
            return f"{self.prefix}/cmd/autocalibration/camera/{ref.id}"
        raise ValueError(f"{ref.kind} messages get no reply")

    def update(self, scene_id: str) -> str:
        """Where SceneScape's manager announces a scene edit (used by clients and tests)."""
        return f"{self.prefix}/cmd/scene/update/{self._id(scene_id)}"

    # -- parsing ---------------------------------------------------------------------------------------------
    def parse(self, topic: str) -> TopicRef | None:
        """The typed reference of an incoming topic (its id checked, see `TopicRef.valid`), or None when not ours."""
        if topic == self.status:
            return TopicRef(TopicKind.STATUS, "")
        for head, kind in self._inbound.items():
            if topic.startswith(head):
                ident = topic[len(head) :]
                return TopicRef(kind, ident, valid_id(ident))
        return None

    @staticmethod
    def _id(value: str) -> str:
        if not valid_id(value):
            raise ValueError(f"id {value!r} cannot be a topic level (empty, too long, or has / # + or controls)")
        return value

"""The calibration watch as the service runs it: each localized frame updates its camera's calibration in the
shared store and the changes are published.

Per frame, under the camera's lock in the store (`scene.calibrations`): read the calibration, apply the frame
(`pipeline.calibration_watch`), publish the calibration (retained) and any event, wait (bounded) for the broker to
acknowledge them, write the record, release. Replicas watching one camera are thereby serialised: the retained
message is always the one the store holds, in revision order. On every (re)connect all stored calibrations are
published again (a broker without persistence loses retained messages), from a thread of their own so the network
thread never waits on a camera's lock.

Only frames that ran through the localizer count: a failure to localize (or an undecodable image) is evidence
that the camera is blocked, dark or pointed elsewhere; a refusal of the request (timeout, superseded, scene
registering, ...) says nothing about the camera.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from markerless.errors import Reason
from markerless.pipeline.calibration_watch import (
    CAMERA_FAILURES,
    Calibration,
    Outcome,
    WatchOptions,
    observe_failure,
    observe_result,
)
from markerless.pipeline.localization import LocalizationResult
from markerless.scene.calibrations import CalibrationStore
from markerless.service.messages import CalibrationEvent, CameraCalibration, dumps, utc_now
from markerless.service.scenes_file import ScenePose, ScenesFile
from markerless.service.settings import Settings
from markerless.service.topics import Topics
from markerless.service.transport import MqttTransport

log = logging.getLogger(__name__)

_DELIVERY_WAIT_S = 5.0  # bound on holding a camera's lock for the broker's acknowledgement


def is_watched(options: WatchOptions, scenes: ScenesFile, camera_id: str) -> bool:
    """Whether the service keeps and watches the camera's calibration (watching on, and not off for the camera)."""
    camera = scenes.cameras.get(camera_id)
    return options.enabled and (camera is None or camera.watch)


class CalibrationWatch:
    """Keeps, fuses and publishes each watched camera's calibration."""

    def __init__(self, settings: Settings, scenes: ScenesFile, transport: MqttTransport, topics: Topics) -> None:
        self.options = settings.calibration
        self._scenes = scenes
        self._transport = transport
        self._topics = topics
        self.store = CalibrationStore(settings.store.root)

    def watched(self, camera_id: str) -> bool:
        return is_watched(self.options, self._scenes, camera_id)

    # -- frames (worker thread) ------------------------------------------------------------------------------------
    def localized(self, camera_id: str, result: LocalizationResult) -> Outcome | None:
        """A frame that ran through the localizer; the outcome for the pose reply, None when not watched."""
        if not self.watched(camera_id):
            return None
        at = utc_now()
        return self._apply(camera_id, lambda cal: observe_result(cal, camera_id, result, at, self.options))

    def failed(self, camera_id: str, reason: Reason | str, message: str) -> Outcome | None:
        """A frame of the camera that failed before or in localization; counted when it says something about it."""
        if not self.watched(camera_id) or reason not in CAMERA_FAILURES:
            return None
        at = utc_now()
        return self._apply(camera_id, lambda cal: observe_failure(cal, str(reason), message, at, self.options))

    def _apply(self, camera_id: str, step: Any) -> Outcome | None:
        """Apply `step` (calibration or None -> Outcome, or None when the frame is no evidence) under the camera's
        lock, publishing and storing what changed."""
        def change(record: dict[str, Any] | None) -> tuple[dict[str, Any] | None, Outcome | None]:
            calibration = None
            if record is not None:
                try:
                    calibration = Calibration.from_dict(record)
                except (KeyError, TypeError, ValueError) as exc:  # written by another version, or damaged
                    log.warning("camera %s: stored calibration unreadable (%s); starting a new one", camera_id, exc)
            outcome: Outcome | None = step(calibration)
            if outcome is None or not outcome.changed or outcome.calibration is None:
                return record, outcome
            self._publish(outcome.calibration, outcome, wait=True)
            return outcome.calibration.to_dict(), outcome

        outcome: Outcome | None = self.store.update(camera_id, change)
        return outcome

    # -- operator and connection ---------------------------------------------------------------------------------
    def forget(self, camera_id: str) -> bool:
        """Drop the camera's calibration and clear its retained message; True when there was one."""

        def change(record: dict[str, Any] | None) -> tuple[None, bool]:
            if record is not None:
                self._send(self._topics.calibration(camera_id), b"", retain=True, wait=True)
            return None, record is not None

        return bool(self.store.update(camera_id, change))

    def republish_all(self) -> None:
        """(Re)connected: publish every stored calibration again, each under its camera's lock."""
        threading.Thread(target=self._republish, name="markerless-calibrations", daemon=True).start()

    def _republish(self) -> None:
        try:
            for camera_id in self.store.camera_ids():
                def change(record: dict[str, Any] | None, camera_id: str = camera_id) -> tuple[Any, None]:
                    if record is not None:
                        try:
                            self._publish(Calibration.from_dict(record), None, wait=False)
                        except (KeyError, TypeError, ValueError) as exc:
                            log.warning("camera %s: stored calibration unreadable (%s)", camera_id, exc)
                    return record, None

                self.store.update(camera_id, change)
        except Exception:  # noqa: BLE001 - a bad record must not end the service
            log.exception("republishing calibrations failed")

    # -- wire ------------------------------------------------------------------------------------------------------
    def payload(self, cal: Calibration) -> CameraCalibration:
        """The retained message of `cal`: pose in scene coordinates (the scene's pose applied, as pose replies)."""
        entry = self._scenes.scenes.get(cal.scene_id)
        pose = entry.pose if entry else ScenePose()
        quaternion, translation = pose.apply(list(cal.quaternion), list(cal.translation))
        last_failure = _reason(cal.last_failure) if cal.state == "lost" else None
        return CameraCalibration(
            camera_id=cal.camera_id, scene_id=cal.scene_id, scene_version=cal.scene_version, quaternion=quaternion,
            translation=translation, intrinsics=[list(r) for r in cal.intrinsics], distortion=list(cal.distortion),
            intrinsics_source=cal.intrinsics_source,  # type: ignore[arg-type]
            position_sigma_m=cal.position_sigma_m * max(pose.scale), rotation_sigma_deg=cal.rotation_sigma_deg,
            frames=cal.frames, first_solved_at=cal.first_solved_at, updated_at=cal.updated_at, state=cal.state,
            last_failure=last_failure, revision=cal.revision,
        )

    def _publish(self, cal: Calibration, outcome: Outcome | None, wait: bool) -> None:
        self._send(self._topics.calibration(cal.camera_id), dumps(self.payload(cal)), retain=True, wait=wait)
        entry = self._scenes.scenes.get(cal.scene_id)
        pose = entry.pose if entry else ScenePose()
        for event in outcome.events if outcome else []:
            displacement = None if event.displacement_m is None else event.displacement_m * max(pose.scale)
            message = CalibrationEvent(
                event=event.event, camera_id=event.camera_id, scene_id=event.scene_id,
                scene_version=event.scene_version, timestamp=event.at, frames=event.frames,
                displacement_m=displacement, rotation_deg=event.rotation_deg, reason=_reason(event.reason),
                message=event.message,
            )
            log.info("camera %s: %s (%s)", event.camera_id, event.event, dumps(message).decode())
            self._send(self._topics.calibration_event(cal.camera_id), dumps(message), retain=False, wait=wait)

    def _send(self, topic: str, payload: bytes, retain: bool, wait: bool) -> None:
        delivered = threading.Event()
        self._transport.publish(topic, payload, retain=retain, on_delivered=delivered.set)
        if wait and self._transport.connected.is_set() and not delivered.wait(_DELIVERY_WAIT_S):
            log.warning("no acknowledgement for %s within %.0f s (sent on reconnect)", topic, _DELIVERY_WAIT_S)


def _reason(value: str | None) -> Reason | None:
    """The typed reason of a stored one (None for none, or one this version does not know)."""
    try:
        return None if value is None else Reason(value)
    except ValueError:
        return None

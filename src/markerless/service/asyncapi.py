"""The MQTT API's contract, generated: `docs/asyncapi.yaml` from `Topics` and the payload models of `messages`,
and `docs/schemas/*.json` from those models.

`python -m markerless.service.asyncapi --write docs/` regenerates both; a test fails when the committed files
drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

from markerless import __version__
from markerless.service.messages import (
    FORGET,
    IS_ALIVE,
    OFFLINE,
    ONLINE,
    REGISTER,
    RUNNING,
    STALLED,
    STOPPED,
    UPDATE,
    json_schemas,
)
from markerless.service.topics import Topics

# Channel parameters: each stands for one topic level of an address, and is documented wherever it appears.
_PARAMETERS = {
    "camera_id": "SceneScape camera id.",
    "scene_id": "SceneScape scene id.",
    "client_id": "mqtt.client_id of a replica (with mqtt.shared_group).",
}
_CAMERA, _SCENE, _CLIENT = (f"{{{name}}}" for name in _PARAMETERS)


def _channel(address: str, *messages: str) -> dict[str, Any]:
    """A channel whose parameters are the placeholders in its address (fresh dicts: YAML would alias shared ones)."""
    parameters = {name: {"description": text} for name, text in _PARAMETERS.items() if f"{{{name}}}" in address}
    return {
        "address": address,
        **({"parameters": parameters} if parameters else {}),
        "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
    }


def _raw(values: list[str], description: str) -> dict[str, Any]:
    return {"contentType": "text/plain", "payload": {"type": "string", "enum": values}, "summary": description}


def asyncapi(prefix: str = "scenescape") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the service (from the service's point of view: it receives and sends)."""
    topics = Topics(prefix)

    def json_msg(name: str, summary: str) -> dict[str, Any]:
        return {
            "name": name,
            "contentType": "application/json",
            "summary": summary,
            "payload": {"$ref": f"schemas/{name}.json"},
        }

    channels = {
        "calibrationFrame": _channel(topics.frame(_CAMERA), "CalibrationFrame"),
        "cameraPose": _channel(topics.pose(_CAMERA), "PoseResult"),
        "sceneRegistration": _channel(
            topics.register(_SCENE), "RegisterCommand", "RegisterRequest", "RegistrationStatus"
        ),
        "sceneUpdate": _channel(topics.update(_SCENE), "UpdateCommand"),
        "status": _channel(topics.status, "Heartbeat", "HeartbeatReply"),
        "availability": _channel(topics.availability, "Availability"),
        "replicaAvailability": _channel(topics.replica_availability(_CLIENT), "Availability"),
        "sceneVersion": _channel(topics.scene_version(_SCENE), "SceneVersion"),
        "cameraCalibration": _channel(topics.calibration(_CAMERA), "CameraCalibration"),
        "calibrationEvent": _channel(topics.calibration_event(_CAMERA), "CalibrationEvent"),
        "cameraCommand": _channel(
            topics.camera_command(_CAMERA), "ForgetCommand", "CameraCommand", "CameraCommandStatus"
        ),
    }

    def op(action: str, channel: str, messages: list[str], summary: str) -> dict[str, Any]:
        return {
            "action": action,
            "summary": summary,
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in messages],
        }

    operations = {
        "receiveCalibrationFrame": op(
            "receive", "calibrationFrame", ["CalibrationFrame"], "Localize a frame (only when calibrate is true)."
        ),
        "sendCameraPose": op("send", "cameraPose", ["PoseResult"], "Exactly one reply per accepted frame (QoS 1)."),
        "receiveRegistration": op(
            "receive", "sceneRegistration", ["RegisterCommand", "RegisterRequest"], "Register or re-register a scene."
        ),
        "sendRegistrationStatus": op(
            "send", "sceneRegistration", ["RegistrationStatus"], "registering / progress / busy / success / error."
        ),
        "receiveSceneUpdate": op("receive", "sceneUpdate", ["UpdateCommand"], "Re-register if dataset/config changed."),
        "receiveHeartbeat": op("receive", "status", ["Heartbeat"], "isAlive."),
        "sendHeartbeat": op("send", "status", ["HeartbeatReply"], "running."),
        "sendAvailability": op("send", "availability", ["Availability"], "Retained; 'offline' is the last will."),
        "sendReplicaAvailability": op(
            "send", "replicaAvailability", ["Availability"], "With mqtt.shared_group: per replica, instead."
        ),
        "sendSceneVersion": op("send", "sceneVersion", ["SceneVersion"], "Retained; on every committed version."),
        "receiveSceneVersion": op("receive", "sceneVersion", ["SceneVersion"], "Every replica reloads the scene."),
        "sendCameraCalibration": op(
            "send", "cameraCalibration", ["CameraCalibration"],
            "Retained; on every change and on (re)connect; empty once forgotten.",
        ),
        "sendCalibrationEvent": op(
            "send", "calibrationEvent", ["CalibrationEvent"], "calibrated / moved / lost / recalibrated."
        ),
        "receiveCameraCommand": op(
            "receive", "cameraCommand", ["ForgetCommand", "CameraCommand"], "Forget a camera's calibration."
        ),
        "sendCameraCommandStatus": op("send", "cameraCommand", ["CameraCommandStatus"], "forgotten / unknown / error."),
    }
    messages = {
        "CalibrationFrame": json_msg("CalibrationFrame", "Camera frame to localize."),
        "PoseResult": json_msg("PoseResult", "Pose or typed failure."),
        "RegisterRequest": json_msg("RegisterRequest", "JSON registration request."),
        "RegistrationStatus": json_msg("RegistrationStatus", "Registration status."),
        "SceneVersion": json_msg("SceneVersion", "Scene version committed to the store."),
        "CameraCommand": json_msg("CameraCommand", "JSON camera command."),
        "CameraCalibration": json_msg("CameraCalibration", "A camera's current calibration."),
        "CalibrationEvent": json_msg("CalibrationEvent", "A change of a camera's calibration."),
        "CameraCommandStatus": json_msg("CameraCommandStatus", "Reply to a camera command."),
        "ForgetCommand": _raw([FORGET], "Forget the camera's calibration."),
        "RegisterCommand": _raw([REGISTER], "SceneScape's plain registration request."),
        "UpdateCommand": _raw([UPDATE], "SceneScape manager: the scene was edited."),
        "Heartbeat": _raw([IS_ALIVE], "Liveness probe; anything else on the topic is ignored."),
        "HeartbeatReply": _raw([RUNNING], "Liveness answer."),
        "Availability": _raw(
            [ONLINE, OFFLINE, STOPPED, STALLED], "Service availability, retained; 'stalled': worker stuck (watchdog)."
        ),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "markerless",
            "version": __version__,
            "description": (
                "Markerless camera calibration over MQTT, a drop-in for SceneScape's auto-calibration topics. "
                "The topic prefix is configurable (mqtt.topic_prefix). All messages are published at QoS 1."
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def rendered_docs() -> dict[str, str]:
    """Relative path -> file text of every generated document."""
    files = {
        f"schemas/{name}.json": orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"
        for name, schema in json_schemas().items()
    }
    header = "# Generated by `python -m markerless.service.asyncapi --write docs/`; do not edit.\n"
    files["asyncapi.yaml"] = header + yaml.safe_dump(asyncapi(), sort_keys=False, width=120)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the AsyncAPI document and JSON schemas of the MQTT API.")
    parser.add_argument("--write", type=Path, required=True, metavar="DIR", help="output directory, e.g. docs/")
    args = parser.parse_args(argv)
    for rel, text in rendered_docs().items():
        path = args.write / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

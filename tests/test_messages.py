"""MQTT payloads and topics: SceneScape's field names and types, our extras, and the committed API documents."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import orjson
import pytest
import yaml
from pydantic import ValidationError

from markerless.service.asyncapi import rendered_docs
from markerless.service.messages import (
    CalibrationFrame,
    PoseResult,
    RegisterRequest,
    RegistrationStatus,
    dumps,
    json_schemas,
)
from markerless.service.topics import TopicKind, TopicRef, Topics

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_committed_api_documents_match_the_models() -> None:
    """docs/asyncapi.yaml and docs/schemas/*.json are generated from the models; regenerate with
    `python -m markerless.service.asyncapi --write docs/` after changing a payload."""
    for rel, text in rendered_docs().items():
        path = DOCS / rel
        assert path.is_file(), f"{path} missing: run python -m markerless.service.asyncapi --write docs/"
        assert path.read_text() == text, f"{path} drifted: run python -m markerless.service.asyncapi --write docs/"
    committed = {p.name for p in (DOCS / "schemas").glob("*.json")}
    assert committed == {Path(rel).name for rel in rendered_docs() if rel.startswith("schemas/")}


def test_asyncapi_references_resolve() -> None:
    doc = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())
    assert doc["asyncapi"].startswith("3.")
    for name, message in doc["components"]["messages"].items():
        ref = message["payload"].get("$ref")
        if ref:
            assert (DOCS / ref).is_file(), name
    for op in doc["operations"].values():
        channel = op["channel"]["$ref"].split("/")[-1]
        assert channel in doc["channels"]
        for m in op["messages"]:
            assert m["$ref"].split("/")[-1] in doc["channels"][channel]["messages"]


def test_pose_success_keeps_scenescape_fields_and_types() -> None:
    reply = orjson.loads(dumps(PoseResult(
        timestamp="2026-01-01T00:00:00+00:00", name="cam1", camera_id="cam1", error="False", success=True,
        quaternion=[0.0, 0.0, 0.0, 1.0], translation=[1.0, 2.0, 3.0], scale=[1.0, 1.0, 1.0], request_id="r",
        num_matches=10, num_inliers=8, inlier_ratio=0.8, scene_id="s", scene_version="v", timings_ms={"total": 3.0})))
    jsonschema.validate(reply, json_schemas()["PoseResult"])
    # SceneScape's UI checks msg.error === "False" (a string) and reads translation / quaternion [x, y, z, w].
    assert reply["error"] == "False" and isinstance(reply["error"], str)
    assert reply["success"] is True and reply["name"] == reply["camera_id"] == "cam1"
    assert len(reply["quaternion"]) == 4 and len(reply["translation"]) == 3 and reply["scale"] == [1.0, 1.0, 1.0]
    assert "message" not in reply and "reason" not in reply  # SceneScape sends no message on success


def test_pose_failure_has_message_reason_and_no_pose() -> None:
    reply = orjson.loads(dumps(PoseResult.failure("cam1", "bad_image", "image does not decode", "r-9")))
    jsonschema.validate(reply, json_schemas()["PoseResult"])
    assert reply["error"] == "True" and reply["success"] is False
    assert (reply["reason"], reply["message"], reply["request_id"]) == ("bad_image", "image does not decode", "r-9")
    assert not {"quaternion", "translation", "scale"} & set(reply)


@pytest.mark.parametrize(
    "fields",
    [
        {"error": "False", "success": False, "message": "m", "reason": "pnp_failed"},  # flags disagree
        {"error": "false", "success": False, "message": "m", "reason": "pnp_failed"},  # SceneScape's exact string
        {"error": "False", "success": True},  # success without pose
        {"error": "True", "success": False},  # failure without reason
    ],
)
def test_inconsistent_pose_results_cannot_be_built(fields: dict) -> None:
    with pytest.raises(ValidationError):
        PoseResult(timestamp="t", name="c", camera_id="c", **fields)


def test_registration_status_shapes() -> None:
    schema = json_schemas()["RegistrationStatus"]
    busy = orjson.loads(dumps(RegistrationStatus(status="busy", scene_id="a", scene_name="A")))
    assert busy == {"status": "busy", "scene_id": "a", "scene_name": "A"}  # SceneScape's busy shape
    error = orjson.loads(dumps(RegistrationStatus(status="Polycam zip file not found", reason="bad_dataset")))
    for payload in (busy, error):
        jsonschema.validate(payload, schema)
    with pytest.raises(ValidationError):
        RegistrationStatus(status="success", reason="bad_dataset")
    with pytest.raises(ValidationError):
        RegistrationStatus(status="it broke")  # an error needs a reason
    with pytest.raises(ValidationError):
        RegistrationStatus(status="register", reason="bad_dataset")  # would read as a request on the shared topic


def test_inbound_frames_accept_scenescape_shapes_and_reject_bad_types() -> None:
    percebro = {"timestamp": "2026-01-01T00:00:00.000Z", "intrinsics": [[500, 0, 320], [0, 500, 240], [0, 0, 1]],
                "distortion": [0, 0, 0, 0, 0], "id": "cam1", "image": "aGk=", "calibrate": True}
    dlstreamer = {"timestamp": 1700000000.5, "id": "cam1", "image": "aGk=", "calibrate": True, "extra": {"a": 1}}
    for body in (percebro, dlstreamer):
        jsonschema.validate(body, json_schemas()["CalibrationFrame"])
        CalibrationFrame.model_validate(body)
    for bad in ({**percebro, "calibrate": "true"}, {**percebro, "image": 5},
                {**percebro, "intrinsics": [[1, 2, 3]]}, {**percebro, "request_id": ""}):
        with pytest.raises(ValidationError):
            CalibrationFrame.model_validate(bad)
    RegisterRequest.model_validate({"command": "register", "dataset": "/data/x.zip", "force": True})
    with pytest.raises(ValidationError):
        RegisterRequest.model_validate({"command": "register", "datset": "/data/x.zip"})


def test_topics_build_and_parse_once() -> None:
    t = Topics("scenescape")
    assert t.subscriptions() == [
        "scenescape/image/calibration/camera/#",
        "scenescape/cmd/autocalibration/scene/#",
        "scenescape/cmd/scene/update/#",
        "scenescape/cmd/autocalibration/camera/#",
        "scenescape/sys/autocalibration/status",
        "scenescape/sys/autocalibration/version/+",
    ]
    # replicas share the requests and the heartbeat; every replica gets every version announcement
    assert t.subscriptions("g") == [
        "$share/g/scenescape/image/calibration/camera/#",
        "$share/g/scenescape/cmd/autocalibration/scene/#",
        "$share/g/scenescape/cmd/scene/update/#",
        "$share/g/scenescape/cmd/autocalibration/camera/#",
        "$share/g/scenescape/sys/autocalibration/status",
        "scenescape/sys/autocalibration/version/+",
    ]
    assert t.replica_availability("r/1") == "scenescape/sys/autocalibration/availability/r_1"
    assert t.parse("scenescape/sys/autocalibration/version/s1") == TopicRef(TopicKind.SCENE_VERSION, "s1")
    assert t.pose("cam1") == "scenescape/autocalibration/camera/pose/cam1"
    assert t.register("s1") == "scenescape/cmd/autocalibration/scene/s1"
    assert t.parse("scenescape/image/calibration/camera/cam1") == TopicRef(TopicKind.CALIBRATION_FRAME, "cam1")
    assert t.parse("scenescape/cmd/autocalibration/scene/s1") == TopicRef(TopicKind.REGISTER_SCENE, "s1")
    assert t.parse("scenescape/cmd/scene/update/s1") == TopicRef(TopicKind.SCENE_UPDATE, "s1")
    assert t.parse("scenescape/sys/autocalibration/status") == TopicRef(TopicKind.STATUS, "")
    assert t.parse("scenescape/cmd/autocalibration/camera/c1") == TopicRef(TopicKind.CAMERA_COMMAND, "c1")
    assert t.calibration("c1") == "scenescape/autocalibration/camera/calibration/c1"
    assert t.calibration_event("c1") == "scenescape/autocalibration/camera/event/c1"
    for foreign in ("scenescape/image/calibration/camera", "other/image/calibration/camera/cam1",
                    "scenescape/autocalibration/camera/pose/cam1"):
        assert t.parse(foreign) is None, foreign
    # ours, with an id that cannot be one topic level: parsed so that it can be refused, on the matching topic
    for topic, kind, ident, reply in (
        ("scenescape/image/calibration/camera/a/b", TopicKind.CALIBRATION_FRAME, "a/b",
         "scenescape/autocalibration/camera/pose/a/b"),
        ("scenescape/image/calibration/camera/", TopicKind.CALIBRATION_FRAME, "",
         "scenescape/autocalibration/camera/pose/"),
        ("scenescape/cmd/autocalibration/scene/../x", TopicKind.REGISTER_SCENE, "../x",
         "scenescape/cmd/autocalibration/scene/../x"),
        ("scenescape/cmd/scene/update/a/b", TopicKind.SCENE_UPDATE, "a/b", "scenescape/cmd/autocalibration/scene/a/b"),
    ):
        ref = t.parse(topic)
        assert ref == TopicRef(kind, ident, valid=False), topic
        assert t.reply_to(ref) == reply
    assert t.reply_to(TopicRef(TopicKind.CALIBRATION_FRAME, "cam1")) == t.pose("cam1")
    assert Topics("site-a/scenescape").pose("c") == "site-a/scenescape/autocalibration/camera/pose/c"
    for bad in ("", "a/b", "a+", "#", "x" * 256):
        with pytest.raises(ValueError):
            t.pose(bad)


def test_frame_intrinsics_mode_is_one_of_three() -> None:
    """An unknown intrinsics_mode is refused at the edge, naming the allowed values."""
    import pydantic

    from markerless.service.messages import CalibrationFrame

    base = {"calibrate": True, "image": "aGk="}
    assert CalibrationFrame.model_validate({**base, "intrinsics_mode": "estimate"}).intrinsics_mode == "estimate"
    with pytest.raises(pydantic.ValidationError, match="fixed.*refine.*estimate"):
        CalibrationFrame.model_validate({**base, "intrinsics_mode": "guess"})

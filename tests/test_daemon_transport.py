"""The daemon against a real mosquitto (TLS, passwords, ACL): replies, hostile input, queueing, broker restarts.

The vision core is replaced by `FakeCore` (test double: replaces the vision core to isolate transport behaviour);
image decoding and intrinsics validation are the real ones. The real core is exercised in test_daemon_kitchen.py.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from mqtt_fixtures import TOPICS, WAIT_S, Broker, FakeCore, ManualClock, daemon_settings, frame, jpeg, k_for

from markerless.service.scenes_file import ScenesFile
from markerless.service.transport import TransportError

K = k_for()


def until(predicate: Any, what: str) -> None:
    """Poll daemon-side state (bounded): it notifies no client condition, so a client wait could miss it."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {WAIT_S} s waiting for {what}"
        time.sleep(0.01)


def scenes(tmp_path: Path, **cameras: Any) -> ScenesFile:
    dataset = tmp_path / "s1.zip"
    if not dataset.exists():
        dataset.write_bytes(b"scan v1")
    return ScenesFile.model_validate(
        {"scenes": {"s1": {"dataset": str(dataset), "name": "Scene one"}}, "cameras": {"cam1": "s1", **cameras}}
    )


def registered_core(tmp_path: Path) -> FakeCore:
    core = FakeCore()
    sf = scenes(tmp_path)
    core.registrations.append("s1")
    core.commit("s1", sf.scenes["s1"].dataset, sf.scenes["s1"].config)  # version v1
    return core


def operator(clients: Any, broker: Broker, **kw: Any) -> Any:
    op = clients(broker, "scenescape", **kw)
    assert not op.connect().is_failure
    op.subscribe(f"{TOPICS.prefix}/autocalibration/camera/pose/+", f"{TOPICS.prefix}/cmd/autocalibration/scene/+",
                 TOPICS.status, TOPICS.availability)
    return op


def camera(clients: Any, broker: Broker, **kw: Any) -> Any:
    cam = clients(broker, "camera", **kw)
    assert not cam.connect().is_failure
    return cam


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_round_trip_heartbeat_and_availability(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path, protocol: str
) -> None:
    """A frame gets SceneScape's pose payload with our extras; isAlive gets `running`; availability is retained
    `online` while up and `stopped` after a clean stop."""
    core = registered_core(tmp_path)
    daemon = daemons(daemon_settings(broker, tmp_path / "store", protocol), core, scenes(tmp_path))
    op = operator(clients, broker)
    cam = camera(clients, broker)
    op.wait(lambda: TOPICS.availability in [t for t, _ in op.messages], "availability")
    assert op.received(TOPICS.availability)[-1] == b"online"

    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, id="cam1", request_id="r-1"))
    reply = op.wait_json(TOPICS.pose("cam1"), lambda d: d.get("request_id") == "r-1", "pose reply")
    assert reply["error"] == "False" and reply["success"] is True
    assert reply["name"] == reply["camera_id"] == "cam1"
    assert reply["quaternion"] == [0.0, 0.0, 0.0, 1.0] and reply["translation"] == [1.0, 0.0, 0.0]
    assert reply["scale"] == [1.0, 1.0, 1.0] and "message" not in reply and "reason" not in reply
    assert (reply["scene_id"], reply["scene_version"]) == ("s1", "v1")
    assert reply["num_matches"] == 100 and reply["num_inliers"] == 90 and reply["inlier_ratio"] == 0.9
    assert {"match", "queue", "total"} <= set(reply["timings_ms"])

    op.publish(TOPICS.status, "isAlive")
    op.wait(lambda: b"running" in op.received(TOPICS.status), "running")
    assert op.received(TOPICS.status).count(b"running") == 1  # our own `running` echo is not answered

    daemon.stop()
    late = clients(broker, "scenescape")
    late.connect()
    late.subscribe(TOPICS.availability)
    late.wait(lambda: late.received(TOPICS.availability), "retained availability")
    assert late.received(TOPICS.availability) == [b"stopped"]


def hostile_frames(tmp_path: Path) -> list[tuple[str, bytes, str]]:
    """(camera id, payload, expected reason): every kind of bad frame we know of."""
    good = jpeg()
    b64 = base64.b64encode(good).decode()
    deep = b"[" * 5000 + b"]" * 5000
    return [
        ("h-notjson", b"this is not json", "bad_request"),
        ("h-utf8", b"\xff\xfe\xfd{", "bad_request"),
        ("h-empty", b"", "bad_request"),
        ("h-array", b"[1, 2, 3]", "bad_request"),
        ("h-string", b'"calibrate"', "bad_request"),
        ("h-number", b"42", "bad_request"),
        ("h-nan", b'{"calibrate": true, "image": "x", "intrinsics": NaN}', "bad_request"),
        ("h-deep", deep, "bad_request"),
        ("h-calstr", orjson.dumps({"calibrate": "yes", "image": b64, "intrinsics": K, "scene_id": "s1"}),
         "bad_request"),
        ("h-noimage", orjson.dumps({"calibrate": True, "intrinsics": K, "scene_id": "s1"}), "bad_request"),
        ("h-imagetype", orjson.dumps({"calibrate": True, "image": 12345, "intrinsics": K, "scene_id": "s1"}),
         "bad_request"),
        ("h-b64", orjson.dumps({"calibrate": True, "image": "@@not base64@@", "intrinsics": K, "scene_id": "s1"}),
         "bad_image"),
        ("h-text", frame(b"GIF89a definitely not a jpeg", intrinsics=K, scene_id="s1"), "bad_image"),
        ("h-truncated", frame(good[: len(good) // 3], intrinsics=K, scene_id="s1"), "bad_image"),
        ("h-k-shape", frame(good, intrinsics=[[1, 0], [0, 1]], scene_id="s1"), "bad_intrinsics"),
        ("h-k-strings", frame(good, intrinsics=[["a", 0, 0], [0, 1, 0], [0, 0, 1]], scene_id="s1"), "bad_intrinsics"),
        ("h-k-negative", frame(good, intrinsics=[[-64, 0, 32], [0, -64, 24], [0, 0, 1]], scene_id="s1"),
         "bad_intrinsics"),
        ("h-k-pp", frame(good, intrinsics=[[64, 0, 900], [0, 64, 700], [0, 0, 1]], scene_id="s1"), "bad_intrinsics"),
        ("h-k-missing", frame(good, scene_id="s1"), "bad_intrinsics"),
        ("h-dist", frame(good, intrinsics=K, distortion=[0.1, 0.2, 0.3], scene_id="s1"), "bad_intrinsics"),
        ("h-unknown-cam", frame(good, intrinsics=K), "unknown_camera"),
        ("h-unknown-scene", frame(good, intrinsics=K, scene_id="nowhere"), "scene_not_found"),
        ("h-bad-scene-id", frame(good, intrinsics=K, scene_id="bad id!"), "bad_scene_id"),
        ("h-scene-path", frame(good, intrinsics=K, scene_id="../../etc"), "bad_request"),
        ("h-mismatch", frame(good, intrinsics=K, scene_id="s1", id="someone-else"), "camera_mismatch"),
        ("h-reqid", frame(good, intrinsics=K, scene_id="s1", request_id=5), "bad_request"),
        ("h-big", frame(good + b"\0" * 300_000, intrinsics=K, scene_id="s1"), "too_large"),
        ("h-crash", frame(jpeg(value=7), intrinsics=K, scene_id="s1"), "internal_error"),
        ("h-foreign", frame(jpeg(value=0), intrinsics=K, scene_id="s1"), "too_few_matches"),
    ]


def test_hostile_frames_each_get_one_error_reply_and_service_continues(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path
) -> None:
    core = registered_core(tmp_path)
    settings = daemon_settings(broker, tmp_path / "store", worker={"max_payload_bytes": 200_000})
    daemon = daemons(settings, core, scenes(tmp_path))
    op = operator(clients, broker)
    cam = camera(clients, broker)
    cases = hostile_frames(tmp_path)
    assert len(cases) >= 20
    for camera_id, payload, _ in cases:
        cam.publish(TOPICS.frame(camera_id), payload)
    # Not requests: no calibrate flag (SceneScape's manual-calibration frames share the topic) -> no reply.
    cam.publish(TOPICS.frame("h-manual"), orjson.dumps({"image": "x", "calibrate": False}))
    # Still serving afterwards; FIFO order means every earlier reply has been published once this one arrives.
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="after"))
    op.wait_json(TOPICS.pose("cam1"), lambda d: d.get("request_id") == "after" and d["success"], "final pose")
    for camera_id, _, reason in cases:
        replies = op.json_on(TOPICS.pose(camera_id))
        assert len(replies) == 1, (camera_id, replies)
        (reply,) = replies
        assert reply["error"] == "True" and reply["success"] is False, camera_id
        assert reply["reason"] == reason, (camera_id, reply)
        assert reply["message"], camera_id
        assert "quaternion" not in reply and "translation" not in reply
    assert op.received(TOPICS.pose("h-manual")) == []
    daemon.stop()


def test_hostile_commands_get_error_status_and_own_replies_are_ignored(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path
) -> None:
    core = registered_core(tmp_path)
    allowed = tmp_path / "uploads"
    allowed.mkdir()
    settings = daemon_settings(broker, tmp_path / "store", registration={"dataset_dirs": [allowed]})
    daemon = daemons(settings, core, scenes(tmp_path))
    op = operator(clients, broker)
    cases = [
        ("c-garbage", b"please register", "bad_request"),
        ("c-utf8", b"\xff\xfe", "bad_request"),
        ("c-extra", orjson.dumps({"command": "register", "dataset": str(allowed / "x.zip"), "oops": 1}), "bad_request"),
        ("c-config", orjson.dumps({"command": "register", "dataset": str(allowed / "x.zip"),
                                   "config": {"matcher": {"superglue": {}}}}), "bad_request"),
        ("c-path", orjson.dumps({"command": "register", "dataset": "/etc/passwd"}), "forbidden_path"),
        ("c-traversal", orjson.dumps({"command": "register", "dataset": str(allowed / ".." / "s1.zip")}),
         "forbidden_path"),
        ("c-missing", orjson.dumps({"command": "register", "dataset": str(allowed / "absent.zip")}), "bad_dataset"),
        ("c-unknown", b"register", "scene_not_found"),
        ("c-id", b"register", "bad_scene_id"),
    ]
    for scene_id, payload, _ in cases:
        if scene_id == "c-id":
            scene_id = "bad scene!"
        op.publish(TOPICS.register(scene_id), payload)
    op.publish(TOPICS.update("u-garbage"), "updated please")
    for scene_id, _, reason in [*cases, ("u-garbage", None, "bad_request")]:
        scene_id = "bad scene!" if scene_id == "c-id" else scene_id
        status = op.wait_json(TOPICS.register(scene_id), lambda d: "reason" in d, f"status of {scene_id}")
        assert status["reason"] == reason, (scene_id, status)
        assert status["status"] not in ("success", "registering", "busy")
    # Replies share the topic with requests: a status-shaped message is never treated as a request.
    op.publish(TOPICS.register("s1"), orjson.dumps({"status": "success", "scene_id": "s1"}))
    op.publish(TOPICS.register("s1"), b"register")
    op.wait_json(TOPICS.register("s1"), lambda d: d.get("status") == "success" and "scene_version" in d, "s1 ok")
    replies = [d for d in op.json_on(TOPICS.register("s1")) if "scene_version" in d]
    assert len(replies) == 1 and replies[0]["scene_version"] == "v1"
    assert core.registrations == ["s1"]  # unchanged dataset: nothing re-registered
    daemon.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_multi_level_ids_are_refused_on_the_matching_topic(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path, protocol: str
) -> None:
    """An id with a slash is several topic levels: a `+` subscription never received it and its sender got no
    answer. Now each such request gets one refusal on the matching reply topic, and the service goes on."""
    core = registered_core(tmp_path)
    daemon = daemons(daemon_settings(broker, tmp_path / "store", protocol), core, scenes(tmp_path))
    op = clients(broker, "scenescape")
    op.connect()
    p = TOPICS.prefix
    op.subscribe(f"{p}/autocalibration/camera/pose/#", f"{p}/cmd/autocalibration/scene/#",
                 f"{p}/cmd/autocalibration/camera/#")
    cam = camera(clients, broker)
    cam.publish(f"{p}/image/calibration/camera/a/b", frame(jpeg(), intrinsics=K, scene_id="s1", request_id="f1"))
    op.publish(f"{p}/cmd/autocalibration/scene/../x", b"register")
    op.publish(f"{p}/cmd/autocalibration/scene/s1/extra",
               orjson.dumps({"command": "register", "dataset": "/x.zip", "request_id": "j1"}))
    op.publish(f"{p}/cmd/scene/update/a/b", b"updated")
    op.publish(f"{p}/cmd/autocalibration/camera/c/d", b"forget")
    forget = op.wait_json(f"{p}/cmd/autocalibration/camera/c/d", lambda d: "reason" in d, "refusal of camera c/d")
    assert forget["reason"] == "bad_request" and forget["camera_id"] == "c/d" and "one topic level" in forget["status"]
    pose = op.wait_json(f"{p}/autocalibration/camera/pose/a/b", lambda d: "reason" in d, "refusal of camera a/b")
    assert pose["reason"] == "bad_request" and pose["success"] is False and pose["error"] == "True"
    assert pose["camera_id"] == "a/b" and "one topic level" in pose["message"] and pose["request_id"] == "f1"
    for scene_id in ("../x", "s1/extra", "a/b"):
        status = op.wait_json(f"{p}/cmd/autocalibration/scene/{scene_id}", lambda d: "reason" in d,
                              f"refusal of scene {scene_id}")
        assert status["reason"] == "bad_scene_id" and status["scene_id"] == scene_id, status
        assert "one topic level" in status["status"]
        assert status.get("request_id") == ("j1" if scene_id == "s1/extra" else None)
    # FIFO: once this pose is in, every earlier reply was published; our refusals, echoed back, were not answered
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="after"))
    op.wait_json(TOPICS.pose("cam1"), lambda d: d.get("request_id") == "after" and d["success"], "final pose")
    for scene_id in ("../x", "s1/extra", "a/b"):
        assert len([d for d in op.json_on(f"{p}/cmd/autocalibration/scene/{scene_id}") if "status" in d]) == 1
    assert len(op.json_on(f"{p}/autocalibration/camera/pose/a/b")) == 1
    assert len([d for d in op.json_on(f"{p}/cmd/autocalibration/camera/c/d") if "status" in d]) == 1
    assert core.registrations == ["s1"]  # nothing registered
    daemon.stop()


def test_supersede_overload_and_exactly_one_reply(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path
) -> None:
    core = registered_core(tmp_path)
    settings = daemon_settings(broker, tmp_path / "store", worker={"queue_size": 2})
    daemon = daemons(settings, core, scenes(tmp_path, cam2="s1", cam3="s1", cam4="s1"))
    op = operator(clients, broker)
    cam = camera(clients, broker)
    core.gate.clear()
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="a"))
    core.wait_started(1)  # the worker holds "a"; the queue is empty
    cam.publish(TOPICS.frame("cam2"), frame(jpeg(), intrinsics=K, request_id="b1"))
    cam.publish(TOPICS.frame("cam2"), frame(jpeg(), intrinsics=K, request_id="b2"))
    cam.publish(TOPICS.frame("cam3"), frame(jpeg(), intrinsics=K, request_id="c"))
    cam.publish(TOPICS.frame("cam4"), frame(jpeg(), intrinsics=K, request_id="d"))  # queue (2) is full
    superseded = op.wait_json(TOPICS.pose("cam2"), lambda d: d.get("request_id") == "b1", "b1 superseded")
    overloaded = op.wait_json(TOPICS.pose("cam4"), lambda d: d.get("request_id") == "d", "d overloaded")
    assert superseded["reason"] == "superseded" and overloaded["reason"] == "overloaded"
    core.gate.set()
    for cam_id, rid in (("cam1", "a"), ("cam2", "b2"), ("cam3", "c")):
        reply = op.wait_json(TOPICS.pose(cam_id), lambda d, rid=rid: d.get("request_id") == rid, rid)
        assert reply["success"] is True
    all_replies = [d for t in ("cam1", "cam2", "cam3", "cam4") for d in op.json_on(TOPICS.pose(t))]
    assert sorted(d["request_id"] for d in all_replies) == ["a", "b1", "b2", "c", "d"]
    daemon.stop()


def test_deadline_and_shutdown_replies(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path
) -> None:
    core = registered_core(tmp_path)
    clock = ManualClock()
    settings = daemon_settings(broker, tmp_path / "store", worker={"deadline_s": 5.0})
    daemon = daemons(settings, core, scenes(tmp_path, cam2="s1", cam3="s1"), clock=clock)
    op = operator(clients, broker)
    cam = camera(clients, broker)
    core.gate.clear()
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="held"))
    core.wait_started(1)
    cam.publish(TOPICS.frame("cam2"), frame(jpeg(), intrinsics=K, request_id="late"))
    op.publish(TOPICS.status, "isAlive")  # the network thread is free while the worker is busy
    op.wait(lambda: b"running" in op.received(TOPICS.status), "heartbeat while busy")
    clock.offset += 6.0  # "late" has waited past its 5 s deadline
    core.gate.set()
    assert op.wait_json(TOPICS.pose("cam2"), lambda d: True, "late")["reason"] == "timeout"
    assert op.wait_json(TOPICS.pose("cam1"), lambda d: True, "held")["success"] is True
    core.gate.clear()
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="busy"))
    core.wait_started(2)
    cam.publish(TOPICS.frame("cam3"), frame(jpeg(), intrinsics=K, request_id="queued"))
    until(lambda: len(daemon._queue) == 1, "cam3's frame queued")  # noqa: SLF001
    core.gate.set()  # the held request completes while stopping; the queued one is answered, not dropped
    daemon.stop()
    # stop() answers the queued request before the worker's reply to the running one reaches the broker: wait for
    # both (the daemon has stopped, so nothing more can come)
    op.wait(lambda: op.json_on(TOPICS.pose("cam3")) and len(op.json_on(TOPICS.pose("cam1"))) >= 2,
            "replies to the running and the queued request")
    replies = [d for t in ("cam1", "cam3") for d in op.json_on(TOPICS.pose(t))]
    assert sorted(d["request_id"] for d in replies) == ["busy", "held", "queued"]  # exactly one each
    reasons = {d["request_id"]: d.get("reason") for d in replies}
    assert reasons["busy"] is None
    assert reasons["queued"] in ("shutting_down", None)  # answered either way: stopped first, or served first


def test_registration_busy_queue_update_and_live_swap(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path
) -> None:
    """First registration answers frames with `scene_registering`; a second request while one runs gets `busy`
    and is queued; `update` re-registers only on change; during a re-registration the old version keeps serving
    and results switch to the new version after the swap."""
    core = FakeCore()
    sf = ScenesFile.model_validate({
        "scenes": {"s1": {"dataset": str(tmp_path / "s1.zip"), "name": "One"},
                   "s2": {"dataset": str(tmp_path / "s2.zip")}},
        "cameras": {"cam1": "s1"},
    })
    (tmp_path / "s1.zip").write_bytes(b"scan 1")
    (tmp_path / "s2.zip").write_bytes(b"scan 2")
    settings = daemon_settings(broker, tmp_path / "store", registration={"on_start": False, "progress_interval_s": 0})
    daemon = daemons(settings, core, sf)
    op = operator(clients, broker)
    cam = camera(clients, broker)
    s1, s2 = TOPICS.register("s1"), TOPICS.register("s2")

    core.register_gate.clear()
    op.publish(s1, "register")
    op.wait_json(s1, lambda d: d.get("status") == "registering", "s1 registering")
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="early"))
    assert op.wait_json(TOPICS.pose("cam1"), lambda d: True, "early")["reason"] == "scene_registering"
    op.publish(s2, orjson.dumps({"command": "register", "request_id": "two"}))
    busy = op.wait_json(s2, lambda d: d.get("status") == "busy", "s2 busy")
    assert busy == {"status": "busy", "scene_id": "s1", "scene_name": "One", "queued": 1, "request_id": "two",
                    "message": busy["message"]}
    core.register_gate.set()
    assert op.wait_json(s1, lambda d: d.get("status") == "success", "s1 ok")["scene_version"] == "v1"
    done = op.wait_json(s2, lambda d: d.get("status") == "success", "s2 ok (queued, not dropped)")
    assert done["request_id"] == "two" and done["scene_version"] == "v1"
    progress = [d for d in op.json_on(s1) if d.get("stage")]
    assert progress and all(0.0 <= d["progress"] <= 1.0 for d in progress)

    op.publish(TOPICS.update("s1"), "update")  # unchanged
    op.wait(lambda: len([d for d in op.json_on(s1) if d.get("status") == "success"]) == 2, "unchanged update")
    assert core.registrations == ["s1", "s2"]

    # Re-registration after an edit: calibrations keep flowing on v1 until the swap, then switch to v2.
    (tmp_path / "s1.zip").write_bytes(b"scan 1, rescanned")
    core.register_gate.clear()
    op.publish(TOPICS.update("s1"), "update")
    op.wait(lambda: core.registrations.count("s1") == 2, "re-registration started")
    versions = []
    for i in range(3):
        cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id=f"during-{i}"))
        r = op.wait_json(TOPICS.pose("cam1"), lambda d, i=i: d.get("request_id") == f"during-{i}", f"during-{i}")
        versions.append((r["success"], r["scene_version"]))
    core.register_gate.set()
    op.wait(lambda: len([d for d in op.json_on(s1) if d.get("scene_version") == "v2"]) == 1, "v2 registered")
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="after"))
    after = op.wait_json(TOPICS.pose("cam1"), lambda d: d.get("request_id") == "after", "after")
    assert versions == [(True, "v1")] * 3
    assert (after["success"], after["scene_version"], after["translation"][0]) == (True, "v2", 2.0)
    daemon.stop()


def test_broker_restart_mid_stream_every_accepted_request_answered(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path
) -> None:
    """QoS 1 + persistent sessions on all sides: frames published before, during and after a broker restart
    (SIGTERM, then start on the same port) all get exactly one reply once everyone has reconnected."""
    core = registered_core(tmp_path)
    daemon = daemons(daemon_settings(broker, tmp_path / "store"), core, scenes(tmp_path))
    op = operator(clients, broker, protocol="3.1.1", persistent=True, client_id="test-operator-restart")
    cam = camera(clients, broker, persistent=True, client_id="test-camera-restart")
    sent: list[str] = []

    def send(i: int, wait: bool) -> None:
        rid = f"req-{i}"
        cam.publish(TOPICS.frame(f"cam-{i}"), frame(jpeg(), intrinsics=K, scene_id="s1", request_id=rid), wait=wait)
        sent.append(rid)

    for i in range(8):
        send(i, wait=True)
    op.wait(lambda: all(op.received(TOPICS.pose(f"cam-{i}")) for i in range(8)), "first replies")
    core.gate.clear()  # some requests are still in the worker's hands when the broker goes
    for i in range(8, 12):
        send(i, wait=True)
    core.wait_started(9)
    broker.stop()
    until(lambda: not daemon._transport.connected.is_set(), "daemon notices")  # noqa: SLF001
    for i in range(12, 16):
        send(i, wait=False)  # queued by the camera's client while the broker is down
    core.gate.set()
    broker.start()
    until(lambda: daemon._transport.connected.is_set(), "daemon reconnects")  # noqa: SLF001
    for i in range(16, 20):
        send(i, wait=True)

    def answered() -> set[str]:
        return {d["request_id"] for i in range(20) for d in _json(op.received(TOPICS.pose(f"cam-{i}")))}

    op.wait(lambda: answered() >= set(sent), "a reply to every request", timeout=60)
    for i in range(20):
        # The broker may hand the operator a reply again (DUP) when the operator's PUBACK was cut by the restart:
        # that is the same message (same bytes, timestamp included), not a second reply of the service.
        replies = _json(list(dict.fromkeys(op.received(TOPICS.pose(f"cam-{i}")))))
        assert [r["request_id"] for r in replies] == [f"req-{i}"], replies
        assert replies[0]["success"] is True
    daemon.stop()


def _json(payloads: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(p) for p in payloads]


def test_broker_refuses_anonymous_wrong_password_and_acl_violations(broker: Broker, clients: Any) -> None:
    anonymous = clients(broker, None)
    assert anonymous.connect().is_failure
    wrong = clients(broker, "camera", password="not-the-password")
    assert wrong.connect().is_failure
    cam = camera(clients, broker)
    rc = cam.publish(TOPICS.register("s1"), "register")  # cameras may only publish frames
    assert rc.is_failure and rc.getName() == "Not authorized"
    for topic in (TOPICS.update("s1"), TOPICS.pose("cam1"), TOPICS.availability, TOPICS.status):
        rc = cam.publish(topic, "spoof")  # nor spoof poses, availability or heartbeats
        assert rc.is_failure and rc.getName() == "Not authorized", topic
    assert not cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K)).is_failure


def test_tls_with_wrong_ca_fails_to_start(broker: Broker, wrong_pki: Any, daemons: Any, tmp_path: Path) -> None:
    settings = daemon_settings(broker, tmp_path / "store", mqtt={"tls": {"ca_file": wrong_pki.ca}})
    with pytest.raises(TransportError, match="TLS handshake .* failed.*Not falling back to plain TCP"):
        daemons(settings, FakeCore())


def test_bad_credentials_fail_to_start(broker: Broker, daemons: Any, tmp_path: Path) -> None:
    bad = tmp_path / "pw"
    bad.write_text("wrong\n")
    settings = daemon_settings(broker, tmp_path / "store", mqtt={"password_file": bad})
    with pytest.raises(TransportError, match="refused the connection"):
        daemons(settings, FakeCore())


def test_restart_serves_registered_scenes_without_reregistering(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path
) -> None:
    """With registration.on_start, an unchanged registered scene is confirmed (`success`, same version) instead
    of registered again, and it serves at once."""
    core = registered_core(tmp_path)
    op = operator(clients, broker)
    settings = daemon_settings(broker, tmp_path / "store", registration={"on_start": True})
    daemons(settings, core, scenes(tmp_path))
    status = op.wait_json(TOPICS.register("s1"), lambda d: d.get("status") == "success", "start-up check")
    assert status["scene_version"] == "v1" and "unchanged" in status["message"]
    assert core.registrations == ["s1"]  # only the registration made before the "restart"
    cam = camera(clients, broker)
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="first"))
    reply = op.wait_json(TOPICS.pose("cam1"), lambda d: d.get("request_id") == "first", "first")
    assert (reply["success"], reply["scene_version"]) == (True, "v1")

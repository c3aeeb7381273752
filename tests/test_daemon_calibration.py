"""Each camera's calibration through a real mosquitto: retained, fused, moved, lost, recalibrated, forgotten; kept
across daemon restarts (SIGTERM and kill -9, with the broker's retained messages wiped) and shared by replicas.

The vision core is FakeCore (tests/mqtt_fixtures.py; the test double where only transport and state are under test):
a pose has 1 cm / 0.1 deg sigma, a frame brighter than 200 is the camera knocked 0.5 m, a dark frame fails to
localize, and the pose's x is the scene version's number. The kitchen-scan streams are in
tests/test_calibration_stream.py.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
from mqtt_fixtures import TOPICS, Broker, FakeCore, daemon_settings, frame, jpeg, k_for
from serve_helpers import FakeServe, availability_is, replies, until, watcher

from markerless.cli import main
from markerless.scene.calibrations import CalibrationStore
from markerless.service.scenes_file import ScenesFile

K = k_for()
CAL = f"{TOPICS.prefix}/autocalibration/camera/calibration/+"
EVENT = f"{TOPICS.prefix}/autocalibration/camera/event/+"
COMMAND = f"{TOPICS.prefix}/cmd/autocalibration/camera/+"


def scenes(tmp_path: Path) -> ScenesFile:
    dataset = tmp_path / "s1.zip"
    dataset.write_bytes(b"scan v1")
    return ScenesFile.model_validate({"scenes": {"s1": {"dataset": str(dataset)}},
                                      "cameras": {"cam1": "s1", "cam2": "s1", "quiet": {"scene": "s1",
                                                                                          "watch": False}}})


def operator(clients: Any, broker: Broker) -> Any:
    op = clients(broker, "scenescape")
    assert not op.connect().is_failure
    op.subscribe(f"{TOPICS.prefix}/autocalibration/camera/pose/+", f"{TOPICS.prefix}/cmd/autocalibration/scene/+",
                 CAL, EVENT, COMMAND)
    return op


def send(cam: Any, op: Any, camera: str, rid: str, value: int = 128) -> dict[str, Any]:
    cam.publish(TOPICS.frame(camera), frame(jpeg(value=value), intrinsics=K, request_id=rid))
    return op.wait(lambda: (replies(op, camera, rid) or [None])[0], f"reply {rid}")


def events(op: Any, camera: str) -> list[dict[str, Any]]:
    return op.json_on(TOPICS.calibration_event(camera))


def retained(clients: Any, broker: Broker, camera: str, what: str) -> dict[str, Any]:
    """The retained calibration a scene controller connecting now gets."""
    late = clients(broker, "scenescape")
    late.connect()
    late.subscribe(TOPICS.calibration(camera))
    late.wait(lambda: late.received(TOPICS.calibration(camera)), what)
    return orjson.loads(late.received(TOPICS.calibration(camera))[-1])


def test_calibrated_fused_moved_lost_recalibrated_and_forgotten_over_mqtt(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sf = scenes(tmp_path)
    core = FakeCore()
    core.registrations.append("s1")
    core.commit("s1", sf.scenes["s1"].dataset, sf.scenes["s1"].config)  # v1
    daemons(daemon_settings(broker, tmp_path / "store", registration={"on_start": False}), core, sf)
    op = operator(clients, broker)
    cam = clients(broker, "camera")
    cam.connect()

    first = send(cam, op, "cam1", "a0")
    assert first["success"] and first["camera_moved"] is False and first["calibration_frames"] == 1
    for i in range(1, 4):
        reply = send(cam, op, "cam1", f"a{i}")
        assert reply["calibration_frames"] == i + 1 and reply["calibration_state"] == "calibrated"
    assert [e["event"] for e in events(op, "cam1")] == ["calibrated"]
    cal = retained(clients, broker, "cam1", "cam1's calibration")
    assert cal["frames"] == 4 and cal["state"] == "calibrated" and cal["translation"] == [1.0, 0.0, 0.0]
    assert cal["scene_version"] == "v1" and cal["intrinsics"] == K and cal["position_sigma_m"] >= 0.01

    knocked = send(cam, op, "cam1", "k1", value=230)  # one frame: pending, never a new calibration
    assert knocked["success"] and knocked["calibration_state"] == "pending" and knocked["camera_moved"] is False
    confirmed = send(cam, op, "cam1", "k2", value=230)
    assert confirmed["camera_moved"] is True and confirmed["calibration_frames"] == 2
    moved = op.wait_json(TOPICS.calibration_event("cam1"), lambda e: e["event"] == "moved", "moved")
    assert abs(moved["displacement_m"] - 0.5) < 1e-9 and moved["rotation_deg"] < 1e-6 and moved["frames"] == 2
    assert retained(clients, broker, "cam1", "moved calibration")["translation"] == [1.0, 0.5, 0.0]

    for i in range(3):  # lost_after = 3 dark frames
        assert send(cam, op, "cam1", f"d{i}", value=0)["reason"] == "too_few_matches"
    lost = op.wait_json(TOPICS.calibration_event("cam1"), lambda e: e["event"] == "lost", "lost")
    assert lost["reason"] == "too_few_matches" and "3 matches" in lost["message"]
    cal = retained(clients, broker, "cam1", "lost calibration")
    assert cal["state"] == "lost" and cal["last_failure"] == "too_few_matches"
    assert send(cam, op, "cam1", "back", value=230)["calibration_state"] == "calibrated"

    # the scene registered again: the next frame re-solves the calibration in the new version
    op.publish(TOPICS.register("s1"), orjson.dumps({"command": "register", "force": True}))
    op.wait_json(TOPICS.register("s1"), lambda d: d.get("status") == "success", "registered v2")
    send(cam, op, "cam1", "after")
    again = op.wait_json(TOPICS.calibration_event("cam1"), lambda e: e["event"] == "recalibrated", "recalibrated")
    assert again["scene_version"] == "v2" and again["frames"] == 1
    assert retained(clients, broker, "cam1", "v2 calibration")["scene_version"] == "v2"

    # watching off for one camera: answered as before, nothing kept
    quiet = send(cam, op, "quiet", "q1")
    assert quiet["success"] and "camera_moved" not in quiet and "calibration_frames" not in quiet
    assert CalibrationStore(tmp_path / "store").read("quiet") is None

    # forget: the retained calibration is cleared and the store record removed; a second forget finds none
    op.publish(TOPICS.camera_command("cam1"), orjson.dumps({"command": "forget", "request_id": "f1"}))
    done = op.wait_json(TOPICS.camera_command("cam1"), lambda d: d.get("request_id") == "f1" and "status" in d,
                        "forget reply")
    assert done["status"] == "forgotten" and "reason" not in done
    op.wait(lambda: op.received(TOPICS.calibration("cam1"))[-1:] == [b""], "retained calibration cleared")
    assert CalibrationStore(tmp_path / "store").read("cam1") is None
    op.publish(TOPICS.camera_command("cam1"), "forget")
    op.wait_json(TOPICS.camera_command("cam1"), lambda d: d.get("status") == "unknown", "nothing to forget")
    assert send(cam, op, "cam1", "fresh")["calibration_frames"] == 1  # a new calibration starts

    # bad commands: a clear reply each, the daemon unharmed
    bad = [(b"forgett", "Unrecognized command"), (b'{"command": "nuke", "request_id": "b1"}', "command"),
           (b'[1, 2]', "payload"), (b'{"command": "forget", "extra": 1}', "extra")]
    for payload, _ in bad:
        op.publish(TOPICS.camera_command("cam2"), payload)
    answers = op.wait(lambda: [d for d in op.json_on(TOPICS.camera_command("cam2")) if d.get("reason")][-4:]
                      if len([d for d in op.json_on(TOPICS.camera_command("cam2")) if d.get("reason")]) >= 4
                      else None, "4 refusals")
    for (_, words), answer in zip(bad, answers, strict=True):
        assert answer["reason"] == "bad_request" and words in answer["status"], answer
        assert "forget" in answer["status"]  # says what would be accepted
    assert answers[1]["request_id"] == "b1"
    assert send(cam, op, "cam2", "alive")["success"]

    # the operator's view of the store
    capsys.readouterr()
    assert main(["cameras", "--store", str(tmp_path / "store")]) == 0
    listing = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(listing) == {"cam1", "cam2"}
    assert listing["cam1"][1:4] == ["s1@v2", "calibrated", "1"] and listing["cam2"][3] == "1"
    age, unit = listing["cam1"][4:6]  # seconds since the last frame confirmed it: this test's own span
    assert unit in ("s", "min") and 0 <= float(age) < 60, listing["cam1"]
    assert main(["cameras", "--store", str(tmp_path / "store"), "--json"]) == 0
    records = {r["camera_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(records) == {"cam1", "cam2"} and records["cam1"]["state"] == "calibrated"
    stored = CalibrationStore(tmp_path / "store").read("cam1")
    assert stored is not None and records["cam1"]["position_sigma_m"] == stored["position_sigma_m"] > 0
    assert listing["cam1"][6] == f"{100 * stored['position_sigma_m']:.2f}"  # the sigma shown is the one kept
    assert "evidence" not in records["cam1"] and "pending" not in records["cam1"]


def _processes(broker: Broker, tmp_path: Path, fake_serve: Any, count: int) -> list[FakeServe]:
    if count == 1:
        return [fake_serve("3.1.1")]
    return [fake_serve("5", name=f"replica-{i}", mqtt={"client_id": f"replica-{i}", "shared_group": "g"})
            for i in range(1, count + 1)]


def test_calibration_survives_sigterm_and_kill_9_restarts_even_when_the_broker_lost_its_retained_messages(
    broker: Broker, clients: Any, fake_serve: Any, tmp_path: Path
) -> None:
    (serve,) = _processes(broker, tmp_path, fake_serve, 1)
    serve.start("serve")
    op = watcher(clients, broker)
    op.subscribe(CAL, EVENT)
    op.wait(availability_is(op, b"online"), "service online", timeout=60)
    cam = clients(broker, "camera")
    cam.connect()
    n = 0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for _ in range(3):
            n += 1
            send(cam, op, "cam1", f"r{n}")
        before = retained(clients, broker, "cam1", f"calibration of {n} frames")
        assert before["frames"] == n
        serve.signal(sig)
        broker.stop()
        (broker.workdir / "data" / "mosquitto.db").unlink(missing_ok=True)  # retained messages gone
        broker.start()
        op = watcher(clients, broker)
        op.subscribe(CAL, EVENT)
        cam = clients(broker, "camera")
        cam.connect()
        serve.start("serve")
        op.wait(availability_is(op, b"online"), "service online again", timeout=60)
        again = op.wait_json(TOPICS.calibration("cam1"), lambda d, n=n: d["frames"] == n,
                             "republished calibration")
        assert again == before
    n += 1
    assert send(cam, op, "cam1", f"r{n}")["calibration_frames"] == n  # fused into the kept calibration
    assert [e["event"] for e in events(op, "cam1")] == []  # no second `calibrated` after a restart


def test_two_replicas_watching_one_camera_fuse_every_frame_into_one_calibration(
    broker: Broker, clients: Any, fake_serve: Any, tmp_path: Path
) -> None:
    reps = _processes(broker, tmp_path, fake_serve, 2)
    op = watcher(clients, broker)
    op.subscribe(CAL, EVENT, f"{TOPICS.availability}/+")
    for r in reps:
        r.start("serve")
        topic = TOPICS.replica_availability(r.name)
        op.wait(lambda topic=topic: op.received(topic)[-1:] == [b"online"], f"{r.name} online", timeout=60)
    cam = clients(broker, "camera")
    cam.connect()
    frames = [send(cam, op, "cam1", f"s{i}")["calibration_frames"] for i in range(10)]
    assert frames == list(range(1, 11))  # each frame fused into what the other replica wrote
    logs = [r.log.read_text() for r in reps]
    assert all("camera cam1: pose" in text for text in logs)  # both replicas served frames of cam1
    assert [e["event"] for e in events(op, "cam1")] == ["calibrated"]
    until(lambda: op.json_on(TOPICS.calibration("cam1"))[-1:] and
          op.json_on(TOPICS.calibration("cam1"))[-1]["frames"] == 10, "last retained calibration")
    stored = CalibrationStore(tmp_path / "store").read("cam1")
    assert stored is not None and stored["frames"] == 10
    assert retained(clients, broker, "cam1", "retained")["revision"] == stored["revision"]

"""Scale-out on MQTT 5 shared subscriptions: replicas of the daemon in one group, one store, a real mosquitto.

Each replica is a `serve_fake.py` process (the daemon with FakeCore, the test double of the vision core; its
scene versions are files in the shared store, so replicas see each other's registrations). A localized pose's
translation x is the number of the scene version that served it.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
from mqtt_fixtures import TOPICS, WAIT_S, Broker, frame, jpeg, k_for
from serve_helpers import FakeServe, replies, until, watcher

from markerless.service.settings import Settings

K = k_for()
GROUP = "markerless"


def replicas(fake_serve: Any, clients: Any, broker: Broker, count: int, **extra: Any) -> tuple[list[FakeServe], Any]:
    """`count` replicas started one after the other (the first creates the scene), each seen `online`."""
    op = watcher(clients, broker)
    op.subscribe(f"{TOPICS.availability}/+", TOPICS.scene_version("+"))
    made = []
    for i in range(1, count + 1):
        r = fake_serve("5", name=f"replica-{i}", mqtt={"client_id": f"replica-{i}", "shared_group": GROUP}, **extra)
        r.start("serve")
        topic = TOPICS.replica_availability(f"replica-{i}")
        op.wait(lambda topic=topic: op.received(topic)[-1:] == [b"online"], f"replica-{i} online", timeout=60)
        made.append(r)
    return made, op


def handled(replica: FakeServe, request_id: str) -> bool:
    """The replica answered the request (its reply log line: pose, or failure reason)."""
    return re.search(rf"\(request {re.escape(request_id)}[,)]", replica.log.read_text()) is not None


def test_shared_group_needs_mqtt_5() -> None:
    with pytest.raises(ValueError, match="needs MQTT 5 shared subscriptions"):
        Settings(mqtt={"shared_group": "g", "protocol": "3.1.1"})


def test_replicas_share_requests_answer_each_heartbeat_once_and_report_availability_each(
    broker: Broker, clients: Any, fake_serve: Any
) -> None:
    reps, op = replicas(fake_serve, clients, broker, 2)
    cam = clients(broker, "camera")
    cam.connect()
    for n in range(3):
        op.publish(TOPICS.status, "isAlive")
        op.wait(lambda n=n: op.received(TOPICS.status).count(b"running") == n + 1, f"running #{n + 1}")
    ids = [(f"cam{1 + i % 6}", f"f{i}") for i in range(12)]
    for camera, rid in ids:
        cam.publish(TOPICS.frame(camera), frame(jpeg(), intrinsics=K, request_id=rid))
    op.wait(lambda: all(replies(op, c, r) for c, r in ids), "every frame answered")
    answers = [replies(op, c, r) for c, r in ids]
    assert all(len(a) == 1 and (a[0]["success"] or a[0]["reason"] == "superseded") for a in answers), answers
    per_replica = [sum(handled(r, rid) for _, rid in ids) for r in reps]
    assert sum(per_replica) == len(ids) and min(per_replica) > 0, per_replica  # shared, not duplicated

    # A replica stopped on purpose ends its broker session: the group's requests all go to the one left.
    assert reps[1].signal(signal.SIGTERM) == 0
    op.wait(lambda: op.received(TOPICS.replica_availability("replica-2"))[-1:] == [b"stopped"], "replica-2 stopped")
    alone = [(f"cam{i}", f"alone-{i}") for i in range(1, 7)]
    for camera, rid in alone:
        cam.publish(TOPICS.frame(camera), frame(jpeg(), intrinsics=K, request_id=rid))
    op.wait(lambda: all(replies(op, c, r) for c, r in alone), "every frame answered by replica-1")
    assert all(handled(reps[0], rid) for _, rid in alone)

    assert reps[0].signal(signal.SIGTERM) == 0
    op.wait(lambda: op.received(TOPICS.replica_availability("replica-1"))[-1:] == [b"stopped"], "replica-1 stopped")
    # `stopped` is each replica's last message: every `running` has arrived before it
    assert op.received(TOPICS.status).count(b"running") == 3  # one per isAlive, not one per replica


def test_client_id_names_the_host_so_replicas_share_one_configuration() -> None:
    import socket

    assert Settings(mqtt={"client_id": "markerless-{hostname}"}).mqtt.client_id == f"markerless-{socket.gethostname()}"


def test_register_while_two_replicas_serve_runs_once_and_both_serve_the_new_version(
    broker: Broker, clients: Any, fake_serve: Any, tmp_path: Path
) -> None:
    release = tmp_path / "release-registration"
    reps, op = replicas(fake_serve, clients, broker, 2, release=str(release))
    cam = clients(broker, "camera")
    cam.connect()
    topic = TOPICS.register("s1")
    op.publish(topic, orjson.dumps({"command": "register", "force": True, "request_id": "reg-a"}))
    op.wait_json(topic, lambda d: d.get("request_id") == "reg-a" and d.get("status") == "registering", "reg-a runs")
    op.publish(topic, orjson.dumps({"command": "register", "request_id": "reg-b"}))  # same dataset: waits, then
    op.wait_json(topic, lambda d: d.get("request_id") == "reg-b" and d.get("status") == "busy", "reg-b waits")

    during = [(f"cam{i}", f"during-{i}") for i in range(1, 7)]  # one per camera: none superseded
    for camera, rid in during:
        cam.publish(TOPICS.frame(camera), frame(jpeg(), intrinsics=K, request_id=rid))
    op.wait(lambda: all(replies(op, c, r) for c, r in during), "frames during the registration answered")
    assert {replies(op, c, r)[0]["translation"][0] for c, r in during} == {1.0}  # the old version serves

    release.touch()
    done = op.wait_json(topic, lambda d: d.get("request_id") == "reg-a" and d.get("status") == "success", "reg-a")
    assert done["scene_version"] == "v2"
    unchanged = op.wait_json(topic, lambda d: d.get("request_id") == "reg-b" and d.get("status", "busy") not in
                             ("busy", "registering"), "reg-b's final status")
    assert unchanged["status"] == "success" and unchanged["scene_version"] == "v2"
    assert "unchanged" in unchanged["message"]
    registering = [d for d in op.json_on(topic) if d.get("status") == "registering"]
    assert {d["request_id"] for d in registering} == {"reg-a"}  # executed by exactly one replica, once
    assert sum(r.log.read_text().count("registering scene s1") for r in reps) == 1

    # The retained announcement makes every replica load v2 before any frame asks for it.
    announced = op.wait(lambda: [orjson.loads(p) for p in op.received(TOPICS.scene_version("s1"))], "announcement")
    assert announced[-1] == {"scene_id": "s1", "version": "v2"}
    until(lambda: all("scene s1: serving version v2" in r.log.read_text() for r in reps), "both replicas on v2")
    after = [(f"cam{i}", f"after-{i}") for i in range(1, 7)]
    for camera, rid in after:
        cam.publish(TOPICS.frame(camera), frame(jpeg(), intrinsics=K, request_id=rid))
    op.wait(lambda: all(replies(op, c, r) for c, r in after), "frames after the registration answered")
    assert {replies(op, c, r)[0]["translation"][0] for c, r in after} == {2.0}
    assert all(any(handled(r, rid) for _, rid in after) for r in reps)  # both replicas served v2


def test_a_replica_killed_mid_run_and_restarted_loses_no_request(
    broker: Broker, clients: Any, fake_serve: Any
) -> None:
    reps, op = replicas(fake_serve, clients, broker, 3, localize_s=0.05)
    cam = clients(broker, "camera")
    cam.connect()
    ids = [(f"cam{1 + i % 6}", f"k{i}") for i in range(60)]
    for n, (camera, rid) in enumerate(ids):
        cam.publish(TOPICS.frame(camera), frame(jpeg(), intrinsics=K, request_id=rid))
        if n == 30:
            victim = reps[1]
            until(victim.marker.exists, "replica-2 at work")
            assert victim.signal(signal.SIGKILL) == -signal.SIGKILL
    victim.start("serve")  # same client id: its session's unacknowledged requests come back to it
    op.wait(lambda: all(replies(op, c, r) for c, r in ids), "every frame answered", timeout=2 * WAIT_S)
    answers = [d for c, r in ids for d in replies(op, c, r)]
    assert len(answers) - len(ids) <= 3  # duplicates only for requests in flight at the kill
    assert all(d["success"] or d["reason"] == "superseded" for d in answers), answers
    assert {d["translation"][0] for d in answers if d["success"]} == {1.0}

"""Service lifecycle against a real mosquitto, with processes killed by real signals: nothing accepted is lost.

Requests are acknowledged to the broker only after their reply is delivered, on a persistent session: a daemon
killed with SIGKILL mid-calibration gets the request again when it comes back and answers it; a request answered
just before the kill is acknowledged at the next start without a second reply; a registration cut short is
reported `interrupted`. The worker watchdog withholds the heartbeat while the worker is stuck, and the metrics
endpoint and `markerless health` say the same. The kill tests run `serve_fake.py` (the daemon with FakeCore, the
test double of the vision core, so "mid-calibration" is a held state, not a race).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from mqtt_fixtures import TOPICS, WAIT_S, Broker, FakeCore, daemon_settings, frame, free_port, jpeg, k_for
from serve_helpers import availability_is, replies, scenes_spec, until, watcher

from markerless.service.scenes_file import ScenesFile

K = k_for()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_kill_9_mid_calibration_then_restart_answers_every_request_once(
    broker: Broker, clients: Any, fake_serve: Any, protocol: str
) -> None:
    op = watcher(clients, broker)
    cam = clients(broker, "camera")
    cam.connect()
    service = fake_serve(protocol)
    service.start("hold")
    op.wait(availability_is(op, b"online"), "online", timeout=60)
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="in-work"))
    until(service.marker.exists, "the worker is localizing 'in-work'")
    cam.publish(TOPICS.frame("cam2"), frame(jpeg(), intrinsics=K, request_id="queued"))
    assert service.signal(signal.SIGKILL) == -signal.SIGKILL
    op.wait(availability_is(op, b"offline"), "last will")
    assert op.json_on(TOPICS.pose("cam1")) == [] and op.json_on(TOPICS.pose("cam2")) == []

    service.start("serve")  # same client id: the broker redelivers what was never acknowledged
    op.wait(lambda: replies(op, "cam1", "in-work") and replies(op, "cam2", "queued"), "both answered after restart")
    assert replies(op, "cam1", "in-work")[0]["success"] is True
    assert replies(op, "cam2", "queued")[0]["success"] is True

    # A clean restart must not bring them back: they were acknowledged after their replies.
    assert service.signal(signal.SIGTERM) == 0
    service.start("serve")
    op.wait(availability_is(op, b"online"), "online again")
    cam.publish(TOPICS.frame("cam3"), frame(jpeg(), intrinsics=K, request_id="after"))
    op.wait(lambda: replies(op, "cam3", "after"), "reply after the second restart")
    assert len(replies(op, "cam1", "in-work")) == 1 and len(replies(op, "cam2", "queued")) == 1


def test_kill_9_after_the_reply_before_the_ack_does_not_answer_twice(
    broker: Broker, clients: Any, fake_serve: Any
) -> None:
    """The broker redelivers a request whose reply went out but whose acknowledgement died with the process: the
    restarted daemon finds it in its answered log and only acknowledges it."""
    op = watcher(clients, broker)
    cam = clients(broker, "camera")
    cam.connect()
    service = fake_serve()
    service.start("die_after_answer")
    op.wait(availability_is(op, b"online"), "online", timeout=60)
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="once"))
    op.wait(lambda: replies(op, "cam1", "once"), "the reply")
    assert service.proc is not None and service.proc.wait(timeout=WAIT_S) == -signal.SIGKILL
    op.wait(availability_is(op, b"offline"), "last will")

    service.start("serve")
    op.wait(availability_is(op, b"online"), "online again")
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="next"))
    op.wait(lambda: replies(op, "cam1", "next"), "the next request's reply")  # the redelivery came before it
    assert len(replies(op, "cam1", "once")) == 1
    log = service.log.read_text()
    assert "redelivered frame of cam1 (sha256:" in log and "already accepted" in log


def test_registration_cut_by_kill_9_is_reported_interrupted_after_restart(
    broker: Broker, clients: Any, fake_serve: Any
) -> None:
    op = watcher(clients, broker)
    service = fake_serve()
    service.start("hold")
    op.wait(availability_is(op, b"online"), "online", timeout=60)
    topic = TOPICS.register("s1")
    op.publish(topic, orjson.dumps({"command": "register", "force": True, "request_id": "reg-1"}))
    op.wait_json(topic, lambda d: d.get("request_id") == "reg-1" and d.get("status") == "registering", "registering")
    assert service.signal(signal.SIGKILL) == -signal.SIGKILL

    service.start("serve")
    final = op.wait_json(topic, lambda d: d.get("request_id") == "reg-1" and "reason" in d, "final status")
    assert final["reason"] == "interrupted" and "send the command again" in final["status"]
    assert service.signal(signal.SIGTERM) == 0
    service.start("serve")  # reported once: the journal entry went with the delivered report
    op.wait(availability_is(op, b"online"), "online again")
    op.publish(TOPICS.status, "isAlive")
    op.wait(lambda: b"running" in op.received(TOPICS.status), "heartbeat")
    assert [d["reason"] for d in op.json_on(topic) if "reason" in d] == ["interrupted"]


def metric(port: int, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # noqa: S310
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def health(port: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKERLESS__")}
    env["MARKERLESS__METRICS__PORT"] = str(port)
    return subprocess.run([sys.executable, "-m", "markerless.cli", "health"], capture_output=True, text=True,
                          env=env, timeout=120)


def test_watchdog_withholds_heartbeat_while_the_worker_is_stuck_and_metrics_say_so(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path
) -> None:
    core = FakeCore()
    sf = ScenesFile.model_validate(scenes_spec(tmp_path))
    core.registrations.append("s1")
    core.commit("s1", sf.scenes["s1"].dataset, sf.scenes["s1"].config)
    port = free_port()
    settings = daemon_settings(broker, tmp_path / "store", worker={"stall_s": 1.0},
                               metrics={"port": port, "host": "127.0.0.1"})
    daemons(settings, core, sf)
    op = watcher(clients, broker)
    cam = clients(broker, "camera")
    cam.connect()
    op.wait(availability_is(op, b"online"), "online")
    assert metric(port, "markerless_worker_alive") == 1.0 and health(port).returncode == 0

    core.gate.clear()
    cam.publish(TOPICS.frame("cam1"), frame(jpeg(), intrinsics=K, request_id="stuck"))
    core.wait_started(1)
    cam.publish(TOPICS.frame("cam2"), frame(jpeg(), intrinsics=K, request_id="waiting"))
    op.wait(availability_is(op, b"stalled"), "availability stalled")
    assert metric(port, "markerless_worker_alive") == 0.0
    assert metric(port, "markerless_queue_depth") == 1.0
    stalled = health(port)
    assert stalled.returncode == 1 and "stalled" in stalled.stdout
    op.publish(TOPICS.status, "isAlive")  # withheld: a stuck worker must not look alive

    core.gate.set()
    op.wait(availability_is(op, b"online"), "online after the worker recovered")
    op.publish(TOPICS.status, "isAlive")
    op.wait(lambda: b"running" in op.received(TOPICS.status), "running")
    op.wait(lambda: replies(op, "cam2", "waiting"), "the waiting request's reply")
    assert op.received(TOPICS.status).count(b"running") == 1  # only the second isAlive was answered
    assert metric(port, "markerless_worker_alive") == 1.0
    assert metric(port, 'markerless_requests_total{kind="calibration",outcome="success",reason=""}') == 2.0
    assert metric(port, "markerless_localization_seconds_count") == 2.0
    assert metric(port, 'markerless_scene_version_loaded{scene_id="s1",version="v1"}') == 1.0


def test_health_without_metrics_port_says_what_to_set() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKERLESS__")}
    done = subprocess.run([sys.executable, "-m", "markerless.cli", "health"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and "MARKERLESS__METRICS__PORT" in done.stderr


def test_a_taken_metrics_port_is_a_clear_start_error(broker: Broker, tmp_path: Path) -> None:
    import socket

    from markerless.service.daemon import Daemon

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = daemon_settings(broker, tmp_path / "store", metrics={"port": port, "host": "127.0.0.1"})
        daemon = Daemon(settings, backend=FakeCore().backend(), scenes=ScenesFile())
        with pytest.raises(OSError, match=rf"metrics endpoint 127.0.0.1:{port} \(metrics.port\)"):
            daemon.start()
        daemon.stop()

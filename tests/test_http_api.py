"""The HTTP front door (SceneScape's REST v1 + Socket.IO) of a real daemon: a real uvicorn on a free port, a real
mosquitto for the MQTT side, real httpx and python-socketio clients. The vision core is the FakeCore test double
(mqtt_fixtures.py: a dark image stands for a foreign one); test_http_kitchen.py runs the same front door on the
real core and the real kitchen scan.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
from http_fixtures import Pushes, is_error, poll
from mqtt_fixtures import TOPICS, WAIT_S, Broker, FakeCore, Pki, daemon_settings, frame, free_port, jpeg, k_for
from serve_helpers import until

from markerless.scene.config import SceneConfig
from markerless.service.daemon import Daemon
from markerless.service.scenes_file import ScenesFile


def scenes(tmp_path: Path) -> ScenesFile:
    dataset = tmp_path / "s1.zip"
    dataset.write_bytes(b"scan v1")
    return ScenesFile.model_validate({"scenes": {"s1": {"dataset": str(dataset)}},
                                      "cameras": {"cam1": {"scene": "s1", "intrinsics": k_for()}, "cam2": "s1",
                                                  "cam3": "s1"}})


def image_b64(value: int = 128) -> str:
    return base64.b64encode(jpeg(value=value)).decode()


@pytest.fixture
def front(broker: Broker, daemons: Callable[..., Daemon], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Starts a daemon with FakeCore and the HTTP front door on a free port; returns (daemon, core, base url)."""

    def start(http: dict[str, Any] | None = None, **sections: Any) -> tuple[Daemon, FakeCore, str]:
        core = FakeCore()
        settings = daemon_settings(broker, tmp_path / "store", registration={"on_start": False},
                                   http={"port": free_port(), "host": "127.0.0.1", **(http or {})}, **sections)
        daemon = daemons(settings, core, scenes(tmp_path))
        scheme = "https" if settings.http.certfile else "http"
        return daemon, core, f"{scheme}://127.0.0.1:{daemon.http.port}"

    yield start


def test_scenescape_flow_register_calibrate_poll_and_socketio_push(front: Any) -> None:
    daemon, core, url = front()
    pushes = Pushes("service_ready", "register_result", "calibration_result").connect(url, transports=["websocket"])
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        try:
            assert http.get("/v1/status").json()["status"] == "running"
            assert pushes.wait("service_ready") == {"status": "running",
                                                    "version": http.get("/v1/status").json()["version"]}
            assert http.get("/v1/scenes/s1/registration").json()["status"] == "not_started"
            assert pushes.client.call("register_scene", {"scene_id": "s1"}, timeout=WAIT_S) == {
                "scene_id": "s1", "data": None}
            accepted = http.post("/v1/scenes/s1/registration")
            assert accepted.status_code == 202, accepted.json()
            assert accepted.json()["status"] in ("registering", "success")  # success: the registrar was that quick
            done = poll(http, "/v1/scenes/s1/registration", "registering")
            assert done["status"] == "success" and done["scene_version"] == "v1", done
            assert done["request_id"] == accepted.json()["request_id"]
            assert pushes.wait("register_result", lambda d: d["data"]["status"] == "success") == {
                "scene_id": "s1", "data": done}
            # PATCH (the scene was edited): nothing changed, so nothing is registered again
            patched = http.patch("/v1/scenes/s1/registration")
            assert patched.status_code == 202 and patched.json()["status"] in ("registering", "success")
            again = until(lambda: (d := http.get("/v1/scenes/s1/registration").json())["request_id"] == patched.json()[
                "request_id"] and d["status"] == "success" and d, "the update's status")
            assert again["scene_version"] == "v1" and core.registrations == ["s1"]

            ack = pushes.client.call("register_camera", {"camera_id": "cam1"}, timeout=WAIT_S)
            assert ack == {"camera_id": "cam1", "result": None}
            assert pushes.client.call("register_camera", {"camera_id": "bad id"}, timeout=WAIT_S)["code"] == 400
            posted = http.post("/v1/cameras/cam1/calibration", json={"image": image_b64(), "request_id": "r1"})
            assert posted.status_code == 202 and posted.json()["status"] == "calibrating", posted.json()
            result = poll(http, "/v1/cameras/cam1/calibration", "calibrating")
            assert result["status"] == "success" and result["request_id"] == "r1" and result["sceneId"] == "s1"
            assert result["translation"] == [1.0, 0.0, 0.0] and result["quaternion"] == [0.0, 0.0, 0.0, 1.0]
            assert result["details"]["num_inliers"] == 90 and result["details"]["camera_id"] == "cam1"
            assert pushes.wait("calibration_result") == {"camera_id": "cam1", "result": result}

            # a foreign image (dark: the double's gates fail) ends in `error` with its reason
            http.post("/v1/cameras/cam1/calibration", json={"image": image_b64(5), "request_id": "r2"})
            failed = poll(http, "/v1/cameras/cam1/calibration", "calibrating")
            assert failed["status"] == "error" and failed["reason"] == "too_few_matches" and failed["message"]
            assert "quaternion" not in failed and failed["request_id"] == "r2"
            assert pushes.wait("calibration_result", lambda d: d["result"]["request_id"] == "r2")["result"] == failed
        finally:
            pushes.close()


def test_bad_requests_get_code_and_message(front: Any, tmp_path: Path) -> None:
    daemon, core, url = front(worker={"max_payload_bytes": 64 * 1024})
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        unregistered = is_error(http.post("/v1/cameras/cam1/calibration", json={"image": image_b64()}), 404)
        assert unregistered["reason"] == "scene_not_found" and "'s1'" in unregistered["message"]
        core.commit("s1", tmp_path / "s1.zip", SceneConfig())
        is_error(http.post("/v1/cameras/bad%20id/calibration", json={"image": image_b64()}), 400)
        assert is_error(http.get("/v1/scenes/s!1/registration"), 400)["reason"] == "bad_scene_id"
        assert is_error(http.post("/v1/cameras/nope/calibration", json={"image": image_b64()}), 404)["reason"] == \
            "unknown_camera"
        is_error(http.get("/v1/cameras/nope/calibration"), 404)
        is_error(http.post("/v1/scenes/nope/registration"), 404)
        assert is_error(http.post("/v1/cameras/cam1/calibration", json={"image": "not base64!"}), 400)["reason"] == \
            "bad_image"
        not_image = base64.b64encode(b"GIF89a not a jpeg").decode()
        assert is_error(http.post("/v1/cameras/cam1/calibration", json={"image": not_image}), 400)["reason"] == \
            "bad_image"
        no_k = is_error(http.post("/v1/cameras/cam2/calibration", json={"image": image_b64()}), 400)
        assert no_k["reason"] == "bad_intrinsics" and "estimate" in no_k["message"]
        zero_f = [[0.0, 0, 32], [0, 0.0, 24], [0, 0, 1]]
        assert is_error(http.post("/v1/cameras/cam2/calibration", json={"image": image_b64(), "intrinsics": zero_f}),
                        400)["reason"] == "bad_intrinsics"
        assert is_error(http.post("/v1/cameras/cam2/calibration", json={"image": image_b64(), "intrinsics": [[1]]}),
                        400)["reason"] == "bad_intrinsics"
        assert is_error(http.post("/v1/cameras/cam1/calibration", json={"image": image_b64(), "typo": 1}),
                        400)["reason"] == "bad_request"
        is_error(http.post("/v1/cameras/cam1/calibration", content=b"{not json", headers={
            "content-type": "application/json"}), 400)
        big = {"image": base64.b64encode(b"\xff" * 80 * 1024).decode()}
        assert is_error(http.post("/v1/cameras/cam1/calibration", json=big), 413)["reason"] == "too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            yield b'{"image": "'
            for _ in range(100):
                yield b"A" * 1024
            yield b'"}'

        is_error(http.post("/v1/cameras/cam1/calibration", content=chunks(),
                           headers={"content-type": "application/json"}), 413)
        # a declared gigabyte is refused from its headers: the answer comes while not one body byte was sent
        address = httpx.URL(url)
        with socket.create_connection((address.host, address.port), timeout=WAIT_S) as raw:
            raw.sendall(b"POST /v1/cameras/cam1/calibration HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                        b"\r\nContent-Length: 1000000000\r\n\r\n")
            answer = b""
            while b"}" not in answer and (chunk := raw.recv(4096)):  # headers and the JSON body
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413") and b"too_large" in answer, answer
        # the {fx, fy, cx, cy} form of SceneScape's camera records is accepted, and nothing above broke the service
        ok = http.post("/v1/cameras/cam2/calibration",
                       json={"image": image_b64(), "intrinsics": {"fx": 64, "fy": 64, "cx": 32, "cy": 24}})
        assert ok.status_code == 202, ok.json()
        assert poll(http, "/v1/cameras/cam2/calibration", "calibrating")["status"] == "success"


def test_token_required_on_routes_and_socketio(front: Any, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    daemon, core, url = front(http={"token_file": str(token)}, worker={"max_payload_bytes": 64 * 1024})
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        assert is_error(http.get("/v1/status"), 401)
        # the token is checked before anything of the body: neither its size nor its content is looked at
        assert is_error(http.post("/v1/cameras/cam1/calibration", content=b"x" * 100_000), 401)
        assert is_error(http.post("/v1/cameras/bad%20id/calibration", content=b"{"), 401)
        assert is_error(http.get("/v1/status", headers={"Authorization": "Bearer wrong"}), 401)
        assert is_error(http.post("/v1/cameras/cam1/calibration", json={"image": image_b64()},
                                  headers={"Authorization": "Bearer wrong"}), 401)
        ok = http.get("/v1/status", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and ok.json()["status"] == "running"
    with pytest.raises(socketio.exceptions.ConnectionError):
        Pushes().connect(url, auth={"token": "wrong"})
    accepted = Pushes("service_ready").connect(url, auth={"token": "s3cret-token"})
    assert accepted.wait("service_ready")["status"] == "running"
    accepted.close()


def test_tls_refuses_plain_clients_and_mutual_tls_refuses_clients_without_certificate(front: Any, pki: Pki) -> None:
    daemon, core, url = front(http={"certfile": str(pki.dir / "server.crt"), "keyfile": str(pki.dir / "server.key"),
                                    "client_ca_file": str(pki.ca)})
    plain = url.replace("https://", "http://")
    with httpx.Client(timeout=WAIT_S) as http, pytest.raises(httpx.TransportError):
        http.get(plain + "/v1/status")
    with httpx.Client(timeout=WAIT_S, verify=ssl.create_default_context(cafile=str(pki.ca))) as http, \
            pytest.raises(httpx.TransportError):
        http.get(url + "/v1/status")  # TLS, but no client certificate
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.dir / "scenescape.crt"), str(pki.dir / "scenescape.key"))
    with httpx.Client(timeout=WAIT_S, verify=context) as http:
        assert http.get(url + "/v1/status").json()["status"] == "running"


def test_stopping_refuses_new_requests_with_503_and_answers_queued_ones(front: Any, tmp_path: Path) -> None:
    daemon, core, url = front()
    core.commit("s1", tmp_path / "s1.zip", SceneConfig())
    core.gate.clear()  # the worker holds the first request
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        assert http.post("/v1/cameras/cam1/calibration", json={"image": image_b64()}).status_code == 202
        core.wait_started(1)
        assert http.post("/v1/cameras/cam3/calibration", json={"image": image_b64(),
                                                               "intrinsics": k_for()}).status_code == 202
        stopper = threading.Thread(target=daemon.stop)
        stopper.start()
        until(lambda: daemon._stopping.is_set(), "stopping")
        body = is_error(http.post("/v1/cameras/cam1/calibration", json={"image": image_b64()}), 503)
        assert body["reason"] == "shutting_down"
        queued = http.get("/v1/cameras/cam3/calibration").json()
        assert queued["status"] == "error" and queued["reason"] == "shutting_down", queued
        core.gate.set()
        stopper.join(WAIT_S)
    assert daemon.wait(0)


def test_browsers_of_other_origins_only_when_listed(front: Any) -> None:
    daemon, core, url = front(http={"cors_origins": ["https://scenescape.example"]})
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        allowed = http.options("/v1/cameras/cam1/calibration",
                               headers={"Origin": "https://scenescape.example", **preflight})
        assert allowed.headers.get("access-control-allow-origin") == "https://scenescape.example"
        other = http.options("/v1/cameras/cam1/calibration", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
        # Socket.IO's Engine.IO handshake: refused for an origin not listed, allowed (and said so) for the listed
        handshake = "/v1/socket.io/?EIO=4&transport=polling"
        assert http.get(handshake, headers={"Origin": "https://evil.example"}).status_code == 400
        listed = http.get(handshake, headers={"Origin": "https://scenescape.example"})
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == \
            "https://scenescape.example"


def test_a_taken_port_fails_start_up_naming_the_http_section(broker: Broker, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = daemon_settings(broker, tmp_path / "store", registration={"on_start": False},
                                   http={"port": port, "host": "127.0.0.1"})
        daemon = Daemon(settings, backend=FakeCore().backend(), scenes=scenes(tmp_path))
        try:
            with pytest.raises(OSError, match=f"http: cannot listen on 127.0.0.1:{port}"):
                daemon.start()
        finally:
            daemon.stop()
        assert daemon.wait(0)


def test_mqtt_and_http_requests_of_one_camera_wait_together_and_each_supersedes_only_its_own(
    front: Any, clients: Any, broker: Broker, tmp_path: Path
) -> None:
    """With the worker held, cam1 gets two MQTT frames and two HTTP requests: each front door's newer request
    replaces only its own older one (answered `superseded` where it was asked), and both survivors are answered
    once, on their own front door."""
    daemon, core, url = front()
    core.commit("s1", tmp_path / "s1.zip", SceneConfig())
    op = clients(broker, "scenescape")
    op.connect()
    op.subscribe(TOPICS.pose("cam1"))
    cam = clients(broker, "camera")
    cam.connect()
    core.gate.clear()
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        assert http.post("/v1/cameras/cam3/calibration", json={"image": image_b64(), "intrinsics": k_for()}
                         ).status_code == 202
        core.wait_started(1)  # the worker holds cam3's request: everything below waits in the queue together
        cam.publish(TOPICS.frame("cam1"), frame(jpeg(), request_id="m1"))
        assert http.post("/v1/cameras/cam1/calibration", json={"image": image_b64(), "request_id": "h1"}
                         ).status_code == 202
        cam.publish(TOPICS.frame("cam1"), frame(jpeg(), request_id="m2"))
        assert http.post("/v1/cameras/cam1/calibration", json={"image": image_b64(), "request_id": "h2"}
                         ).status_code == 202
        assert op.wait_json(TOPICS.pose("cam1"), lambda d: d.get("request_id") == "m1", "m1")["reason"] == \
            "superseded"
        core.gate.set()
        assert op.wait_json(TOPICS.pose("cam1"), lambda d: d.get("request_id") == "m2", "m2")["success"] is True
        result = poll(http, "/v1/cameras/cam1/calibration", "calibrating")
        assert result["status"] == "success" and result["request_id"] == "h2", result
    assert sorted(d["request_id"] for d in op.json_on(TOPICS.pose("cam1"))) == ["m1", "m2"]  # no HTTP one on MQTT
    assert len(core.started) == 3  # cam3, then one of each front door: nothing localized twice

"""SIGTERM to a real `markerless serve` process (tests/serve_fake.py: the daemon with the FakeCore vision core)
with the HTTP front door on: exit 0, the calibration in work answered and the queued one answered
`shutting_down`, both pushed to a connected Socket.IO client before the server closes, and the port released."""

from __future__ import annotations

import base64
import signal
import socket
from typing import Any

import httpx
from http_fixtures import Pushes
from mqtt_fixtures import WAIT_S, free_port, jpeg, k_for
from serve_helpers import until


def test_sigterm_stops_the_http_front_door_cleanly(fake_serve: Any) -> None:
    service = fake_serve()
    port = free_port()
    service.settings["http"] = {"port": port, "host": "127.0.0.1"}
    service.start("hold")  # every localization is held until SIGTERM
    url = f"http://127.0.0.1:{port}"

    def status() -> dict[str, Any] | None:
        try:
            return httpx.get(f"{url}/v1/status", timeout=5).json()
        except httpx.TransportError:
            return None

    assert until(status, "the HTTP front door", WAIT_S)["status"] == "running"
    pushes = Pushes("calibration_result").connect(url)
    try:
        for camera in ("cam1", "cam2"):
            pushes.client.call("register_camera", {"camera_id": camera}, timeout=WAIT_S)
        image = base64.b64encode(jpeg()).decode()
        with httpx.Client(base_url=url, timeout=WAIT_S) as http:
            assert http.post("/v1/cameras/cam1/calibration", json={"image": image, "intrinsics": k_for()}
                             ).status_code == 202
            until(service.marker.exists, "the worker holding cam1's request")
            assert http.post("/v1/cameras/cam2/calibration", json={"image": image, "intrinsics": k_for()}
                             ).status_code == 202
            assert http.get("/v1/cameras/cam2/calibration").json()["status"] == "calibrating"
        assert service.signal(signal.SIGTERM) == 0, service.log.read_text()[-3000:]
        done = pushes.wait("calibration_result", lambda d: d["camera_id"] == "cam1")["result"]
        stopped = pushes.wait("calibration_result", lambda d: d["camera_id"] == "cam2")["result"]
        assert done["status"] == "success", done
        assert stopped["status"] == "error" and stopped["reason"] == "shutting_down", stopped
    finally:
        pushes.close()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nobody listens any more

"""The console on a real daemon's HTTP front door: sign-in with the token (session cookie), the page from the
daemon's core, the Register and Recalibrate buttons through the same queue and registrar, cameras seen through
either front door, and the overlay's 404s. Real uvicorn on a free port, real mosquitto, real httpx; the vision
core is the FakeCore test double (mqtt_fixtures.py; it stores no scan, so no overlay can be drawn here:
test_http_kitchen.py draws them from the real kitchen scan).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_fixtures import is_error, poll
from mqtt_fixtures import TOPICS, WAIT_S, Broker, FakeCore, daemon_settings, frame, free_port, jpeg, k_for
from serve_helpers import until

from markerless.scene.config import SceneConfig
from markerless.service.daemon import Daemon
from markerless.service.scenes_file import ScenesFile

TOKEN = "s3cret-console-token"
CALIBRATED = '<span class="ok">calibrated</span>'  # the state on a camera's card


@pytest.fixture
def console(broker: Broker, daemons: Callable[..., Daemon], tmp_path: Path) -> Callable[..., Any]:
    def start(token: bool) -> tuple[Daemon, FakeCore, str]:
        dataset = tmp_path / "s1.zip"
        dataset.write_bytes(b"scan v1")
        scenes = ScenesFile.model_validate({"scenes": {"s1": {"dataset": str(dataset)}},
                                            "cameras": {"cam1": {"scene": "s1", "intrinsics": k_for()},
                                                        "cam2": "s1"}})
        http: dict[str, Any] = {"port": free_port(), "host": "127.0.0.1"}
        if token:
            (tmp_path / "token").write_text(TOKEN + "\n")
            http["token_file"] = str(tmp_path / "token")
        core = FakeCore()
        settings = daemon_settings(broker, tmp_path / "store", registration={"on_start": False}, http=http)
        daemon = daemons(settings, core, scenes)
        return daemon, core, f"http://127.0.0.1:{daemon.http.port}"

    return start


def camera_block(page: str, camera_id: str) -> str:
    """The console's card of one camera."""
    found = re.search(rf'<div class="camera" id="camera-{re.escape(camera_id)}">(.*?)</form>', page, re.S)
    assert found, page
    return found.group(1)


def test_console_behind_the_token_sign_in_buttons_and_both_front_doors(console: Any, clients: Any,
                                                                        broker: Broker) -> None:
    daemon, core, url = console(token=True)
    with httpx.Client(base_url=url, timeout=WAIT_S) as anonymous:
        assert anonymous.get("/").status_code == 303 and anonymous.get("/").headers["location"] == "/login"
        assert 'name="token" type="password"' in anonymous.get("/login").text
        is_error(anonymous.get("/v1/cameras/cam1/calibration/overlay"), 401)
        is_error(anonymous.post("/console/cameras/cam1/recalibrate"), 401)
        wrong = anonymous.post("/login", data={"token": "guess"})
        assert wrong.status_code == 401 and "Wrong token." in wrong.text and "set-cookie" not in wrong.headers
        signed = anonymous.post("/login", data={"token": TOKEN})
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
        session = signed.cookies["markerless_session"]

    with httpx.Client(base_url=url, timeout=WAIT_S, cookies={"markerless_session": session}) as browser:
        page = browser.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "s1" in page.text and "absent" in page.text  # configured, not registered yet
        assert all('<span class="muted">never</span>' in camera_block(page.text, c) for c in ("cam1", "cam2"))
        assert 'action="/logout"' in page.text
        # overlays: an unknown camera, and one never calibrated, get 404 with a reason, never an image
        unknown = is_error(browser.get("/v1/cameras/nope/calibration/overlay"), 404)
        assert unknown["reason"] == "unknown_camera" and "'nope'" in unknown["message"]
        never = is_error(browser.get("/v1/cameras/cam1/calibration/overlay"), 404)
        assert "not calibrated" in never["message"] and "no frame" in never["message"]
        assert "no frame of camera 'cam1'" in is_error(browser.post("/console/cameras/cam1/recalibrate"),
                                                       404)["message"]
        # another site's page cannot use the cookie to change anything
        assert is_error(browser.post("/console/scenes/s1/register", headers={"Origin": "http://evil.example"}),
                        403)["message"]
        assert is_error(browser.post("/console/scenes/s1/register", headers={"Sec-Fetch-Site": "cross-site"}),
                        403)
        assert core.registrations == []

        # Register: the registrar's command, then back to the console
        registered = browser.post("/console/scenes/s1/register", headers={"Origin": url})
        assert registered.status_code == 303 and registered.headers["location"] == "/"
        assert poll(browser, "/v1/scenes/s1/registration", "registering")["status"] == "success"
        assert core.registrations == ["s1"]
        assert "v1" in browser.get("/").text

        # a frame over MQTT: the console shows the camera calibrated and points at its overlay
        camera = clients(broker, "camera")
        camera.connect()
        camera.publish(TOPICS.frame("cam1"), frame(jpeg(), request_id="m1"))
        card = until(lambda: CALIBRATED in (c := camera_block(browser.get("/").text, "cam1")) and c,
                     "cam1 calibrated on the console")
        assert 'src="/v1/cameras/cam1/calibration/overlay"' in card and "90/100" in card
        # the double stores no scan: the overlay says why it cannot be drawn (the kitchen test draws real ones)
        assert is_error(browser.get("/v1/cameras/cam1/calibration/overlay"), 404)["reason"] == "scene_outdated"

        # Recalibrate: the same frame again through the queue, its result on the REST resource
        again = browser.post("/console/cameras/cam1/recalibrate")
        assert again.status_code == 303 and again.headers["location"] == "/"
        result = poll(browser, "/v1/cameras/cam1/calibration", "calibrating")
        assert result["status"] == "success" and result["request_id"].startswith("console-"), result
        assert len(core.started) == 2

        # a frame over HTTP that fails: the camera stays calibrated, the console says why the newer one failed
        dark = base64.b64encode(jpeg(value=5)).decode()
        assert browser.post("/v1/cameras/cam1/calibration", json={"image": dark}).status_code == 202
        assert poll(browser, "/v1/cameras/cam1/calibration", "calibrating")["reason"] == "too_few_matches"
        card = camera_block(browser.get("/").text, "cam1")
        assert CALIBRATED in card and "too_few_matches: 3 matches &lt; 20" in card
        # a camera outside scenes.yaml whose frame names its scene shows up too, and can be re-run
        camera.publish(TOPICS.frame("lobby"), frame(jpeg(), intrinsics=k_for(), scene_id="s1", request_id="l1"))
        until(lambda: 'id="camera-lobby"' in browser.get("/").text, "camera lobby on the console")
        assert browser.post("/console/cameras/lobby/recalibrate").status_code == 303

        signed_out = browser.post("/logout")
        assert signed_out.status_code == 303 and 'markerless_session=""' in signed_out.headers["set-cookie"]

    with httpx.Client(base_url=url, timeout=WAIT_S, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        assert api.get("/").status_code == 200  # the bearer token opens the console too
    forged = {"markerless_session": "99999999999." + "0" * 64}  # far from expiry, but not this token's HMAC
    with httpx.Client(base_url=url, timeout=WAIT_S, cookies=forged) as forger:
        is_error(forger.get("/v1/status"), 401)
        assert forger.get("/").status_code == 303


def test_console_without_a_token_needs_no_sign_in(console: Any, tmp_path: Path) -> None:
    daemon, core, url = console(token=False)
    with httpx.Client(base_url=url, timeout=WAIT_S) as browser:
        page = browser.get("/")
        assert page.status_code == 200 and "health: ok" in page.text and 'action="/logout"' not in page.text
        assert browser.get("/login").status_code == 303
        core.commit("s1", tmp_path / "s1.zip", SceneConfig())
        assert "ready" in browser.get("/").text
        is_error(browser.get("/v1/cameras/cam2/calibration/overlay"), 404)

"""The console on a real daemon's HTTP front door: sign-in with the token (session cookie), the page from the
daemon's core, the Register and Recalibrate buttons through the same queue and registrar, cameras seen through
either front door, the overlay's 404s, and each camera's state, frames and sigma from the calibration kept in the
store (right after a restart, and on a replica that never saw the camera's frames). Real uvicorn on a free port,
real mosquitto, real httpx; the vision core is the FakeCore test double (mqtt_fixtures.py; it stores no scan, so
no overlay can be drawn here: test_http_kitchen.py draws them from the real kitchen scan).
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

from markerless.pipeline.calibration_watch import Calibration, Frame, WatchOptions, observe, observe_failure
from markerless.scene.calibrations import CalibrationStore
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
        # (the card shows the calibration the watch keeps in the store, written just before the pose reply)
        card = until(lambda: "<td>1 frame, scene version v1</td>" in (
            c := camera_block(browser.get("/").text, "cam1")) and c, "cam1's kept calibration on the console")
        assert CALIBRATED in card and 'src="/v1/cameras/cam1/calibration/overlay"' in card and "90/100" in card
        assert "1.0 cm, 0.10 deg" in card, card  # the fused 1-sigma of one frame: the double's 1 cm / 0.1 deg
        assert "drawn with that frame's own result, not the fused calibration" in card
        # the double stores no scan: the overlay says why it cannot be drawn (the kitchen test draws real ones)
        assert is_error(browser.get("/v1/cameras/cam1/calibration/overlay"), 404)["reason"] == "scene_outdated"

        # Recalibrate: the same frame again through the queue, its result on the REST resource
        again = browser.post("/console/cameras/cam1/recalibrate")
        assert again.status_code == 303 and again.headers["location"] == "/"
        result = poll(browser, "/v1/cameras/cam1/calibration", "calibrating")
        assert result["status"] == "success" and result["request_id"].startswith("console-"), result
        assert len(core.started) == 2
        assert "<td>2 frames, scene version v1</td>" in camera_block(browser.get("/").text, "cam1")

        # a frame over HTTP that fails: the camera stays calibrated, the console says why the newer one failed
        dark = base64.b64encode(jpeg(value=5)).decode()
        assert browser.post("/v1/cameras/cam1/calibration", json={"image": dark}).status_code == 202
        assert poll(browser, "/v1/cameras/cam1/calibration", "calibrating")["reason"] == "too_few_matches"
        card = camera_block(browser.get("/").text, "cam1")
        assert CALIBRATED in card and "too_few_matches: 3 matches &lt; 20" in card and "(1 in a row)" in card
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


NOW = "2026-12-03T12:00:00+00:00"


def _frame(at: str, version: str = "v0", x: float = 0.0, sigma_m: float = 0.01) -> Frame:
    """A localized frame as the FakeCore answers one of version v0 (identity pose at the origin), `x` metres off."""
    return Frame((0.0, 0.0, 0.0, 1.0), (x, 0.0, 0.0), tuple(tuple(r) for r in k_for()), (), "given", sigma_m, 0.1,
                 "s1", version, at)


def _keep(store: CalibrationStore, camera_id: str, frames: list[Frame], failures: int = 0,
          options: WatchOptions = WatchOptions()) -> Calibration:
    """Writes a calibration the way the service's watch does (the watch's rules, the store's locked update), as a
    previous run of the service or another replica would have left it."""
    def step(change: Callable[[Calibration | None], Any]) -> None:
        def apply(record: dict[str, Any] | None) -> tuple[dict[str, Any], None]:
            calibration = change(Calibration.from_dict(record) if record else None).calibration
            assert calibration is not None
            return calibration.to_dict(), None

        store.update(camera_id, apply)

    for f in frames:
        step(lambda cal, f=f: observe(cal, camera_id, f, options))
    for _ in range(failures):
        step(lambda cal: observe_failure(cal, "no_matches", "0 matches: blocked or pointed elsewhere", NOW,
                                         options))
    record = store.read(camera_id)
    assert record is not None
    return Calibration.from_dict(record)


def test_console_shows_the_stored_calibrations_after_a_restart(console: Any, tmp_path: Path) -> None:
    """The store holds calibrations (a previous run's, or another replica's); this process has no frame of any
    camera, as right after a restart: the console shows each camera's kept state, frames, sigma and last failure,
    and no overlay (an overlay draws a frame this process localized)."""
    store = CalibrationStore(tmp_path / "store")
    sigmas = [0.012, 0.008, 0.010, 0.009, 0.011]
    kept = _keep(store, "cam1", [_frame(f"2026-12-03T11:0{i}:00+00:00", sigma_m=s) for i, s in enumerate(sigmas)])
    lost = _keep(store, "cam2", [_frame("2026-12-03T10:00:00+00:00"), _frame("2026-12-03T10:05:00+00:00")],
                 failures=WatchOptions().lost_after)
    moving = _keep(store, "door", [_frame("2026-12-03T09:00:00+00:00", "v-old"),
                                   _frame("2026-12-03T09:10:00+00:00", "v-old", x=0.5)])
    assert (kept.state, kept.frames, lost.state, moving.state) == ("calibrated", 5, "lost", "pending")
    _, core, url = console(token=False)
    core.commit("s1", tmp_path / "s1.zip", SceneConfig())  # registered before: version v0
    with httpx.Client(base_url=url, timeout=WAIT_S) as browser:
        page = browser.get("/").text
        card = camera_block(page, "cam1")
        assert CALIBRATED in card and "<td>5 frames, scene version v0</td>" in card, card
        assert f"{100 * kept.position_sigma_m:.1f} cm, {kept.rotation_sigma_deg:.2f} deg" in card
        assert '<span class="muted">fused</span>' in card and "camera given" in card
        assert "outdated" not in card and "last failure" not in card and "<img" not in card
        assert "no overlay: no frame localized here since this service started" in card
        assert '<span class="muted">never</span>' not in card

        card = camera_block(page, "cam2")
        assert '<span class="bad">lost</span>' in card, card
        assert f"Its last {WatchOptions().lost_after} frames failed to localize" in card
        assert "<td>2 frames, scene version v0</td>" in card
        assert "no_matches: 0 matches: blocked or pointed elsewhere" in card

        # a camera only the store knows (not in scenes.yaml, no frame here): on the page, its calibration of an
        # older scan flagged; the overlay says there is no frame here rather than 'unknown camera'
        card = camera_block(page, "door")
        assert '<span class="warn">pending</span>' in card and "one more frame that agrees with it" in card
        assert "scene version v-old" in card and "outdated: re-solved on its next frame" in card
        overlay = is_error(browser.get("/v1/cameras/door/calibration/overlay"), 404)
        assert overlay.get("reason") != "unknown_camera" and "since the service started" in overlay["message"]
        assert is_error(browser.get("/v1/cameras/nope/calibration/overlay"), 404)["reason"] == "unknown_camera"

        # a frame arrives: the watch fuses it into the kept calibration (6 frames), the overlay is this frame's
        camera_frame = base64.b64encode(jpeg()).decode()
        assert browser.post("/v1/cameras/cam1/calibration", json={"image": camera_frame}).status_code == 202
        assert poll(browser, "/v1/cameras/cam1/calibration", "calibrating")["status"] == "success"
        card = camera_block(browser.get("/").text, "cam1")
        assert CALIBRATED in card and "<td>6 frames, scene version v0</td>" in card, card
        assert 'src="/v1/cameras/cam1/calibration/overlay"' in card and "90/100" in card

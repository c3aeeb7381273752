"""SceneScape's REST functional flow against the daemon with the real core and the real kitchen scan: status,
register, poll, calibrate a kitchen query with intrinsics, poll to `success` within 5 cm / 5 deg, a foreign image
ending in `error`, the Socket.IO `calibration_result` push; an MQTT and an HTTP request for one camera at the
same time, both answered once and correctly; the console (registered and calibrated through it and REST) loaded in
headless Chromium, with the camera's overlay drawn from the stored scan. Real uvicorn, real mosquitto (TLS,
passwords, ACL), real httpx and python-socketio clients, Debian's chromium.

Needs the research data at $MARKERLESS_KITCHEN_DIR (see /work/shared/data/kitchen/README.md); skipped without.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from http_fixtures import Pushes, is_error, poll
from mqtt_fixtures import TOPICS, Broker, Client, Pki, daemon_settings, frame, free_port
from scipy.spatial.transform import Rotation

from markerless.scene.queries import load_queries
from markerless.service.daemon import Daemon
from markerless.service.scenes_file import ScenesFile

WAIT_S = 900.0  # a failure bound for localizations on 2 loaded CPU cores, not a measurement

pytestmark = pytest.mark.slow


@dataclass
class Service:
    daemon: Daemon
    http: httpx.Client
    url: str
    operator: Client
    camera: Client
    kitchen: Path
    queries: list[dict[str, Any]]


@pytest.fixture(scope="module")
def service(pki: Pki, kitchen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Broker + daemon (real core, HTTP on a free port) with the kitchen in scenes.yaml and an empty store: the first
    registration request (`registered`) really registers the scan; later ones find it unchanged."""
    tmp = tmp_path_factory.mktemp("http-kitchen")
    store = tmp / "store"
    store.mkdir()
    broker = Broker(pki, tmp / "broker")
    broker.start()
    queries = load_queries(kitchen_dir / "queries.json")
    scenes = ScenesFile.model_validate({
        "scenes": {"kitchen": {"dataset": str(kitchen_dir / "kitchen-poly.zip"), "name": "Kitchen"}},
        "cameras": {"kitchen-cam": {"scene": "kitchen", "intrinsics": queries[0]["intrinsics"]},
                    "console-cam": {"scene": "kitchen", "intrinsics": queries[0]["intrinsics"]},
                    "busy-cam": "kitchen", "idle-cam": "kitchen"},
    })
    settings = daemon_settings(broker, store, registration={"on_start": False},
                               worker={"deadline_s": WAIT_S}, http={"port": free_port(), "host": "127.0.0.1"})
    daemon = Daemon(settings, scenes=scenes)
    operator = Client(broker, "scenescape")
    camera = Client(broker, "camera")
    http = httpx.Client(timeout=60.0)
    try:
        daemon.start()
        operator.connect()
        operator.subscribe(f"{TOPICS.prefix}/autocalibration/camera/pose/+")
        camera.connect()
        assert daemon.wait_ready(WAIT_S)
        url = f"http://127.0.0.1:{daemon.http.port}"
        yield Service(daemon, http, url, operator, camera, kitchen_dir, queries)
    finally:
        http.close()
        for client in (operator, camera):
            client.close()
        daemon.stop()
        broker.stop()


def rotation_error_deg(q_est: list[float], q_gt: list[float]) -> float:
    return float(np.degrees((Rotation.from_quat(q_est).inv() * Rotation.from_quat(q_gt)).magnitude()))


def assert_within(result: dict[str, Any], query: dict[str, Any]) -> None:
    t_err = float(np.linalg.norm(np.subtract(result["translation"], query["translation"])))
    r_err = rotation_error_deg(result["quaternion"], query["quaternion"])
    assert t_err <= 0.05 and r_err <= 5.0, (t_err, r_err, result.get("details", result))


def body(service: Service, query: dict[str, Any], request_id: str) -> dict[str, Any]:
    image = (service.kitchen / query["image"]).read_bytes()
    return {"image": base64.b64encode(image).decode(), "intrinsics": query["intrinsics"],
            "distortion": query["distortion"], "request_id": request_id}


def registered(service: Service) -> dict[str, Any]:
    """POST a registration of the kitchen and poll to its end: the first one in this module registers the scan,
    later ones find it unchanged."""
    accepted = service.http.post(f"{service.url}/v1/scenes/kitchen/registration")
    assert accepted.status_code == 202, accepted.text
    done = poll(service.http, f"{service.url}/v1/scenes/kitchen/registration", "registering", WAIT_S)
    assert done["status"] == "success" and done["scene_version"], done
    return done


def test_scenescape_rest_flow_on_the_kitchen(service: Service) -> None:
    http, url = service.http, service.url
    assert http.get(f"{url}/v1/status").json()["status"] == "running"
    registered(service)

    pushes = Pushes("calibration_result").connect(url)
    try:
        pushes.client.call("register_camera", {"camera_id": "kitchen-cam"}, timeout=60)
        query = service.queries[1]
        posted = http.post(f"{url}/v1/cameras/kitchen-cam/calibration", json=body(service, query, "rest-q1"))
        assert posted.status_code == 202 and posted.json()["status"] == "calibrating", posted.json()
        result = poll(http, f"{url}/v1/cameras/kitchen-cam/calibration", "calibrating", WAIT_S)
        assert result["status"] == "success" and result["request_id"] == "rest-q1", result
        assert_within(result, query)
        points2d, points3d = result["calibration_points_2d"], result["calibration_points_3d"]
        assert 20 <= len(points2d) == len(points3d) <= 64
        assert len({tuple(p) for p in points2d}) == len(points2d)
        details = result["details"]
        assert details["num_inliers"] >= len(points2d) and details["position_sigma_m"] > 0
        assert details["intrinsics_source"] in ("given", "refined") and details["camera_id"] == "kitchen-cam"
        assert pushes.wait("calibration_result", lambda d: d["result"]["request_id"] == "rest-q1",
                           WAIT_S)["result"] == result

        foreign = sorted((service.kitchen / "foreign").glob("*.jpg"))[0]
        http.post(f"{url}/v1/cameras/kitchen-cam/calibration", json={
            "image": base64.b64encode(foreign.read_bytes()).decode(), "intrinsics": query["intrinsics"],
            "request_id": "rest-foreign"})
        failed = poll(http, f"{url}/v1/cameras/kitchen-cam/calibration", "calibrating", WAIT_S)
        assert failed["status"] == "error" and failed["request_id"] == "rest-foreign"
        assert failed["reason"] and failed["message"] and "quaternion" not in failed, failed
    finally:
        pushes.close()


def test_mqtt_and_http_requests_for_one_camera_at_once_are_both_answered_once(service: Service) -> None:
    """While the worker is busy with another camera, one MQTT frame and one HTTP request of kitchen-cam wait in the
    queue together: neither replaces the other, each gets exactly one correct answer on its own front door."""
    http, url = service.http, service.url
    registered(service)
    q_busy, q_mqtt, q_http = service.queries[4], service.queries[2], service.queries[3]
    assert http.post(f"{url}/v1/cameras/busy-cam/calibration", json=body(service, q_busy, "busy")).status_code == 202
    image = (service.kitchen / q_mqtt["image"]).read_bytes()
    service.camera.publish(TOPICS.frame("kitchen-cam"), frame(image, intrinsics=q_mqtt["intrinsics"],
                                                              request_id="both-mqtt"))
    posted = http.post(f"{url}/v1/cameras/kitchen-cam/calibration", json=body(service, q_http, "both-http"))
    assert posted.status_code == 202, posted.json()

    result = poll(http, f"{url}/v1/cameras/kitchen-cam/calibration", "calibrating", WAIT_S)
    assert result["status"] == "success" and result["request_id"] == "both-http", result
    assert_within(result, q_http)
    reply = service.operator.wait_json(TOPICS.pose("kitchen-cam"), lambda d: d.get("request_id") == "both-mqtt",
                                       "the MQTT reply", timeout=WAIT_S)
    assert reply["error"] == "False", reply
    assert_within(reply, q_mqtt)
    assert 0 < len(reply["calibration_points_2d"]) == len(reply["calibration_points_3d"]) <= 64
    assert poll(http, f"{url}/v1/cameras/busy-cam/calibration", "calibrating", WAIT_S)["status"] == "success"
    # exactly once: nothing else arrived on the camera's pose topic, and the HTTP state is still that one result
    assert [d.get("request_id") for d in service.operator.json_on(TOPICS.pose("kitchen-cam"))] == ["both-mqtt"]
    assert http.get(f"{url}/v1/cameras/kitchen-cam/calibration").json() == result


CHROMIUM = os.environ.get("MARKERLESS_CHROMIUM", "/usr/bin/chromium")


def test_console_on_the_daemon_in_headless_chromium(service: Service, tmp_path: Path) -> None:
    """Register the kitchen with the console's button, calibrate a camera over REST, then the console in headless
    Chromium: it shows the scene and the camera with its overlay, a PNG of the frame's size; the overlays of an
    unknown camera and of one never calibrated are 404 with a reason."""
    if not Path(CHROMIUM).exists():
        message = f"no {CHROMIUM} (Debian package `chromium`; .ci/run installs it)"
        if os.environ.get("CI") == "true":  # in CI a missing browser is a broken setup, never a skip
            pytest.fail(message)
        pytest.skip(message)
    http, url = service.http, service.url
    button = http.post(f"{url}/console/scenes/kitchen/register")
    assert button.status_code == 303 and button.headers["location"] == "/"
    done = poll(http, f"{url}/v1/scenes/kitchen/registration", "registering", WAIT_S)
    assert done["status"] == "success" and done["scene_version"], done
    query = service.queries[0]
    posted = http.post(f"{url}/v1/cameras/console-cam/calibration", json=body(service, query, "console-q0"))
    assert posted.status_code == 202, posted.json()
    result = poll(http, f"{url}/v1/cameras/console-cam/calibration", "calibrating", WAIT_S)
    assert result["status"] == "success" and result["request_id"] == "console-q0", result

    overlay = http.get(f"{url}/v1/cameras/console-cam/calibration/overlay")
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    drawn = cv2.imdecode(np.frombuffer(overlay.content, np.uint8), cv2.IMREAD_COLOR)
    frame_image = cv2.imread(str(service.kitchen / query["image"]), cv2.IMREAD_COLOR)
    assert drawn is not None and drawn.shape == frame_image.shape  # the frame's own size
    assert not np.array_equal(drawn, frame_image)  # the scan is drawn over it
    edge_agreement = float(overlay.headers["x-edge-agreement"])
    assert -1.0 <= edge_agreement <= 1.0
    again = http.get(f"{url}/v1/cameras/console-cam/calibration/overlay",
                     headers={"If-None-Match": overlay.headers["etag"]})
    assert again.status_code == 304  # drawn once per calibration: the browser keeps it between refreshes
    unknown = is_error(http.get(f"{url}/v1/cameras/no-such-cam/calibration/overlay"), 404)
    assert unknown["reason"] == "unknown_camera"
    assert "not calibrated" in is_error(http.get(f"{url}/v1/cameras/idle-cam/calibration/overlay"), 404)["message"]

    page = http.get(f"{url}/").text
    card = re.search(r'<div class="camera" id="camera-console-cam">(.*?)</form>', page, re.S)
    assert card and '<span class="ok">calibrated</span>' in card.group(1), page
    assert 'src="/v1/cameras/console-cam/calibration/overlay"' in card.group(1)
    shown = re.search(r"<th>edge agreement</th><td>(-?[0-9.]+)</td>", card.group(1))
    assert shown and abs(float(shown.group(1)) - edge_agreement) <= 0.006  # the drawn overlay's, on its card
    assert done["scene_version"] in page and "<svg" in page  # the scene's version, the plan

    shot = tmp_path / "console.png"
    browser = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={shot}", "--window-size=1280,1600",
         "--hide-scrollbars", f"{url}/"],
        capture_output=True, text=True, timeout=300,
    )
    assert browser.returncode == 0, browser.stderr[-2000:]
    image = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (1600, 1280, 3)
    assert image.std() > 20  # not blank: a blank page has no variance at all
    cyanish = (image[:, :, 0] > 180) & (image[:, :, 1] > 180) & (image[:, :, 2] < 90)  # BGR: the scan's edges
    assert cyanish.sum() > 100  # the overlay shows inside the page
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", f"{url}/"],
        capture_output=True, text=True, timeout=300,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    shown_card = re.search(r'<div class="camera" id="camera-console-cam">(.*?)</form>', dom.stdout, re.S)
    assert shown_card and "calibrated" in shown_card.group(1)  # what the browser rendered, not only what was sent
    assert re.search(r"<td>kitchen</td>\s*<td class=\"ok\">ready", dom.stdout) and done["scene_version"] in dom.stdout

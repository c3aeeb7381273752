"""The console page rendered from a snapshot, and loaded in a real headless Chromium (Debian's `chromium`) from a
real local HTTP server: the kitchen registered, a camera calibrated on a real query, its real overlay."""

from __future__ import annotations

import functools
import os
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import pytest

from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.overlay import overlay_for_result, scene_mesh
from markerless.pipeline.plan_view import PlanCamera, plan_view_svg
from markerless.scene.camera import Camera
from markerless.scene.queries import load_queries
from markerless.scene.store import SceneStore
from markerless.service.console import CameraView, ConsoleSnapshot, HealthView, QueueView, SceneView, render_console

CHROMIUM = os.environ.get("MARKERLESS_CHROMIUM", "/usr/bin/chromium")
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _snapshot(**changes) -> ConsoleSnapshot:
    base = dict(
        generated_at=NOW,
        refresh_s=7,
        scenes=[SceneView(scene_id="kitchen", version="20261203T110000-abc", num_keyframes=100,
                          registered_at=NOW - timedelta(hours=1))],
        cameras=[
            CameraView(camera_id="cam-1", scene_id="kitchen", state="calibrated", calibrated_at=NOW - timedelta(
                minutes=5), position_sigma_m=0.004, rotation_sigma_deg=0.05, num_inliers=551, num_matches=551,
                intrinsics_source="refined", edge_score=0.21, overlay_url="/overlays/cam-1.png"),
            CameraView(camera_id="door/<b>2</b>", state="failed", last_reason="low_inlier_ratio",
                       last_message="0.31 < 0.5", warnings=["intrinsics_mismatch: focal length -23%"]),
        ],
        health=HealthView(status="degraded", worker_alive=True, broker_connected=False, version="0.1.0"),
        queue=QueueView(pending=3, in_flight=1, capacity=16, registrations=0),
    )
    return ConsoleSnapshot(**{**base, **changes})


def test_console_renders_the_snapshot() -> None:
    page = render_console(_snapshot(plan_svg='<svg xmlns="http://www.w3.org/2000/svg" id="plan"></svg>'))
    assert '<meta http-equiv="refresh" content="7">' in page
    assert "kitchen" in page and "20261203T110000-abc" in page and "100" in page and "1 h ago" in page
    assert "cam-1" in page and "5 min ago" in page and "0.4 cm" in page and "551/551" in page
    assert '<img src="/overlays/cam-1.png"' in page
    assert "low_inlier_ratio: 0.31 &lt; 0.5" in page and "intrinsics_mismatch: focal length -23%" in page
    assert "health: degraded" in page and "broker disconnected" in page and "3 waiting, 1 in flight (of 16)" in page
    # the buttons are forms posting to the console's commands; ids are one escaped path segment each
    assert '<form method="post" action="/console/scenes/kitchen/register">' in page
    assert '<form method="post" action="/console/cameras/cam-1/recalibrate">' in page
    assert 'action="/console/cameras/door%2F%3Cb%3E2%3C%2Fb%3E/recalibrate"' in page
    assert "<b>2</b>" not in page and "door/&lt;b&gt;2&lt;/b&gt;" in page  # ids are text, never markup
    assert '<svg xmlns="http://www.w3.org/2000/svg" id="plan"></svg>' in page  # the plan inline
    # nothing from the network, no script
    assert "<script" not in page
    for attribute in ("src=", "href="):
        for part in page.split(attribute)[1:]:
            assert not part.lstrip("\"'").startswith(("http:", "https:", "//")), part[:60]


def test_console_without_anything_yet() -> None:
    page = render_console(ConsoleSnapshot(generated_at=NOW))
    assert "No scene registered." in page and "No plan" in page
    assert "No camera is calibrated or has sent a frame yet." in page


def test_console_shows_the_kept_calibrations_states() -> None:
    """A camera's card from its stored calibration: frames, scene version, fused sigma, solved and last confirmed,
    and the watch's states (pending: a move suspected; lost: its frames stopped localizing, and why)."""
    cameras = [
        CameraView(camera_id="kept", scene_id="kitchen", state="calibrated", scene_version="v7", frames=12,
                   solved_at=NOW - timedelta(days=3), calibrated_at=NOW - timedelta(minutes=2),
                   position_sigma_m=0.006, rotation_sigma_deg=0.08, intrinsics_source="refined"),
        CameraView(camera_id="knocked", scene_id="kitchen", state="pending", scene_version="v6", outdated=True,
                   frames=4, calibrated_at=NOW - timedelta(hours=1), position_sigma_m=0.01, rotation_sigma_deg=0.1,
                   calibrating=True, overlay_url="/o.png", overlay_at=NOW - timedelta(minutes=1)),
        CameraView(camera_id="blocked", scene_id="kitchen", state="lost", frames=30, failures=3,
                   last_reason="no_matches", last_message="0 matches", position_sigma_m=0.005,
                   rotation_sigma_deg=0.07),
        CameraView(camera_id="free", state="calibrated", watched=False, position_sigma_m=0.02, overlay_url="/f.png"),
    ]
    page = render_console(_snapshot(cameras=cameras))
    kept = page.split('id="camera-kept"')[1].split("</form>")[0]
    assert '<span class="ok">calibrated</span>' in kept and "<td>12 frames, scene version v7</td>" in kept
    assert "<td>3 d ago</td>" in kept and "<td>2 min ago</td>" in kept and "0.6 cm, 0.08 deg" in kept
    assert '<span class="muted">fused</span>' in kept and "no overlay: no frame localized here" in kept
    knocked = page.split('id="camera-knocked"')[1].split("</form>")[0]
    assert '<span class="warn">pending</span> <span class="warn">· calibrating a frame</span>' in knocked
    assert "one more frame that agrees with it means the camera moved" in knocked
    assert "outdated: re-solved on its next frame" in knocked
    assert "the last frame localized here (1 min ago), drawn with that frame's own result, not the fused" in knocked
    blocked = page.split('id="camera-blocked"')[1].split("</form>")[0]
    assert '<span class="bad">lost</span>' in blocked and "Its last 3 frames failed to localize" in blocked
    assert "no_matches: 0 matches" in blocked and "in a row" not in blocked
    free = page.split('id="camera-free"')[1].split("</form>")[0]
    assert "Not watched" in free and "fused" not in free and "<th>calibrated</th>" in free


def test_snapshot_refuses_unknown_fields_and_states() -> None:
    with pytest.raises(ValueError):
        CameraView(camera_id="c", state="great")
    with pytest.raises(ValueError):
        SceneView(scene_id="s", colour="red")


class _Handler(SimpleHTTPRequestHandler):
    requested: list[str]

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requested.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        message = f"no {CHROMIUM} (Debian package `chromium`; .ci/run installs it)"
        if os.environ.get("CI") == "true":  # in CI a missing browser is a broken setup, never a skip
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def test_console_in_headless_chromium_with_the_kitchen(chromium: str, kitchen_store: Path, kitchen_dir: Path,
                                                      feature_models, tmp_path: Path) -> None:
    scene = SceneStore(kitchen_store).load("kitchen")
    query = load_queries(kitchen_dir / "queries.json")[0]
    frame = decode_image((kitchen_dir / query["image"]).read_bytes())
    result = Localizer(feature_models).localize(scene, frame, Camera.from_matrix(query["intrinsics"], 640, 480))
    assert result.success
    mesh = scene_mesh(scene.path)
    overlay = overlay_for_result(frame, result, mesh)
    site = tmp_path / "site"
    (site / "overlays").mkdir(parents=True)
    (site / "overlays" / "cam-1.png").write_bytes(overlay.png)
    camera = Camera.from_matrix(result.intrinsics, 640, 480, result.distortion)
    plan = plan_view_svg(mesh, [PlanCamera("cam-1", camera, result.pose_matrix())])
    info = scene.info
    snapshot = ConsoleSnapshot(
        scenes=[SceneView(scene_id="kitchen", version=info.version, num_keyframes=info.num_keyframes,
                          registered_at=datetime.fromisoformat(info.registered_at))],
        cameras=[CameraView(camera_id="cam-1", scene_id="kitchen", state="calibrated",
                            calibrated_at=datetime.now(UTC), position_sigma_m=result.position_sigma_m,
                            rotation_sigma_deg=result.rotation_sigma_deg, num_inliers=result.num_inliers,
                            num_matches=result.num_matches, intrinsics_source=result.intrinsics_source,
                            edge_score=overlay.edge_score, warnings=result.warnings,
                            overlay_url="/overlays/cam-1.png")],
        health=HealthView(version="markerless 0.1.0"),
        plan_svg=plan,
    )
    (site / "index.html").write_text(render_console(snapshot))

    requested: list[str] = []
    handler = functools.partial(type("Handler", (_Handler,), {"requested": requested}), directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    shot = tmp_path / "console.png"
    try:
        done = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={shot}", "--window-size=1280,820",
             "--hide-scrollbars", f"http://127.0.0.1:{server.server_address[1]}/index.html"],
            capture_output=True, text=True, timeout=180,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "/index.html" in requested and "/overlays/cam-1.png" in requested  # the page loaded its overlay
    image = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (820, 1280, 3)
    assert image.std() > 20  # not blank: a blank page has no variance at all
    # the overlay shows inside the page: its cyan scan edges are on the screenshot
    cyanish = (image[:, :, 0] > 180) & (image[:, :, 1] > 180) & (image[:, :, 2] < 90)
    assert cyanish.sum() > 100

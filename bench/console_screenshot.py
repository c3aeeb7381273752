"""Makes docs/console.png, the README's console screenshot, from the synthetic room (`markerless synth`): the
kitchen scan's licence keeps images made from it out of this repository.

The room is synthesized and registered in a temporary folder; three cameras: `cam-1` calibrated from a query with
its right camera, `cam-2` from another query with its focal length given 30 % too long in `fixed` mode (the
overlay disagrees and the reply warns), `door-3` a frame of another room (refused). The page is rendered from
their real results and overlays, served by a local http.server and photographed by headless Chromium.

    python bench/console_screenshot.py [--out docs/console.png] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import tempfile
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from markerless.demo.synth import generate
from markerless.pipeline.features import FeatureModels
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.overlay import overlay_for_result, scene_mesh
from markerless.pipeline.plan_view import PlanCamera, plan_view_svg
from markerless.pipeline.registration import register_scene
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.queries import load_queries
from markerless.scene.store import SceneStore
from markerless.service.console import CameraView, ConsoleSnapshot, HealthView, QueueView, SceneView, render_console


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def make(out: Path, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        synth = generate(tmp / "room" / "room.zip")
        models = FeatureModels()
        store = SceneStore(tmp / "store")
        info = register_scene(store, "room", synth.zip_path, SceneConfig(), models)
        scene = store.load("room")
        mesh = scene_mesh(scene.path)
        localizer = Localizer(models)
        queries = load_queries(synth.queries_json)
        site = tmp / "site"
        (site / "overlays").mkdir(parents=True)
        now = datetime.now(UTC)
        views, plan_cameras = [], []
        for camera_id, query, factor, minutes in (("cam-1", queries[0], 1.0, 3), ("cam-2", queries[5], 1.3, 12)):
            frame = decode_image((synth.queries_json.parent / query["image"]).read_bytes())
            given = Camera.from_matrix(query["intrinsics"], frame.shape[1], frame.shape[0])
            given = replace(given, fx=given.fx * factor, fy=given.fy * factor)  # the focal length only
            result = localizer.localize(scene, frame, given, "fixed")
            if not result.success:
                raise SystemExit(f"{camera_id}: {result.reason}: {result.message}")
            overlay = overlay_for_result(frame, result, mesh)
            (site / "overlays" / f"{camera_id}.png").write_bytes(overlay.png)
            camera = Camera.from_matrix(result.intrinsics, frame.shape[1], frame.shape[0], result.distortion)
            plan_cameras.append(PlanCamera(camera_id, camera, result.pose_matrix(), ok=not result.warnings))
            views.append(CameraView(
                camera_id=camera_id, scene_id="room", state="calibrated", calibrated_at=now - timedelta(
                    minutes=minutes), position_sigma_m=result.position_sigma_m,
                rotation_sigma_deg=result.rotation_sigma_deg, num_inliers=result.num_inliers,
                num_matches=result.num_matches, intrinsics_source=result.intrinsics_source,
                edge_score=overlay.edge_score, warnings=result.warnings, overlay_url=f"overlays/{camera_id}.png"))
        foreign = decode_image(synth.foreign[0].read_bytes())
        failed = localizer.localize(scene, foreign, Camera.from_matrix(queries[0]["intrinsics"], 640, 480), "fixed")
        views.append(CameraView(camera_id="door-3", scene_id="room", state="failed", last_reason=failed.reason,
                                last_message=failed.message))
        snapshot = ConsoleSnapshot(
            generated_at=now,
            scenes=[SceneView(scene_id="room", version=info.version, num_keyframes=info.num_keyframes,
                              registered_at=datetime.fromisoformat(info.registered_at))],
            cameras=views,
            health=HealthView(version="markerless 0.1.0", uptime_s=3600),
            queue=QueueView(pending=0, in_flight=1, capacity=16),
            plan_svg=plan_view_svg(mesh, plan_cameras),
        )
        (site / "index.html").write_text(render_console(snapshot))
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp / 'chromium'}", f"--screenshot={out.resolve()}", "--window-size=1280,1140",
                 "--hide-scrollbars", f"http://127.0.0.1:{server.server_address[1]}/index.html"],
                check=True, capture_output=True, timeout=180,
            )
        finally:
            server.shutdown()
            server.server_close()
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/console.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    make(args.out, args.chromium)


if __name__ == "__main__":
    main()

"""Cost of the operator's pictures on the kitchen scan: the overlay of a 640x480 query (ray casting, edges, score,
drawing, PNG), the same through a distorted 1280x960 camera, and the plan view; the one-off mesh load.

Registers the kitchen in a temporary store, localizes the first query once, then times each picture 5 times and
prints the median (ms) with the stages of the overlay.

    python bench/bench_overlay.py [--kitchen DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from markerless.pipeline.features import FeatureModels
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.overlay import (
    edge_alignment_score,
    overlay_for_result,
    render_overlay,
    render_scan,
    scene_mesh,
)
from markerless.pipeline.plan_view import PlanCamera, plan_view_svg
from markerless.pipeline.registration import register_scene
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.queries import load_queries
from markerless.scene.store import SceneStore

REPEATS = 5


def _median_ms(fn) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 1)


def run(kitchen: Path) -> dict:
    query = load_queries(kitchen / "queries.json")[0]
    frame = decode_image((kitchen / query["image"]).read_bytes())
    models = FeatureModels()
    with tempfile.TemporaryDirectory() as tmp:
        store = SceneStore(Path(tmp))
        register_scene(store, "kitchen", kitchen / "kitchen-poly.zip", SceneConfig(), models)
        scene = store.load("kitchen")
        result = Localizer(models).localize(scene, frame, Camera.from_matrix(query["intrinsics"], 640, 480))
        assert result.success, result.message
        start = time.perf_counter()
        mesh = scene_mesh(scene.path)
        load_ms = round((time.perf_counter() - start) * 1e3, 1)
        camera = Camera.from_matrix(result.intrinsics, 640, 480, result.distortion)
        pose = result.pose_matrix()
        view = render_scan(mesh, camera, pose)
        big = np.repeat(np.repeat(frame, 2, axis=0), 2, axis=1)
        distorted = Camera(1280, 960, camera.fx * 2, camera.fy * 2, camera.cx * 2, camera.cy * 2, (-0.25, 0.08, 0, 0))
        overlay = overlay_for_result(frame, result, mesh)
        summary = {
            "mesh_load_ms (once per scene version)": load_ms,
            "overlay_640x480_ms": _median_ms(lambda: overlay_for_result(frame, result, mesh)),
            "  ray_cast_and_edges_ms": _median_ms(lambda: render_scan(mesh, camera, pose)),
            "  edge_score_ms": _median_ms(lambda: edge_alignment_score(frame, view.edges)),
            "overlay_1280x960_distorted_ms": _median_ms(lambda: render_overlay(big, distorted, pose, mesh)),
            "plan_view_ms": _median_ms(lambda: plan_view_svg(mesh, [PlanCamera("cam-1", camera, pose)])),
            "overlay_png_kib": round(len(overlay.png) / 1024, 1),
            "edge_score": round(overlay.edge_score, 3),
            "cpus": len(os.sched_getaffinity(0)),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kitchen", type=Path,
                        default=Path(os.environ.get("MARKERLESS_KITCHEN_DIR", "../shared/data/kitchen")))
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    summary = run(args.kitchen)
    for key, value in summary.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

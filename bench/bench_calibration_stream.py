"""Replays fixed-camera streams of the kitchen scan through the calibration watch (the service's own logic): per
camera, a query frame re-captured N times (exposure, white balance, noise, JPEG, people in front; `--heavy` for
the rough version), then neighbouring frames of the sequence as the camera knocked twice. Prints every frame
(the frame's error and sigma, events, state, the kept calibration's error and sigma) and a summary per camera:
false `moved` while static, frames to detect each knock, the calibration's error after each phase and whether
its sigma covers it (within sqrt(chi2_3(0.99)) = 3.37 sigma).

    python bench/bench_calibration_stream.py [--kitchen DIR] [--store DIR] [--static 30] [--knocked 5] [--json OUT]

`--store` reuses a store with the kitchen registered as scene `kitchen`; otherwise it is registered in a
temporary one. The pairs (query -> keyframe -> keyframe) are the tests' (tests/test_calibration_stream.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
from scipy.stats import chi2

from markerless.demo.calibration_stream import stream
from markerless.pipeline.calibration_replay import replay
from markerless.pipeline.features import FeatureModels
from markerless.pipeline.localization import Localizer
from markerless.pipeline.registration import register_scene
from markerless.scene.config import SceneConfig
from markerless.scene.queries import load_queries, query_camera, query_pose
from markerless.scene.store import SceneStore

CAMERAS = [("light", 6, 31, 29, False), ("heavy", 5, 25, 23, True)]
COVER = math.sqrt(chi2.ppf(0.99, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kitchen", type=Path, default=Path(os.environ.get("MARKERLESS_KITCHEN_DIR",
                                                                            "../shared/data/kitchen")))
    parser.add_argument("--store", type=Path, help="a store with scene 'kitchen' registered")
    parser.add_argument("--static", type=int, default=30, help="frames of the unmoved camera")
    parser.add_argument("--knocked", type=int, default=5, help="frames after each knock")
    parser.add_argument("--json", type=Path, help="write every step and the summary here")
    args = parser.parse_args()
    models = FeatureModels()
    with tempfile.TemporaryDirectory() as tmp:
        store = SceneStore(args.store or Path(tmp))
        if store.info("kitchen") is None:
            register_scene(store, "kitchen", args.kitchen / "kitchen-poly.zip", SceneConfig(), models)
        scene = store.load("kitchen")
        localizer = Localizer(models)
        queries = load_queries(args.kitchen / "queries.json")
        report = {}
        for name, query, near, far, heavy in CAMERAS:
            q = queries[query]
            image = cv2.cvtColor(cv2.imread(str(args.kitchen / q["image"])), cv2.COLOR_BGR2RGB)
            phases = [("static", image, query_pose(q), args.static),
                      ("knock-1", scene.keyframe_image(near), scene.keyframe_pose(near), args.knocked),
                      ("knock-2", scene.keyframe_image(far), scene.keyframe_pose(far), args.knocked)]
            frames = stream(phases, np.random.default_rng(query), heavy=heavy)
            camera = query_camera(q, q["width"], q["height"])
            assert camera is not None, f"query {query} gives no intrinsics"
            steps, _ = replay(localizer, scene, [(f.phase, f.jpeg, f.truth) for f in frames], camera, camera_id=name)
            summary = {}
            for phase in ("static", "knock-1", "knock-2"):
                group = [s for s in steps if s.phase == phase]
                moved = [i for i, s in enumerate(group) if "moved" in s.events]
                last = group[-1]
                summary[phase] = {
                    "frames": len(group), "localized": sum(s.success for s in group), "moved_at": moved,
                    "error_cm": None if last.error_m is None else 100 * last.error_m, "error_deg": last.error_deg,
                    "sigma_cm": None if last.sigma_m is None else 100 * last.sigma_m, "sigma_deg": last.sigma_deg,
                    "covered": last.error_m is not None and last.error_m <= COVER * last.sigma_m
                    and last.error_deg <= COVER * last.sigma_deg,
                }
            print(f"\n{name}:")
            for s in steps:
                cal = "-" if s.error_m is None else f"{100 * s.error_m:.2f} cm/{s.error_deg:.2f} deg"
                print(f"  {s.phase:8s} {'ok' if s.success else s.reason:20s} {','.join(s.events):12s} {s.state:10s} "
                      f"{s.frames:3d} {cal}")
            print(json.dumps(summary, indent=1))
            report[name] = {"summary": summary, "steps": [asdict(s) for s in steps]}
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

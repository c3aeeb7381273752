"""Real cameras on the kitchen scan: accuracy and cost of each intrinsics mode, in one run.

Fixed-camera frames are made from the 20 kitchen queries (1280x960, barrel lens, photometric damage and JPEG
25-50; `markerless.demo.fixed_camera`), and each is localized:
- `fixed` with the exact camera (the reference cost: `refine` must stay within 1.2x of it),
- `fixed` with a focal length 0.85-1.15x off and no distortion (what happens to users today),
- `refine` from that wrong camera,
- `estimate` with no intrinsics,
and the original 640x480 queries in the default mode. Prints recall at (5 cm, 5 deg), median errors, median focal
error of the returned camera, poses more than 10 cm off returned without a warning, latency p50 in seconds and as
a ratio to `fixed`, measured in this run, and the range of stated position sigmas with the share of poses whose
error is within 3 sigma.

    python bench/bench_intrinsics.py [--kitchen DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from markerless.demo.fixed_camera import fixed_camera_frame
from markerless.pipeline.features import FeatureModels
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.registration import register_scene
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.scene.store import SceneStore

FOCAL_FACTORS = (0.85, 0.9, 1.1, 1.15)


def run(kitchen: Path) -> dict:
    queries = json.loads((kitchen / "queries.json").read_text())["queries"]
    models = FeatureModels()
    with tempfile.TemporaryDirectory() as tmp:
        store = SceneStore(Path(tmp))
        register_scene(store, "kitchen", kitchen / "kitchen-poly.zip", SceneConfig(), models)
        scene = store.load("kitchen")
        localizer = Localizer(models)
        rng = np.random.default_rng(8)
        cases: dict[str, list[tuple]] = {k: [] for k in ("fixed_exact", "fixed_wrong", "refine", "estimate",
                                                          "original_default")}
        for i, q in enumerate(queries):
            original = decode_image((kitchen / q["image"]).read_bytes())
            truth = quat_trans_to_pose(q["quaternion"], q["translation"])
            data, exact = fixed_camera_frame(original, Camera.from_matrix(q["intrinsics"], 640, 480), rng)
            image = decode_image(data)
            f = FOCAL_FACTORS[i % len(FOCAL_FACTORS)]
            wrong = Camera(exact.width, exact.height, exact.fx * f, exact.fy * f, exact.cx, exact.cy)
            runs = {
                "fixed_exact": (image, exact, "fixed"),
                "fixed_wrong": (image, wrong, "fixed"),
                "refine": (image, wrong, "refine"),
                "estimate": (image, None, "estimate"),
                "original_default": (original, Camera.from_matrix(q["intrinsics"], 640, 480), "refine"),
            }
            for name, (img, camera, mode) in runs.items():
                start = time.perf_counter()
                result = localizer.localize(scene, img, camera, mode)
                latency = time.perf_counter() - start
                t_err, r_err = pose_error(result.pose_matrix(), truth) if result.success else (np.inf, np.inf)
                true_f = 525.0 if name == "original_default" else exact.fx
                f_err = abs(result.intrinsics[0][0] / true_f - 1) if result.success else np.nan
                sigma = result.position_sigma_m if result.success and result.position_sigma_m else np.nan
                cases[name].append((t_err, r_err, f_err, latency, result.success and not result.warnings, sigma))
    out = {}
    for name, rows in cases.items():
        a = np.array(rows, dtype=float)
        out[name] = {
            "recall_5cm_5deg": float(np.mean((a[:, 0] <= 0.05) & (a[:, 1] <= 5))),
            "median_translation_cm": float(np.median(a[:, 0]) * 100),
            "median_focal_error_pct": float(np.nanmedian(a[:, 2]) * 100),
            "wrong_by_10cm_without_warning": int(np.sum((a[:, 0] > 0.10) & np.isfinite(a[:, 0]) & (a[:, 4] > 0))),
            "latency_p50_s": float(np.median(a[:, 3])),
            "position_sigma_cm": [float(np.nanmin(a[:, 5]) * 100), float(np.nanmax(a[:, 5]) * 100)],
            # is the stated uncertainty honest? share of poses whose position error is within 3 sigma
            "within_3_sigma": float(np.mean(a[np.isfinite(a[:, 5]), 0] <= 3 * a[np.isfinite(a[:, 5]), 5])),
        }
    base = out["fixed_exact"]["latency_p50_s"]
    for row in out.values():
        row["latency_vs_fixed"] = row["latency_p50_s"] / base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kitchen", type=Path, default=Path(os.environ.get("MARKERLESS_KITCHEN_DIR",
                                                                           "../shared/data/kitchen")))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = run(args.kitchen)
    print(f"{'case':<18} {'recall':>7} {'t med cm':>9} {'f err %':>8} {'>10cm silent':>13} {'p50 s':>7} {'x fixed':>8}"
          f" {'sigma cm':>11} {'<=3 sigma':>9}")
    for name, r in out.items():
        print(f"{name:<18} {r['recall_5cm_5deg']:>7.2f} {r['median_translation_cm']:>9.2f} "
              f"{r['median_focal_error_pct']:>8.2f} {r['wrong_by_10cm_without_warning']:>13} "
              f"{r['latency_p50_s']:>7.2f} {r['latency_vs_fixed']:>8.2f} "
              f"{r['position_sigma_cm'][0]:>5.1f}-{r['position_sigma_cm'][1]:<5.1f} {r['within_3_sigma']:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

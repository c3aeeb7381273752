"""Real cameras on the kitchen scan: accuracy, honesty of the stated sigma and cost of each intrinsics mode.

Fixed-camera frames are made from the 20 kitchen queries (`markerless.demo.fixed_camera`; photometric damage and
JPEG 25-50 on each), for three kinds of camera:
- `site`: 1280x960, the typical wide CCTV lens (k1 -0.28), as on most sites;
- `narrow`: 1280x960 with a 27 degree field of view (a varifocal zoomed in; a central crop enlarged: soft image);
- `barrel`: 1280x960 with a strong barrel lens (k1 -0.4).
Each is localized in `fixed` with the exact camera (the reference cost), `fixed` with a focal 0.85-1.15x off and no
distortion (site only: what a wrong camera does), `refine` from that wrong camera (barrel: the spec focal and no
lens), `estimate` with no intrinsics; and the original 640x480 queries in the default mode. Prints recall at
(5 cm, 5 deg), median errors, median focal error, poses > 10 cm off returned without a warning, latency p50 as a
ratio to `fixed` in this run, the stated position sigmas, the share of returned poses within 3 sigma of the truth,
and poses more than 10 cm off outside 3 sigma (the contract's breaches).

    python bench/bench_intrinsics.py [--kitchen DIR] [--kinds site,narrow,barrel] [--json OUT]
    python bench/bench_intrinsics.py --focal-profile   # what one narrow frame says about its focal length

`--focal-profile` localizes each narrow frame in `fixed` with the focal length forced to 0.92-1.08x the truth and
prints the inliers' RMS reprojection error and the position error at each: how flat the data are in focal length
(docs/intrinsics.md, "What one narrow frame can determine").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from markerless.scene.queries import load_queries

FOCAL_FACTORS = (0.85, 0.9, 1.1, 1.15)
NARROW_FACTORS = (0.85, 1.15)  # "a focal 15 % off"


def _cases(kind: str, i: int, image: np.ndarray, exact, wrong_factor: float) -> dict:
    from markerless.scene.camera import Camera

    wrong = Camera(exact.width, exact.height, exact.fx * wrong_factor, exact.fy * wrong_factor, exact.cx, exact.cy)
    if kind == "barrel":
        spec = Camera(exact.width, exact.height, exact.fx, exact.fy, exact.cx, exact.cy)
        return {"fixed_exact": (exact, "fixed"), "refine": (spec, "refine"), "estimate": (None, "estimate")}
    cases = {"fixed_exact": (exact, "fixed"), "refine": (wrong, "refine"), "estimate": (None, "estimate")}
    if kind == "site":
        cases["fixed_wrong"] = (wrong, "fixed")
    return cases


def run(kitchen: Path, kinds: list[str]) -> dict:
    from markerless.demo.fixed_camera import STRONG_BARREL_LENS, fixed_camera_frame, narrow_camera
    from markerless.pipeline.evaluation import ACCURATE_DEGREES, ACCURATE_METRES
    from markerless.pipeline.features import FeatureModels
    from markerless.pipeline.image_decoding import decode_image
    from markerless.pipeline.localization import Localizer
    from markerless.pipeline.registration import register_scene
    from markerless.scene.camera import Camera
    from markerless.scene.config import SceneConfig
    from markerless.scene.geometry import pose_error, quat_trans_to_pose
    from markerless.scene.store import SceneStore

    queries = load_queries(kitchen / "queries.json")
    models = FeatureModels()
    rows: dict[str, list[tuple]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = SceneStore(Path(tmp))
        register_scene(store, "kitchen", kitchen / "kitchen-poly.zip", SceneConfig(), models)
        scene = store.load("kitchen")
        localizer = Localizer(models)

        def record(name: str, image, camera, mode: str, truth, true_f: float) -> None:
            start = time.perf_counter()
            result = localizer.localize(scene, image, camera, mode)
            latency = time.perf_counter() - start
            t_err, r_err = pose_error(result.pose_matrix(), truth) if result.success else (np.inf, np.inf)
            f_err = abs(result.intrinsics[0][0] / true_f - 1) if result.success else np.nan
            sigma = result.position_sigma_m if result.success and result.position_sigma_m else np.nan
            rows.setdefault(name, []).append((t_err, r_err, f_err, latency, result.success and not result.warnings,
                                              sigma, result.success))

        for kind in kinds:
            rng = np.random.default_rng(8)
            for i, q in enumerate(queries):
                original = decode_image((kitchen / q["image"]).read_bytes())
                truth = quat_trans_to_pose(q["quaternion"], q["translation"])
                camera = Camera.from_matrix(q["intrinsics"], 640, 480)
                if kind == "site":
                    data, exact = fixed_camera_frame(original, camera, rng)
                    factor = FOCAL_FACTORS[i % len(FOCAL_FACTORS)]
                elif kind == "narrow":
                    data, exact = fixed_camera_frame(original, camera, rng, target=narrow_camera(camera))
                    factor = NARROW_FACTORS[i % len(NARROW_FACTORS)]
                else:
                    data, exact = fixed_camera_frame(original, camera, rng, lens=STRONG_BARREL_LENS)
                    factor = 1.0
                image = decode_image(data)
                for case, (cam, mode) in _cases(kind, i, image, exact, factor).items():
                    record(f"{kind}/{case}", image, cam, mode, truth, exact.fx)
                if kind == "site":
                    record("original/default", original, camera, "refine", truth, camera.fx)
    out = {}
    for name, case_rows in rows.items():
        a = np.array(case_rows, dtype=float)
        returned = a[:, 6] > 0
        err, sig = a[returned, 0], a[returned, 5]
        outside = err > 3 * np.nan_to_num(sig, nan=0.0)
        out[name] = {
            "recall_5cm_5deg": float(np.mean((a[:, 0] < ACCURATE_METRES) & (a[:, 1] < ACCURATE_DEGREES))),
            "returned": int(returned.sum()),
            "median_translation_cm": float(np.median(a[:, 0]) * 100),
            "median_focal_error_pct": float(np.nanmedian(a[:, 2]) * 100) if returned.any() else float("nan"),
            "wrong_by_10cm_without_warning": int(np.sum((a[:, 0] > 0.10) & np.isfinite(a[:, 0]) & (a[:, 4] > 0))),
            "latency_p50_s": float(np.median(a[:, 3])),
            "position_sigma_cm": [float(np.nanmin(sig) * 100), float(np.nanmax(sig) * 100)] if returned.any()
            else [float("nan")] * 2,
            # the contract: returned poses within 3 sigma, and no pose > 10 cm off outside 3 sigma
            "within_3_sigma": float(np.mean(~outside)) if returned.any() else float("nan"),
            "beyond_10cm_outside_3_sigma": int(np.sum(outside & (err > 0.10))),
        }
    for name, row in out.items():
        base = out.get(name.split("/")[0] + "/fixed_exact", row)
        row["latency_vs_fixed"] = row["latency_p50_s"] / base["latency_p50_s"]
    return out


PROFILE_FACTORS = tuple(round(0.92 + 0.02 * i, 2) for i in range(9))


def focal_profile(kitchen: Path) -> None:
    from markerless.demo.fixed_camera import fixed_camera_frame, narrow_camera
    from markerless.pipeline.features import FeatureModels
    from markerless.pipeline.image_decoding import decode_image
    from markerless.pipeline.localization import Localizer
    from markerless.pipeline.registration import register_scene
    from markerless.scene.camera import Camera
    from markerless.scene.config import SceneConfig
    from markerless.scene.geometry import pose_error
    from markerless.scene.queries import query_pose
    from markerless.scene.store import SceneStore

    models = FeatureModels()
    rng = np.random.default_rng(8)
    print("frame  " + "  ".join(f"{f:>12.2f}x" for f in PROFILE_FACTORS) + "   (RMS px / error cm)")
    with tempfile.TemporaryDirectory() as tmp:
        store = SceneStore(Path(tmp))
        register_scene(store, "kitchen", kitchen / "kitchen-poly.zip", SceneConfig(), models)
        scene = store.load("kitchen")
        localizer = Localizer(models)
        for i, q in enumerate(load_queries(kitchen / "queries.json")):
            original = decode_image((kitchen / q["image"]).read_bytes())
            camera = Camera.from_matrix(q["intrinsics"], 640, 480)
            data, exact = fixed_camera_frame(original, camera, rng, target=narrow_camera(camera))
            image = decode_image(data)
            cells = []
            for factor in PROFILE_FACTORS:
                forced = Camera(exact.width, exact.height, exact.fx * factor, exact.fy * factor, exact.cx, exact.cy)
                result = localizer.localize(scene, image, forced, "fixed")
                if result.success:
                    error = pose_error(result.pose_matrix(), query_pose(q))[0]
                    cells.append(f"{result.reprojection_error_px:6.2f}/{error * 100:4.0f}")
                else:
                    cells.append(f"{'-':>11}")
            print(f"{i:>5}  " + "  ".join(f"{c:>13}" for c in cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kitchen", type=Path, default=Path(os.environ.get("MARKERLESS_KITCHEN_DIR",
                                                                           "../shared/data/kitchen")))
    parser.add_argument("--kinds", default="site,narrow,barrel")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--focal-profile", action="store_true", help="print the narrow frames' focal profiles")
    args = parser.parse_args()
    if args.focal_profile:
        focal_profile(args.kitchen)
        return
    out = run(args.kitchen, args.kinds.split(","))
    print(f"{'case':<22} {'recall':>6} {'ret':>4} {'t med cm':>9} {'f err %':>8} {'>10cm silent':>12} {'p50 s':>6} "
          f"{'x fixed':>7} {'sigma cm':>11} {'<=3 sigma':>9} {'>10cm out':>9}")
    for name, r in out.items():
        print(f"{name:<22} {r['recall_5cm_5deg']:>6.2f} {r['returned']:>4} {r['median_translation_cm']:>9.2f} "
              f"{r['median_focal_error_pct']:>8.2f} {r['wrong_by_10cm_without_warning']:>12} "
              f"{r['latency_p50_s']:>6.2f} {r['latency_vs_fixed']:>7.2f} "
              f"{r['position_sigma_cm'][0]:>5.1f}-{r['position_sigma_cm'][1]:<5.1f} {r['within_3_sigma']:>9.2f} "
              f"{r['beyond_10cm_outside_3_sigma']:>9}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

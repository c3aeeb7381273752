"""Localization latency, registration time, accuracy and memory on the kitchen scan, in units of this machine.

Machines differ 2-3x in speed, so every time is also given in **units**: one pycolmap SIFT extraction with
COLMAP's default options (CPU) on a 640x480 kitchen query, median over the 20 queries. The unit is measured
interleaved with the localizations (one extraction right before each query), so that both see the same load;
registration is stated against its own unit, extractions of the 20 queries half before and half after it.

Baseline (same run, same SIFT features and 3D points): the "plain composition" of SceneScape and hloc -- match
the query against every keyframe, pool all 2D-3D matches, one LO-RANSAC PnP, and SceneScape's gate as written
(inliers / all matches >= 0.5). markerless: top-K retrieval (K = 50), batched matching, pairwise verification,
PnP on verified matches, gates, keyframes visited best first with early stopping; also without early stopping
(all K matched) in the same run.

    python bench/bench_localization.py [--kitchen DIR] [--out REPORT.json] [--no-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import psutil
import pycolmap

if TYPE_CHECKING:
    from markerless.pipeline.features import FeatureModels
    from markerless.scene.camera import Camera
    from markerless.scene.store import Scene

# markerless is imported inside the functions: registration's SIFT worker processes import this script (Python's
# multiprocessing prepares each worker from the parent's __main__), and at the top it would make every worker
# import torch, seconds that the service (whose __main__ is the light `markerless` command) never pays.


class UnitClock:
    """The speed unit: one pycolmap SIFT extraction with COLMAP's default options on a 640x480 query."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._sift = pycolmap.Sift(options=pycolmap.FeatureExtractionOptions(), device=pycolmap.Device.cpu)
        self.samples: list[float] = []

    def measure(self, image_rgb: np.ndarray) -> None:
        gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        start = time.perf_counter()
        self._sift.extract(gray)
        self.samples.append(time.perf_counter() - start)

    @property
    def seconds(self) -> float:
        return float(np.median(self.samples))


def baseline(models: FeatureModels, scene: Scene, image: np.ndarray, camera: Camera) -> tuple[np.ndarray | None, float]:
    """Brute force over every keyframe, pooled PnP, SceneScape's gate. Returns (pose or None, seconds)."""
    from markerless.pipeline.features import to_gray
    from markerless.pipeline.matching import match_batch
    from markerless.scene.camera import to_camera_pixels

    start = time.perf_counter()
    feats = models.sift()(to_gray(image))
    matches = match_batch(feats["descriptors"], scene.descriptors)
    kp = to_camera_pixels(feats["keypoints"])
    matches = [m[scene.has_point[i][m[:, 1]]] for i, m in enumerate(matches)]
    p2 = np.concatenate([kp[m[:, 0]] for m in matches])
    p3 = np.concatenate([scene.points3d[i][m[:, 1]] for i, m in enumerate(matches)])
    opts = pycolmap.AbsolutePoseEstimationOptions()
    opts.ransac.max_error = 12.0
    ret = pycolmap.estimate_and_refine_absolute_pose(p2, p3, camera.to_pycolmap(), estimation_options=opts)
    elapsed = time.perf_counter() - start
    if ret is None or len(p2) < 20 or np.sum(ret["inlier_mask"]) / len(p2) < 0.5:
        return None, elapsed
    pose = np.eye(4)
    pose[:3] = ret["cam_from_world"].inverse().matrix()
    return pose, elapsed


def _recall(errors: list[tuple[float, float]]) -> float:
    from markerless.pipeline.evaluation import ACCURATE_DEGREES, ACCURATE_METRES

    return float(np.mean([t < ACCURATE_METRES and r < ACCURATE_DEGREES for t, r in errors]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kitchen", type=Path, default=Path(os.environ.get("MARKERLESS_KITCHEN_DIR",
                                                                                "../shared/data/kitchen")))
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--no-baseline", action="store_true", help="skip the brute-force baseline (faster)")
    args = parser.parse_args()
    from markerless.pipeline.evaluation import localize_foreign, peak_rss_mb
    from markerless.pipeline.features import FeatureModels
    from markerless.pipeline.image_decoding import decode_image
    from markerless.pipeline.localization import Localizer
    from markerless.pipeline.options import LocalizationOptions
    from markerless.pipeline.registration import register_scene
    from markerless.scene.camera import Camera
    from markerless.scene.config import SceneConfig
    from markerless.scene.geometry import pose_error, quat_trans_to_pose
    from markerless.scene.queries import load_queries
    from markerless.scene.store import SceneStore

    proc = psutil.Process()
    rss0 = proc.memory_info().rss / 2**20
    models = FeatureModels()
    unit, register_unit = UnitClock(), UnitClock()
    queries = load_queries(args.kitchen / "queries.json")
    frames = [decode_image((args.kitchen / q["image"]).read_bytes()) for q in queries]
    cameras = [Camera.from_matrix(q["intrinsics"], 640, 480) for q in queries]
    unit.measure(frames[0])  # warm-up
    register_unit.measure(frames[0])
    with tempfile.TemporaryDirectory() as tmp:
        store = SceneStore(Path(tmp))
        for frame in frames[:10]:
            register_unit.measure(frame)
        start = time.perf_counter()
        info = register_scene(store, "kitchen", args.kitchen / "kitchen-poly.zip", SceneConfig(), models)
        register_s = time.perf_counter() - start
        for frame in frames[10:]:
            register_unit.measure(frame)
        rss_registered = proc.memory_info().rss / 2**20
        scene = store.load("kitchen")
        rss_scene = proc.memory_info().rss / 2**20
        localizer = Localizer(models)
        all_k = Localizer(models, LocalizationOptions(early_stop_keyframes=0))
        localizer.localize(scene, frames[0], cameras[0])  # warm-up (allocations, thread pools)
        ours_s, ours_err, base_s, base_err, stages, all_s, all_err = [], [], [], [], {}, [], []
        for q, frame, camera in zip(queries, frames, cameras, strict=True):
            gt = quat_trans_to_pose(q["quaternion"], q["translation"])
            unit.measure(frame)
            result = localizer.localize(scene, frame, camera)
            ours_s.append(result.timings_ms["total"] / 1e3)
            ours_err.append(pose_error(result.pose_matrix(), gt) if result.success else (np.inf, np.inf))
            for k, v in result.timings_ms.items():
                stages.setdefault(k, []).append(v / 1e3)
            result = all_k.localize(scene, frame, camera)
            all_s.append(result.timings_ms["total"] / 1e3)
            all_err.append(pose_error(result.pose_matrix(), gt) if result.success else (np.inf, np.inf))
            if not args.no_baseline:
                pose, seconds = baseline(models, scene, frame, camera)
                base_s.append(seconds)
                base_err.append(pose_error(pose, gt) if pose is not None else (np.inf, np.inf))
        foreign = localize_foreign(localizer, scene, args.kitchen / "foreign", queries[0]["intrinsics"])
    unit.samples.pop(0)  # the warm-ups
    register_unit.samples.pop(0)
    u = unit.seconds

    def fig(seconds: float, unit_s: float = u) -> dict[str, float]:
        return {"s": seconds, "units": seconds / unit_s}

    report = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads()},
        "unit_s": u,
        "unit_spread_s": [float(np.min(unit.samples)), float(np.max(unit.samples))],
        "num_keyframes": info.num_keyframes,
        "registration_unit_s": register_unit.seconds,
        "registration": fig(register_s, register_unit.seconds),
        "localize_p50": fig(float(np.median(ours_s))),
        "localize_p90": fig(float(np.percentile(ours_s, 90))),
        "stage_p50": {k: fig(float(np.median(v))) for k, v in stages.items()},
        "all_k_p50": fig(float(np.median(all_s))),
        "all_k_p90": fig(float(np.percentile(all_s, 90))),
        "all_k_recall_5cm_5deg": _recall(all_err),
        "recall_5cm_5deg": _recall(ours_err),
        "foreign_rejected": f"{sum(not o.success for o in foreign)}/{len(foreign)}",
        "foreign_reasons": [o.reason for o in foreign],
        "rss_mb": {"start": rss0, "after_registration": rss_registered, "scene_loaded": rss_scene,
                   "peak": peak_rss_mb()},
    }
    if base_s:
        report |= {"baseline_p50": fig(float(np.median(base_s))), "baseline_p90": fig(float(np.percentile(base_s, 90))),
                   "baseline_recall_5cm_5deg": _recall(base_err)}

    def show(name: str, f: dict[str, float]) -> str:
        return f"{name} {f['units']:.2f} u ({f['s']:.3f} s)"

    print(f"unit (COLMAP-default SIFT, 640x480 query, median of {len(unit.samples)}): {u:.3f} s "
          f"[{report['unit_spread_s'][0]:.3f} .. {report['unit_spread_s'][1]:.3f}]")
    print(show(f"registration of {info.num_keyframes} keyframes:", report["registration"])
          + f" [its unit {register_unit.seconds:.3f} s]")
    print(f"markerless (K=50): {show('p50', report['localize_p50'])}, {show('p90', report['localize_p90'])}, "
          f"recall 5cm/5deg {report['recall_5cm_5deg']:.2f}, foreign rejected {report['foreign_rejected']} "
          f"{report['foreign_reasons']}")
    print(f"markerless, all K matched (no early stop): {show('p50', report['all_k_p50'])}, "
          f"{show('p90', report['all_k_p90'])}, recall 5cm/5deg {report['all_k_recall_5cm_5deg']:.2f}")
    if base_s:
        print(f"baseline (all, pooled): {show('p50', report['baseline_p50'])}, {show('p90', report['baseline_p90'])}, "
              f"recall 5cm/5deg {report['baseline_recall_5cm_5deg']:.2f}")
    print("stage p50: " + ", ".join(show(k, v) for k, v in report["stage_p50"].items()))
    print("RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in report["rss_mb"].items()))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

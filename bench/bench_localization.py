"""Localization latency, registration time and memory on the kitchen scan, against a plain baseline.

Baseline (measured in the same run, same SIFT features and 3D points): the "plain composition" of SceneScape
and hloc -- match the query against every keyframe, pool all 2D-3D matches, one LO-RANSAC PnP, and SceneScape's
gate as written (inliers / all matches >= 0.5). markerless: top-K retrieval (K = 50), batched matching,
pairwise verification, PnP on verified matches.

    python bench/bench_localization.py [--kitchen DIR] [--out bench-localization.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pycolmap

from markerless.pipeline.evaluation import load_queries
from markerless.pipeline.features import FeatureModels, to_gray
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.matching import match_batch
from markerless.pipeline.registration import register_scene
from markerless.scene.camera import Camera, to_camera_pixels
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.scene.store import SceneStore


def baseline(models: FeatureModels, scene, image: np.ndarray, camera: Camera) -> tuple[np.ndarray | None, float]:
    """Brute force over every keyframe, pooled PnP, SceneScape's gate. Returns (pose or None, seconds)."""
    start = time.perf_counter()
    feats = models.sift()(to_gray(image))
    matches = match_batch(feats["descriptors"], scene.descriptors)
    kp = to_camera_pixels(feats["keypoints"])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kitchen", type=Path, default=Path(os.environ.get("MARKERLESS_KITCHEN_DIR",
                                                                                "../shared/data/kitchen")))
    parser.add_argument("--out", type=Path, default=Path("bench-localization.json"))
    args = parser.parse_args()
    proc = psutil.Process()
    rss0 = proc.memory_info().rss / 2**20
    models = FeatureModels()
    with tempfile.TemporaryDirectory() as tmp:
        store = SceneStore(Path(tmp))
        start = time.perf_counter()
        info = register_scene(store, "kitchen", args.kitchen / "kitchen-poly.zip", SceneConfig(), models)
        register_s = time.perf_counter() - start
        rss_registered = proc.memory_info().rss / 2**20
        scene = store.load("kitchen")
        rss_scene = proc.memory_info().rss / 2**20
        localizer = Localizer(models)
        queries = load_queries(args.kitchen / "queries.json")
        frames = [decode_image((args.kitchen / q["image"]).read_bytes()) for q in queries]
        cameras = [Camera.from_matrix(q["intrinsics"], 640, 480) for q in queries]
        localizer.localize(scene, frames[0], cameras[0])  # warm-up (allocations, thread pools)
        rows, stages = [], {}
        for q, frame, camera in zip(queries, frames, cameras, strict=True):
            gt = quat_trans_to_pose(q["quaternion"], q["translation"])
            result = localizer.localize(scene, frame, camera)
            ours = pose_error(result.pose_matrix(), gt) if result.success else (np.inf, np.inf)
            base_pose, base_s = baseline(models, scene, frame, camera)
            base = pose_error(base_pose, gt) if base_pose is not None else (np.inf, np.inf)
            rows.append({"image": q["image"], "ours_s": result.timings_ms["total"] / 1e3, "ours_err": ours,
                         "baseline_s": base_s, "baseline_err": base})
            for k, v in result.timings_ms.items():
                stages.setdefault(k, []).append(v)

    def recall(key: str) -> float:
        return float(np.mean([r[key][0] < 0.05 and r[key][1] < 5 for r in rows]))

    ours = np.array([r["ours_s"] for r in rows])
    base = np.array([r["baseline_s"] for r in rows])
    report = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads()},
        "register_s": register_s,
        "num_keyframes": info.num_keyframes,
        "localize_p50_s": float(np.median(ours)),
        "localize_p90_s": float(np.percentile(ours, 90)),
        "baseline_p50_s": float(np.median(base)),
        "baseline_p90_s": float(np.percentile(base, 90)),
        "speedup_p50": float(np.median(base) / np.median(ours)),
        "recall_5cm_5deg": recall("ours_err"),
        "baseline_recall_5cm_5deg": recall("baseline_err"),
        "stage_p50_ms": {k: float(np.median(v)) for k, v in stages.items()},
        "rss_mb": {"start": rss0, "after_registration": rss_registered, "scene_loaded": rss_scene,
                   "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
    }
    print(f"registration of {info.num_keyframes} keyframes: {register_s:.1f} s")
    print(f"{'':24}{'p50 s':>8}{'p90 s':>8}{'recall 5cm/5deg':>17}")
    print(f"{'markerless (K=50)':24}{report['localize_p50_s']:>8.3f}{report['localize_p90_s']:>8.3f}"
          f"{report['recall_5cm_5deg']:>17.2f}")
    print(f"{'baseline (all, pooled)':24}{report['baseline_p50_s']:>8.3f}{report['baseline_p90_s']:>8.3f}"
          f"{report['baseline_recall_5cm_5deg']:>17.2f}")
    print(f"speed-up at p50: {report['speedup_p50']:.2f}x")
    print("stage p50 ms: " + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_p50_ms"].items()))
    print("RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in report["rss_mb"].items()))
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

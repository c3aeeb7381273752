"""Speed on an accelerator (or the CPU): NetVLAD, sparse and dense localization, frames back to back.

Figures, on a synthetic room of 60 keyframes (K = 50 retrieved, keyframe features cached at registration):
- NetVLAD images/s at 640x480 (batches of 8, float16 backbone on CUDA);
- sparse localization per query (SIFT on the CPU: pycolmap wheels have no CUDA; matching on the device);
- dense localization per query (QTA-LoFTR indoor, float16 on CUDA, keyframe backbone features cached);
- frames/s when 200 frames of many cameras (the queries, each with its own intrinsics) are calibrated back to back.
Weights are random in the official formats (the real files are not needed for speed); QTA's match threshold is
0 so that random weights still give matches (a few thousand per pair: conservative). Also states the CPU unit of
`bench_localization.py` (one COLMAP-default SIFT extraction at 640x480), so figures compare across machines.

    python bench/bench_device.py [--device cuda] [--out REPORT.json] [--frames 200] [--keyframes 60]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap
import torch

from markerless.demo.synth import SynthConf, generate
from markerless.models import netvlad, qta_loftr
from markerless.pipeline.evaluation import ACCURATE_DEGREES, ACCURATE_METRES
from markerless.pipeline.features import FeatureModels, to_gray
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.registration import RegistrationOptions, register_scene
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.scene.queries import load_queries
from markerless.scene.store import SceneStore


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def unit_seconds(images: list[np.ndarray]) -> float:
    """Median over the images of one pycolmap SIFT extraction with COLMAP's default options (CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sift = pycolmap.Sift(options=pycolmap.FeatureExtractionOptions(), device=pycolmap.Device.cpu)
    times = []
    for image in images:
        gray = to_gray(image).astype(np.float32) / 255.0
        start = time.perf_counter()
        sift.extract(gray)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:] if len(times) > 1 else times))


def netvlad_speed(checkpoint: Path, device: str, images: list[np.ndarray], rounds: int = 4) -> float:
    """Images per second at 640x480 in batches of 8 (after one warm-up batch)."""
    extractor = netvlad.NetVLADExtractor(checkpoint, device)
    batch = (images * 8)[:8]
    extractor(batch)
    _sync(device)
    start = time.perf_counter()
    for _ in range(rounds):
        extractor(batch)
    _sync(device)
    return rounds * len(batch) / (time.perf_counter() - start)


def localize_all(localizer: Localizer, scene: Any, items: list[tuple[np.ndarray, Camera, np.ndarray]],
                 device: str) -> dict[str, Any]:
    """Each item once after a warm-up: latency percentiles, stage medians, recall at 5 cm / 5 deg."""
    localizer.localize(scene, items[0][0], items[0][1])
    latencies, stages, good = [], {}, []
    for image, camera, truth in items:
        start = time.perf_counter()
        result = localizer.localize(scene, image, camera)
        _sync(device)
        latencies.append(time.perf_counter() - start)
        for k, v in result.timings_ms.items():
            stages.setdefault(k, []).append(v)
        err = pose_error(result.pose_matrix(), truth) if result.success else (np.inf, np.inf)
        good.append(err[0] < ACCURATE_METRES and err[1] < ACCURATE_DEGREES)
    return {
        "p50_s": float(np.median(latencies)),
        "p90_s": float(np.percentile(latencies, 90)),
        "stage_p50_ms": {k: float(np.median(v)) for k, v in stages.items()},
        "recall_5cm_5deg": float(np.mean(good)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--keyframes", type=int, default=60)
    parser.add_argument("--dense-resize-max", type=int, help="QTA-LoFTR image size (default: the conf's, 832)")
    args = parser.parse_args()
    device = args.device
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        scan = generate(root / "room" / "room.zip",
                        SynthConf(num_keyframes=args.keyframes, num_queries=10, num_foreign=0)).zip_path
        report["synth_s"] = time.perf_counter() - t0
        weights = root / "weights"
        weights.mkdir()
        netvlad.write_random_checkpoint(weights / "VGG16-NetVLAD-Pitts30K.mat")
        qta_loftr.write_random_checkpoint(weights / "qta-indoor.ckpt", "qta_indoor")
        queries = load_queries(scan.parent / "queries.json")
        items = []
        for q in queries:
            image = decode_image((scan.parent / q["image"]).read_bytes())
            camera = Camera.from_matrix(q["intrinsics"], image.shape[1], image.shape[0], q.get("distortion", []))
            items.append((image, camera, quat_trans_to_pose(q["quaternion"], q["translation"])))
        report["unit_s"] = unit_seconds([image for image, _, _ in items])
        report["netvlad_images_per_s_640x480"] = netvlad_speed(weights / "VGG16-NetVLAD-Pitts30K.mat", device,
                                                                [image for image, _, _ in items])
        print(f"NetVLAD: {report['netvlad_images_per_s_640x480']:.1f} images/s", flush=True)

        models = FeatureModels(device=device, weights_dir=weights)
        store = SceneStore(root / "store")
        dense_overrides: dict[str, Any] = {"match_threshold": 0.0}
        if args.dense_resize_max:
            dense_overrides["resize_max"] = args.dense_resize_max
        options = RegistrationOptions(workers=4)
        for name, config in (
            ("sparse", SceneConfig(number_of_localizations=50)),
            ("dense", SceneConfig(local_feature={"-": {}}, matcher={"qta_indoor": dense_overrides},
                                  number_of_localizations=50)),
        ):
            t0 = time.perf_counter()
            info = register_scene(store, name, scan, config, models, options=options)
            report[f"{name}_registration_s"] = time.perf_counter() - t0
            scene = store.load(name)
            report[f"{name}_localization"] = localize_all(Localizer(models), scene, items, device)
            print(f"{name}: {info.num_keyframes} keyframes registered in {report[f'{name}_registration_s']:.1f} s; "
                  f"{report[f'{name}_localization']}", flush=True)

        scene = store.load("sparse")
        localizer = Localizer(models)
        frames = [items[i % len(items)] for i in range(args.frames)]
        start = time.perf_counter()
        for image, camera, _ in frames:
            localizer.localize(scene, image, camera)
        _sync(device)
        report["sparse_frames_per_s_back_to_back"] = args.frames / (time.perf_counter() - start)
        print(f"{args.frames} frames back to back: {report['sparse_frames_per_s_back_to_back']:.2f} frames/s")
    report["units"] = {
        k: report[k]["p50_s"] / report["unit_s"] for k in ("sparse_localization", "dense_localization")
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

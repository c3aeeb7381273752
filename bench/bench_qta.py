"""Dense matching speed: QTA-LoFTR pairs per second with cached keyframe features, against kornia LoFTR.

Measures on the CPU at 640x480 (and on CUDA when available):
- baseline: kornia's LoFTR (linear attention, random weights), one full pair (two backbones), same device and run;
- QTA-LoFTR, full pair (two backbones);
- QTA-LoFTR through `DenseMatcher.match` for one query against K keyframes whose backbone features were cached at
  "registration": one query backbone + K transformer/matching passes. On CUDA: K = 50 (goal <= 1 s on an H100),
  float16 autocast, pairs batched, keyframe features resident in GPU memory (warm) and read from disk (cold).

Weights are random (checkpoint in the official format): the real files are not needed for speed, but random
weights give no match above the 0.1 threshold and would skip the fine stage, so the threshold is 0 here
(a few thousand matches per pair, at the upper end of what a real indoor pair yields: conservative).

Usage: python bench/bench_qta.py [--out results.json] [--conf qta_indoor] [--cpu-pairs 2] [--gpu-pairs 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _images(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    """Blocky random RGB images (content does not change the cost, only the image size and match count do)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        out.append(np.ascontiguousarray(np.repeat(np.repeat(small, 8, 0), 8, 1)))
    return out


def _timed(fn, repeats: int, device: str) -> list[float]:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def bench_device(device: str, conf: str, pairs: int, repeats: int, h: int, w: int, tmp: Path) -> dict:
    from kornia.feature import LoFTR

    from markerless.models.qta_loftr import load_qta_loftr, resolve_conf, write_random_checkpoint
    from markerless.pipeline.dense import DenseMatcher

    weights = tmp / "weights"
    name = resolve_conf(conf)["weights"]
    if not (weights / f"{name}.ckpt").exists():
        write_random_checkpoint(weights / f"{name}.ckpt", conf)
    gray = torch.rand(2, 1, h, w, device=device)
    rows: dict[str, dict] = {}

    kornia = LoFTR(pretrained=None, config={**_kornia_thr0()}).eval().to(device)
    with torch.inference_mode():
        kornia({"image0": gray[:1], "image1": gray[1:]})  # warm-up
        t = _timed(lambda: kornia({"image0": gray[:1], "image1": gray[1:]}), repeats, device)
    rows["kornia_loftr_pair"] = {"median_s": statistics.median(t), "pairs": 1}

    overrides = {"match_threshold": 0.0}
    qta = load_qta_loftr(resolve_conf(conf, overrides), path=weights / f"{name}.ckpt").to(device)
    with torch.inference_mode():
        qta(gray[:1], gray[1:])
        t = _timed(lambda: qta(gray[:1], gray[1:]), repeats, device)
    rows["qta_full_pair"] = {"median_s": statistics.median(t), "pairs": 1}

    matcher = DenseMatcher(conf, overrides, device, weights)
    images = _images(pairs + 1, h, w)
    cache = tmp / f"cache-{device}"
    start = time.perf_counter()
    matcher.cache_keyframes(images[1:], cache)
    rows["cache_keyframes"] = {"median_s": (time.perf_counter() - start) / pairs, "pairs": 1, "note": "per keyframe"}
    ids = list(range(pairs))
    counts = [len(s) for _, _, s in matcher.match(images[0], ids, cache)]  # also fills the memory cache
    t = _timed(lambda: matcher.match(images[0], ids, cache), repeats, device)
    rows[f"qta_cached_query_K{pairs}"] = {"median_s": statistics.median(t), "pairs": pairs, "matches_per_pair": counts}
    if device == "cuda":
        cold = DenseMatcher(conf, overrides, device, weights)
        t = _timed(lambda: cold.match(images[0], ids, cache), 1, device)
        rows[f"qta_cached_query_K{pairs}_cold"] = {"median_s": t[0], "pairs": pairs, "note": "features read from disk"}
    for row in rows.values():
        row["pairs_per_s"] = row["pairs"] / row["median_s"]
    base = rows["kornia_loftr_pair"]["pairs_per_s"]
    for row in rows.values():
        row["speed_vs_kornia_loftr"] = row["pairs_per_s"] / base
    return rows


def _kornia_thr0() -> dict:
    import copy

    from kornia.feature.loftr.loftr import default_cfg

    cfg = copy.deepcopy(default_cfg)
    cfg["match_coarse"]["thr"] = 0.0  # random weights: keep the fine stage busy, as for QTA
    return cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--conf", default="qta_indoor")
    parser.add_argument("--size", default="640x480", help="WxH of query and keyframes")
    parser.add_argument("--cpu-pairs", type=int, default=2)
    parser.add_argument("--gpu-pairs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row on the CPU (5 on CUDA)")
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))

    results: dict = {
        "conf": args.conf,
        "size": [w, h],
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "devices": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        results["devices"]["cpu"] = bench_device("cpu", args.conf, args.cpu_pairs, args.repeats, h, w, Path(tmp))
        if torch.cuda.is_available():
            results["gpu"] = torch.cuda.get_device_name()
            results["devices"]["cuda"] = bench_device(
                "cuda", args.conf, args.gpu_pairs, max(args.repeats, 5), h, w, Path(tmp)
            )

    print(f"QTA-LoFTR ({args.conf}) at {w}x{h}, random weights, match threshold 0")
    print(f"{'device':6} {'measurement':32} {'time (s)':>9} {'pairs/s':>9} {'vs kornia LoFTR':>16}")
    for device, rows in results["devices"].items():
        for name, row in rows.items():
            print(
                f"{device:6} {name:32} {row['median_s']:9.3f} {row['pairs_per_s']:9.3f} "
                f"{row['speed_vs_kornia_loftr']:15.2f}x"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

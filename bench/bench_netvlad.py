"""NetVLAD throughput at 640x480 (the kitchen keyframe size), and start-up time with and without the `.pt` cache.

Baseline, measured in the same run on the same device (median of round-robin repeats): one image per forward
pass in fp32, which is how hloc's `extract_features` runs NetVLAD (DataLoader batch 1, no autocast). Compared
against it: batched extraction and, on CUDA, fp16 autocast. Weights are random in the official shapes
(`write_random_checkpoint`) unless `--checkpoint` names a real file: speed does not depend on the values.

    python bench/bench_netvlad.py --out out/bench_netvlad.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from markerless.models.netvlad import NetVLADExtractor, cache_path, write_random_checkpoint


def images_per_second(extractor: NetVLADExtractor, images: list[np.ndarray]) -> float:
    start = time.perf_counter()
    extractor(images)  # returns NumPy: the device work is finished when it returns
    return len(images) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a NetVLAD .mat (default: random weights); its .pt cache is rebuilt")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the batched runs")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per configuration (median reported)")
    parser.add_argument("--cpu-images", type=int, default=8, help="images per CPU measurement")
    parser.add_argument("--cuda-images", type=int, default=256, help="images per CUDA measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "VGG16-NetVLAD-Pitts30K.mat"
            write_random_checkpoint(checkpoint)
        cache_path(checkpoint).unlink(missing_ok=True)
        start = time.perf_counter()
        NetVLADExtractor(checkpoint, "cpu")
        load_mat_s = time.perf_counter() - start
        start = time.perf_counter()
        NetVLADExtractor(checkpoint, "cpu")
        load_cache_s = time.perf_counter() - start

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        rng = np.random.default_rng(0)
        runs = []
        for device in devices:
            count = args.cpu_images if device == "cpu" else args.cuda_images
            images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(count)]
            configs = [("batch 1 fp32 (hloc)", 1, False), (f"batch {args.batch} fp32", args.batch, False)]
            if device == "cuda":
                configs += [("batch 1 fp16", 1, True), (f"batch {args.batch} fp16", args.batch, True)]
            extractors = [NetVLADExtractor(checkpoint, device, {"batch_size": b, "half": h}) for _, b, h in configs]
            for extractor in extractors:
                extractor(images[: args.batch])  # warm-up (allocator, cuDNN autotuning)
            rates: list[list[float]] = [[] for _ in configs]
            for _ in range(args.repeats):  # round robin: background load hits every configuration alike
                for rate, extractor in zip(rates, extractors, strict=True):
                    rate.append(images_per_second(extractor, images))
            baseline = float(np.median(rates[0]))
            for (label, batch, half), rate in zip(configs, rates, strict=True):
                median = float(np.median(rate))
                runs.append({"device": device, "config": label, "batch_size": batch, "half": half,
                             "images_per_s": median, "images_per_s_all": rate,
                             "speedup_vs_baseline": median / baseline})
            del extractors

    result = {
        "benchmark": "netvlad", "image_size": [640, 480], "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "weights": "random (official shapes)" if args.checkpoint is None else str(args.checkpoint),
        "load_from_mat_s": load_mat_s, "load_from_pt_cache_s": load_cache_s, "runs": runs,
    }
    print(f"start-up: {load_mat_s:.2f} s from .mat, {load_cache_s:.2f} s from .pt cache "
          f"({load_mat_s / load_cache_s:.1f}x)")
    print(f"{'device':<7} {'config':<22} {'images/s':>9} {'vs baseline':>12}")
    for run in runs:
        rate, ratio = run["images_per_s"], run["speedup_vs_baseline"]
        print(f"{run['device']:<7} {run['config']:<22} {rate:>9.2f} {ratio:>11.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Local features (SIFT via pycolmap) and the resident model set.

`confs` follows hloc's `extract_features.confs` naming; the `sift` conf starts from hloc's (`first_octave 0`,
RootSIFT, grayscale, `resize_max 1600`) with a lower peak threshold: indoor frames at 640x480 are low in
contrast, and hloc's 0.01 keeps too few keypoints on them; lower still, matching time grows with no gain in recall
(the figures: docs/measurements.md). Keypoints come out in hloc's pixel convention.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from markerless.pipeline.parent_death import die_with_parent
from markerless.scene.camera import from_camera_pixels, rescale_pixels
from markerless.scene.config import SiftOverrides

confs: dict[str, dict[str, Any]] = {
    "sift": {
        "output": "feats-sift",
        "options": {
            "first_octave": 0,  # no upsampled octave (COLMAP's -1): far faster; docs/measurements.md
            "peak_threshold": 0.004,  # DoG contrast threshold (hloc 0.01, COLMAP 0.0067); docs/measurements.md
            "max_num_features": 8192,  # COLMAP's cap; strongest kept
        },
        "preprocessing": {
            "grayscale": True,
            "resize_max": 1600,  # longer side; images are only shrunk
        },
    },
}


def sift_conf(overrides: SiftOverrides | None = None) -> dict[str, Any]:
    """The `sift` preset with a scene's overrides merged in (a new dict): what its keyframes and queries use."""
    conf = copy.deepcopy(confs["sift"])
    if overrides is not None:
        for section, values in overrides.model_dump(exclude_none=True).items():
            conf[section].update(values)
    return conf


def _rootsift(desc: np.ndarray) -> np.ndarray:
    """L1-normalise, square-root, L2-normalise (Arandjelovic & Zisserman): dot products become Hellinger kernels."""
    desc = desc / np.maximum(np.abs(desc).sum(axis=1, keepdims=True), 1e-12)
    desc = np.sqrt(np.abs(desc))
    return desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)


class SiftExtractor:
    """pycolmap SIFT on one image -> hloc-style feature dict (keypoints in hloc's pixel convention)."""

    def __init__(self, conf: dict[str, Any], device: str = "cpu") -> None:
        import pycolmap

        self.conf = conf
        options = pycolmap.FeatureExtractionOptions()
        for key, value in conf["options"].items():
            setattr(options.sift, key, value)
        options.sift.normalization = pycolmap.Normalization.L2  # RootSIFT applied below, once
        use_cuda = device.startswith("cuda") and pycolmap.has_cuda
        options.num_threads = 1
        # pycolmap.Sift is deprecated in favour of FeatureExtractor, whose results are opaque C++ objects
        # without a NumPy view; Sift still returns arrays and is what hloc uses.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._sift = pycolmap.Sift(
                options=options, device=pycolmap.Device.cuda if use_cuda else pycolmap.Device.cpu
            )
        self.on_gpu = use_cuda
        self._lock = threading.Lock()

    def __call__(self, gray: np.ndarray, max_scale: float = 1.0) -> dict[str, np.ndarray]:
        """gray: HxW uint8. Returns keypoints (N,2), descriptors (N,128) unit-norm RootSIFT, scales, oris (deg), in
        the pixels of `gray`; it is shrunk by `max_scale` or to `resize_max` first, whichever is smaller."""
        h, w = gray.shape
        scale = min(1.0, max_scale, self.conf["preprocessing"]["resize_max"] / max(h, w))
        if scale < 1.0:
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        with self._lock:  # one pycolmap extractor is not re-entrant
            kp, desc = self._sift.extract(gray.astype(np.float32) / 255.0)
        keypoints = from_camera_pixels(kp[:, :2])
        if scale != 1.0:
            keypoints = rescale_pixels(keypoints, 1.0 / scale)
        return {
            "keypoints": keypoints.astype(np.float32),
            "descriptors": _rootsift(desc.astype(np.float32)),
            "scales": (kp[:, 2] / scale).astype(np.float32),
            "oris": np.degrees(kp[:, 3]).astype(np.float32),
            "image_size": np.array([w, h], dtype=np.int64),
        }


_worker_sift: SiftExtractor | None = None  # one per worker process of `SiftWorkers`


def _init_worker(conf: dict[str, Any], minloglevel: int) -> None:
    import pycolmap

    global _worker_sift
    die_with_parent()  # the forkserver: a killed registration must not leave its workers running
    pycolmap.logging.minloglevel = minloglevel  # as quiet as the parent: glog lines would tear its progress bars
    _worker_sift = SiftExtractor(conf)


def _extract_file(path: str) -> dict[str, np.ndarray]:
    assert _worker_sift is not None
    return _worker_sift(cv2.imread(path, cv2.IMREAD_GRAYSCALE))


def _started() -> None:
    """A no-op task: submitting one per worker makes the pool start them all at once."""


class SiftWorkers:
    """SIFT (CPU) of image files in worker processes, results in order; a context manager.

    Processes, not threads: pycolmap's SIFT holds the GIL while it extracts, so threads run one at a time.
    `forkserver` workers are safe to start from a threaded service and import only this module's needs, plus, as
    multiprocessing prepares every worker, the parent's `__main__`: the `markerless` command's is light, a script
    that imports torch at its top makes each worker pay that import (2 s on 2 cores) at every registration.
    The workers start on entry, so that their start-up (a process each, importing pycolmap and OpenCV: 0.4 s on 2
    cores) overlaps whatever the caller does meanwhile, and images can be submitted one by one as they appear.
    The forkserver and the workers end with their parent, also when it is killed (parent_death.py).
    """

    def __init__(self, conf: dict[str, Any], workers: int) -> None:
        self.conf, self.workers = conf, workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> SiftWorkers:
        import pycolmap

        ctx = multiprocessing.get_context("forkserver")
        # Effective when this starts the forkserver (the first pool of the process); `__main__` as by default.
        ctx.set_forkserver_preload(["__main__", "markerless.pipeline.forkserver_dies_with_parent"])
        init = (self.conf, int(pycolmap.logging.minloglevel))
        self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=init)
        for _ in range(self.workers):
            self._pool.submit(_started)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._pool is not None
        self._pool.shutdown(cancel_futures=True)

    def submit(self, path: Path) -> Future[dict[str, np.ndarray]]:
        assert self._pool is not None, "use SiftWorkers as a context manager"
        return self._pool.submit(_extract_file, str(path))


def to_gray(image_rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)


class FeatureModels:
    """Every model markerless runs, built lazily once and then kept resident on `device`.

    Create one per worker thread; registration and localization reuse it for every scene. NetVLAD and
    QTA-LoFTR weights are looked up in `weights_dir` (or MARKERLESS_WEIGHTS_DIR) and never downloaded here.
    """

    def __init__(self, device: str | None = None, weights_dir: Path | None = None) -> None:
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.weights_dir = weights_dir
        self._cache: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def _get(self, key: tuple[str, str], build: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._cache:
                self._cache[key] = build()
            return self._cache[key]

    def sift(self, conf: dict[str, Any] | None = None) -> SiftExtractor:
        """The SIFT extractor of `conf` (default: the `sift` preset), one per distinct conf."""
        conf = conf or confs["sift"]
        return self._get(("local", json.dumps(conf, sort_keys=True)), lambda: SiftExtractor(conf, self.device))

    def netvlad(self) -> Any:
        from markerless.models.netvlad import load_netvlad

        return self._get(("global", "netvlad"), lambda: load_netvlad(self.weights_dir, self.device))

    def dense(self, conf_name: str, overrides: dict[str, Any]) -> Any:
        from markerless.pipeline.dense import DenseMatcher

        key = ("dense", f"{conf_name}:{sorted(overrides.items())!r}")
        return self._get(key, lambda: DenseMatcher(conf_name, overrides, self.device, self.weights_dir))

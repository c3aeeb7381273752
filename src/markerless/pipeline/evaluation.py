"""Accuracy evaluation: register a scan, localize queries with ground truth and foreign images, summarise.

`QUERIES.json` has the format of the kitchen test set: `{"queries": [{"image", "width", "height",
"intrinsics" (3x3, optional), "distortion" (optional), "intrinsics_mode" (optional), "quaternion" [x, y, z, w],
"translation", "true_intrinsics" (optional: the real camera when "intrinsics" is deliberately off)}]}`, poses
camera-to-world in the raw.glb frame with OpenCV axes; image paths are relative to the JSON file. A query without
intrinsics is localized in `estimate` mode. Missing poses count as failures (infinite error), as in hloc's
evaluation.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from markerless.errors import DatasetError
from markerless.pipeline.features import FeatureModels
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.pipeline.registration import RegistrationOptions, register_scene
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.scene.store import Scene, SceneStore


@dataclass
class QueryOutcome:
    image: str
    success: bool
    reason: str | None
    translation_error_m: float
    rotation_error_deg: float
    num_matches: int
    num_inliers: int
    inlier_ratio: float
    latency_s: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    intrinsics: list[list[float]] | None = None
    distortion: list[float] | None = None
    intrinsics_source: str | None = None
    warnings: list[str] = field(default_factory=list)
    position_sigma_m: float | None = None
    rotation_sigma_deg: float | None = None
    focal_error: float | None = None  # |f / f_true - 1| of the returned camera, when the truth is known


def load_queries(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
        queries = data["queries"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a queries file ({exc})") from exc
    return queries


def _outcome(
    localizer: Localizer, scene: Scene, name: str, image: np.ndarray, camera: Camera | None, mode: str,
    truth: np.ndarray | None, true_focal: float | None = None,
) -> QueryOutcome:
    """Localize one image; errors against `truth` (camera-to-world) or infinite without a pose or a truth."""
    start = time.perf_counter()
    result = localizer.localize(scene, image, camera, mode)
    latency = time.perf_counter() - start
    t_err, r_err = float("inf"), float("inf")
    if result.success and truth is not None:
        t_err, r_err = pose_error(result.pose_matrix(), truth)
    focal_error = None
    if result.success and true_focal and result.intrinsics:
        focal_error = abs(result.intrinsics[0][0] / true_focal - 1.0)
    return QueryOutcome(name, result.success, result.reason, t_err, r_err, result.num_matches, result.num_inliers,
                        result.inlier_ratio, latency, result.timings_ms, result.intrinsics, result.distortion,
                        result.intrinsics_source, result.warnings, result.position_sigma_m, result.rotation_sigma_deg,
                        focal_error)


def query_camera(item: dict[str, Any], width: int, height: int) -> Camera | None:
    """The camera a queries-file entry gives, or None when it gives no intrinsics."""
    if item.get("intrinsics") is None:
        return None
    return Camera.from_matrix(item["intrinsics"], width, height, item.get("distortion") or [])


def localize_queries(
    localizer: Localizer, scene: Scene, queries: list[dict[str, Any]], root: Path, mode: str | None = None
) -> list[QueryOutcome]:
    """`mode` overrides each query's `intrinsics_mode` (default `refine`, `estimate` without intrinsics)."""
    out = []
    for item in queries:
        image = decode_image((root / item["image"]).read_bytes())
        camera = query_camera(item, image.shape[1], image.shape[0])
        query_mode = mode or item.get("intrinsics_mode") or ("refine" if camera else "estimate")
        truth = quat_trans_to_pose(item["quaternion"], item["translation"])
        out.append(_outcome(localizer, scene, item["image"], image, camera, query_mode, truth,
                            (item.get("true_intrinsics") or [[None]])[0][0]))
    return out


def localize_foreign(localizer: Localizer, scene: Scene, folder: Path, intrinsics: list[list[float]] | None,
                     mode: str = "refine") -> list[QueryOutcome]:
    """Images of other places: every one must fail the gates. Intrinsics: the queries' (same camera)."""
    out = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        image = decode_image(path.read_bytes())
        camera = Camera.from_matrix(intrinsics, image.shape[1], image.shape[0]) if intrinsics else None
        out.append(_outcome(localizer, scene, path.name, image, camera, mode if camera else "estimate", None))
    return out


def summarise(outcomes: list[QueryOutcome], foreign: list[QueryOutcome]) -> dict[str, Any]:
    t = np.array([o.translation_error_m for o in outcomes])
    r = np.array([o.rotation_error_deg for o in outcomes])
    lat = np.array([o.latency_s for o in outcomes])
    focal = [o.focal_error for o in outcomes if o.focal_error is not None]
    return {
        "num_queries": len(outcomes),
        "localized": int(sum(o.success for o in outcomes)),
        "recall_5cm_5deg": float(np.mean((t < 0.05) & (r < 5))) if len(t) else 0.0,
        "recall_10cm_10deg": float(np.mean((t < 0.10) & (r < 10))) if len(t) else 0.0,
        "median_translation_cm": float(np.median(t) * 100) if len(t) else None,
        "median_rotation_deg": float(np.median(r)) if len(r) else None,
        "foreign_rejected": int(sum(not o.success for o in foreign)),
        "foreign_total": len(foreign),
        "latency_p50_s": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_p90_s": float(np.percentile(lat, 90)) if len(lat) else None,
        "median_focal_error": float(np.median(focal)) if focal else None,
        "with_warnings": int(sum(bool(o.warnings) for o in outcomes if o.success)),
    }


def evaluate(
    scan: Path,
    queries_path: Path,
    config: SceneConfig,
    foreign: Path | None = None,
    options: RegistrationOptions = RegistrationOptions(),
    store_root: Path | None = None,
    weights_dir: Path | None = None,
    mode: str | None = None,
) -> tuple[dict[str, Any], list[QueryOutcome], list[QueryOutcome]]:
    """Register `scan` into a (temporary) store, localize every query and foreign image, summarise."""
    queries = load_queries(queries_path)
    models = FeatureModels(weights_dir=weights_dir)
    with tempfile.TemporaryDirectory(prefix="markerless-eval-") as tmp:
        store = SceneStore(store_root or Path(tmp))
        start = time.perf_counter()
        register_scene(store, "eval", scan, config, models, options=options)
        register_s = time.perf_counter() - start
        scene = store.load("eval")
        localizer = Localizer(models)
        outcomes = localize_queries(localizer, scene, queries, Path(queries_path).parent, mode)
        intrinsics = queries[0].get("intrinsics") if queries else None
        foreign_out = localize_foreign(localizer, scene, foreign, intrinsics, mode or "refine") if foreign else []
    summary = summarise(outcomes, foreign_out)
    summary["register_s"] = register_s
    summary["peak_rss_mb"] = peak_rss_mb()
    summary["config"] = config.model_dump()
    summary["use_depth"] = options.use_depth
    summary["intrinsics_mode"] = mode
    return summary, outcomes, foreign_out


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

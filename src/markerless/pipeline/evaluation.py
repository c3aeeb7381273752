"""Accuracy evaluation: register a scan, localize queries with ground truth and foreign images, summarise.

`QUERIES.json` has the format of the kitchen test set: `{"queries": [{"image", "width", "height",
"intrinsics" (3x3), "distortion", "quaternion" [x, y, z, w], "translation"}]}`, poses camera-to-world in the
raw.glb frame with OpenCV axes; image paths are relative to the JSON file. Missing poses count as failures
(infinite error), as in hloc's evaluation.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from markerless.scene.config import SceneConfig
from markerless.errors import DatasetError
from markerless.pipeline.features import FeatureModels
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer, QueryCamera
from markerless.pipeline.registration import RegistrationOptions, register_scene
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


def load_queries(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
        queries = data["queries"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a queries file ({exc})") from exc
    return queries


def _outcome(
    localizer: Localizer, scene: Scene, name: str, image: np.ndarray, camera: QueryCamera, truth: np.ndarray | None
) -> QueryOutcome:
    """Localize one image; errors against `truth` (camera-to-world) or infinite without a pose or a truth."""
    start = time.perf_counter()
    result = localizer.localize(scene, image, camera)
    latency = time.perf_counter() - start
    t_err, r_err = float("inf"), float("inf")
    if result.success and truth is not None:
        t_err, r_err = pose_error(result.pose_matrix(), truth)
    return QueryOutcome(name, result.success, result.reason, t_err, r_err, result.num_matches, result.num_inliers,
                        result.inlier_ratio, latency, result.timings_ms)


def localize_queries(
    localizer: Localizer, scene: Scene, queries: list[dict[str, Any]], root: Path
) -> list[QueryOutcome]:
    out = []
    for item in queries:
        image = decode_image((root / item["image"]).read_bytes())
        camera = QueryCamera.from_matrix(item["intrinsics"], image.shape[1], image.shape[0], item.get("distortion", []))
        truth = quat_trans_to_pose(item["quaternion"], item["translation"])
        out.append(_outcome(localizer, scene, item["image"], image, camera, truth))
    return out


def localize_foreign(localizer: Localizer, scene: Scene, folder: Path, intrinsics: list[list[float]]) -> list[
    QueryOutcome
]:
    """Images of other places: every one must fail the gates. Intrinsics: the queries' (same camera)."""
    out = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        image = decode_image(path.read_bytes())
        camera = QueryCamera.from_matrix(intrinsics, image.shape[1], image.shape[0])
        out.append(_outcome(localizer, scene, path.name, image, camera, None))
    return out


def summarise(outcomes: list[QueryOutcome], foreign: list[QueryOutcome]) -> dict[str, Any]:
    t = np.array([o.translation_error_m for o in outcomes])
    r = np.array([o.rotation_error_deg for o in outcomes])
    lat = np.array([o.latency_s for o in outcomes])
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
    }


def evaluate(
    scan: Path,
    queries_path: Path,
    config: SceneConfig,
    foreign: Path | None = None,
    options: RegistrationOptions = RegistrationOptions(),
    store_root: Path | None = None,
    weights_dir: Path | None = None,
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
        outcomes = localize_queries(localizer, scene, queries, Path(queries_path).parent)
        intrinsics = queries[0]["intrinsics"] if queries else [[525, 0, 320], [0, 525, 240], [0, 0, 1]]
        foreign_out = localize_foreign(localizer, scene, foreign, intrinsics) if foreign else []
    summary = summarise(outcomes, foreign_out)
    summary["register_s"] = register_s
    summary["peak_rss_mb"] = peak_rss_mb()
    summary["config"] = config.model_dump()
    summary["use_depth"] = options.use_depth
    return summary, outcomes, foreign_out


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

"""The queries format: `queries.json`, frames of a scanned place with their ground-truth poses, read and written.

`{"frame": ..., "queries": [{"image", "width", "height", "intrinsics" (3x3, optional), "distortion" (optional),
"intrinsics_mode" (optional), "quaternion" [x, y, z, w], "translation", "true_intrinsics" (optional: the real
camera when "intrinsics" is deliberately off)}]}`, the format of the kitchen test set and of the synthetic scans:
poses camera-to-world in the raw.glb frame with OpenCV axes, metres; image paths relative to the JSON file.
Images of other places, which a localizer must refuse, lie in `foreign/` next to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np

from markerless.errors import DatasetError
from markerless.scene.camera import Camera
from markerless.scene.geometry import quat_trans_to_pose

FRAME = "raw.glb mesh frame; camera-to-world; OpenCV camera axes; quaternion xyzw; metres"
FOREIGN_DIR = "foreign"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_REQUIRED = ("image", "width", "height", "quaternion", "translation")


class QueryEntry(TypedDict):
    """One frame of `queries.json`."""

    image: str
    width: int
    height: int
    quaternion: list[float]
    translation: list[float]
    intrinsics: NotRequired[list[list[float]] | None]
    distortion: NotRequired[list[float]]
    intrinsics_mode: NotRequired[str]
    true_intrinsics: NotRequired[list[list[float]]]


def load_queries(path: Path) -> list[QueryEntry]:
    """The entries of a queries file; a missing file, bad JSON or an entry without a required field is refused."""
    try:
        queries = json.loads(Path(path).read_text())["queries"]
        if not isinstance(queries, list):
            raise TypeError("'queries' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a queries file ({exc})") from exc
    for i, entry in enumerate(queries):
        missing = [key for key in _REQUIRED if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise DatasetError(f"{path}: query {i} lacks {', '.join(missing)}")
    return queries


def write_queries(path: Path, queries: list[QueryEntry]) -> Path:
    """Write `queries` as a queries file at `path`; returns `path`."""
    path = Path(path)
    path.write_text(json.dumps({"frame": FRAME, "queries": queries}, indent=1))
    return path


def query_pose(entry: QueryEntry) -> np.ndarray:
    """The ground-truth camera-to-world 4x4 of an entry."""
    try:
        return quat_trans_to_pose(entry["quaternion"], entry["translation"])
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"query {entry['image']}: bad quaternion or translation ({exc})") from exc


def query_camera(entry: QueryEntry, width: int, height: int) -> Camera | None:
    """The camera an entry gives, or None when it gives no intrinsics."""
    if entry.get("intrinsics") is None:
        return None
    return Camera.from_matrix(entry["intrinsics"], width, height, entry.get("distortion") or [])


def true_focal(entry: QueryEntry) -> float | None:
    """The real camera's focal length in pixels, when the entry's intrinsics are deliberately off."""
    truth: Any = entry.get("true_intrinsics")
    return float(truth[0][0]) if truth else None


def foreign_images(folder: Path) -> list[Path]:
    """Images of other places in `folder` (JPEG or PNG), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

"""The frames the demo publishes: the queries of a queries.json and the foreign images next to it, as the
calibration frames a camera pipeline (Percebro) sends."""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Query:
    """A frame the demo publishes: an entry of queries.json, or an image of another place (no truth)."""

    name: str
    image_path: Path
    intrinsics: list[list[float]] | None
    distortion: list[float]
    truth: np.ndarray | None
    foreign: bool


def load_demo_queries(queries_json: Path) -> list[Query]:
    """The queries of `queries.json`, then the foreign images in `foreign/` next to it.

    Foreign images reuse the first query's intrinsics: they only have to be refused.
    """
    from markerless.scene.queries import FOREIGN_DIR, foreign_images, load_queries, query_pose

    base = Path(queries_json).parent
    queries = [Query(e["image"], base / e["image"], e.get("intrinsics"), list(e.get("distortion") or []),
                     query_pose(e), False) for e in load_queries(queries_json)]
    if queries and (base / FOREIGN_DIR).is_dir():
        first = queries[0]
        queries += [dataclasses.replace(first, name=f"{FOREIGN_DIR}/{path.name}", image_path=path, truth=None,
                                        foreign=True) for path in foreign_images(base / FOREIGN_DIR)]
    return queries


def calibration_frame(query: Query, camera_id: str, request_id: str) -> tuple[dict[str, Any], bytes]:
    """A Percebro-shaped calibration frame (plus our request_id) and the JPEG bytes it carries."""
    data = query.image_path.read_bytes()
    return {
        "timestamp": datetime.now(UTC).isoformat(),
        "id": camera_id,
        "image": base64.b64encode(data).decode("ascii"),
        "intrinsics": query.intrinsics,
        "distortion": query.distortion,
        "calibrate": True,
        "request_id": request_id,
    }, data

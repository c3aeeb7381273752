"""Writes a Polycam "raw data" zip: keyframes (image, camera JSON, depth, confidence), raw.glb, mesh_info.json.

Camera JSONs carry `inv(A) @ T_glb_cv @ diag(1, -1, -1, 1)` (ARKit world, ARKit camera axes), A being the
alignmentTransform (ARKit world -> raw.glb frame), so a reader that applies A correctly gets back the poses given
here; their intrinsics are in COLMAP's pixel convention (centre at 0.5, 0.5), the one Polycam files use. Members get
a fixed date and mode, so the same input gives a byte-identical zip.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np
import trimesh

from markerless.demo.room import View
from markerless.scene.geometry import ARKIT_TO_OPENCV

_ZIP_DATE = (2023, 11, 14, 22, 13, 20)  # the synthetic scan's first keyframe timestamp, UTC


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def _write(zf: zipfile.ZipFile, name: str, data: bytes | str) -> None:
    """Add a member with a fixed date and mode, so the same seed gives a byte-identical zip."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _camera_json(view: View, alignment: np.ndarray, width: int, height: int, timestamp: int, blur: float) -> dict:
    """Polycam camera JSON: intrinsics and the top 3 rows of the ARKit camera-to-world matrix, row-major."""
    arkit = np.linalg.inv(alignment) @ view.pose @ ARKIT_TO_OPENCV
    cam = view.camera
    record: dict[str, Any] = {"fx": cam.fx, "fy": cam.fy, "cx": cam.cx, "cy": cam.cy, "width": width,
                              "height": height, "timestamp": timestamp, "blur_score": blur}
    for i in range(3):
        for j in range(4):
            record[f"t_{i}{j}"] = float(arkit[i, j])
    return record


class PolycamZip:
    """A Polycam raw-data zip being written under `<stem>-poly/`; use as a context manager."""

    def __init__(self, out_zip: Path, alignment: np.ndarray) -> None:
        self.stem = out_zip.stem if out_zip.stem.endswith("-poly") else f"{out_zip.stem}-poly"
        self.alignment = alignment  # 4x4, ARKit world -> raw.glb frame
        self._zf = zipfile.ZipFile(out_zip, "w", zipfile.ZIP_DEFLATED)

    def add_keyframe(self, view: View, image: np.ndarray, depth_mm: np.ndarray, confidence: np.ndarray,
                     timestamp: int, jpeg_quality: int) -> None:
        """One keyframe: RGB image, its camera (view pose in the raw.glb frame), depth (mm) and confidence."""
        height, width = image.shape[:2]
        blur = float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())
        record = _camera_json(view, self.alignment, width, height, timestamp, blur)
        _write(self._zf, f"{self.stem}/keyframes/images/{timestamp}.jpg", encode_jpeg(image, jpeg_quality))
        _write(self._zf, f"{self.stem}/keyframes/cameras/{timestamp}.json", json.dumps(record, indent=1))
        _write(self._zf, f"{self.stem}/keyframes/depth/{timestamp}.png", _png(depth_mm))
        _write(self._zf, f"{self.stem}/keyframes/confidence/{timestamp}.png", _png(confidence))

    def add_thumbnail(self, image: np.ndarray) -> None:
        height, width = image.shape[:2]
        thumbnail = cv2.resize(image, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
        _write(self._zf, f"{self.stem}/thumbnail.jpg", encode_jpeg(thumbnail, 85))

    def add_mesh(self, mesh: trimesh.Trimesh) -> None:
        """raw.glb (the mesh, in the raw.glb frame) and mesh_info.json with the alignmentTransform."""
        _write(self._zf, f"{self.stem}/raw.glb", mesh.export(file_type="glb"))
        _write(self._zf, f"{self.stem}/mesh_info.json", json.dumps({
            "alignmentTransform": [float(x) for x in self.alignment.T.ravel()],  # column-major, as Polycam
            "vertexCount": len(mesh.vertices), "faceCount": len(mesh.faces),
        }))

    def __enter__(self) -> PolycamZip:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._zf.close()

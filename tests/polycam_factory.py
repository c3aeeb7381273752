"""Builds small Polycam raw-data zips in the exact export layout, with optional corruption, for ingestion tests."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import trimesh

W, H = 64, 48


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    return buf.tobytes()


def _jpg(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", array)
    return buf.tobytes()


def camera_json(ts: int, x: float) -> dict:
    pose = np.eye(4)
    pose[:3, 3] = [x, 0.0, 0.0]
    data = {"fx": 50.0, "fy": 51.0, "cx": 32.0, "cy": 24.0, "width": W, "height": H, "timestamp": ts,
            "blur_score": 300.0}
    data.update({f"t_{i}{j}": float(pose[i, j]) for i in range(3) for j in range(4)})
    return data


def polycam_members(n: int = 3, root: str = "scan-poly/") -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    members: dict[str, bytes] = {}
    for k in range(n):
        ts = 1700000000000000 + k * 100000
        members[f"{root}keyframes/images/{ts}.jpg"] = _jpg(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        members[f"{root}keyframes/cameras/{ts}.json"] = json.dumps(camera_json(ts, 0.1 * k)).encode()
        members[f"{root}keyframes/depth/{ts}.png"] = _png(np.full((12, 16), 1500, np.uint16))
        members[f"{root}keyframes/confidence/{ts}.png"] = _png(np.full((12, 16), 255, np.uint8))
    box = trimesh.creation.box(extents=(4, 4, 4))
    box.invert()  # seen from inside, like a room
    members[f"{root}raw.glb"] = box.export(file_type="glb")
    align = np.eye(4)
    align[:3, 3] = [1.0, 2.0, 3.0]
    members[f"{root}mesh_info.json"] = json.dumps({"alignmentTransform": align.T.ravel().tolist()}).encode()
    return members


def write_zip(path: Path, members: dict[str, bytes], extra: Callable[[zipfile.ZipFile], None] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if extra:
            extra(zf)
    return path


def symlink_member(name: str) -> Callable[[zipfile.ZipFile], None]:
    def add(zf: zipfile.ZipFile) -> None:
        info = zipfile.ZipInfo(name)
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")

    return add


def subset_zip(source: Path, dest: Path, keep: int) -> Path:
    """The first `keep` keyframes of a Polycam zip (same layout), for tests whose models are slow on CPU."""
    with zipfile.ZipFile(source) as src:
        stems = sorted({Path(n).stem for n in src.namelist() if "/keyframes/images/" in n})[:keep]
        with zipfile.ZipFile(dest, "w") as dst:
            for name in src.namelist():
                if "/keyframes/" not in name or Path(name).stem in stems:
                    dst.writestr(name, src.read(name))
    return dest

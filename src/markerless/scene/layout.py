"""The SceneScape dataset layout a registered scene keeps its keyframes in, written and read back.

`rgb/<stem>.jpg`, `depth/<stem>.png`, `confidence/<stem>.png`, `raw.glb`, `mesh_info.json`, `cameras.txt` (one
PINHOLE camera per keyframe: Polycam intrinsics differ per frame), `images.txt` (world-to-camera, quaternion xyzw
as SceneScape writes it): SceneScape's, so tools that read it work; plus `keyframes.json`, the machine-readable
record the rest of markerless reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from markerless.scene.camera import Camera
from markerless.scene.geometry import pose_to_quat_trans


@dataclass(frozen=True)
class Keyframe:
    """One registered keyframe.

    `name` is its image path relative to the dataset root (`rgb/<stem>.jpg`, the hloc/SceneScape key).
    `camera` holds Polycam's intrinsics (COLMAP pixel convention, as every Camera).
    `pose` is camera-to-world in the raw.glb frame, OpenCV camera axes, row-major 4x4 flattened.
    """

    name: str
    stem: str
    camera: Camera
    pose: tuple[float, ...]
    has_depth: bool

    @property
    def pose_matrix(self) -> np.ndarray:
        return np.asarray(self.pose, dtype=float).reshape(4, 4)


def write_layout(out_dir: Path, keyframes: list[Keyframe]) -> None:
    """cameras.txt / images.txt in SceneScape's layout, and keyframes.json for markerless."""
    cam_lines = ["#camera_id model width height params"]
    img_lines = ["#image_name camera_id qx qy qz qw tx ty tz"]
    for cam_id, kf in enumerate(keyframes, start=1):
        cam = kf.camera
        cam_lines.append(f"{cam_id} PINHOLE {cam.width} {cam.height} {cam.fx!r} {cam.fy!r} {cam.cx!r} {cam.cy!r}")
        world_to_cam = np.linalg.inv(kf.pose_matrix)
        quat, trans = pose_to_quat_trans(world_to_cam)
        img_lines.append(f"{kf.name} {cam_id} " + " ".join(repr(v) for v in [*quat, *trans]))
    (out_dir / "cameras.txt").write_text("\n".join(cam_lines) + "\n")
    (out_dir / "images.txt").write_text("\n".join(img_lines) + "\n")
    (out_dir / "keyframes.json").write_text(json.dumps([asdict(k) for k in keyframes]))


def read_keyframes(dataset_dir: Path) -> list[Keyframe]:
    data = json.loads((dataset_dir / "keyframes.json").read_text())
    return [
        Keyframe(**{**k, "camera": Camera(**{**k["camera"], "distortion": tuple(k["camera"]["distortion"])}),
                    "pose": tuple(k["pose"])})
        for k in data
    ]


def read_rgb(path: Path) -> np.ndarray:
    """A stored keyframe image as HxWx3 uint8 RGB."""
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def load_depth(dataset_dir: Path, stem: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Depth in metres (float32) and confidence (uint8) of a keyframe; confidence None when absent."""
    depth = cv2.imread(str(dataset_dir / "depth" / f"{stem}.png"), cv2.IMREAD_UNCHANGED).astype(np.float32) / 1000.0
    conf_path = dataset_dir / "confidence" / f"{stem}.png"
    conf = cv2.imread(str(conf_path), cv2.IMREAD_UNCHANGED) if conf_path.exists() else None
    return depth, conf

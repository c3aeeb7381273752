"""Pose conventions, back-projection of pixels to 3D (depth maps, mesh ray casting) and pose errors.

Conventions used everywhere in markerless (written here once):
- A pose is a 4x4 camera-to-world matrix in scene coordinates (the frame of the scan's raw.glb), OpenCV camera
  axes (x right, y down, z forward), metres.
- Quaternions are [x, y, z, w] (SceneScape's and scipy's order); pycolmap's `Rotation3d.quat` is also xyzw.
- Pixel conventions (intrinsics COLMAP's, keypoints hloc's) and their conversions: `markerless.scene.camera`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh
from pydantic import BaseModel, ConfigDict, Field
from scipy.spatial.transform import Rotation

from markerless.errors import DatasetError
from markerless.scene.camera import Camera, rescale_pixels

# ARKit/OpenGL camera axes (x right, y up, looking down -z) to OpenCV axes (x right, y down, looking down +z).
ARKIT_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


def arkit_to_scene_pose(cam_to_arkit: np.ndarray, alignment: np.ndarray) -> np.ndarray:
    """ARKit camera-to-world (ARKit camera axes, ARKit world) -> camera-to-world in the raw.glb frame, OpenCV axes.

    `alignment` is Polycam's alignmentTransform as a 4x4 matrix (ARKit world -> raw.glb frame).
    """
    return alignment @ cam_to_arkit @ ARKIT_TO_OPENCV


def pose_to_quat_trans(pose: np.ndarray) -> tuple[list[float], list[float]]:
    """4x4 camera-to-world -> (quaternion [x, y, z, w], translation [x, y, z])."""
    quat = Rotation.from_matrix(pose[:3, :3]).as_quat()
    return [float(v) for v in quat], [float(v) for v in pose[:3, 3]]


def quat_trans_to_pose(quat_xyzw: np.ndarray | list[float], translation: np.ndarray | list[float]) -> np.ndarray:
    """(quaternion [x, y, z, w], translation) -> 4x4 matrix."""
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_quat(np.asarray(quat_xyzw, dtype=float)).as_matrix()
    pose[:3, 3] = np.asarray(translation, dtype=float)
    return pose


def pose_error(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(translation error in metres, rotation error in degrees = angle of R_est^T R_gt)."""
    t_err = float(np.linalg.norm(estimate[:3, 3] - truth[:3, 3]))
    r_rel = Rotation.from_matrix(estimate[:3, :3].T @ truth[:3, :3])
    return t_err, float(np.degrees(np.linalg.norm(r_rel.as_rotvec())))


def is_rigid(pose: np.ndarray, tol: float = 1e-3) -> bool:
    """True for a finite 4x4 rigid transform (orthonormal rotation with det +1)."""
    if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
        return False
    rot = pose[:3, :3]
    return bool(
        np.allclose(rot.T @ rot, np.eye(3), atol=tol)
        and abs(np.linalg.det(rot) - 1.0) < tol
        and np.allclose(pose[3], [0, 0, 0, 1])
    )


class DepthConfig(BaseModel):
    """How sensor depth is trusted when lifting keypoints to 3D (part of a sparse scene's identity)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_confidence: int = Field(127, description="ARKit confidence 0/127/255 = low/medium/high: drop low.")
    min_depth: float = Field(0.1, description="Metres.")
    max_depth: float = Field(5.0, description="LiDAR range in metres: anything beyond is a guess.")
    edge_rel: float = Field(
        0.03, description="Reject if the 3x3 neighbourhood spans more than this share of the depth."
    )


def lift_with_depth(
    pixels: np.ndarray,
    camera: Camera,
    pose: np.ndarray,
    depth: np.ndarray,
    confidence: np.ndarray | None,
    conf: DepthConfig = DepthConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """Back-project image pixels with a (lower-resolution) z-depth map in metres.

    The depth map covers the whole image at its own resolution, so its intrinsics are the image's scaled by
    (depth_w / width, depth_h / height). A pixel is rejected at a depth edge (its 3x3 depth neighbourhood
    spans more than `edge_rel` of its depth: foreground/background mixtures), outside the valid range, or where
    confidence is below `min_confidence`. Returns world points (N, 3) and a validity mask.
    """
    dh, dw = depth.shape
    sx, sy = dw / camera.width, dh / camera.height
    ud, vd = np.rint(rescale_pixels(pixels, np.array([sx, sy]))).astype(int).T
    inside = (ud >= 0) & (ud < dw) & (vd >= 0) & (vd < dh)
    ud, vd = np.clip(ud, 0, dw - 1), np.clip(vd, 0, dh - 1)
    z = depth[vd, ud]
    valid = inside & (z >= conf.min_depth) & (z <= conf.max_depth)
    if confidence is not None:
        valid &= confidence[vd, ud] >= conf.min_confidence
    # Depth-edge test on the 3x3 neighbourhood; missing neighbours (0) count as an edge.
    padded = np.pad(depth, 1, mode="edge")
    neigh = np.stack([padded[vd + dy, ud + dx] for dy in range(3) for dx in range(3)], axis=1)
    span = neigh.max(axis=1) - neigh.min(axis=1)
    valid &= (neigh.min(axis=1) > 0) & (span <= conf.edge_rel * np.maximum(z, 1e-6))
    points_cam = camera.rays(pixels) * z[:, None]
    points = points_cam @ pose[:3, :3].T + pose[:3, 3]
    return points, valid


class MeshRaycaster:
    """Ray casting against the scan mesh (raw.glb), with Embree when available (trimesh picks it)."""

    def __init__(self, mesh: trimesh.Trimesh) -> None:
        self.mesh = mesh
        self._intersector = mesh.ray

    @classmethod
    def from_glb(cls, path: Path) -> MeshRaycaster:
        """Load a binary glTF; an unreadable or empty mesh is a DatasetError."""
        try:
            loaded = trimesh.load(path, file_type="glb", force="mesh", process=False)
        except Exception as exc:  # noqa: BLE001 - trimesh raises many types for malformed files
            raise DatasetError(f"{path}: not a readable glTF mesh ({exc})") from exc
        if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0:
            raise DatasetError(f"{path}: no triangles in mesh")
        return cls(loaded)

    def lift(self, pixels: np.ndarray, camera: Camera, pose: np.ndarray, max_range: float = 20.0) -> tuple[
        np.ndarray, np.ndarray
    ]:
        """First mesh hit of each pixel's viewing ray -> world points (N, 3) and validity mask."""
        n = len(pixels)
        points = np.full((n, 3), np.nan)
        valid = np.zeros(n, dtype=bool)
        if n == 0:
            return points, valid
        dirs = camera.rays(pixels) @ pose[:3, :3].T
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        origins = np.repeat(pose[None, :3, 3], n, axis=0)
        locations, index_ray, _ = self._intersector.intersects_location(origins, dirs, multiple_hits=False)
        if len(index_ray):
            dist = np.linalg.norm(locations - origins[index_ray], axis=1)
            keep = dist <= max_range
            points[index_ray[keep]] = locations[keep]
            valid[index_ray[keep]] = True
        return points, valid

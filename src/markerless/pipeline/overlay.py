"""The scan drawn over a camera's own frame through the camera it was calibrated with: how an operator judges a
calibration at a glance, and a number for the same judgement (`edge_alignment_score`).

Rendering is ray casting (Embree through trimesh), one ray per output pixel: the ray of pixel centre (u, v) is
pycolmap's `cam_from_img` of that pixel, the exact inverse of the camera's distortion model (the same model
`img_from_cam` projects with), so a distorted camera's scan bends exactly as its image does. The first hit per
ray is a depth buffer: what is drawn is only what the camera sees (hidden surfaces never show). Scan edges are
where that buffer jumps from a nearer surface to a farther one (occlusion edges: the outline of a chair against
the floor, of a worktop against the cabinets below), which is where the camera's image has edges too when the
calibration is right; the scan's own border (where it stops) is drawn in another colour and not scored. Creases
are not drawn: the normals of a fused scan are too noisy for them (docs/measurements.md).

Pixels: the `Camera` convention (COLMAP, top-left pixel centre at (0.5, 0.5)) for rays; correspondences come in
hloc's (centre at (0, 0)), which is also OpenCV's drawing convention.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import trimesh

from markerless.pipeline.localization import LocalizationResult
from markerless.scene.camera import Camera
from markerless.scene.geometry import MeshRaycaster

# A surface seen at up to this angle from its normal changes depth between neighbouring pixels by at most
# tan(angle) x the pixel's angular size; a larger jump is a step from one surface to another (an occlusion edge).
GRAZING_DEG = 85.0
# Ray casting beyond this many rays renders at a coarser step and scales the result up (a 4K frame costs what a
# 1 MP frame does).
MAX_RAYS = 1_000_000
# An image edge within this distance of a drawn scan edge counts as agreeing with it: the scan's own accuracy
# (about 1 cm, 2.6 px at 2 m with f = 525 px) plus a pixel of edge localisation.
EDGE_TOLERANCE_PX = 3.0

EDGE_COLOUR = (0, 255, 255)  # RGB: cyan occlusion edges
BORDER_COLOUR = (255, 200, 0)  # amber: where the scan stops
INLIER_COLOUR = (40, 220, 40)
OUTLIER_COLOUR = (255, 40, 40)


@lru_cache(maxsize=4)
def _load_mesh(path: str, mtime_ns: int) -> trimesh.Trimesh:
    mesh = MeshRaycaster.from_glb(Path(path)).mesh
    mesh.ray.intersects_first(np.zeros((1, 3)), np.ones((1, 3)))  # build the BVH once, here, not per frame
    return mesh


def scene_mesh(version_dir: Path) -> trimesh.Trimesh:
    """The `raw.glb` of a registered scene version (`SceneInfo.path`), loaded once and kept (the last four)."""
    path = Path(version_dir) / "raw.glb"
    return _load_mesh(str(path.resolve()), path.stat().st_mtime_ns)


@dataclass(frozen=True)
class ScanView:
    """The scan as a camera sees it, at the camera's image size: z-depth (m, NaN where no surface), occlusion
    edges (the outline of every surface in front of another: where the world has an edge, so does the image)
    and the scan's border (surface next to nothing: where the scan stops, which the image need not show)."""

    depth: np.ndarray
    edges: np.ndarray
    border: np.ndarray


def render_scan(mesh: trimesh.Trimesh, camera: Camera, pose: np.ndarray) -> ScanView:
    """Ray cast `mesh` through `camera` at camera-to-world `pose` (scene frame, OpenCV axes)."""
    step = max(1, math.ceil(math.sqrt(camera.width * camera.height / MAX_RAYS)))
    w, h = math.ceil(camera.width / step), math.ceil(camera.height / step)
    u, v = np.meshgrid(np.arange(w) * step + step / 2, np.arange(h) * step + step / 2)
    pixels = np.stack([u.ravel(), v.ravel()], axis=1)  # COLMAP convention: pixel (0, 0) is centred at 0.5
    normalized = np.asarray(camera.to_pycolmap().cam_from_img(pixels), dtype=np.float64)
    rays_cam = np.hstack([normalized, np.ones((len(normalized), 1))])  # z = 1: the ray parameter is z-depth
    rotation, centre = pose[:3, :3], pose[:3, 3]
    rays = rays_cam @ rotation.T
    defined = np.all(np.isfinite(rays), axis=1)  # a lens model may have no inverse far out in the corners
    face = np.full(len(rays), -1)
    face[defined] = mesh.ray.intersects_first(np.broadcast_to(centre, rays[defined].shape), rays[defined])
    hit = face >= 0
    depth = np.full(len(face), np.nan)
    if hit.any():  # the hit face's plane along each ray
        normals = mesh.face_normals[face[hit]]
        corner = mesh.vertices[mesh.faces[face[hit], 0]]
        with np.errstate(divide="ignore", invalid="ignore"):
            depth[hit] = np.einsum("ij,ij->i", normals, corner - centre) / np.einsum("ij,ij->i", normals, rays[hit])
    depth = depth.reshape(h, w)
    depth[~(depth > 0)] = np.nan
    edges, border = _edges(depth, step / math.sqrt(camera.fx * camera.fy))
    if step > 1:
        size = (camera.width, camera.height)
        depth = cv2.resize(depth, size, interpolation=cv2.INTER_NEAREST)
        edges, border = (cv2.resize(e.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
                         for e in (edges, border))
    return ScanView(depth.astype(np.float32), edges, border)


def _edges(depth: np.ndarray, pixel_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Occlusion edges (the nearer pixel of 4-neighbours whose depths differ by more than a surface at
    GRAZING_DEG gives over one pixel) and the scan's border (a surface pixel next to one without)."""
    valid = np.isfinite(depth)
    filled = np.where(valid, depth, 0.0)
    jump = math.tan(math.radians(GRAZING_DEG)) * pixel_angle
    edges = np.zeros(depth.shape, dtype=bool)
    border = np.zeros(depth.shape, dtype=bool)
    for a, b in (((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                 ((slice(None), slice(None, -1)), (slice(None), slice(1, None)))):
        both = valid[a] & valid[b]
        step = both & (np.abs(filled[a] - filled[b]) > jump * np.minimum(filled[a], filled[b]))
        edges[a] |= step & (filled[a] <= filled[b])
        edges[b] |= step & (filled[b] < filled[a])
        alone = valid[a] ^ valid[b]
        border[a] |= alone & valid[a]
        border[b] |= alone & valid[b]
    return edges, border


def image_edges(image: np.ndarray) -> np.ndarray:
    """Canny edges of an RGB or grey image, thresholds from the image itself (Otsu's threshold as the high one,
    half of it as the low one), after a light blur that keeps sensor noise out."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    grey = cv2.GaussianBlur(grey, (5, 5), 1.0)
    high, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return cv2.Canny(grey, 0.5 * high, high) > 0


def edge_alignment_score(image: np.ndarray, rendered_edges: np.ndarray,
                         tolerance_px: float = EDGE_TOLERANCE_PX) -> float:
    """How much better than chance the drawn scan edges fall on the image's own edges, in [-1, 1] (nan without
    drawn edges).

    near = the fraction of drawn edge pixels within `tolerance_px` of an image (Canny) edge; chance = the fraction
    of all pixels that are (what edges drawn anywhere would score, high for a cluttered image).
    score = (near - chance) / (1 - chance): 1 when every drawn edge lies on an image edge, 0 for edges no better
    placed than random, negative when they avoid the image's edges.
    """
    if image.shape[:2] != rendered_edges.shape:
        raise ValueError(f"image {image.shape[:2]} and rendered edges {rendered_edges.shape} differ in size")
    edges = image_edges(image)
    if not rendered_edges.any() or not edges.any():
        return float("nan")
    distance = cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    within = distance <= tolerance_px
    near = float(within[rendered_edges].mean())
    chance = float(within.mean())
    return (near - chance) / (1.0 - chance) if chance < 1.0 else 0.0


@dataclass(frozen=True)
class Overlay:
    png: bytes
    width: int
    height: int
    edge_score: float


def render_overlay(
    frame: np.ndarray,
    camera: Camera,
    pose: np.ndarray,
    mesh: trimesh.Trimesh,
    inliers2d: Sequence[Sequence[float]] | np.ndarray | None = None,
    outliers2d: Sequence[Sequence[float]] | np.ndarray | None = None,
    caption: Sequence[str] = (),
) -> Overlay:
    """The frame (HxWx3 RGB uint8) at its own size with the scan's edges drawn through `camera` at `pose`,
    inliers (green dots) and outliers (red crosses) at their hloc pixels, and `caption` lines plus the edge
    alignment score on a dark band at the bottom."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be HxWx3 uint8 RGB, got {frame.shape} {frame.dtype}")
    if (camera.width, camera.height) != (frame.shape[1], frame.shape[0]):
        raise ValueError(f"camera is {camera.width}x{camera.height}, frame is {frame.shape[1]}x{frame.shape[0]}")
    view = render_scan(mesh, camera, pose)
    score = edge_alignment_score(frame, view.edges)
    canvas = frame.copy()
    canvas[view.border] = BORDER_COLOUR
    canvas[view.edges] = EDGE_COLOUR
    scale = max(1.0, max(frame.shape[:2]) / 640)
    radius = round(2 * scale)
    for x, y in _points(inliers2d):
        cv2.circle(canvas, (round(x * 16), round(y * 16)), radius * 16, INLIER_COLOUR, -1, cv2.LINE_AA, shift=4)
    for x, y in _points(outliers2d):
        p, r = np.array([x, y]), radius + 1
        for d in (np.array([r, r]), np.array([r, -r])):
            a, b = np.round((p - d) * 16).astype(int), np.round((p + d) * 16).astype(int)
            cv2.line(canvas, tuple(a), tuple(b), OUTLIER_COLOUR, max(1, round(scale)), cv2.LINE_AA, shift=4)
    lines = [*caption, f"scan/image edge agreement {score:.2f} (1 = every scan edge on an image edge, 0 = chance)"]
    _caption(canvas, lines, scale)
    ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return Overlay(png.tobytes(), frame.shape[1], frame.shape[0], score)


def _points(points: Sequence[Sequence[float]] | np.ndarray | None) -> np.ndarray:
    return np.zeros((0, 2)) if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)


def _caption(canvas: np.ndarray, lines: Sequence[str], scale: float) -> None:
    font, size, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.42 * scale, max(1, round(scale))
    line_h = round(17 * scale)
    top = canvas.shape[0] - line_h * len(lines) - round(6 * scale)
    band = canvas[max(top, 0):]
    band[:] = (band * 0.35).astype(np.uint8)
    for i, text in enumerate(lines):
        y = top + line_h * (i + 1)
        cv2.putText(canvas, text, (round(6 * scale), y), font, size, (255, 255, 255), thickness, cv2.LINE_AA)


def caption_for(camera: Camera, source: str | None, num_inliers: int, num_matches: int,
                position_sigma_m: float | None, rotation_sigma_deg: float | None) -> list[str]:
    """The caption of a calibration: the camera used and how sure the pose is."""
    dist = ", ".join(f"{v:.3f}" for v in camera.distortion) or "none"
    sigma = ("n/a" if position_sigma_m is None else f"{position_sigma_m * 100:.1f} cm") + ", " + (
        "n/a" if rotation_sigma_deg is None else f"{rotation_sigma_deg:.2f} deg")
    return [
        f"camera ({source or 'given'}): f {camera.fx:.1f}/{camera.fy:.1f} px, c {camera.cx:.1f}/{camera.cy:.1f}, "
        f"distortion {dist}",
        f"inliers {num_inliers}/{num_matches}, pose 1-sigma {sigma}",
    ]


class OverlayCache:
    """The last `size` overlays by key (e.g. camera id and calibration id): a calibration is drawn once."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[object, Overlay] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object, render: Callable[[], Overlay]) -> Overlay:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        overlay = render()  # outside the lock: other keys stay served while one renders
        with self._lock:
            self._items[key] = overlay
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return overlay

    def peek(self, key: object) -> Overlay | None:
        """The overlay of `key` when it was drawn already (never draws)."""
        with self._lock:
            return self._items.get(key)


def overlay_for_result(frame: np.ndarray, result: LocalizationResult, mesh: trimesh.Trimesh) -> Overlay:
    """The overlay of a successful localization: its pose, the camera it returned, its judged correspondences."""
    pose = result.pose_matrix()
    if not result.success or pose is None or result.intrinsics is None:
        raise ValueError(f"no overlay for a failed localization ({result.reason}: {result.message})")
    camera = Camera.from_matrix(result.intrinsics, frame.shape[1], frame.shape[0], result.distortion)
    caption = caption_for(camera, result.intrinsics_source, result.num_inliers, result.num_matches,
                          result.position_sigma_m, result.rotation_sigma_deg)
    return render_overlay(frame, camera, pose, mesh, result.inlier_points2d, result.outlier_points2d, caption)

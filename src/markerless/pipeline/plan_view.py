"""The site from above: the scan's footprint with each calibrated camera's frustum over it, as inline SVG.

Up is the scan's +y (glTF's convention, which Polycam's raw.glb follows: gravity along -y), so the plan is the
x-z plane seen from above: x to the right, z down the page. Each map cell shows the highest scan surface in it
(its colour, darker the lower it is), as someone looking down on the site would see it, with the ceiling
left out (it faces down). A camera is drawn as the shadow of its viewing frustum on
the floor plan (its centre and the rays of the image corners out to a depth of an eighth of the site, so that
it reads at any site scale), its optical axis and its id.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import trimesh

from markerless.scene.camera import Camera

UP = np.array([0.0, 1.0, 0.0])
MAP_CELLS = 400  # cells across the plan's longer side
FRUSTUM_FRACTION = 1 / 8  # frustum depth drawn, as a fraction of the site's extent
SAMPLES_PER_CELL = 4  # surface samples per map cell a large triangle covers, on average
MAX_SAMPLES = 2_000_000
VERTICAL_TOLERANCE_DEG = 5.0  # a surface this close to vertical is a wall, even if it leans a little downwards


@dataclass(frozen=True)
class PlanCamera:
    camera_id: str
    camera: Camera
    pose: np.ndarray  # camera-to-world, scene frame, OpenCV axes
    ok: bool = True  # a good calibration (drawn green) or one to look at (amber)


def _frame(up: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right, down-the-page, up) unit vectors of the plan."""
    up = up / np.linalg.norm(up)
    seed = np.array([1.0, 0.0, 0.0]) if abs(up[0]) < 0.9 else np.array([0.0, 0.0, 1.0])
    right = seed - up * (seed @ up)
    right /= np.linalg.norm(right)
    return right, np.cross(right, up), up


def _frustum_points(cam: PlanCamera, depth: float) -> np.ndarray:
    """The camera centre and its image corners' rays at z-depth `depth`, in world coordinates (5, 3)."""
    c = cam.camera
    corners = np.array([[0, 0], [c.width, 0], [c.width, c.height], [0, c.height]], dtype=np.float64)
    rays = np.asarray(c.to_pycolmap().cam_from_img(corners), dtype=np.float64)
    points_cam = np.hstack([rays, np.ones((4, 1))]) * depth
    world = points_cam @ cam.pose[:3, :3].T + cam.pose[:3, 3]
    return np.vstack([cam.pose[:3, 3], world])


def _footprint(mesh: trimesh.Trimesh, right: np.ndarray, down: np.ndarray, up: np.ndarray,
               origin: np.ndarray, cell: float, shape: tuple[int, int]) -> np.ndarray:
    """RGBA image of what one sees of the scan from above (transparent where the scan has nothing).

    Each triangle smaller than a cell is taken at its centre, larger ones are sampled by area (SAMPLES_PER_CELL
    per cell they cover, on average); per cell the highest sample among the surfaces not facing down wins:
    floors and tops face up, walls show as their top edge, and a ceiling or the underside of a table (facing
    down, seen only from below) never hides the room.
    """
    points, faces = np.asarray(mesh.triangles_center), np.arange(len(mesh.faces))
    area = np.asarray(mesh.area_faces)
    big = area > cell * cell  # a face larger than a cell is sampled over its area, a smaller one by its centre
    if big.any():
        count = min(int(SAMPLES_PER_CELL * area[big].sum() / (cell * cell)) + 1, MAX_SAMPLES)
        more, more_faces = trimesh.sample.sample_surface(mesh, count, face_weight=np.where(big, area, 0.0), seed=0)
        points, faces = np.vstack([points, more]), np.concatenate([faces, more_faces])
    facing = mesh.face_normals[faces] @ up > -math.sin(math.radians(VERTICAL_TOLERANCE_DEG))
    points, faces = points[facing], faces[facing]
    height = points @ up
    cols = ((points @ right - origin[0]) / cell).astype(int)
    rows = ((points @ down - origin[1]) / cell).astype(int)
    inside = (cols >= 0) & (cols < shape[1]) & (rows >= 0) & (rows < shape[0])
    cols, rows, height, faces = cols[inside], rows[inside], height[inside], faces[inside]
    flat = rows * shape[1] + cols
    order = np.lexsort((height, flat))  # per cell, highest last
    last = np.r_[flat[order][1:] != flat[order][:-1], True]
    top = order[last]
    image = np.zeros((shape[0] * shape[1], 4), np.uint8)
    if len(top):
        h = height[top]
        shade = 0.45 + 0.55 * (h - h.min()) / max(h.max() - h.min(), 1e-9)
        image[flat[top], :3] = (_face_colours(mesh)[faces[top]] * shade[:, None]).astype(np.uint8)
        image[flat[top], 3] = 255
    image = image.reshape(shape[0], shape[1], 4)
    # close single-cell gaps the sampling left
    grown = cv2.dilate(image, np.ones((3, 3), np.uint8))
    empty = image[:, :, 3] == 0
    image[empty] = grown[empty]
    return image


def _face_colours(mesh: trimesh.Trimesh) -> np.ndarray:
    """Mean vertex colour of each face (RGB, float), light grey for an uncoloured mesh."""
    visual = mesh.visual
    if getattr(visual, "kind", None) == "vertex":
        return np.asarray(visual.vertex_colors)[:, :3].astype(np.float64)[mesh.faces].mean(axis=1)
    return np.full((len(mesh.faces), 3), 200.0)


def plan_view_svg(mesh: trimesh.Trimesh, cameras: Sequence[PlanCamera], up: Sequence[float] = UP,
                  width_px: int = 480) -> str:
    """An `<svg>` element (no external references) of the site from above with each camera's frustum."""
    right, down, up_v = _frame(np.asarray(up, dtype=np.float64))
    vertices = np.asarray(mesh.vertices)
    plane = np.stack([vertices @ right, vertices @ down], axis=1)
    lo, hi = plane.min(axis=0), plane.max(axis=0)
    extent = float(np.max(hi - lo)) or 1.0
    depth = extent * FRUSTUM_FRACTION
    frusta = [_frustum_points(cam, depth) for cam in cameras]
    shadows = [np.stack([f @ right, f @ down], axis=1) for f in frusta]
    if shadows:
        everything = np.vstack([plane[[0]], *shadows, lo[None], hi[None]])
        lo, hi = everything.min(axis=0), everything.max(axis=0)
    margin = 0.04 * float(np.max(hi - lo))
    lo, hi = lo - margin, hi + margin
    cell = float(np.max(hi - lo)) / MAP_CELLS
    shape = (max(1, math.ceil((hi[1] - lo[1]) / cell)), max(1, math.ceil((hi[0] - lo[0]) / cell)))
    footprint = _footprint(mesh, right, down, up_v, lo, cell, shape)
    ok, png = cv2.imencode(".png", cv2.cvtColor(footprint, cv2.COLOR_RGBA2BGRA))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    w, h = shape[1], shape[0]
    stroke = w / 400

    def xy(p: np.ndarray) -> str:
        return f"{(p[0] - lo[0]) / cell:.1f},{(p[1] - lo[1]) / cell:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{width_px}" '
        f'height="{round(width_px * h / w)}" class="plan" role="img" aria-label="site plan">',
        f'<rect width="{w}" height="{h}" fill="#20242a"/>',
        f'<image width="{w}" height="{h}" href="data:image/png;base64,{base64.b64encode(png).decode()}"/>',
    ]
    for cam, shadow in zip(cameras, shadows, strict=True):
        colour = "#3ddc84" if cam.ok else "#ffb020"
        hull = cv2.convexHull(shadow.astype(np.float32)).reshape(-1, 2)
        centre = shadow[0]
        axis = cam.pose[:3, 2]
        tip = np.array([(cam.pose[:3, 3] + axis * depth) @ right, (cam.pose[:3, 3] + axis * depth) @ down])
        label = html.escape(cam.camera_id)
        parts += [
            f'<g class="camera"><title>{label}</title>',
            f'<polygon points="{" ".join(xy(p) for p in hull)}" fill="{colour}" fill-opacity="0.25" '
            f'stroke="{colour}" stroke-width="{stroke:.2f}"/>',
            f'<line x1="{xy(centre).split(",")[0]}" y1="{xy(centre).split(",")[1]}" '
            f'x2="{xy(tip).split(",")[0]}" y2="{xy(tip).split(",")[1]}" stroke="{colour}" '
            f'stroke-width="{stroke:.2f}" stroke-dasharray="{4 * stroke:.1f}"/>',
            f'<circle cx="{xy(centre).split(",")[0]}" cy="{xy(centre).split(",")[1]}" r="{3 * stroke:.1f}" '
            f'fill="{colour}"/>',
            f'<text x="{(centre[0] - lo[0]) / cell + 5 * stroke:.1f}" y="{(centre[1] - lo[1]) / cell - 5 * stroke:.1f}"'
            f' fill="#ffffff" stroke="#000000" stroke-width="{0.6 * stroke:.2f}" paint-order="stroke" '
            f'font-size="{14 * stroke:.1f}" font-family="sans-serif">{label}</text></g>',
        ]
    bar = _scale_bar(extent)
    x0, y0 = 10 * stroke, h - 10 * stroke
    parts += [
        f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x0 + bar / cell:.1f}" y2="{y0:.1f}" stroke="#ffffff" '
        f'stroke-width="{2 * stroke:.1f}"/>',
        f'<text x="{x0:.1f}" y="{y0 - 4 * stroke:.1f}" fill="#ffffff" font-size="{12 * stroke:.1f}" '
        f'font-family="sans-serif">{bar:g} m</text>',
        "</svg>",
    ]
    return "\n".join(parts)


def _scale_bar(extent: float) -> float:
    """The largest 1, 2 or 5 x 10^k metres not over a fifth of the site."""
    target = extent / 5
    power = 10 ** math.floor(math.log10(target))
    return max(m * power for m in (1, 2, 5) if m * power <= target)

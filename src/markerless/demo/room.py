"""The synthetic room: textured axis-aligned boxes, ray cast into colour and z-depth images, and meshed, on the CPU.

The room is a set of axis-aligned boxes (walls/floor/ceiling seen from inside plus some furniture) with
procedurally generated, non-repetitive textures, rendered by analytic ray-box intersection in the raw.glb frame.
Depth is ARKit-like z-depth in millimetres at 1/4 resolution; its pixel (ud, vd) covers the image pixels of its
4x4 block, so it is rendered at the block centre `u = (ud + 0.5) * 4 - 0.5` (hloc pixel convention, as
`markerless.scene.geometry.lift_with_depth` reads it). Rendering uses hloc's pixel convention (top-left pixel
centre at 0, 0).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import cv2
import numpy as np
import trimesh

from markerless.scene.camera import Camera, rescale_pixels

_DEPTH_LIDAR_RANGE_M = 5.0  # beyond it ARKit confidence is low


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in the raw.glb frame; `inside` for the room itself (seen from within)."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    inside: bool = False


@dataclass(frozen=True)
class View:
    """One rendered camera: intrinsics and camera-to-world pose (raw.glb frame, OpenCV axes)."""

    camera: Camera
    pose: np.ndarray


def _furniture(size: tuple[float, float, float]) -> list[Box]:
    """Boxes near the walls (relative to the room size) so the camera loop in the middle never enters one."""
    sx, sy, sz = size
    hx, hz = sx / 2, sz / 2
    return [
        Box((hx - 0.65, 0.0, -1.2), (hx - 0.05, 0.9, 0.2)),  # cabinet
        Box((-hx + 0.05, 0.0, 0.3), (-hx + 0.6, 1.9, 1.2)),  # shelf
        Box((-0.8, 0.0, hz - 0.7), (0.6, 0.75, hz - 0.05)),  # sideboard
        Box((-0.4, 0.75, hz - 0.55), (-0.05, 1.0, hz - 0.2)),  # box on the sideboard
        Box((0.9, 0.0, -hz + 0.05), (1.4, 0.45, -hz + 0.55)),  # crate
        Box((-hx + 0.9, 0.0, -hz + 0.05), (-hx + 1.2, sy, -hz + 0.35)),  # pillar
    ]


_GLYPHS = np.array(list(string.ascii_uppercase + string.digits))


def _texture(rng: np.random.Generator, width: int, height: int, ppm: float) -> np.ndarray:
    """Non-repetitive texture: coloured multi-scale noise, then many random shapes and text of varied size.

    Shapes give corners and blobs at every scale, so SIFT finds thousands of distinctive keypoints per view.
    All random numbers are drawn up front in arrays: per-shape generator calls would dominate the run time.
    """
    img = np.empty((height, width, 3), np.float32)
    img[:] = rng.uniform(70, 190, 3)
    for cell_m, amplitude in ((0.8, 40.0), (0.3, 25.0), (0.1, 18.0), (0.035, 14.0), (0.012, 8.0)):
        gw = max(2, int(width / (cell_m * ppm)) + 2)
        gh = max(2, int(height / (cell_m * ppm)) + 2)
        grid = rng.normal(size=(gh, gw, 3)).astype(np.float32)
        img += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img, 0, 255).astype(np.uint8)
    n = int(width * height / ppm**2 * 260)
    # Python lists, not numpy scalars, inside the loop: element access on arrays costs more than the drawing.
    sizes = (np.exp(rng.uniform(np.log(0.012), np.log(0.25), n)) * ppm).tolist()
    centres = np.stack([rng.integers(0, width, n), rng.integers(0, height, n)], axis=1).tolist()
    colours = rng.integers(0, 256, (n, 3)).tolist()
    filled = (rng.random(n) < 0.6).tolist()
    kinds = rng.integers(0, 5, n).tolist()
    shape = rng.uniform(0.2, 1.0, (n, 2)).tolist()
    angles = rng.uniform(0, 180, n).tolist()
    fonts = rng.integers(0, 8, n).tolist()
    polygon = rng.uniform(-1, 1, (n, 6, 2))
    corners = rng.integers(3, 7, n).tolist()
    glyphs = _GLYPHS[rng.integers(0, len(_GLYPHS), (n, 6))].tolist()
    lengths = rng.integers(2, 7, n).tolist()
    for i in range(n):
        size, centre, colour, kind = sizes[i], tuple(centres[i]), tuple(colours[i]), kinds[i]
        thickness = -1 if filled[i] else max(1, int(size / 8))
        if kind == 0:
            cv2.circle(img, centre, max(1, int(size / 2)), colour, thickness, cv2.LINE_AA)
        elif kind == 1:
            corner = (int(centre[0] + shape[i][0] * size), int(centre[1] + shape[i][1] * size))
            cv2.rectangle(img, centre, corner, colour, thickness, cv2.LINE_AA)
        elif kind == 2:
            axes = (max(1, int(size / 2)), max(1, int(0.6 * shape[i][0] * size)))
            cv2.ellipse(img, centre, axes, angles[i], 0, 360, colour, thickness, cv2.LINE_AA)
        elif kind == 3:
            pts = (np.array(centre) + size * polygon[i, : corners[i]]).astype(np.int32)
            if filled[i]:
                cv2.fillPoly(img, [pts], colour, cv2.LINE_AA)
            else:
                cv2.polylines(img, [pts], True, colour, thickness, cv2.LINE_AA)
        else:
            scale = max(size / 30.0, 0.3)
            text = "".join(glyphs[i][: lengths[i]])
            cv2.putText(img, text, centre, fonts[i], scale, colour, max(1, int(scale * 2)), cv2.LINE_AA)
    return cv2.GaussianBlur(img, (0, 0), 0.6)


def _sample(texture: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """Bilinear lookup of N texel positions -> (N, 3) float32; cv2.remap wants 2D maps under 32767 per side."""
    n = len(map_x)
    cols = 1024
    rows = -(-n // cols)
    grid_x = np.zeros(rows * cols, np.float32)
    grid_y = np.zeros(rows * cols, np.float32)
    grid_x[:n], grid_y[:n] = map_x, map_y
    texels = cv2.remap(texture, grid_x.reshape(rows, cols), grid_y.reshape(rows, cols), cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REFLECT)
    return texels.reshape(-1, 3)[:n].astype(np.float32)


class Room:
    """A room of textured boxes that can be ray cast (colour and z-depth) and meshed."""

    def __init__(self, seed: int, size: tuple[float, float, float], ppm: float, variant: int = 0) -> None:
        """`variant` tells rooms of one seed apart (0: the scanned room, 1: the foreign one)."""
        sx, sy, sz = size
        self.size = (float(sx), float(sy), float(sz))
        self.ppm = ppm
        self.boxes = [Box((-sx / 2, 0.0, -sz / 2), (sx / 2, sy, sz / 2), inside=True), *_furniture(size)]
        self.lo = np.array([b.lo for b in self.boxes])
        self.hi = np.array([b.hi for b in self.boxes])
        # Face f = 6 * box + 2 * axis + side (side 1 = the box's upper face along that axis).
        self.textures: list[np.ndarray] = []
        self.shade = np.empty(6 * len(self.boxes), np.float32)
        light = np.array([0.3, 0.8, 0.5]) / np.linalg.norm([0.3, 0.8, 0.5])
        for b, box in enumerate(self.boxes):
            for axis in range(3):
                u_axis, v_axis = self._plane_axes(axis)
                width = int(np.ceil((box.hi[u_axis] - box.lo[u_axis]) * ppm)) + 2
                height = int(np.ceil((box.hi[v_axis] - box.lo[v_axis]) * ppm)) + 2
                for side in range(2):
                    rng = np.random.default_rng([seed, variant, b, axis, side])
                    self.textures.append(_texture(rng, width, height, ppm))
                    normal = np.zeros(3)
                    normal[axis] = (1.0 if side else -1.0) * (-1.0 if box.inside else 1.0)
                    self.shade[6 * b + 2 * axis + side] = 0.8 + 0.2 * float(normal @ light)

    @staticmethod
    def _plane_axes(axis: int) -> tuple[int, int]:
        """In-plane texture axes (u, v) of a face normal to `axis`."""
        return ((1, 2), (0, 2), (0, 1))[axis]

    def cast(self, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """First hit along origin + t * dirs (N, 3): (t (N,), face id (N,), hit points (N, 3)).

        Slab test per box, one axis at a time on float32 columns (much faster than reductions over (N, 3)).
        """
        d = [np.ascontiguousarray(dirs[:, a], dtype=np.float32) for a in range(3)]
        with np.errstate(divide="ignore"):
            inv = [np.float32(1.0) / col for col in d]
        best_t = np.full(len(dirs), np.inf, np.float32)
        best_face = np.full(len(dirs), -1, np.int64)
        for b, box in enumerate(self.boxes):
            with np.errstate(invalid="ignore"):
                t_lo = [(np.float32(self.lo[b, a] - origin[a])) * inv[a] for a in range(3)]
                t_hi = [(np.float32(self.hi[b, a] - origin[a])) * inv[a] for a in range(3)]
            near = [np.minimum(t_lo[a], t_hi[a]) for a in range(3)]
            far = [np.maximum(t_lo[a], t_hi[a]) for a in range(3)]
            t_far = np.minimum(np.minimum(far[0], far[1]), far[2])
            if box.inside:  # the camera is inside: the ray leaves through the nearest far slab
                idx = np.flatnonzero((t_far > 0) & (t_far < best_t))
                t = t_far[idx]
                slabs = far
            else:  # seen from outside: the ray enters through the farthest near slab
                t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
                idx = np.flatnonzero((t_near > 1e-6) & (t_near <= t_far) & (t_near < best_t))
                t = t_near[idx]
                slabs = near
            axis = np.where(slabs[0][idx] == t, 0, np.where(slabs[1][idx] == t, 1, 2))
            d_axis = np.choose(axis, [d[0][idx], d[1][idx], d[2][idx]])
            side = (d_axis > 0) if box.inside else (d_axis < 0)
            best_t[idx] = t
            best_face[idx] = 6 * b + 2 * axis + side
        t64 = best_t.astype(np.float64)
        return t64, best_face, origin + t64[:, None] * dirs

    def render(self, view: View, width: int, height: int, rng: np.random.Generator, noise: float) -> np.ndarray:
        """RGB uint8 image of the view: bilinear texture lookup, per-face shading, light falloff, sensor noise."""
        u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
        dirs_cam = view.camera.rays(np.stack([u.ravel(), v.ravel()], axis=1))
        dirs = dirs_cam @ view.pose[:3, :3].T
        _, face, points = self.cast(view.pose[:3, 3], dirs)
        colour = np.zeros((u.size, 3), np.float32)
        for f in np.unique(face):
            mask = face == f
            b, axis = int(f) // 6, (int(f) % 6) // 2
            u_axis, v_axis = self._plane_axes(axis)
            map_x = ((points[mask, u_axis] - self.lo[b, u_axis]) * self.ppm - 0.5).astype(np.float32)
            map_y = ((points[mask, v_axis] - self.lo[b, v_axis]) * self.ppm - 0.5).astype(np.float32)
            colour[mask] = _sample(self.textures[f], map_x, map_y) * self.shade[f]
        # A ceiling light in the middle of the room: smooth, view-independent illumination falloff.
        lamp = np.array([0.0, self.size[1] - 0.05, 0.0])
        falloff = 1.0 / (1.0 + (np.linalg.norm(points - lamp, axis=1) / 4.0) ** 2)
        colour *= (0.55 + 0.6 * falloff)[:, None].astype(np.float32)
        colour += np.float32(noise) * rng.standard_normal(colour.shape, dtype=np.float32)
        return np.clip(colour, 0, 255).astype(np.uint8).reshape(height, width, 3)

    def depth(self, view: View, width: int, height: int, downscale: int) -> tuple[np.ndarray, np.ndarray]:
        """ARKit-like z-depth (uint16 mm) and confidence (0/127/255) at 1/downscale resolution."""
        dw, dh = width // downscale, height // downscale
        ud, vd = np.meshgrid(np.arange(dw, dtype=np.float64), np.arange(dh, dtype=np.float64))
        # centre of each depth pixel's block of image pixels
        dirs_cam = view.camera.rays(rescale_pixels(np.stack([ud.ravel(), vd.ravel()], axis=1), downscale))
        dirs = dirs_cam @ view.pose[:3, :3].T
        z, face, _ = self.cast(view.pose[:3, 3], dirs)  # dirs have camera z = 1, so t is the z-depth
        depth_mm = np.clip(np.rint(z * 1000.0), 0, 65535).astype(np.uint16).reshape(dh, dw)
        # Confidence: low beyond the LiDAR range, medium at grazing incidence and at depth edges, else high.
        axis = (face % 6) // 2
        cos_incidence = np.abs(dirs[np.arange(len(dirs)), axis]) / np.linalg.norm(dirs, axis=1)
        conf = np.full(z.shape, 255, np.uint8)
        conf[cos_incidence < 0.3] = 127
        zmap = z.reshape(dh, dw)
        span = cv2.dilate(zmap, np.ones((3, 3))) - cv2.erode(zmap, np.ones((3, 3)))
        conf = conf.reshape(dh, dw)
        conf[span > 0.05 * zmap] = 127
        conf[zmap > _DEPTH_LIDAR_RANGE_M] = 0
        return depth_mm, conf

    def mesh(self, spacing: float = 0.1) -> trimesh.Trimesh:
        """Vertex-coloured triangle mesh of every box face (room faces point inward), grid of ~`spacing` m."""
        vertices, faces, colours = [], [], []
        offset = 0
        for b, box in enumerate(self.boxes):
            for axis in range(3):
                u_axis, v_axis = self._plane_axes(axis)
                for side in range(2):
                    f = 6 * b + 2 * axis + side
                    nu = max(2, int(np.ceil((box.hi[u_axis] - box.lo[u_axis]) / spacing)) + 1)
                    nv = max(2, int(np.ceil((box.hi[v_axis] - box.lo[v_axis]) / spacing)) + 1)
                    gu, gv = np.meshgrid(np.linspace(box.lo[u_axis], box.hi[u_axis], nu),
                                         np.linspace(box.lo[v_axis], box.hi[v_axis], nv))
                    pts = np.zeros((nu * nv, 3))
                    pts[:, axis] = box.hi[axis] if side else box.lo[axis]
                    pts[:, u_axis], pts[:, v_axis] = gu.ravel(), gv.ravel()
                    small = cv2.resize(self.textures[f], (nu, nv), interpolation=cv2.INTER_AREA)
                    idx = np.arange(nu * nv).reshape(nv, nu)
                    a, bq, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]
                    tris = np.concatenate([np.stack([a, bq, c], -1).reshape(-1, 3),
                                           np.stack([a, c, d], -1).reshape(-1, 3)])
                    # (u, v, axis) is right-handed for axis 0 and 2, left-handed for axis 1 (u=x, v=z);
                    # flip so that normals point out of furniture and into the room.
                    outward = (1 if side else -1) * (-1 if axis == 1 else 1) * (-1 if box.inside else 1)
                    if outward < 0:
                        tris = tris[:, ::-1]
                    vertices.append(pts)
                    faces.append(tris + offset)
                    colours.append(np.concatenate([small.reshape(-1, 3), np.full((nu * nv, 1), 255)], 1))
                    offset += nu * nv
        return trimesh.Trimesh(
            vertices=np.concatenate(vertices), faces=np.concatenate(faces),
            vertex_colors=np.concatenate(colours).astype(np.uint8), process=False,
        )

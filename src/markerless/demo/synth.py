"""Synthetic Polycam "raw data" scan of a textured room, with ground-truth query views, made on the CPU.

Why: the demo and the tests need a scan whose every pose is known exactly, that needs nothing downloaded, and that
SIFT can localize against. The room is a set of axis-aligned boxes (walls/floor/ceiling seen from inside plus some
furniture) with procedurally generated, non-repetitive textures, rendered by analytic ray-box intersection.

The scene is built axis-aligned in the raw.glb frame, as Polycam's mesh is; the ARKit world differs from it by the
alignmentTransform A (a yaw and an offset, ARKit world -> raw.glb frame), so the camera JSONs carry
`inv(A) @ T_glb_cv @ diag(1, -1, -1, 1)` (ARKit world, ARKit camera axes) and a reader that applies A correctly gets
back the exact poses used for rendering. Depth is ARKit-like z-depth in millimetres at 1/4 resolution; its pixel
(ud, vd) covers the image pixels of its 4x4 block, so it is rendered at the block centre
`u = (ud + 0.5) * 4 - 0.5` (hloc pixel convention, as `markerless.scene.geometry.lift_with_depth` reads it).
Rendering uses hloc's pixel convention (top-left pixel centre at 0, 0); the intrinsics written out (camera JSONs
and query K) are in COLMAP's (centre at 0.5, 0.5), the one Polycam files and SceneScape's pycolmap calls use.

Output layout (as `kitchen` in the shared data): `OUT.zip` holding `<stem>-poly/...`, and next to it
`queries.json` (camera-to-world in the raw.glb frame, OpenCV axes, quaternion xyzw), `queries/<ts>.jpg` and
`foreign/room-<i>.jpg` (views of a differently textured room that must fail localization).
"""

from __future__ import annotations

import json
import string
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import trimesh
from scipy.spatial.transform import Rotation

from markerless.scene.camera import Camera, rescale_pixels
from markerless.scene.geometry import ARKIT_TO_OPENCV, pose_to_quat_trans
from markerless.scene.queries import QueryEntry, write_queries

DEFAULT_CONF: dict[str, Any] = {
    "seed": 0,  # RNG seed: the same seed and conf give byte-identical output
    "num_keyframes": 48,  # keyframes on one loop around the room
    "num_queries": 10,  # query views, each between two keyframes and perturbed
    "num_foreign": 2,  # views of another room (must not localize)
    "width": 640,  # image width in pixels
    "height": 480,  # image height in pixels
    "focal": 500.0,  # nominal keyframe focal length in pixels (per-frame jitter added, as in real Polycam)
    "query_focal": 520.0,  # focal length of the fixed query camera
    "depth_downscale": 4,  # depth and confidence maps at 1/4 resolution, as ARKit LiDAR depth
    "texels_per_metre": 220,  # texture resolution: ~1 texel per pixel at 2.3 m
    "room_size": (5.0, 2.6, 4.0),  # room extent x, y (up), z in metres; the floor is at y = 0
    "query_offset_m": 0.08,  # std of the query position perturbation
    "query_rotation_deg": 3.0,  # std of the query yaw/pitch/roll perturbation
    "jpeg_quality": 92,  # keyframe and query JPEG quality
    "image_noise": 2.0,  # std of additive sensor noise, grey levels
}

ProgressFn = Callable[[str, float], None]

_DEPTH_LIDAR_RANGE_M = 5.0  # beyond it ARKit confidence is low
_TIMESTAMP0_US = 1_700_000_000_000_000
_FRAME_INTERVAL_US = 333_330
_ZIP_DATE = (2023, 11, 14, 22, 13, 20)  # the first keyframe's timestamp, UTC


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


@dataclass(frozen=True)
class SynthOutput:
    """Where `generate` wrote things."""

    zip_path: Path
    queries_json: Path
    foreign: list[Path]
    alignment: np.ndarray  # 4x4, ARKit world -> raw.glb frame
    num_keyframes: int
    num_queries: int


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


def _look(position: np.ndarray, yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera-to-world (OpenCV axes) at `position` looking along yaw (in the x-z plane) and pitch (up +), y up."""
    forward = np.array([np.cos(pitch) * np.cos(yaw), np.sin(pitch), np.cos(pitch) * np.sin(yaw)])
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1) @ Rotation.from_euler("z", roll).as_matrix()
    pose[:3, 3] = position
    return pose


def _trajectory(phase: float, size: tuple[float, float, float]) -> tuple[np.ndarray, float, float, float]:
    """Smooth loop in the middle of the room looking outwards at the walls; phase in [0, 1)."""
    theta = 2 * np.pi * phase
    position = np.array([0.2 * size[0] * np.cos(theta), 1.35 + 0.15 * np.sin(3 * theta),
                         0.18 * size[2] * np.sin(theta)])
    yaw = theta + 0.35 * np.sin(2 * theta)
    pitch = np.radians(-12.0 + 9.0 * np.sin(5 * theta))
    roll = np.radians(2.0 * np.sin(7 * theta))
    return position, yaw, pitch, roll


def _alignment(rng: np.random.Generator) -> np.ndarray:
    """A non-identity ARKit world -> raw.glb transform: a yaw about the gravity (y) axis and an offset."""
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("y", rng.uniform(20, 70), degrees=True).as_matrix()
    a[:3, 3] = [rng.uniform(-2, 2), rng.uniform(-0.3, 0.3), rng.uniform(-2, 2)]
    return a


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def _write(zf: zipfile.ZipFile, name: str, data: bytes | str) -> None:
    """Add a member with a fixed date and mode, so the same seed gives a byte-identical zip."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


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


def generate(out_zip: Path, conf: dict[str, Any] | None = None, progress: ProgressFn | None = None) -> SynthOutput:
    """Write the scan zip, and `queries.json`, `queries/`, `foreign/` in the zip's folder.

    `conf` overrides keys of DEFAULT_CONF (unknown keys are refused). progress(stage, fraction) is called as
    the work advances, with the fraction of the whole generation done.
    """
    unknown = set(conf or {}) - set(DEFAULT_CONF)
    if unknown:
        raise ValueError(f"unknown synth conf keys {sorted(unknown)}; known: {sorted(DEFAULT_CONF)}")
    c = {**DEFAULT_CONF, **(conf or {})}
    if c["num_keyframes"] < 2 or c["num_queries"] < 0 or c["num_foreign"] < 0:
        raise ValueError(f"need >= 2 keyframes and >= 0 queries/foreign views, got {c['num_keyframes']}, "
                         f"{c['num_queries']}, {c['num_foreign']}")
    out_zip = Path(out_zip)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([c["seed"], 1])
    # Progress in units of one rendered view; a room's textures cost about as much as 4 views.
    total = c["num_keyframes"] + c["num_queries"] + c["num_foreign"] + 4 + (4 if c["num_foreign"] else 0)
    done = [0]

    def step(stage: str, units: int = 1) -> None:
        done[0] += units
        if progress is not None:
            progress(stage, done[0] / total)

    if progress is not None:
        progress("textures", 0.0)
    room = Room(c["seed"], c["room_size"], c["texels_per_metre"])
    step("textures", 4)
    alignment = _alignment(rng)
    _write_scan(out_zip, room, alignment, c, rng, step)
    queries_json = _write_queries(out_zip.parent, room, c, rng, step)
    foreign = []
    if c["num_foreign"]:
        other = Room(c["seed"], (4.2, 2.5, 3.4), c["texels_per_metre"], variant=1)
        step("foreign", 4)
        foreign = _write_foreign(out_zip.parent, other, c, rng, step)
    return SynthOutput(out_zip, queries_json, foreign, alignment, c["num_keyframes"], c["num_queries"])


def _write_scan(out_zip: Path, room: Room, alignment: np.ndarray, c: dict[str, Any], rng: np.random.Generator,
                step: Callable[[str], None]) -> None:
    """The Polycam zip: keyframes (image, camera JSON, depth, confidence), raw.glb, mesh_info.json, thumbnail."""
    stem = out_zip.stem if out_zip.stem.endswith("-poly") else f"{out_zip.stem}-poly"
    width, height, n_kf = int(c["width"]), int(c["height"]), c["num_keyframes"]
    with zipfile.ZipFile(out_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(n_kf):
            camera = Camera(width, height, fx=c["focal"] + rng.normal(0, 0.8), fy=c["focal"] + rng.normal(0, 0.8),
                            cx=width / 2 + rng.normal(0, 1.0), cy=height / 2 + rng.normal(0, 1.0))
            view = View(camera, pose=_look(*_trajectory(k / n_kf, room.size)))
            image = room.render(view, width, height, rng, c["image_noise"])
            depth_mm, confidence = room.depth(view, width, height, int(c["depth_downscale"]))
            timestamp = _TIMESTAMP0_US + k * _FRAME_INTERVAL_US
            blur = float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())
            record = _camera_json(view, alignment, width, height, timestamp, blur)
            _write(zf, f"{stem}/keyframes/images/{timestamp}.jpg", _jpeg(image, c["jpeg_quality"]))
            _write(zf, f"{stem}/keyframes/cameras/{timestamp}.json", json.dumps(record, indent=1))
            _write(zf, f"{stem}/keyframes/depth/{timestamp}.png", _png(depth_mm))
            _write(zf, f"{stem}/keyframes/confidence/{timestamp}.png", _png(confidence))
            if k == 0:
                thumbnail = cv2.resize(image, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
                _write(zf, f"{stem}/thumbnail.jpg", _jpeg(thumbnail, 85))
            step("keyframes")
        mesh = room.mesh()  # built in the raw.glb frame already
        _write(zf, f"{stem}/raw.glb", mesh.export(file_type="glb"))
        _write(zf, f"{stem}/mesh_info.json", json.dumps({
            "alignmentTransform": [float(x) for x in alignment.T.ravel()],  # column-major, as Polycam
            "vertexCount": len(mesh.vertices), "faceCount": len(mesh.faces),
        }))


def _write_queries(out_dir: Path, room: Room, c: dict[str, Any], rng: np.random.Generator,
                   step: Callable[[str], None]) -> Path:
    """Query JPEGs half-way between keyframes, perturbed off the trajectory, and their ground truth."""
    width, height, n_kf, n_q = int(c["width"]), int(c["height"]), c["num_keyframes"], c["num_queries"]
    fq = float(c["query_focal"])
    (out_dir / "queries").mkdir(exist_ok=True)
    queries: list[QueryEntry] = []
    for j in range(n_q):
        phase = (int(j * n_kf / max(n_q, 1)) + 0.5) / n_kf
        position, yaw, pitch, roll = _trajectory(phase, room.size)
        position = position + rng.normal(0, c["query_offset_m"], 3)
        yaw, pitch, roll = np.array([yaw, pitch, roll]) + np.radians(rng.normal(0, c["query_rotation_deg"], 3))
        view = View(Camera(width, height, fq, fq, width / 2, height / 2), _look(position, yaw, pitch, roll))
        image = room.render(view, width, height, rng, c["image_noise"])
        name = f"queries/{_TIMESTAMP0_US + int(phase * n_kf * _FRAME_INTERVAL_US)}.jpg"
        (out_dir / name).write_bytes(_jpeg(image, c["jpeg_quality"]))
        quat, trans = pose_to_quat_trans(view.pose)
        queries.append(QueryEntry(
            image=name, width=width, height=height, intrinsics=view.camera.matrix.tolist(), distortion=[],
            quaternion=quat, translation=trans,
        ))
        step("queries")
    return write_queries(out_dir / "queries.json", queries)


def _write_foreign(out_dir: Path, other: Room, c: dict[str, Any], rng: np.random.Generator,
                   step: Callable[[str], None]) -> list[Path]:
    """Views of another room, taken with the query camera: a localizer must refuse them."""
    width, height, fq = int(c["width"]), int(c["height"]), float(c["query_focal"])
    (out_dir / "foreign").mkdir(exist_ok=True)
    paths = []
    for i in range(c["num_foreign"]):
        pose = _look(*_trajectory((i + 0.3) / c["num_foreign"], other.size))
        view = View(Camera(width, height, fq, fq, width / 2, height / 2), pose)
        path = out_dir / "foreign" / f"room-{i + 1}.jpg"
        path.write_bytes(_jpeg(other.render(view, width, height, rng, c["image_noise"]), c["jpeg_quality"]))
        paths.append(path)
        step("foreign")
    return paths

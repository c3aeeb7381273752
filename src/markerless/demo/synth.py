"""Synthetic Polycam "raw data" scan of a textured room, with ground-truth query views, made on the CPU.

Why: the demo and the tests need a scan whose every pose is known exactly, that needs nothing downloaded, and that
SIFT can localize against. The room (`markerless.demo.room`) is rendered along a loop of keyframes and written as
a Polycam export (`markerless.demo.polycam_export`); query views are taken near the loop and written as a queries
file (`markerless.scene.queries`).

The scene is built axis-aligned in the raw.glb frame, as Polycam's mesh is; the ARKit world differs from it by the
alignmentTransform A (a yaw and an offset, ARKit world -> raw.glb frame). The intrinsics written out (camera JSONs
and query K) are in COLMAP's pixel convention (centre at 0.5, 0.5), the one Polycam files and SceneScape's pycolmap
calls use.

Output layout (as `kitchen` in the shared data): `OUT.zip` holding `<stem>-poly/...`, and next to it
`queries.json` (camera-to-world in the raw.glb frame, OpenCV axes, quaternion xyzw), `queries/<ts>.jpg` and
`foreign/room-<i>.jpg` (views of a differently textured room that must fail localization).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from markerless.demo.polycam_export import PolycamZip, encode_jpeg
from markerless.demo.room import Room, View
from markerless.scene.camera import Camera
from markerless.scene.geometry import pose_to_quat_trans
from markerless.scene.queries import QueryEntry, write_queries

ProgressFn = Callable[[str, float], None]

_TIMESTAMP0_US = 1_700_000_000_000_000
_FRAME_INTERVAL_US = 333_330


@dataclass(frozen=True)
class SynthConf:
    """What to synthesize; the same seed and conf give byte-identical output."""

    seed: int = 0  # RNG seed
    num_keyframes: int = 48  # keyframes on one loop around the room
    num_queries: int = 10  # query views, each between two keyframes and perturbed
    num_foreign: int = 2  # views of another room (must not localize)
    width: int = 640  # image width in pixels
    height: int = 480  # image height in pixels
    focal: float = 500.0  # nominal keyframe focal length in pixels (per-frame jitter added, as in real Polycam)
    query_focal: float = 520.0  # focal length of the fixed query camera
    depth_downscale: int = 4  # depth and confidence maps at 1/4 resolution, as ARKit LiDAR depth
    texels_per_metre: float = 220  # texture resolution: ~1 texel per pixel at 2.3 m
    room_size: tuple[float, float, float] = (5.0, 2.6, 4.0)  # extent x, y (up), z in metres; the floor at y = 0
    query_offset_m: float = 0.08  # std of the query position perturbation
    query_rotation_deg: float = 3.0  # std of the query yaw/pitch/roll perturbation
    jpeg_quality: int = 92  # keyframe and query JPEG quality
    image_noise: float = 2.0  # std of additive sensor noise, grey levels

    def __post_init__(self) -> None:
        if self.num_keyframes < 2 or self.num_queries < 0 or self.num_foreign < 0:
            raise ValueError(f"need >= 2 keyframes and >= 0 queries/foreign views, got {self.num_keyframes}, "
                             f"{self.num_queries}, {self.num_foreign}")

    @classmethod
    def from_dict(cls, overrides: Mapping[str, Any]) -> SynthConf:
        """The defaults with `overrides`; unknown keys are refused (ValueError naming them)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown synth conf keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**overrides)


@dataclass(frozen=True)
class SynthOutput:
    """Where `generate` wrote things."""

    zip_path: Path
    queries_json: Path
    foreign: list[Path]
    alignment: np.ndarray  # 4x4, ARKit world -> raw.glb frame
    num_keyframes: int
    num_queries: int


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


def generate(out_zip: Path, conf: SynthConf = SynthConf(), progress: ProgressFn | None = None) -> SynthOutput:
    """Write the scan zip, and `queries.json`, `queries/`, `foreign/` in the zip's folder.

    progress(stage, fraction) is called as the work advances, with the fraction of the whole generation done.
    """
    c = conf
    out_zip = Path(out_zip)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([c.seed, 1])
    # Progress in units of one rendered view; a room's textures cost about as much as 4 views.
    total = c.num_keyframes + c.num_queries + c.num_foreign + 4 + (4 if c.num_foreign else 0)
    done = [0]

    def step(stage: str, units: int = 1) -> None:
        done[0] += units
        if progress is not None:
            progress(stage, done[0] / total)

    if progress is not None:
        progress("textures", 0.0)
    room = Room(c.seed, c.room_size, c.texels_per_metre)
    step("textures", 4)
    alignment = _alignment(rng)
    _write_scan(out_zip, room, alignment, c, rng, step)
    queries_json = _write_queries(out_zip.parent, room, c, rng, step)
    foreign = []
    if c.num_foreign:
        other = Room(c.seed, (4.2, 2.5, 3.4), c.texels_per_metre, variant=1)
        step("foreign", 4)
        foreign = _write_foreign(out_zip.parent, other, c, rng, step)
    return SynthOutput(out_zip, queries_json, foreign, alignment, c.num_keyframes, c.num_queries)


def _write_scan(out_zip: Path, room: Room, alignment: np.ndarray, c: SynthConf, rng: np.random.Generator,
                step: Callable[[str], None]) -> None:
    """The keyframes along the loop, the thumbnail and the mesh, into the Polycam zip."""
    width, height, n_kf = c.width, c.height, c.num_keyframes
    with PolycamZip(out_zip, alignment) as export:
        for k in range(n_kf):
            camera = Camera(width, height, fx=c.focal + rng.normal(0, 0.8), fy=c.focal + rng.normal(0, 0.8),
                            cx=width / 2 + rng.normal(0, 1.0), cy=height / 2 + rng.normal(0, 1.0))
            view = View(camera, pose=_look(*_trajectory(k / n_kf, room.size)))
            image = room.render(view, width, height, rng, c.image_noise)
            depth_mm, confidence = room.depth(view, width, height, c.depth_downscale)
            export.add_keyframe(view, image, depth_mm, confidence, _TIMESTAMP0_US + k * _FRAME_INTERVAL_US,
                                c.jpeg_quality)
            if k == 0:
                export.add_thumbnail(image)
            step("keyframes")
        export.add_mesh(room.mesh())  # built in the raw.glb frame already


def _write_queries(out_dir: Path, room: Room, c: SynthConf, rng: np.random.Generator,
                   step: Callable[[str], None]) -> Path:
    """Query JPEGs half-way between keyframes, perturbed off the trajectory, and their ground truth."""
    width, height, n_kf, n_q = c.width, c.height, c.num_keyframes, c.num_queries
    fq = float(c.query_focal)
    (out_dir / "queries").mkdir(exist_ok=True)
    queries: list[QueryEntry] = []
    for j in range(n_q):
        phase = (int(j * n_kf / max(n_q, 1)) + 0.5) / n_kf
        position, yaw, pitch, roll = _trajectory(phase, room.size)
        position = position + rng.normal(0, c.query_offset_m, 3)
        yaw, pitch, roll = np.array([yaw, pitch, roll]) + np.radians(rng.normal(0, c.query_rotation_deg, 3))
        view = View(Camera(width, height, fq, fq, width / 2, height / 2), _look(position, yaw, pitch, roll))
        image = room.render(view, width, height, rng, c.image_noise)
        name = f"queries/{_TIMESTAMP0_US + int(phase * n_kf * _FRAME_INTERVAL_US)}.jpg"
        (out_dir / name).write_bytes(encode_jpeg(image, c.jpeg_quality))
        quat, trans = pose_to_quat_trans(view.pose)
        queries.append(QueryEntry(
            image=name, width=width, height=height, intrinsics=view.camera.matrix.tolist(), distortion=[],
            quaternion=quat, translation=trans,
        ))
        step("queries")
    return write_queries(out_dir / "queries.json", queries)


def _write_foreign(out_dir: Path, other: Room, c: SynthConf, rng: np.random.Generator,
                   step: Callable[[str], None]) -> list[Path]:
    """Views of another room, taken with the query camera: a localizer must refuse them."""
    width, height, fq = c.width, c.height, float(c.query_focal)
    (out_dir / "foreign").mkdir(exist_ok=True)
    paths = []
    for i in range(c.num_foreign):
        pose = _look(*_trajectory((i + 0.3) / c.num_foreign, other.size))
        view = View(Camera(width, height, fq, fq, width / 2, height / 2), pose)
        path = out_dir / "foreign" / f"room-{i + 1}.jpg"
        path.write_bytes(encode_jpeg(other.render(view, width, height, rng, c.image_noise), c.jpeg_quality))
        paths.append(path)
        step("foreign")
    return paths

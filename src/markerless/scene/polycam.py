"""Polycam "raw data" zip -> validated keyframes, written in the SceneScape layout (`markerless.scene.layout`).

Reads the export described in docs (Polycam format): per-frame intrinsics and ARKit camera-to-world poses,
`corrected_images` + `corrected_cameras` when both exist (globally optimised poses), LiDAR depth (mm, own
resolution) with confidence, `mesh_info.json` alignmentTransform and `raw.glb`. Poses are converted once here to
camera-to-world in the raw.glb frame with OpenCV axes. Everything is checked before anything is trusted
(`markerless.scene.archive` for the zip and the mesh): a bad upload raises `DatasetError` naming the member and
the problem.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from markerless.errors import DatasetError
from markerless.image_headers import ImageHeader, ImageHeaderError, read_image_header
from markerless.scene.archive import check_members, extract_glb, read_json_member, read_member, reject
from markerless.scene.camera import Camera
from markerless.scene.geometry import MeshRaycaster, arkit_to_scene_pose, is_rigid
from markerless.scene.layout import Keyframe, write_layout
from markerless.scene.limits import IngestLimits

POSE_KEYS = tuple(f"t_{i}{j}" for i in range(3) for j in range(4))
INTRINSIC_KEYS = ("fx", "fy", "cx", "cy", "width", "height")


@dataclass
class Ingested:
    """What `ingest` wrote, and the mesh it loaded to validate `raw.glb` (ray casting reuses it)."""

    keyframes: list[Keyframe]
    mesh: MeshRaycaster


def _find_root(zip_path: Path, names: set[str]) -> str:
    """The folder holding `keyframes/`: the single top-level folder, or the zip root (newer exports)."""
    prefixes = {n[: n.index("keyframes/")] for n in names if "keyframes/" in n}
    roots = sorted(p for p in prefixes if p == "" or (p.endswith("/") and p.count("/") == 1))
    if not roots:
        raise reject(zip_path, "", "no keyframes/ folder: not a Polycam raw-data export")
    if len(roots) > 1:
        raise reject(zip_path, "", f"several captures in one archive ({', '.join(r or '/' for r in roots)})")
    return roots[0]


def _number(zip_path: Path, member: str, data: dict, key: str) -> float:
    if key not in data:
        raise reject(zip_path, member, f"missing field '{key}'")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise reject(zip_path, member, f"field '{key}' must be a finite number, got {value!r}")
    return float(value)


def _stems(names: set[str], folder: str, ext: str) -> dict[str, str]:
    return {
        PurePosixPath(n).stem: n
        for n in names
        if n.startswith(folder) and n.lower().endswith(ext) and "/" not in n[len(folder) :]
    }


def read_alignment(zip_path: Path, zf: zipfile.ZipFile, member: str, limit: int) -> np.ndarray:
    """mesh_info.json alignmentTransform: 16 numbers, column-major -> 4x4 (ARKit world -> raw.glb frame)."""
    info = read_json_member(zip_path, zf, member, limit)
    values = info.get("alignmentTransform")
    if not isinstance(values, list) or len(values) != 16:
        raise reject(zip_path, member, "'alignmentTransform' must be a list of 16 numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise reject(zip_path, member, "'alignmentTransform' holds a non-finite or non-numeric value")
    matrix = np.asarray(values, dtype=float).reshape(4, 4).T
    if not is_rigid(matrix):
        raise reject(zip_path, member, "'alignmentTransform' is not a rigid transform")
    return matrix


def ingest(
    zip_path: Path,
    out_dir: Path,
    limits: IngestLimits = IngestLimits(),
    progress: Callable[[float], None] | None = None,
    on_keyframe: Callable[[Keyframe], None] | None = None,
) -> Ingested:
    """Validate a Polycam raw export and write its keyframes into `out_dir` in the SceneScape layout.

    `progress(fraction)` is called after each keyframe (a large scan takes a while to validate and decode), and
    `on_keyframe(keyframe)` once its files are written, so that work on it can start while the rest is ingested."""
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise DatasetError(f"{zip_path}: dataset file not found")
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{zip_path}: not a zip archive ({exc})") from exc
    with zf:
        infos = check_members(zip_path, zf, limits)
        names = {i.filename for i in infos if not i.is_dir()}
        root = _find_root(zip_path, names)
        kf = f"{root}keyframes/"
        use_corrected = any(n.startswith(kf + "corrected_images/") for n in names) and any(
            n.startswith(kf + "corrected_cameras/") for n in names
        )
        img_dir = kf + ("corrected_images/" if use_corrected else "images/")
        cam_dir = kf + ("corrected_cameras/" if use_corrected else "cameras/")
        images = _stems(names, img_dir, ".jpg")
        cameras = _stems(names, cam_dir, ".json")
        depths = _stems(names, kf + "depth/", ".png")
        confidences = _stems(names, kf + "confidence/", ".png")
        if not images:
            raise reject(zip_path, img_dir, "missing folder or no .jpg keyframe images")
        if not cameras:
            raise reject(zip_path, cam_dir, "missing folder or no camera .json files")
        if set(images) != set(cameras):
            only_img = sorted(set(images) - set(cameras))[:3]
            only_cam = sorted(set(cameras) - set(images))[:3]
            raise reject(
                zip_path,
                kf,
                f"image count mismatch: {len(images)} images vs {len(cameras)} cameras "
                f"(images without camera: {only_img}, cameras without image: {only_cam})",
            )
        if depths and not set(depths) <= set(images):
            extra = sorted(set(depths) - set(images))[:3]
            raise reject(zip_path, kf + "depth/", f"depth maps without a keyframe image: {extra}")
        if len(images) > limits.max_keyframes:
            raise reject(zip_path, img_dir, f"{len(images)} keyframes exceed the limit of {limits.max_keyframes}")
        mesh_member = root + "raw.glb"
        if mesh_member not in names:
            raise reject(zip_path, mesh_member, "missing mesh raw.glb")
        info_member = root + "mesh_info.json"
        if info_member not in names:
            raise reject(zip_path, info_member, "missing mesh_info.json (alignmentTransform)")
        alignment = read_alignment(zip_path, zf, info_member, limits.max_json_bytes)
        out_dir.mkdir(parents=True, exist_ok=True)
        extract_glb(zip_path, zf, mesh_member, out_dir / "raw.glb", limits)  # first: refuses a bomb in ms

        for sub in ("rgb", "depth", "confidence"):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        keyframes = []
        for stem in sorted(images):
            keyframes.append(
                _ingest_keyframe(zip_path, zf, stem, images[stem], cameras[stem], depths.get(stem),
                                 confidences.get(stem), alignment, out_dir, limits)
            )
            if on_keyframe is not None:
                on_keyframe(keyframes[-1])
            if progress is not None:
                progress(len(keyframes) / len(images))
        try:
            mesh = MeshRaycaster.from_glb(out_dir / "raw.glb")
        except DatasetError as exc:
            raise reject(zip_path, mesh_member, str(exc).split(": ", 1)[-1]) from exc
        (out_dir / "mesh_info.json").write_bytes(read_member(zip_path, zf, info_member, limits.max_json_bytes))
    write_layout(out_dir, keyframes)
    return Ingested(keyframes, mesh)


def _image_header(zip_path: Path, member: str, data: bytes, what: str) -> ImageHeader:
    try:
        return read_image_header(data)
    except ImageHeaderError as exc:
        raise reject(zip_path, member, f"{what} ({exc})") from exc


def _read_png(zip_path: Path, zf: zipfile.ZipFile, member: str, max_bytes: int, problem: str,
              header_fault: Callable[[ImageHeader], str | None],
              array_ok: Callable[[np.ndarray], bool]) -> tuple[bytes, np.ndarray]:
    """A depth or confidence PNG member, read and decoded. Its header is checked first (`header_fault`: what is
    wrong with it, or None) since it sizes the buffer decoding allocates; `problem` refuses any other PNG."""
    png = read_member(zip_path, zf, member, max_bytes)
    header = _image_header(zip_path, member, png, problem)
    fault = problem if header.format != "png" else header_fault(header)
    if fault is not None:
        raise reject(zip_path, member, fault)
    array = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or not array_ok(array):
        raise reject(zip_path, member, problem)
    return png, array


def _ingest_keyframe(
    zip_path: Path,
    zf: zipfile.ZipFile,
    stem: str,
    image_member: str,
    camera_member: str,
    depth_member: str | None,
    confidence_member: str | None,
    alignment: np.ndarray,
    out_dir: Path,
    limits: IngestLimits,
) -> Keyframe:
    cam = read_json_member(zip_path, zf, camera_member, limits.max_json_bytes)
    intr = {k: _number(zip_path, camera_member, cam, k) for k in INTRINSIC_KEYS}
    width, height = int(intr["width"]), int(intr["height"])
    if width <= 0 or height <= 0 or intr["fx"] <= 0 or intr["fy"] <= 0:
        raise reject(zip_path, camera_member, "width, height, fx and fy must be positive")
    if width * height > limits.max_image_pixels:
        raise reject(zip_path, camera_member, f"{width}x{height} exceeds the {limits.max_image_pixels}-pixel limit")
    values = [_number(zip_path, camera_member, cam, k) for k in POSE_KEYS]
    cam_to_arkit = np.eye(4)
    cam_to_arkit[:3] = np.asarray(values).reshape(3, 4)
    if not is_rigid(cam_to_arkit, tol=1e-2):
        raise reject(zip_path, camera_member, "t_00..t_23 is not a rigid camera-to-world transform")
    pose = arkit_to_scene_pose(cam_to_arkit, alignment)
    # Re-orthonormalise: ARKit/KinectFusion rotations are orthonormal only to ~1e-4.
    u, _, vt = np.linalg.svd(pose[:3, :3])
    pose[:3, :3] = u @ vt

    raw = read_member(zip_path, zf, image_member, limits.max_image_bytes)
    header = _image_header(zip_path, image_member, raw, "image does not decode as JPEG")
    if header.format != "jpeg":
        raise reject(zip_path, image_member, f"image does not decode as JPEG (it is a {header.format.upper()})")
    if (header.width, header.height) != (width, height):  # checked before decoding: the header sizes the buffer
        raise reject(zip_path, image_member,
                    f"image is {header.width}x{header.height} but its camera says {width}x{height}")
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise reject(zip_path, image_member, "image does not decode as JPEG")
    if image.shape[:2] != (height, width):
        raise reject(
            zip_path, image_member, f"image is {image.shape[1]}x{image.shape[0]} but its camera says {width}x{height}"
        )
    (out_dir / "rgb" / f"{stem}.jpg").write_bytes(raw)

    has_depth = False
    if depth_member is not None:
        depth_problem = "depth must be a single-channel 16-bit PNG (millimetres)"

        def depth_fault(header: ImageHeader) -> str | None:
            if (header.bit_depth, header.channels) != (16, 1):
                return depth_problem
            if header.pixels > width * height:
                return f"depth map of {header.width}x{header.height} is larger than its {width}x{height} image"
            return None

        depth_png, depth = _read_png(zip_path, zf, depth_member, limits.max_image_bytes, depth_problem, depth_fault,
                                     lambda array: array.ndim == 2 and array.dtype == np.uint16)
        (out_dir / "depth" / f"{stem}.png").write_bytes(depth_png)
        has_depth = True
        if confidence_member is not None:
            conf_problem = "confidence must be an 8-bit PNG of the depth map's size"
            conf_png, _ = _read_png(
                zip_path, zf, confidence_member, limits.max_image_bytes, conf_problem,
                lambda header: None if (header.width, header.height) == depth.shape[::-1] else conf_problem,
                lambda array: array.shape == depth.shape and array.dtype == np.uint8,
            )
            (out_dir / "confidence" / f"{stem}.png").write_bytes(conf_png)
    return Keyframe(
        name=f"rgb/{stem}.jpg",
        stem=stem,
        camera=Camera(width, height, intr["fx"], intr["fy"], intr["cx"], intr["cy"]),
        pose=tuple(float(v) for v in pose.ravel()),
        has_depth=has_depth,
    )

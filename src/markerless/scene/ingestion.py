"""Polycam "raw data" zip -> validated keyframes in the SceneScape dataset layout.

Reads the export described in docs (Polycam format): per-frame intrinsics and ARKit camera-to-world poses,
`corrected_images` + `corrected_cameras` when both exist (globally optimised poses), LiDAR depth (mm, own
resolution) with confidence, `mesh_info.json` alignmentTransform and `raw.glb`. Poses are converted once here to
camera-to-world in the raw.glb frame with OpenCV axes. Everything is checked before anything is trusted: a bad
upload raises `DatasetError` naming the member and the problem.

Output layout (SceneScape's, so tools that read it work): `rgb/<stem>.jpg`, `depth/<stem>.png`,
`confidence/<stem>.png`, `raw.glb`, `mesh_info.json`, `cameras.txt` (one PINHOLE camera per keyframe: Polycam
intrinsics differ per frame), `images.txt` (world-to-camera, quaternion xyzw as SceneScape writes it), plus
`keyframes.json`, the machine-readable record the rest of markerless reads.
"""

from __future__ import annotations

import json
import math
import shutil
import stat
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import cv2
import numpy as np

from markerless.errors import DatasetError
from markerless.image_headers import ImageHeader, ImageHeaderError, read_image_header
from markerless.scene.camera import Camera
from markerless.scene.geometry import MeshRaycaster, arkit_to_scene_pose, is_rigid, pose_to_quat_trans
from markerless.scene.limits import IngestLimits

GLB_MAGIC, GLB_VERSION = b"glTF", 2
GLB_JSON_CHUNK = b"JSON"
GLTF_TRIANGLE_MODES = (4, 5, 6)  # triangles, strip, fan (4 is the default)
POSE_KEYS = tuple(f"t_{i}{j}" for i in range(3) for j in range(4))
INTRINSIC_KEYS = ("fx", "fy", "cx", "cy", "width", "height")


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


@dataclass
class Ingested:
    """What `ingest` wrote, and the mesh it loaded to validate `raw.glb` (ray casting reuses it)."""

    keyframes: list[Keyframe]
    mesh: MeshRaycaster


def _fail(zip_path: Path, member: str, problem: str) -> DatasetError:
    where = f"{zip_path}:{member}" if member else str(zip_path)
    return DatasetError(f"{where}: {problem}")


def _check_members(zip_path: Path, zf: zipfile.ZipFile, limits: IngestLimits) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > limits.max_files:
        raise _fail(zip_path, "", f"{len(infos)} entries exceed the limit of {limits.max_files}")
    total = 0
    for info in infos:
        name = info.filename
        path = PurePosixPath(name)
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
            raise _fail(zip_path, name, "absolute or non-POSIX path in archive")
        if ".." in path.parts:
            raise _fail(zip_path, name, "path traversal ('..') in archive")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise _fail(zip_path, name, "symbolic link in archive")
        total += info.file_size
        if total > limits.max_uncompressed_bytes:
            raise _fail(
                zip_path, "", f"uncompressed size exceeds the limit of {limits.max_uncompressed_bytes} bytes"
            )
    return infos


def _find_root(zip_path: Path, names: set[str]) -> str:
    """The folder holding `keyframes/`: the single top-level folder, or the zip root (newer exports)."""
    prefixes = {n[: n.index("keyframes/")] for n in names if "keyframes/" in n}
    roots = sorted(p for p in prefixes if p == "" or (p.endswith("/") and p.count("/") == 1))
    if not roots:
        raise _fail(zip_path, "", "no keyframes/ folder: not a Polycam raw-data export")
    if len(roots) > 1:
        raise _fail(zip_path, "", f"several captures in one archive ({', '.join(r or '/' for r in roots)})")
    return roots[0]


_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError)


def _check_size(zip_path: Path, zf: zipfile.ZipFile, member: str, limit: int) -> int:
    """The member's declared uncompressed size, refused above `limit` before a byte is inflated."""
    size = zf.getinfo(member).file_size
    if size > limit:
        raise _fail(zip_path, member, f"declares {size} bytes, over the limit of {limit} for this kind of file")
    return size


def _read(zip_path: Path, zf: zipfile.ZipFile, member: str, limit: int) -> bytes:
    """A member's bytes, at most `limit` of them; a corrupt entry (bad CRC, truncated or undecompressable data) is a
    DatasetError."""
    _check_size(zip_path, zf, member, limit)
    try:
        return zf.read(member)
    except _CORRUPT as exc:
        raise _fail(zip_path, member, f"corrupt archive entry ({exc})") from exc


def _copy(zip_path: Path, source: IO[bytes], member: str, dest: IO[bytes]) -> None:
    """Stream the rest of an open member to `dest` in 1 MiB chunks (never whole in memory)."""
    try:
        shutil.copyfileobj(source, dest, 2**20)
    except _CORRUPT as exc:
        raise _fail(zip_path, member, f"corrupt archive entry ({exc})") from exc


def _read_json(zip_path: Path, zf: zipfile.ZipFile, member: str, limit: int) -> dict:
    raw = _read(zip_path, zf, member, limit)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(zip_path, member, f"unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _fail(zip_path, member, "JSON must be an object")
    return data


def _number(zip_path: Path, member: str, data: dict, key: str) -> float:
    if key not in data:
        raise _fail(zip_path, member, f"missing field '{key}'")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(zip_path, member, f"field '{key}' must be a finite number, got {value!r}")
    return float(value)


def _stems(names: set[str], folder: str, ext: str) -> dict[str, str]:
    return {
        PurePosixPath(n).stem: n
        for n in names
        if n.startswith(folder) and n.lower().endswith(ext) and "/" not in n[len(folder) :]
    }


def read_alignment(zip_path: Path, zf: zipfile.ZipFile, member: str, limit: int) -> np.ndarray:
    """mesh_info.json alignmentTransform: 16 numbers, column-major -> 4x4 (ARKit world -> raw.glb frame)."""
    info = _read_json(zip_path, zf, member, limit)
    values = info.get("alignmentTransform")
    if not isinstance(values, list) or len(values) != 16:
        raise _fail(zip_path, member, "'alignmentTransform' must be a list of 16 numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise _fail(zip_path, member, "'alignmentTransform' holds a non-finite or non-numeric value")
    matrix = np.asarray(values, dtype=float).reshape(4, 4).T
    if not is_rigid(matrix):
        raise _fail(zip_path, member, "'alignmentTransform' is not a rigid transform")
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
        infos = _check_members(zip_path, zf, limits)
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
            raise _fail(zip_path, img_dir, "missing folder or no .jpg keyframe images")
        if not cameras:
            raise _fail(zip_path, cam_dir, "missing folder or no camera .json files")
        if set(images) != set(cameras):
            only_img = sorted(set(images) - set(cameras))[:3]
            only_cam = sorted(set(cameras) - set(images))[:3]
            raise _fail(
                zip_path,
                kf,
                f"image count mismatch: {len(images)} images vs {len(cameras)} cameras "
                f"(images without camera: {only_img}, cameras without image: {only_cam})",
            )
        if depths and not set(depths) <= set(images):
            extra = sorted(set(depths) - set(images))[:3]
            raise _fail(zip_path, kf + "depth/", f"depth maps without a keyframe image: {extra}")
        if len(images) > limits.max_keyframes:
            raise _fail(zip_path, img_dir, f"{len(images)} keyframes exceed the limit of {limits.max_keyframes}")
        mesh_member = root + "raw.glb"
        if mesh_member not in names:
            raise _fail(zip_path, mesh_member, "missing mesh raw.glb")
        info_member = root + "mesh_info.json"
        if info_member not in names:
            raise _fail(zip_path, info_member, "missing mesh_info.json (alignmentTransform)")
        alignment = read_alignment(zip_path, zf, info_member, limits.max_json_bytes)
        out_dir.mkdir(parents=True, exist_ok=True)
        _extract_mesh(zip_path, zf, mesh_member, out_dir / "raw.glb", limits)  # first: refuses a bomb in ms

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
            raise _fail(zip_path, mesh_member, str(exc).split(": ", 1)[-1]) from exc
        (out_dir / "mesh_info.json").write_bytes(_read(zip_path, zf, info_member, limits.max_json_bytes))
    write_layout(out_dir, keyframes)
    return Ingested(keyframes, mesh)


def _extract_mesh(zip_path: Path, zf: zipfile.ZipFile, member: str, dest: Path, limits: IngestLimits) -> None:
    """Stream raw.glb to `dest` once what it declares fits the limits: its size in the zip, its 12-byte GLB
    header (magic, version 2, total length equal to that size), its JSON chunk, and the triangle and vertex counts
    of its meshes. Only the header and the JSON chunk are held in memory."""
    size = _check_size(zip_path, zf, member, limits.max_mesh_bytes)
    try:
        with zf.open(member) as source:
            head = source.read(20)  # GLB header + the first chunk's header
            if len(head) < 20:
                raise _fail(zip_path, member, f"not a readable glTF mesh ({len(head)} bytes: no GLB header)")
            magic, version, length, json_length, json_type = struct.unpack("<4sIII4s", head)
            if magic != GLB_MAGIC or version != GLB_VERSION:
                raise _fail(zip_path, member, f"not a readable glTF mesh (no binary glTF 2.0 header: {head[:8]!r})")
            if length != size:
                raise _fail(zip_path, member, f"GLB header declares {length} bytes but the file holds {size}")
            if json_type != GLB_JSON_CHUNK or json_length > size - 20:
                raise _fail(zip_path, member, "not a readable glTF mesh (the first chunk must be its JSON)")
            if json_length > limits.max_mesh_json_bytes:
                raise _fail(zip_path, member, f"GLB JSON chunk of {json_length} bytes exceeds the limit of "
                                              f"{limits.max_mesh_json_bytes}")
            json_chunk = source.read(json_length)
            try:
                gltf = json.loads(json_chunk)
            except (ValueError, UnicodeDecodeError) as exc:
                raise _fail(zip_path, member, f"not a readable glTF mesh (JSON chunk: {exc})") from exc
            triangles, vertices = _mesh_counts(zip_path, member, gltf)
            external = _external_uris(gltf)
            if external:  # trimesh would read them from disk, relative to the staging dir
                raise _fail(zip_path, member, f"mesh refers to external files {external[:3]}; a GLB must embed them")
            if triangles > limits.max_mesh_triangles or vertices > limits.max_mesh_vertices:
                raise _fail(zip_path, member,
                            f"mesh declares {triangles} triangles and {vertices} vertices, over the limits of "
                            f"{limits.max_mesh_triangles} and {limits.max_mesh_vertices}")
            with open(dest, "wb") as out:
                out.write(head + json_chunk)
                _copy(zip_path, source, member, out)
    except _CORRUPT as exc:
        raise _fail(zip_path, member, f"corrupt archive entry ({exc})") from exc


def _mesh_counts(zip_path: Path, member: str, gltf: Any) -> tuple[int, int]:
    """(triangles, vertices) the glTF's meshes declare, each mesh counted once per node that places it (trimesh
    loads every placement as its own copy)."""
    try:
        accessors = gltf.get("accessors", [])
        placements = Counter(n["mesh"] for n in gltf.get("nodes", []) if "mesh" in n)

        def count(index: int) -> int:
            value = accessors[index]["count"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"accessor {index} has count {value!r}")
            return value

        triangles = vertices = 0
        for m, mesh in enumerate(gltf.get("meshes", [])):
            copies = max(placements.get(m, 0), 1)
            for primitive in mesh["primitives"]:
                n_vertices = count(primitive["attributes"]["POSITION"])
                vertices += copies * n_vertices
                if primitive.get("mode", 4) in GLTF_TRIANGLE_MODES:
                    n_indices = count(primitive["indices"]) if "indices" in primitive else n_vertices
                    triangles += copies * n_indices // 3
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise _fail(zip_path, member, f"not a readable glTF mesh (malformed JSON chunk: {exc!r})") from exc
    return triangles, vertices


def _external_uris(gltf: dict) -> list[str]:
    """URIs of buffers and images that are not embedded (`data:`): an uploaded mesh may not name other files.
    Malformed lists are left to the glTF loader, which refuses them."""
    items = [item for key in ("buffers", "images") if isinstance(gltf.get(key), list) for item in gltf[key]]
    return [
        str(item["uri"])
        for item in items
        if isinstance(item, dict) and "uri" in item and not str(item["uri"]).startswith("data:")
    ]


def _image_header(zip_path: Path, member: str, data: bytes, what: str) -> ImageHeader:
    try:
        return read_image_header(data)
    except ImageHeaderError as exc:
        raise _fail(zip_path, member, f"{what} ({exc})") from exc


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
    cam = _read_json(zip_path, zf, camera_member, limits.max_json_bytes)
    intr = {k: _number(zip_path, camera_member, cam, k) for k in INTRINSIC_KEYS}
    width, height = int(intr["width"]), int(intr["height"])
    if width <= 0 or height <= 0 or intr["fx"] <= 0 or intr["fy"] <= 0:
        raise _fail(zip_path, camera_member, "width, height, fx and fy must be positive")
    if width * height > limits.max_image_pixels:
        raise _fail(zip_path, camera_member, f"{width}x{height} exceeds the {limits.max_image_pixels}-pixel limit")
    values = [_number(zip_path, camera_member, cam, k) for k in POSE_KEYS]
    cam_to_arkit = np.eye(4)
    cam_to_arkit[:3] = np.asarray(values).reshape(3, 4)
    if not is_rigid(cam_to_arkit, tol=1e-2):
        raise _fail(zip_path, camera_member, "t_00..t_23 is not a rigid camera-to-world transform")
    pose = arkit_to_scene_pose(cam_to_arkit, alignment)
    # Re-orthonormalise: ARKit/KinectFusion rotations are orthonormal only to ~1e-4.
    u, _, vt = np.linalg.svd(pose[:3, :3])
    pose[:3, :3] = u @ vt

    raw = _read(zip_path, zf, image_member, limits.max_image_bytes)
    header = _image_header(zip_path, image_member, raw, "image does not decode as JPEG")
    if header.format != "jpeg":
        raise _fail(zip_path, image_member, f"image does not decode as JPEG (it is a {header.format.upper()})")
    if (header.width, header.height) != (width, height):  # checked before decoding: the header sizes the buffer
        raise _fail(zip_path, image_member,
                    f"image is {header.width}x{header.height} but its camera says {width}x{height}")
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise _fail(zip_path, image_member, "image does not decode as JPEG")
    if image.shape[:2] != (height, width):
        raise _fail(
            zip_path, image_member, f"image is {image.shape[1]}x{image.shape[0]} but its camera says {width}x{height}"
        )
    (out_dir / "rgb" / f"{stem}.jpg").write_bytes(raw)

    has_depth = False
    if depth_member is not None:
        depth_png = _read(zip_path, zf, depth_member, limits.max_image_bytes)
        depth_problem = "depth must be a single-channel 16-bit PNG (millimetres)"
        depth_header = _image_header(zip_path, depth_member, depth_png, depth_problem)
        if (depth_header.format, depth_header.bit_depth, depth_header.channels) != ("png", 16, 1):
            raise _fail(zip_path, depth_member, depth_problem)
        if depth_header.pixels > width * height:
            raise _fail(zip_path, depth_member, f"depth map of {depth_header.width}x{depth_header.height} is larger "
                                                f"than its {width}x{height} image")
        depth = cv2.imdecode(np.frombuffer(depth_png, np.uint8), cv2.IMREAD_UNCHANGED)
        if depth is None or depth.ndim != 2 or depth.dtype != np.uint16:
            raise _fail(zip_path, depth_member, depth_problem)
        (out_dir / "depth" / f"{stem}.png").write_bytes(depth_png)
        has_depth = True
        if confidence_member is not None:
            conf_png = _read(zip_path, zf, confidence_member, limits.max_image_bytes)
            conf_problem = "confidence must be an 8-bit PNG of the depth map's size"
            conf_header = _image_header(zip_path, confidence_member, conf_png, conf_problem)
            if (conf_header.format, conf_header.width, conf_header.height) != ("png", *depth.shape[::-1]):
                raise _fail(zip_path, confidence_member, conf_problem)
            conf = cv2.imdecode(np.frombuffer(conf_png, np.uint8), cv2.IMREAD_UNCHANGED)
            if conf is None or conf.shape != depth.shape or conf.dtype != np.uint8:
                raise _fail(zip_path, confidence_member, conf_problem)
            (out_dir / "confidence" / f"{stem}.png").write_bytes(conf_png)
    return Keyframe(
        name=f"rgb/{stem}.jpg",
        stem=stem,
        camera=Camera(width, height, intr["fx"], intr["fy"], intr["cx"], intr["cy"]),
        pose=tuple(float(v) for v in pose.ravel()),
        has_depth=has_depth,
    )


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

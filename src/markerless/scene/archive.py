"""Zip and GLB safety: an uploaded archive and its mesh read within declared limits, or refused by name.

Every member is checked before it is trusted (paths, links, counts, sizes declared before a byte is inflated), and a
corrupt entry is a `DatasetError` naming the archive, the member and the problem. The GLB is streamed to disk only
once its header and JSON chunk declare what fits the limits; only those two are held in memory.
"""

from __future__ import annotations

import json
import shutil
import stat
import struct
import zipfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import IO, Any

from markerless.errors import DatasetError
from markerless.scene.limits import IngestLimits

GLB_MAGIC, GLB_VERSION = b"glTF", 2
GLB_JSON_CHUNK = b"JSON"
GLTF_TRIANGLE_MODES = (4, 5, 6)  # triangles, strip, fan (4 is the default)


def reject(zip_path: Path, member: str, problem: str) -> DatasetError:
    """`<zip>:<member>: <problem>` (the archive alone when `member` is empty)."""
    where = f"{zip_path}:{member}" if member else str(zip_path)
    return DatasetError(f"{where}: {problem}")


def check_members(zip_path: Path, zf: zipfile.ZipFile, limits: IngestLimits) -> list[zipfile.ZipInfo]:
    """The members, refused: too many, absolute or non-POSIX paths, '..', links, too large uncompressed."""
    infos = zf.infolist()
    if len(infos) > limits.max_files:
        raise reject(zip_path, "", f"{len(infos)} entries exceed the limit of {limits.max_files}")
    total = 0
    for info in infos:
        name = info.filename
        path = PurePosixPath(name)
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
            raise reject(zip_path, name, "absolute or non-POSIX path in archive")
        if ".." in path.parts:
            raise reject(zip_path, name, "path traversal ('..') in archive")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise reject(zip_path, name, "symbolic link in archive")
        total += info.file_size
        if total > limits.max_uncompressed_bytes:
            raise reject(
                zip_path, "", f"uncompressed size exceeds the limit of {limits.max_uncompressed_bytes} bytes"
            )
    return infos


CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError)


def check_size(zip_path: Path, zf: zipfile.ZipFile, member: str, limit: int) -> int:
    """The member's declared uncompressed size, refused above `limit` before a byte is inflated."""
    size = zf.getinfo(member).file_size
    if size > limit:
        raise reject(zip_path, member, f"declares {size} bytes, over the limit of {limit} for this kind of file")
    return size


def read_member(zip_path: Path, zf: zipfile.ZipFile, member: str, limit: int) -> bytes:
    """A member's bytes, at most `limit` of them; a corrupt entry (bad CRC, truncated or undecompressable data) is a
    DatasetError."""
    check_size(zip_path, zf, member, limit)
    try:
        return zf.read(member)
    except CORRUPT as exc:
        raise reject(zip_path, member, f"corrupt archive entry ({exc})") from exc


def copy_member(zip_path: Path, source: IO[bytes], member: str, dest: IO[bytes]) -> None:
    """Stream the rest of an open member to `dest` in 1 MiB chunks (never whole in memory)."""
    try:
        shutil.copyfileobj(source, dest, 2**20)
    except CORRUPT as exc:
        raise reject(zip_path, member, f"corrupt archive entry ({exc})") from exc


def read_json_member(zip_path: Path, zf: zipfile.ZipFile, member: str, limit: int) -> dict:
    """A member holding a JSON object."""
    raw = read_member(zip_path, zf, member, limit)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise reject(zip_path, member, f"unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise reject(zip_path, member, "JSON must be an object")
    return data


def extract_glb(zip_path: Path, zf: zipfile.ZipFile, member: str, dest: Path, limits: IngestLimits) -> None:
    """Stream raw.glb to `dest` once what it declares fits the limits: its size in the zip, its 12-byte GLB
    header (magic, version 2, total length equal to that size), its JSON chunk, and the triangle and vertex counts
    of its meshes. Only the header and the JSON chunk are held in memory."""
    size = check_size(zip_path, zf, member, limits.max_mesh_bytes)
    try:
        with zf.open(member) as source:
            head = source.read(20)  # GLB header + the first chunk's header
            if len(head) < 20:
                raise reject(zip_path, member, f"not a readable glTF mesh ({len(head)} bytes: no GLB header)")
            magic, version, length, json_length, json_type = struct.unpack("<4sIII4s", head)
            if magic != GLB_MAGIC or version != GLB_VERSION:
                raise reject(zip_path, member, f"not a readable glTF mesh (no binary glTF 2.0 header: {head[:8]!r})")
            if length != size:
                raise reject(zip_path, member, f"GLB header declares {length} bytes but the file holds {size}")
            if json_type != GLB_JSON_CHUNK or json_length > size - 20:
                raise reject(zip_path, member, "not a readable glTF mesh (the first chunk must be its JSON)")
            if json_length > limits.max_mesh_json_bytes:
                raise reject(zip_path, member, f"GLB JSON chunk of {json_length} bytes exceeds the limit of "
                                              f"{limits.max_mesh_json_bytes}")
            json_chunk = source.read(json_length)
            try:
                gltf = json.loads(json_chunk)
            except (ValueError, UnicodeDecodeError) as exc:
                raise reject(zip_path, member, f"not a readable glTF mesh (JSON chunk: {exc})") from exc
            triangles, vertices = _mesh_counts(zip_path, member, gltf)
            external = _external_uris(gltf)
            if external:  # trimesh would read them from disk, relative to the staging dir
                raise reject(zip_path, member, f"mesh refers to external files {external[:3]}; a GLB must embed them")
            if triangles > limits.max_mesh_triangles or vertices > limits.max_mesh_vertices:
                raise reject(zip_path, member,
                            f"mesh declares {triangles} triangles and {vertices} vertices, over the limits of "
                            f"{limits.max_mesh_triangles} and {limits.max_mesh_vertices}")
            with open(dest, "wb") as out:
                out.write(head + json_chunk)
                copy_member(zip_path, source, member, out)
    except CORRUPT as exc:
        raise reject(zip_path, member, f"corrupt archive entry ({exc})") from exc


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
        raise reject(zip_path, member, f"not a readable glTF mesh (malformed JSON chunk: {exc!r})") from exc
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

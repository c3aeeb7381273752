"""What an upload or a camera frame may declare: limits checked before its data is read. Light, so that settings
can import it."""

from __future__ import annotations

from dataclasses import dataclass, fields

# About 7300 x 5500: above any camera a site calibrates (8K UHD is 33 Mpx) and any scan's keyframe (Polycam:
# 1024 x 768); both a frame to localize and a keyframe a scan declares are refused above it.
MAX_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True)
class IngestLimits:
    """Refuse uploads that would exhaust disk, inodes or memory, from sizes declared before the data is read.

    The zip's central directory declares every member's size (Python's zipfile never inflates past it), and each
    file declares its own size in its header (image dimensions, a GLB's length and its mesh's accessor counts),
    so a bomb is refused after reading a few bytes. Members are read whole only under the per-kind byte limits;
    the mesh is streamed to disk, and loaded only once its declared triangle and vertex counts fit.
    """

    max_uncompressed_bytes: int = 16 * 2**30
    max_files: int = 100_000
    max_keyframes: int = 20_000
    max_json_bytes: int = 2**20  # a camera JSON or mesh_info.json (a few hundred bytes in real exports)
    max_image_bytes: int = 64 * 2**20  # one keyframe JPEG, depth or confidence PNG
    max_image_pixels: int = MAX_IMAGE_PIXELS  # declared keyframe size
    max_mesh_bytes: int = 2**30  # raw.glb (real Polycam meshes: up to a few hundred MB)
    max_mesh_json_bytes: int = 64 * 2**20  # the GLB's JSON chunk
    max_mesh_triangles: int = 10_000_000  # what trimesh and Embree hold in memory scales with these
    max_mesh_vertices: int = 10_000_000

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive")

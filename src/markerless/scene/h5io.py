"""HDF5 files in hloc's layouts, so scenes interoperate with hloc and SceneScape tooling.

- Local features (`feats-sift.h5`): one group per image, keyed by its path relative to the dataset root
  (`rgb/<stem>.jpg`, nested groups as h5py makes them), with `keypoints` (N, 2), `descriptors` (D, N) --
  transposed, as hloc stores them --, `scores` (N,), `scales` (N,), `oris` (N,) in degrees and `image_size`
  (2,) int64 (W, H). Keypoints use hloc's pixel convention and stay float32 (hloc's `as_half` would quantise them
  to 0.5 px at 640 px); descriptors are float16 as hloc writes them.
- Global descriptors (`global-feats-<name>.h5`): `global_descriptor` (D,) float16, `image_size`.
- Our addition (`points3d-<local>.h5`, same keys): `points3D` (N, 3) float32 in scene coordinates, NaN where the
  keypoint has no reliable 3D point.
Files are opened once per stage, not once per image (hloc's bottleneck, issues #193/#194).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np


def _walk(group: h5py.Group, prefix: str = "") -> Iterator[tuple[str, h5py.Group]]:
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            name = f"{prefix}{key}"
            if any(isinstance(v, h5py.Dataset) for v in item.values()):
                yield name, item
            yield from _walk(item, name + "/")


def write_local_features(path: Path, features: dict[str, dict[str, np.ndarray]]) -> None:
    """name -> {keypoints (N,2), descriptors (N,D), scales, oris (deg), image_size (W,H)}; hloc layout."""
    with h5py.File(path, "w", libver="latest") as fd:
        for name, feat in features.items():
            grp = fd.create_group(name)
            n = len(feat["keypoints"])
            grp.create_dataset("keypoints", data=feat["keypoints"].astype(np.float32))
            grp.create_dataset("descriptors", data=feat["descriptors"].T.astype(np.float16))
            grp.create_dataset("scores", data=np.zeros(n, dtype=np.float16))
            grp.create_dataset("scales", data=feat["scales"].astype(np.float16))
            grp.create_dataset("oris", data=feat["oris"].astype(np.float16))
            grp.create_dataset("image_size", data=np.asarray(feat["image_size"], dtype=np.int64))
            grp["keypoints"].attrs["uncertainty"] = 1.0  # DoG detection noise, as hloc records it


def read_local_features(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of write_local_features; also reads files written by hloc (any float dtype)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as fd:
        for name, grp in _walk(fd):
            out[name] = {
                "keypoints": grp["keypoints"][()].astype(np.float32),
                "descriptors": grp["descriptors"][()].T.astype(np.float32),
                "image_size": grp["image_size"][()],
            }
    return out


def write_global_descriptors(path: Path, descriptors: dict[str, np.ndarray], sizes: dict[str, tuple[int, int]]) -> None:
    with h5py.File(path, "w", libver="latest") as fd:
        for name, desc in descriptors.items():
            grp = fd.create_group(name)
            grp.create_dataset("global_descriptor", data=desc.astype(np.float16))
            grp.create_dataset("image_size", data=np.asarray(sizes[name], dtype=np.int64))


def read_global_descriptors(path: Path, names: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(names, (N, D) float32) in `names` order (default: sorted)."""
    with h5py.File(path, "r") as fd:
        groups = dict(_walk(fd))
        order = names if names is not None else sorted(groups)
        missing = [n for n in order if n not in groups]
        if missing:
            raise KeyError(f"{path}: no global descriptor for {missing[:3]}")
        desc = np.stack([groups[n]["global_descriptor"][()].astype(np.float32) for n in order])
    return list(order), desc


def write_points3d(path: Path, points: dict[str, np.ndarray]) -> None:
    with h5py.File(path, "w", libver="latest") as fd:
        for name, pts in points.items():
            fd.create_group(name).create_dataset("points3D", data=pts.astype(np.float32))


def read_points3d(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as fd:
        return {name: grp["points3D"][()] for name, grp in _walk(fd)}


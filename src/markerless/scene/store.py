"""The scene store: registered scene versions on disk, and a scene loaded into memory for localization.

Layout under the store root:

    <scene_id>/current -> versions/<version>     symlink, swapped atomically (rename) when a version completes
    <scene_id>/versions/<version>/               SceneScape dataset layout + hloc feature files + manifest.json
    <scene_id>/.staging-<version>/               a registration in progress
    <scene_id>/.lock-<version>                   flock held by the process writing that staging dir

`manifest.json` records the store format (`STORE_FORMAT`, the layout and meaning of the files this code writes)
and the scene's identity (every setting that shaped its stored data, computed by `pipeline.identity`): a version
of another format is refused on load with reason `scene_outdated`; a changed identity is the pipeline's to see.

A version directory is complete once `manifest.json` is written and `current` points at it, so a crash or kill
at any moment leaves the previous version serving. The previous version is kept (a scene loaded from it may
still be in use); older ones are deleted. Opening a store removes abandoned staging dirs: those whose lock no
process holds (the kernel releases it when its holder dies), so a CLI opening the store never deletes the
staging dir of a daemon registering in it. A failed first registration leaves no `<scene_id>/` behind.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from markerless.errors import MarkerlessError, Reason, SceneNotFoundError, SceneOutdatedError
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import DepthConfig, MeshRaycaster, lift_with_depth
from markerless.scene.h5io import read_global_descriptors, read_local_features, read_points3d
from markerless.scene.layout import Keyframe, load_depth, read_keyframes, read_rgb

SCENE_ID = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,254}$")
MANIFEST = "manifest.json"
KEEP_VERSIONS = 2
# Bump when the files of a version change layout or meaning. 2: the manifest records the scene's identity.
STORE_FORMAT = 2


def check_scene_id(scene_id: str) -> str:
    if not isinstance(scene_id, str) or not SCENE_ID.match(scene_id):
        raise MarkerlessError(
            f"invalid scene id {scene_id!r}: use 1-255 letters, digits, '-', '_' or '.', not starting with '.'",
            reason=Reason.BAD_SCENE_ID,
        )
    return scene_id


@dataclass(frozen=True)
class SceneInfo:
    """What the manifest of a registered scene version says."""

    scene_id: str
    version: str
    dataset_sha256: str
    config: SceneConfig
    use_depth: bool
    num_keyframes: int
    registered_at: str
    path: Path
    store_format: int
    identity: dict[str, Any]


class SceneStore:
    """Registered scenes under one root directory (files only; no models)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for staging in self.root.glob("*/.staging-*"):
            self._remove_abandoned(staging, staging.parent / f".lock-{staging.name.removeprefix('.staging-')}")
        for lock_file in self.root.glob("*/.lock-*"):  # a writer that died before it created its staging dir
            self._remove_abandoned(lock_file.parent / f".staging-{lock_file.name.removeprefix('.lock-')}", lock_file)
        for scene_dir in self.root.iterdir():
            if SCENE_ID.match(scene_dir.name):  # scene folders only, not .locks/ or .service/
                _remove_if_empty(scene_dir)

    @staticmethod
    def _remove_abandoned(staging: Path, lock_file: Path) -> None:
        """Remove a staging dir and its lock file unless a live process holds the lock."""
        try:
            lock = _try_lock(lock_file)
        except FileNotFoundError:  # its scene dir went away meanwhile
            return
        if lock is not None:
            shutil.rmtree(staging, ignore_errors=True)
            _release(lock, unlink=lock_file)

    def scene_ids(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/current") if (p / MANIFEST).exists())

    def info(self, scene_id: str) -> SceneInfo | None:
        current = self.root / check_scene_id(scene_id) / "current"
        try:
            data = json.loads((current / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return SceneInfo(
            scene_id=data["scene_id"],
            version=data["version"],
            dataset_sha256=data["dataset_sha256"],
            config=SceneConfig.model_validate(data["config"]),
            use_depth=data["use_depth"],
            num_keyframes=data["num_keyframes"],
            registered_at=data["registered_at"],
            path=current.resolve(),
            store_format=data.get("store_format", 1),  # manifests before format 2 did not say
            identity=data.get("identity", {}),
        )

    @contextmanager
    def staging(self, scene_id: str, version: str) -> Iterator[Path]:
        """A new staging dir for `version`, locked while the block runs. Whatever the block does not `commit` is
        removed on exit, and so is `<scene_id>/` if that leaves it empty (a failed first registration)."""
        scene_dir = self.root / check_scene_id(scene_id)
        lock_file = scene_dir / f".lock-{version}"
        for _ in range(3):  # another store may remove an empty scene dir between mkdir and open
            scene_dir.mkdir(parents=True, exist_ok=True)
            try:
                lock = _try_lock(lock_file)
                break
            except FileNotFoundError:
                continue
        else:
            raise MarkerlessError(f"scene {scene_id!r}: cannot create {lock_file}")
        if lock is None:
            raise MarkerlessError(f"scene {scene_id!r}: version {version} is already being written")
        path = scene_dir / f".staging-{version}"
        try:
            path.mkdir()
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            _release(lock, unlink=lock_file)
            _remove_if_empty(scene_dir)

    def commit(self, scene_id: str, staging: Path, manifest: dict) -> SceneInfo:
        """Write the manifest (stamped with `STORE_FORMAT`), move the staging dir into versions/ and swap `current`
        to it atomically."""
        (staging / MANIFEST).write_text(json.dumps({**manifest, "store_format": STORE_FORMAT}, indent=1))
        scene_dir = self.root / scene_id
        final = scene_dir / "versions" / manifest["version"]
        final.parent.mkdir(exist_ok=True)
        os.replace(staging, final)
        link_tmp = scene_dir / f".current-{manifest['version']}"
        link_tmp.symlink_to(Path("versions") / manifest["version"])
        os.replace(link_tmp, scene_dir / "current")
        versions = sorted(p for p in final.parent.iterdir() if p.is_dir())
        for old in versions[:-KEEP_VERSIONS]:
            shutil.rmtree(old, ignore_errors=True)
        info = self.info(scene_id)
        if info is None:
            raise MarkerlessError(f"scene {scene_id!r}: version {manifest['version']} vanished after commit")
        return info

    def load(self, scene_id: str) -> Scene:
        info = self.info(scene_id)
        if info is None:
            raise SceneNotFoundError(f"scene {scene_id!r} is not registered in {self.root}")
        if info.store_format != STORE_FORMAT:
            raise SceneOutdatedError(
                f"scene {scene_id!r} version {info.version} is in store format {info.store_format}; this markerless "
                f"reads format {STORE_FORMAT}: register the scene again"
            )
        return Scene(info)


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on `path` (created if absent), or None if another process
    holds it. Raises FileNotFoundError when the folder is gone."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _release(fd: int, unlink: Path | None = None) -> None:
    """Release a lock from `_try_lock`, unlinking its file first (while still held) when given."""
    if unlink is not None:
        unlink.unlink(missing_ok=True)
    os.close(fd)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (or already gone): nothing to do
        pass


class Scene:
    """A registered scene version held in memory: everything a query needs, read once.

    Every keyframe keypoint is kept, with or without a reliable 3D point (`has_point`): those without one can never
    yield a 2D-3D match, but they are what makes the ratio test meaningful (a repeated texture is ambiguous
    whether or not its other copies have depth).
    """

    def __init__(self, info: SceneInfo) -> None:
        self.info = info
        self.path = info.path
        self.keyframes: list[Keyframe] = read_keyframes(self.path)
        self.keyframe_names = [k.name for k in self.keyframes]
        # the scan's angular resolution: median keyframe focal length in pixels
        self.focal_px = float(np.median([math.sqrt(k.camera.fx * k.camera.fy) for k in self.keyframes]))
        self.config = info.config
        self.keypoints: list[np.ndarray] = []
        self.points3d: list[np.ndarray] = []
        self.descriptors: list[np.ndarray] = []
        self.has_point: list[np.ndarray] = []
        if not self.config.dense:
            feats = read_local_features(self.path / "feats-sift.h5")
            points = read_points3d(self.path / "points3d-sift.h5")
            for name in self.keyframe_names:
                self.keypoints.append(feats[name]["keypoints"])
                self.points3d.append(points[name].astype(np.float64))
                self.has_point.append(np.all(np.isfinite(points[name]), axis=1))
                self.descriptors.append(np.ascontiguousarray(feats[name]["descriptors"]))
        self.global_name = self.config.global_feature
        _, self.global_descriptors = read_global_descriptors(
            self.path / f"global-feats-{self.global_name}.h5", self.keyframe_names
        )
        vocab = self.path / "vlad-vocabulary.npy"
        self.vocabulary = np.load(vocab) if vocab.exists() else None
        self._raycaster: MeshRaycaster | None = None
        self._depth: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._lock = threading.Lock()

    @property
    def scene_id(self) -> str:
        return self.info.scene_id

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def num_keyframes(self) -> int:
        return len(self.keyframes)


    def keyframe_image(self, i: int) -> np.ndarray:
        """HxWx3 uint8 RGB."""
        return read_rgb(self.path / self.keyframes[i].name)

    def keyframe_pose(self, i: int) -> np.ndarray:
        """Camera-to-world, scene (raw.glb) frame, OpenCV axes."""
        return self.keyframes[i].pose_matrix

    def raycaster(self) -> MeshRaycaster:
        with self._lock:
            if self._raycaster is None:
                self._raycaster = MeshRaycaster.from_glb(self.path / "raw.glb")
            return self._raycaster

    def depth(self, i: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Keyframe i's (depth in metres, confidence), read once and kept; None when unused or absent."""
        keyframe = self.keyframes[i]
        if not (self.info.use_depth and keyframe.has_depth):
            return None
        with self._lock:
            if i not in self._depth:
                self._depth[i] = load_depth(self.path, keyframe.stem)
            return self._depth[i]

    def lift(self, i: int, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """3D points (scene frame) of keyframe i's pixels (hloc convention): depth where reliable, else mesh."""
        return lift_keyframe(self.keyframes[i], pixels, self.depth(i), self.raycaster)


def lift_keyframe(
    keyframe: Keyframe,
    pixels: np.ndarray,
    depth: tuple[np.ndarray, np.ndarray | None] | None,
    raycaster: Callable[[], MeshRaycaster],
    depth_conf: DepthConfig = DepthConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """Depth lookup first (sensor depth is metric and needs no mesh), then mesh ray casting for the rest.

    `depth` is the keyframe's (depth in metres, confidence) or None to use the mesh only. `raycaster` returns
    the scene's MeshRaycaster; it is called only if some pixel needs the mesh.
    """
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
    points = np.full((len(pixels), 3), np.nan)
    valid = np.zeros(len(pixels), dtype=bool)
    pose, camera = keyframe.pose_matrix, keyframe.camera
    if depth is not None:
        points, valid = lift_with_depth(pixels, camera, pose, depth[0], depth[1], depth_conf)
    rest = ~valid
    if rest.any():
        mesh_points, mesh_valid = raycaster().lift(pixels[rest], camera, pose)
        idx = np.flatnonzero(rest)
        points[idx[mesh_valid]] = mesh_points[mesh_valid]
        valid[idx[mesh_valid]] = True
    points[~valid] = np.nan
    return points, valid

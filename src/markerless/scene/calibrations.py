"""Each camera's calibration on disk: one JSON file per camera under `<store root>/.calibrations/`.

Replicas share the store, so every change is a read-modify-write under an exclusive flock of that camera's lock
file (released by the kernel if the process dies): one writer per camera at a time, and a second replica's frame
is fused into what the first one wrote, never over it. A write goes to a temporary file, is fsynced and replaces
the old one with `os.replace`, so a reader (or a kill -9 mid-write) sees the old file or the new one, never half.
The records are plain JSON objects; their meaning belongs to `pipeline.calibration_watch`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

FOLDER = ".calibrations"
_MAX_NAME = 200  # quoted ids longer than this are hashed (file names are limited to 255 bytes)


class CalibrationStore:
    """The calibration records of a store root, by camera id."""

    def __init__(self, root: Path) -> None:
        self.folder = Path(root) / FOLDER

    def path(self, camera_id: str) -> Path:
        return self.folder / f"{_file_stem(camera_id)}.json"

    def read(self, camera_id: str) -> dict[str, Any] | None:
        """The camera's record, or None when it has none (or it cannot be read: logged by the caller)."""
        try:
            data = orjson.loads(self.path(camera_id).read_bytes())
        except FileNotFoundError:
            return None
        return data if isinstance(data, dict) else None

    def camera_ids(self) -> list[str]:
        """Every camera with a record (its id is stored in the record: hashed file names are not reversible)."""
        ids = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                data = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            if isinstance(data, dict) and isinstance(data.get("camera_id"), str):
                ids.append(data["camera_id"])
        return ids

    def records(self) -> Iterator[dict[str, Any]]:
        for camera_id in self.camera_ids():
            record = self.read(camera_id)
            if record is not None:
                yield record

    def update(self, camera_id: str,
               change: Callable[[dict[str, Any] | None], tuple[dict[str, Any] | None, Any]]) -> Any:
        """Under the camera's lock: `change(current record or None)` returns (new record or None to delete, value);
        the record is written atomically (or removed) before the lock is released; returns the value. Whatever
        `change` does while the lock is held (publishing, for one) is ordered with every other writer's."""
        with self._locked(camera_id):
            current = self.read(camera_id)
            new, value = change(current)
            if new is None:
                if current is not None:
                    self.path(camera_id).unlink(missing_ok=True)
            elif new is not current:
                self._write(camera_id, new)
            return value

    def forget(self, camera_id: str) -> bool:
        """Remove the camera's record; True when there was one."""
        return bool(self.update(camera_id, lambda current: (None, current is not None)))

    @contextmanager
    def _locked(self, camera_id: str) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / f"{_file_stem(camera_id)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _write(self, camera_id: str, record: dict[str, Any]) -> None:
        path = self.path(camera_id)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _file_stem(camera_id: str) -> str:
    """A file name for any camera id (ids may hold any printable character but / # +): percent-quoted, or its
    SHA-256 when that is too long. A leading dot is quoted too, so no id names a hidden or special file."""
    stem = quote(camera_id, safe="")
    if stem.startswith("."):
        stem = "%2E" + stem[1:]
    if len(stem) > _MAX_NAME:
        stem = "sha256-" + hashlib.sha256(camera_id.encode()).hexdigest()
    return stem


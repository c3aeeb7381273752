"""Pretrained weight files: the manifest, where files are looked for, and a safe download.

Weights are never downloaded while a request is served: `resolve` only looks, and fails with a message that
names the file, every directory searched and the command that fetches it. `fetch` is the one place that
downloads, for the CLI and for deployments that opt in. It streams into `<file>.part` (resumed with an HTTP
Range request after an interruption), checks size and SHA-256 against the manifest, renames atomically, and
holds an exclusive `flock` so that several processes or containers fetching at once (SceneScape's PR #98 race)
end with one good file.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.resources
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from markerless.errors import MarkerlessError, MissingWeightsError, Reason

logger = logging.getLogger(__name__)

ENV_WEIGHTS_DIR = "MARKERLESS_WEIGHTS_DIR"
ENV_MANIFEST = "MARKERLESS_WEIGHTS_MANIFEST"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/markerless/weights")
# Shipped as package data, so a wheel install finds it too.
DEFAULT_MANIFEST = Path(str(importlib.resources.files("markerless.models") / "weights.json"))
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WeightsEntry:
    """One pretrained file of the manifest; `sha256`/`size` are None when not pinned yet."""

    name: str
    file: str
    url: str
    sha256: str | None
    size: int | None
    licence: str
    description: str
    legacy_dirs: tuple[str, ...] = ()  # where hloc / SceneScape installs keep the same file

    def search_dirs(self, weights_dir: Path | None = None) -> list[Path]:
        """Directories looked in, in order: the configured weights directory, then the legacy locations."""
        dirs = [resolve_weights_dir(weights_dir)]
        for raw in self.legacy_dirs:
            expanded = os.path.expanduser(os.path.expandvars(raw))
            if "$" not in expanded and Path(expanded) not in dirs:  # unset variable: not a location
                dirs.append(Path(expanded))
        return dirs


def manifest_path() -> Path:
    """The manifest in use: `$MARKERLESS_WEIGHTS_MANIFEST` (a site mirror) or the repository's own."""
    return Path(os.environ.get(ENV_MANIFEST) or DEFAULT_MANIFEST)


def load_manifest(path: Path | None = None) -> dict[str, WeightsEntry]:
    """Parse the manifest (a few entries: read on every call, never cached, so edits apply at once)."""
    path = path or manifest_path()
    try:
        raw = json.loads(path.read_text())
        return {
            name: WeightsEntry(
                name=name,
                file=spec["file"],
                url=spec["url"],
                sha256=spec["sha256"],
                size=spec["size"],
                licence=spec["licence"],
                description=spec["description"],
                legacy_dirs=tuple(spec.get("legacy_dirs", ())),
            )
            for name, spec in raw["weights"].items()
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MarkerlessError(f"cannot read the weights manifest {path}: {exc!r}", reason=Reason.BAD_MANIFEST) from exc


def entry(name: str, manifest: dict[str, WeightsEntry] | None = None) -> WeightsEntry:
    """The manifest entry called `name`; an unknown name lists the known ones."""
    manifest = load_manifest() if manifest is None else manifest
    if name not in manifest:
        known = ", ".join(sorted(manifest)) or "none"
        raise MarkerlessError(
            f"unknown weights {name!r} (known in {manifest_path()}: {known})", reason=Reason.UNKNOWN_WEIGHTS
        )
    return manifest[name]


def resolve_weights_dir(explicit: Path | None = None) -> Path:
    """The weights directory: explicit argument > `$MARKERLESS_WEIGHTS_DIR` > `~/.cache/markerless/weights`."""
    chosen = explicit or os.environ.get(ENV_WEIGHTS_DIR) or DEFAULT_WEIGHTS_DIR
    return Path(chosen).expanduser()


weights_dir = resolve_weights_dir  # the public name of the API contract


def fetch_command(name: str) -> str:
    return f"markerless weights fetch {name}"


def resolve(name: str, weights_dir: Path | None = None) -> Path:
    """Path of an existing weights file, without downloading; raises `MissingWeightsError` naming the file,
    every directory searched and the fetch command."""
    spec = entry(name)
    dirs = spec.search_dirs(weights_dir)
    for directory in dirs:
        candidate = directory / spec.file
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(d) for d in dirs)
    raise MissingWeightsError(
        f"weights {name!r} missing: file {spec.file} not found in {looked}. "
        f"Fetch it with `{fetch_command(name)}` (it goes to {dirs[0]}; choose another directory with "
        f"--weights-dir or ${ENV_WEIGHTS_DIR}), or download {spec.url} yourself and save it as "
        f"{dirs[0] / spec.file} (under the name {spec.file}, whatever the download is called)."
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str, weights_dir: Path | None = None, url: str | None = None, progress: bool = True) -> Path:
    """Download `name` into the weights directory unless already there; returns its path.

    Safe to run concurrently: the second process waits for the lock, then finds the finished file.
    An unpinned entry (no SHA-256 in the manifest) is downloaded with a warning that prints its digest.
    """
    spec = entry(name)
    directory = resolve_weights_dir(weights_dir)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / spec.file
    lock_path = dest.with_name(dest.name + ".lock")
    with lock_path.open("a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, also if this process dies
        if dest.is_file():
            _check_existing(spec, dest)
            logger.info("%s already present at %s", name, dest)
            return dest
        part = dest.with_name(dest.name + ".part")
        digest = _download(spec, url or spec.url, part, progress)
        _verify(spec, part, digest)
        with part.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(part, dest)
    logger.info("%s saved to %s", name, dest)
    return dest


def _check_existing(spec: WeightsEntry, path: Path) -> None:
    """Refuse to vouch for a present file that contradicts the pin; never delete a user's file."""
    if spec.sha256 is None:
        return
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise MarkerlessError(
            f"{path} has SHA-256 {actual}, the manifest pins {spec.sha256} for {spec.name}: "
            f"delete it and run `{fetch_command(spec.name)}` again",
            reason=Reason.WEIGHTS_CHECKSUM_MISMATCH,
        )


def _download(spec: WeightsEntry, url: str, part: Path, progress: bool) -> str:
    """Stream `url` into `part`, resuming what is there; returns the SHA-256 of the whole file."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    if spec.size is not None and offset > spec.size:
        part.unlink()
        offset = 0
    digest = hashlib.sha256()
    if offset:
        with part.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            if offset and response.status != 206:  # server ignored the Range header: start over
                logger.info("%s: server does not resume, downloading from the start", url)
                offset, digest = 0, hashlib.sha256()
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else spec.size
            with (
                part.open("ab" if offset else "wb") as out,
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=spec.file, disable=not progress,
                     file=sys.stderr) as bar,
            ):
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the part is complete (verified next)
            return digest.hexdigest()
        message = f"download of {url} failed: HTTP {exc.code} {exc.reason}"
        raise MarkerlessError(message, reason=Reason.DOWNLOAD_FAILED) from exc
    except (urllib.error.URLError, OSError) as exc:
        kept = f"; {part.stat().st_size} bytes kept in {part}, run it again to resume" if part.is_file() else ""
        raise MarkerlessError(f"download of {url} failed: {exc}{kept}", reason=Reason.DOWNLOAD_FAILED) from exc
    return digest.hexdigest()


def _verify(spec: WeightsEntry, part: Path, digest: str) -> None:
    """Size and SHA-256 against the manifest; a mismatch deletes the part so a retry starts clean."""
    size = part.stat().st_size
    problems = []
    if spec.size is not None and size != spec.size:
        problems.append(f"size {size} bytes, expected {spec.size}")
    if spec.sha256 is not None and digest != spec.sha256:
        problems.append(f"SHA-256 {digest}, expected {spec.sha256}")
    if problems:
        part.unlink()
        raise MarkerlessError(
            f"downloaded {spec.file} for {spec.name} refused ({'; '.join(problems)}); the partial file was deleted",
            reason=Reason.WEIGHTS_CHECKSUM_MISMATCH,
        )
    if spec.sha256 is None:
        logger.warning(
            "%s is unpinned in %s: nothing to check it against. Got sha256=%s size=%d; "
            "record both in the manifest once you trust the file.",
            spec.name, manifest_path(), digest, size,
        )

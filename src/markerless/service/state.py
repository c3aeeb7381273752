"""What the service must remember across a crash: answered request ids and accepted registrations.

The broker redelivers a QoS 1 request that was not acknowledged (the daemon acknowledges only after its reply is
delivered), so after a kill -9 it may hand back a request that was answered just before the crash. `AnsweredLog`
keeps the last `keep` answered (camera, payload digest) pairs in an append-only JSON-lines file, compacted when
it doubles, so such a redelivery is acknowledged without a second reply. `RegistrationJournal` lists the
registrations accepted and not yet finished, so a restart can tell their requesters they were `interrupted`.

Files live in `<state_dir>/<client id>/` (one folder per replica). Writes are flushed, not fsynced: they survive
a killed process, which is the failure this guards against; a power loss can at worst cause a duplicate reply.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import orjson

log = logging.getLogger(__name__)

ANSWERED_FILE = "answered.jsonl"
REGISTRATIONS_FILE = "registrations.json"


def client_state_dir(root: Path, client_id: str) -> Path:
    """`root/<client id>`, the id made a safe folder name."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", client_id).lstrip(".") or "_"
    return Path(root) / safe


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class AnsweredLog:
    """The last `keep` answered (camera id, payload digest) pairs, persisted."""

    def __init__(self, folder: Path, keep: int = 4096) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._path = folder / ANSWERED_FILE
        self._keep = keep
        self._lock = threading.Lock()
        self._keys: OrderedDict[tuple[str, str], None] = OrderedDict()
        lines, torn = 0, False
        if self._path.exists():
            data = self._path.read_bytes()
            torn = not data.endswith(b"\n") and data != b""
            for line in data.splitlines():
                try:
                    camera, digest = orjson.loads(line)
                except (orjson.JSONDecodeError, ValueError, TypeError):
                    torn = True  # a line torn by a crash mid-write
                    continue
                self._remember((str(camera), str(digest)))
                lines += 1
        self._lines = lines
        self._file: IO[bytes] = open(self._path, "ab")  # noqa: SIM115 - closed in close()
        if torn or lines > 2 * keep:
            self._compact()  # rewritten clean: the next append must not continue a torn line

    def __contains__(self, key: tuple[str, str]) -> bool:
        with self._lock:
            return key in self._keys

    def add(self, key: tuple[str, str]) -> None:
        with self._lock:
            if key in self._keys:
                return
            self._remember(key)
            self._file.write(orjson.dumps(list(key)) + b"\n")
            self._file.flush()
            self._lines += 1
            if self._lines > 2 * self._keep:
                self._compact()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def _remember(self, key: tuple[str, str]) -> None:
        self._keys[key] = None
        while len(self._keys) > self._keep:
            self._keys.popitem(last=False)

    def _compact(self) -> None:
        self._file.close()
        _write_atomic(self._path, b"".join(orjson.dumps(list(k)) + b"\n" for k in self._keys))
        self._file = open(self._path, "ab")  # noqa: SIM115
        self._lines = len(self._keys)


@dataclass(frozen=True)
class JournalEntry:
    job_id: str
    scene_id: str
    request_id: str | None


class RegistrationJournal:
    """Registrations accepted and not yet given a terminal status, persisted on every change."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._path = folder / REGISTRATIONS_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, JournalEntry] = {}
        self.interrupted: list[JournalEntry] = []  # left by the previous run: it died before finishing them
        if self._path.exists():
            try:
                self.interrupted = [JournalEntry(**e) for e in orjson.loads(self._path.read_bytes())]
            except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                log.error("unreadable registration journal %s (%s): starting afresh", self._path, exc)
            self._entries = {e.job_id: e for e in self.interrupted}

    def add(self, entry: JournalEntry) -> None:
        with self._lock:
            self._entries[entry.job_id] = entry
            self._save()

    def remove(self, job_id: str) -> None:
        with self._lock:
            if self._entries.pop(job_id, None) is not None:
                self._save()

    def _save(self) -> None:
        _write_atomic(self._path, orjson.dumps([asdict(e) for e in self._entries.values()]))

"""Weights manifest, lookup and download: checksum and size pinning, resume with HTTP Range, concurrent fetches,
and the `markerless weights` commands.

Test double: downloads come from a local threaded HTTP server on 127.0.0.1 (Range support switchable, paced
writes so that concurrent fetches overlap) serving random bytes, described by a test manifest selected with
$MARKERLESS_WEIGHTS_MANIFEST; the real weight files are hundreds of MB on hosts this machine cannot reach.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from markerless.cli import main as cli_main
from markerless.errors import MarkerlessError, MissingWeightsError
from markerless.models import weights

PAYLOAD = bytes(range(256)) * 12_000 + b"tail"  # ~3 MB, several download chunks
OTHER = b"not the weights" * 1000


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    ranges: list[str | None]  # the Range header of every GET
    honour_range = True
    delay_s = 0.0  # pause per 64 KiB written


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if header and self.server.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", header)[1])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        for offset in range(start, len(data), 1 << 16):
            self.wfile.write(data[offset : offset + (1 << 16)])
            time.sleep(self.server.delay_s)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files = {"/good.bin": PAYLOAD, "/mirror/good.bin": PAYLOAD}
    srv.ranges = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def manifest(tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch) -> Path:
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def spec(file: str, path: str, sha256: str | None, size: int | None) -> dict[str, object]:
        return {"file": file, "url": base + path, "sha256": sha256, "size": size, "licence": "test",
                "description": "test payload", "legacy_dirs": ["$TEST_LEGACY_DIR"]}

    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"format": 1, "weights": {
        "good": spec("good.bin", "/good.bin", _sha(PAYLOAD), len(PAYLOAD)),
        "bad-sha": spec("bad-sha.bin", "/good.bin", _sha(OTHER), None),
        "bad-size": spec("bad-size.bin", "/good.bin", None, len(PAYLOAD) + 1),
        "unpinned": spec("unpinned.bin", "/good.bin", None, None),
        "gone": spec("gone.bin", "/gone.bin", None, None),
    }}))
    monkeypatch.setenv("MARKERLESS_WEIGHTS_MANIFEST", str(path))
    monkeypatch.delenv("MARKERLESS_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("TEST_LEGACY_DIR", raising=False)
    return path


def test_fetch_verifies_and_installs_once(manifest: Path, server: _Server, tmp_path: Path) -> None:
    target = tmp_path / "w"
    path = weights.fetch("good", target, progress=False)
    assert path == target / "good.bin" and path.read_bytes() == PAYLOAD
    assert not (target / "good.bin.part").exists()
    assert weights.resolve("good", target) == path
    assert weights.fetch("good", target, progress=False) == path
    assert server.ranges == [None]  # the second call found the verified file and downloaded nothing


@pytest.mark.parametrize(("name", "problem"), [("bad-sha", "SHA-256"), ("bad-size", "size")])
def test_mismatch_is_refused_and_the_part_deleted(manifest: Path, tmp_path: Path, name: str, problem: str) -> None:
    with pytest.raises(MarkerlessError, match=problem) as info:
        weights.fetch(name, tmp_path, progress=False)
    assert info.value.reason == "weights_checksum_mismatch"
    assert not (tmp_path / f"{name}.bin").exists() and not (tmp_path / f"{name}.bin.part").exists()


def test_present_file_contradicting_the_pin_is_reported_not_deleted(manifest: Path, tmp_path: Path) -> None:
    (tmp_path / "good.bin").write_bytes(OTHER)
    with pytest.raises(MarkerlessError, match="delete it") as info:
        weights.fetch("good", tmp_path, progress=False)
    assert info.value.reason == "weights_checksum_mismatch"
    assert (tmp_path / "good.bin").read_bytes() == OTHER


@pytest.mark.parametrize("honour_range", [True, False])
def test_resumes_a_partial_download(manifest: Path, server: _Server, tmp_path: Path, honour_range: bool) -> None:
    server.honour_range = honour_range
    done = 1_234_567
    (tmp_path / "good.bin.part").write_bytes(PAYLOAD[:done])
    path = weights.fetch("good", tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == [f"bytes={done}-"]  # asked for the rest; a server that ignores it resends everything


def test_corrupt_partial_fails_the_checksum_then_a_retry_succeeds(manifest: Path, tmp_path: Path) -> None:
    (tmp_path / "good.bin.part").write_bytes(b"\0" * 1000)
    with pytest.raises(MarkerlessError, match="SHA-256"):
        weights.fetch("good", tmp_path, progress=False)
    assert not (tmp_path / "good.bin.part").exists()
    assert weights.fetch("good", tmp_path, progress=False).read_bytes() == PAYLOAD


def test_concurrent_fetches_from_two_processes_download_once(
    manifest: Path, server: _Server, tmp_path: Path
) -> None:
    server.delay_s = 0.03  # ~1.4 s of download: the processes overlap
    target = tmp_path / "shared"
    code = "import sys; from markerless.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, "weights", "fetch", "good", "--weights-dir", str(target), "--no-progress"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    assert [out.strip() for out, _ in results] == [str(target / "good.bin")] * 2
    assert (target / "good.bin").read_bytes() == PAYLOAD
    assert server.ranges == [None]
    assert sorted(p.name for p in target.iterdir()) == ["good.bin", "good.bin.lock"]


def test_unpinned_download_says_so_and_prints_its_digest(
    manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="markerless.models.weights"):
        weights.fetch("unpinned", tmp_path, progress=False)
    assert "unpinned" in caplog.text and _sha(PAYLOAD) in caplog.text and str(len(PAYLOAD)) in caplog.text


def test_url_override_and_http_errors(manifest: Path, server: _Server, tmp_path: Path) -> None:
    with pytest.raises(MarkerlessError, match="404") as info:
        weights.fetch("gone", tmp_path, progress=False)
    assert info.value.reason == "download_failed" and "/gone.bin" in str(info.value)
    mirror = f"http://127.0.0.1:{server.server_address[1]}/mirror/good.bin"
    assert weights.fetch("good", tmp_path, url=mirror, progress=False).read_bytes() == PAYLOAD


def test_weights_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MARKERLESS_WEIGHTS_DIR", raising=False)
    assert weights.weights_dir(None) == tmp_path / "home" / ".cache" / "markerless" / "weights"
    monkeypatch.setenv("MARKERLESS_WEIGHTS_DIR", str(tmp_path / "env"))
    assert weights.weights_dir(None) == tmp_path / "env"
    assert weights.weights_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_resolve_searches_legacy_dirs_and_names_them(
    manifest: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    legacy = tmp_path / "scenescape"
    monkeypatch.setenv("TEST_LEGACY_DIR", str(legacy))
    with pytest.raises(MissingWeightsError) as info:
        weights.resolve("good", tmp_path / "w")
    assert f"{tmp_path / 'w'}, {legacy}" in str(info.value)
    legacy.mkdir()
    (legacy / "good.bin").write_bytes(PAYLOAD)
    assert weights.resolve("good", tmp_path / "w") == legacy / "good.bin"


def test_unknown_name_lists_the_known_ones(manifest: Path) -> None:
    with pytest.raises(MarkerlessError, match="known in .*: bad-sha, bad-size, gone, good, unpinned") as info:
        weights.resolve("nope")
    assert info.value.reason == "unknown_weights"


def test_cli_path(manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["weights", "path", "good", "--weights-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "good.bin" in err and str(tmp_path) in err and "`markerless weights fetch good`" in err
    (tmp_path / "good.bin").write_bytes(PAYLOAD)
    assert cli_main(["weights", "path", "good", "--weights-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "good.bin")


def test_cli_list(manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "good.bin").write_bytes(PAYLOAD)
    assert cli_main(["weights", "list", "--weights-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "FILE", "PRESENT", "SIZE", "SHA256"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert rows["good"] == ["good", "good.bin", str(tmp_path / "good.bin"), "3.1", "MB", _sha(PAYLOAD)[:12] + "…"]
    assert rows["unpinned"] == ["unpinned", "unpinned.bin", "no", "-", "unpinned"]
    assert rows["bad-size"][2:] == ["no", "(3.1", "MB)", "unpinned"]  # manifest size
    assert lines[-1] == f"weights directory: {tmp_path}"


def test_cli_fetch_reports_failures(manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["weights", "fetch", "bad-sha", "--weights-dir", str(tmp_path), "--no-progress"]) == 1
    assert "refused" in capsys.readouterr().err


def test_repository_manifest_lists_every_model() -> None:
    entries = weights.load_manifest(weights.DEFAULT_MANIFEST)
    assert {"netvlad-pitts30k", "qta-indoor", "qta-outdoor"} <= set(entries)
    netvlad = entries["netvlad-pitts30k"]
    assert netvlad.file == "VGG16-NetVLAD-Pitts30K.mat"
    assert netvlad.url == "https://cvg-data.inf.ethz.ch/hloc/netvlad/Pitts30K_struct.mat"
    for entry in entries.values():
        assert entry.url.startswith("https://") and entry.licence
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)

"""Uploads are refused from what they declare (zip sizes, file headers) before they are read: a 2 GiB mesh of
zeros through the real `markerless register`, and each declared size the ingestion checks."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from mqtt_fixtures import TOPICS, Broker, daemon_settings
from polycam_factory import polycam_members, write_zip

from markerless.errors import DatasetError
from markerless.scene.limits import IngestLimits
from markerless.scene.polycam import ingest
from markerless.service.scenes_file import ScenesFile

ROOT = "scan-poly/"
MESH = f"{ROOT}raw.glb"


def zip_with_streamed_member(path: Path, members: dict[str, bytes], name: str, size: int, head: bytes = b"") -> Path:
    """A deflated zip whose member `name` is `head` then zeros up to `size` bytes, written in 64 MiB chunks (the
    test never holds it in memory; the zip is ~1/1000 of it)."""
    chunk = bytes(64 * 2**20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for member, data in members.items():
            if member != name:
                zf.writestr(member, data)
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as out:
            out.write(head)
            left = size - len(head)
            while left > 0:
                out.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    return path


def register(scan: Path, store: Path) -> tuple[int, str, float]:
    """`markerless register` as a real process: exit code, stderr, its own peak RSS in MB (wait4 on that child)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKERLESS__")}
    proc = subprocess.Popen([sys.executable, "-m", "markerless.cli", "register", str(scan), "--scene", "bomb",
                             "--store", str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stderr, usage.ru_maxrss / 1024


@pytest.fixture(scope="module")
def glb_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Polycam zip whose raw.glb is 2 GiB of zeros (about 10 MB deflated)."""
    bomb = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    return zip_with_streamed_member(bomb, polycam_members(), MESH, 2 * 2**30)


def test_glb_of_2_gib_zeros_is_refused_by_register_without_reading_it(tmp_path: Path, glb_bomb: Path) -> None:
    bomb = glb_bomb
    assert bomb.stat().st_size < 20 * 2**20
    control = write_zip(tmp_path / "control.zip", {**polycam_members(), MESH: b"glTF not really"})

    code, stderr, bomb_rss = register(bomb, tmp_path / "store")
    _, control_err, control_rss = register(control, tmp_path / "store")
    print(f"peak RSS: GLB bomb {bomb_rss:.0f} MB, control {control_rss:.0f} MB")
    assert code == 1
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("markerless: registration failed (bad_dataset):"), stderr
    assert "raw.glb: declares 2147483648 bytes, over the limit of 1073741824" in lines[-1]
    assert "Traceback" not in stderr and "not a readable glTF mesh" in control_err
    assert bomb_rss - control_rss < 200, (bomb_rss, control_rss)
    assert not (tmp_path / "store" / "bomb").exists()  # a failed first registration leaves no scene folder


def test_glb_within_the_size_limit_is_checked_by_its_header_and_streamed(tmp_path: Path, glb_bomb: Path) -> None:
    """2 GiB of zeros under a raised size limit: refused from its first 12 bytes, in-process RSS untouched."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DatasetError, match=r"raw.glb: not a readable glTF mesh \(no binary glTF 2.0 header"):
        ingest(glb_bomb, tmp_path / "out", IngestLimits(max_mesh_bytes=4 * 2**30))
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200


def test_glb_bomb_registered_over_mqtt_is_refused_and_the_daemon_serves_on(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path, glb_bomb: Path
) -> None:
    """SceneScape's `register` command for a new scene whose upload is the bomb, through the real core: one error
    status naming the mesh, no scene folder left in the store, and the heartbeat still answered."""
    scenes = ScenesFile.model_validate({"scenes": {"bomb": {"dataset": str(glb_bomb)}}})
    store = tmp_path / "store"
    daemons(daemon_settings(broker, store, registration={"on_start": False}), None, scenes)
    op = clients(broker, "scenescape")
    op.connect()
    op.subscribe(TOPICS.register("bomb"), TOPICS.status)
    op.publish(TOPICS.register("bomb"), "register")
    done = op.wait_json(TOPICS.register("bomb"), lambda d: d.get("status") not in ("registering", "busy"),
                        "registration outcome")
    assert done["reason"] == "bad_dataset", done
    assert "raw.glb: declares 2147483648 bytes, over the limit" in done["status"], done
    assert not (store / "bomb").exists()
    op.publish(TOPICS.status, "isAlive")
    op.wait(lambda: b"running" in op.received(TOPICS.status), "heartbeat after the refused upload")


def test_the_service_applies_the_upload_limits_of_its_settings(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path
) -> None:
    """An operator lowers `registration.limits` in the settings: a scan over them is refused, naming the limit."""
    scan = write_zip(tmp_path / "scan.zip", polycam_members())  # 3 keyframes
    scenes = ScenesFile.model_validate({"scenes": {"small": {"dataset": str(scan)}}})
    store = tmp_path / "store"
    daemons(daemon_settings(broker, store, registration={"on_start": False, "limits": {"max_keyframes": 2}}), None,
            scenes)
    op = clients(broker, "scenescape")
    op.connect()
    op.subscribe(TOPICS.register("small"))
    op.publish(TOPICS.register("small"), "register")
    done = op.wait_json(TOPICS.register("small"), lambda d: d.get("status") not in ("registering", "busy"),
                        "registration outcome")
    assert done["reason"] == "bad_dataset" and "3 keyframes exceed the limit of 2" in done["status"], done
    assert not (store / "small").exists()


def _glb(json_part: dict | bytes, binary: bytes = b"", length: int | None = None) -> bytes:
    js = json_part if isinstance(json_part, bytes) else json.dumps(json_part).encode()
    js += b" " * (-len(js) % 4)
    body = struct.pack("<I4s", len(js), b"JSON") + js + struct.pack("<I4s", len(binary), b"BIN\x00") + binary
    return struct.pack("<4sII", b"glTF", 2, length if length is not None else 12 + len(body)) + body


def _triangles(n: int, copies: int = 1) -> dict:
    """glTF JSON of one indexed mesh of n triangles, placed `copies` times (no buffer data: never loaded)."""
    return {"asset": {"version": "2.0"}, "accessors": [{"count": 3 * n}, {"count": n + 2}],
            "meshes": [{"primitives": [{"attributes": {"POSITION": 1}, "indices": 0}]}],
            "nodes": [{"mesh": 0}] * copies}


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


TS = 1700000000000000
CASES = {
    "glb length lies": ({MESH: _glb(_triangles(1), length=999)}, IngestLimits(),
                        "GLB header declares 999 bytes but the file holds"),
    "glb first chunk not json": ({MESH: struct.pack("<4sII", b"glTF", 2, 28) + struct.pack("<I4s", 8, b"BIN\x00")
                                  + bytes(8)}, IngestLimits(), "the first chunk must be its JSON"),
    "glb json chunk over limit": ({MESH: _glb(_triangles(1) | {"pad": "x" * 5000})},
                                  IngestLimits(max_mesh_json_bytes=4096), "GLB JSON chunk of 5"),
    "glb too many triangles": ({MESH: _glb(_triangles(600, copies=2))}, IngestLimits(max_mesh_triangles=1000),
                               "mesh declares 1200 triangles and 1204 vertices, over the limits of 1000"),
    "glb too many vertices": ({MESH: _glb(_triangles(10))}, IngestLimits(max_mesh_vertices=11),
                              "mesh declares 10 triangles and 12 vertices"),
    "glb malformed json": ({MESH: _glb({"meshes": [{"primitives": [{"attributes": {}}]}]})}, IngestLimits(),
                           "malformed JSON chunk: KeyError('POSITION')"),
    "glb bad count": ({MESH: _glb(_triangles(1) | {"accessors": [{"count": "9"}, {"count": 3}]})}, IngestLimits(),
                      "accessor 0 has count '9'"),
    "glb external buffer": ({MESH: _glb(_triangles(1) | {"buffers": [{"uri": "../../../etc/passwd",
                                                                        "byteLength": 9}]})},
                            IngestLimits(), "mesh refers to external files ['../../../etc/passwd']"),
    "glb buffers not a list": ({MESH: _glb(_triangles(1) | {"buffers": 5})}, IngestLimits(),
                               "raw.glb: not a readable glTF mesh"),
    "mesh over byte limit": ({}, IngestLimits(max_mesh_bytes=100), "raw.glb: declares"),
    "camera json over limit": ({f"{ROOT}keyframes/cameras/{TS}.json": b" " * 3000 + b"{}"},
                               IngestLimits(max_json_bytes=2048), f"{TS}.json: declares 3002 bytes, over the limit"),
    "image over byte limit": ({}, IngestLimits(max_image_bytes=500), f"images/{TS}.jpg: declares"),
    "camera over pixel limit": ({}, IngestLimits(max_image_pixels=1000), "64x48 exceeds the 1000-pixel limit"),
    "keyframe is a png": ({f"{ROOT}keyframes/images/{TS}.jpg": _png(np.zeros((48, 64, 3), np.uint8))},
                          IngestLimits(), "image does not decode as JPEG (it is a PNG)"),
    "keyframe header bomb": ({f"{ROOT}keyframes/images/{TS}.jpg": b"\xff\xd8\xff\xc0\x00\x11\x08\x75\x30\x75\x30"
                              b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"}, IngestLimits(),
                             "image is 30000x30000 but its camera says 64x48"),
    "depth larger than image": ({f"{ROOT}keyframes/depth/{TS}.png": _png(np.zeros((480, 640), np.uint16))},
                                IngestLimits(), "depth map of 640x480 is larger than its 64x48 image"),
    "depth is rgb": ({f"{ROOT}keyframes/depth/{TS}.png": _png(np.zeros((12, 16, 3), np.uint16))}, IngestLimits(),
                     "depth must be a single-channel 16-bit PNG"),
    "confidence size": ({f"{ROOT}keyframes/confidence/{TS}.png": _png(np.zeros((6, 8), np.uint8))}, IngestLimits(),
                        "confidence must be an 8-bit PNG of the depth map's size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_declared_sizes_are_checked_before_reading(tmp_path: Path, case: str) -> None:
    replace, limits, expected = CASES[case]
    scan = write_zip(tmp_path / "scan.zip", {**polycam_members(), **replace})
    with pytest.raises(DatasetError) as info:
        ingest(scan, tmp_path / "out", limits)
    assert expected in str(info.value)
    assert info.value.reason == "bad_dataset"


def test_valid_glb_is_streamed_unchanged(tmp_path: Path) -> None:
    members = polycam_members()
    ingest(write_zip(tmp_path / "scan.zip", members), tmp_path / "out")
    assert (tmp_path / "out" / "raw.glb").read_bytes() == members[MESH]

"""Camera frames at the edge: image headers read before decoding (bombs refused cheaply), only checked formats
accepted, base64 with MIME line breaks accepted over MQTT. The daemon tests use the real broker and FakeCore
(test double of the vision core); image decoding is the real one."""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
import pytest
from mqtt_fixtures import TOPICS, Broker, FakeCore, daemon_settings, jpeg, k_for

from markerless.errors import BadImageError
from markerless.image_headers import ImageHeaderError, read_image_header
from markerless.pipeline.image_decoding import MAX_IMAGE_PIXELS, decode_image
from markerless.service.scenes_file import ScenesFile

K = k_for()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A complete, valid 1-bit greyscale PNG of width x height black pixels: about 110 KB for 30000 x 30000, which
    a decoder expands to 2.7 GB of BGR. Built row by row, never held uncompressed in memory."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed 1-bit samples
    idat = bytearray()
    for start in range(0, height, 1000):
        idat += compressor.compress(row * min(1000, height - start))
    idat += compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", bytes(idat)) + _chunk(b"IEND", b"")


def _encoded(ext: str, array: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, array, params or [])
    assert ok
    return buf.tobytes()


def with_exif_thumbnail(main: bytes, thumbnail: bytes) -> bytes:
    """`main` with an APP1 segment holding another JPEG (as cameras embed EXIF thumbnails) right after SOI."""
    payload = b"Exif\x00\x00" + thumbnail
    return main[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + main[2:]


def test_headers_give_the_declared_size_of_jpeg_and_png() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    cases = {
        "baseline jpeg": (_encoded(".jpg", rgb), ("jpeg", 53, 37, 8, 3)),
        "progressive jpeg": (_encoded(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), ("jpeg", 53, 37, 8, 3)),
        "grey jpeg": (_encoded(".jpg", rgb[:, :, 0]), ("jpeg", 53, 37, 8, 1)),
        "jpeg with thumbnail": (with_exif_thumbnail(_encoded(".jpg", rgb), _encoded(".jpg", rgb[:8, :9])),
                                ("jpeg", 53, 37, 8, 3)),
        "rgb png": (_encoded(".png", rgb), ("png", 53, 37, 8, 3)),
        "16-bit png": (_encoded(".png", np.full((12, 16), 1500, np.uint16)), ("png", 16, 12, 16, 1)),
        "bomb png": (png_bomb(), ("png", 30000, 30000, 1, 1)),
    }
    for name, (data, expected) in cases.items():
        h = read_image_header(data)
        assert (h.format, h.width, h.height, h.bit_depth, h.channels) == expected, name
    assert read_image_header(png_bomb()[:40]).pixels == 900_000_000  # the first bytes suffice


@pytest.mark.parametrize("ext", [".bmp", ".tiff", ".webp", ".ppm"])
def test_formats_whose_header_is_not_checked_are_refused(ext: str) -> None:
    data = _encoded(ext, np.zeros((8, 8, 3), np.uint8))
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV would decode it
    with pytest.raises(BadImageError, match="unsupported or unknown image format") as info:
        decode_image(data)
    assert info.value.reason == "bad_image"


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"\xff\xd8\xff\xda\x00\x08", "no frame header before its scan data"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "ends before its frame header"),
        (b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x10\x03", "empty size 16x0"),
        (b"\x89PNG\r\n\x1a\n" + _chunk(b"IEND", b""), "without a valid IHDR"),
        (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 5, 0, 0, 0)), "colour type 5"),
    ],
)
def test_malformed_headers_are_named(data: bytes, expected: str) -> None:
    with pytest.raises(ImageHeaderError, match=expected):
        read_image_header(data)


def test_decode_refuses_over_the_pixel_limit_and_decodes_good_frames() -> None:
    with pytest.raises(BadImageError, match="PNG of 30000x30000 pixels exceeds the 40000000-pixel limit"):
        decode_image(png_bomb())
    big = _encoded(".jpg", np.zeros((300, 400, 3), np.uint8))
    with pytest.raises(BadImageError, match="JPEG of 400x300 pixels exceeds the 100000-pixel limit"):
        decode_image(big, max_pixels=100_000)
    rgb = decode_image(_encoded(".png", np.dstack([np.full((5, 7), v, np.uint8) for v in (10, 20, 30)])))
    assert rgb.shape == (5, 7, 3) and rgb[0, 0].tolist() == [30, 20, 10]  # BGR on disk -> RGB
    with pytest.raises(BadImageError, match="does not decode"):
        decode_image(big[: len(big) // 4] + b"\x00" * 10)  # header fine, data truncated
    assert 30000 * 30000 > MAX_IMAGE_PIXELS


def _peak_rss_mb(args: list[str]) -> tuple[float, str]:
    """Run a real CLI process; its own peak RSS (wait4 rusage of that child only) and stderr+stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKERLESS__")}
    proc = subprocess.Popen([sys.executable, "-m", "markerless.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 1, output  # the request failed, with a reason (bad_image)
    return usage.ru_maxrss / 1024, output


def test_png_bomb_is_refused_by_the_cli_without_a_memory_spike(tmp_path: Path) -> None:
    """`markerless localize` on the bomb: `bad_image` from the header, peak RSS within 200 MB of the same command
    on a small valid frame (decoding the bomb would need 2.7 GB)."""
    bomb, small = tmp_path / "bomb.png", tmp_path / "small.png"
    bomb.write_bytes(png_bomb())
    small.write_bytes(_encoded(".png", np.zeros((48, 64, 3), np.uint8)))
    assert bomb.stat().st_size < 150_000
    common = ["--scene", "nowhere", "--store", str(tmp_path / "store"), "--json", "--intrinsics"]
    bomb_rss, bomb_out = _peak_rss_mb(["localize", str(bomb), *common, "500,500,320,240"])
    small_rss, small_out = _peak_rss_mb(["localize", str(small), *common, "50,50,32,24"])
    print(f"peak RSS: PNG bomb {bomb_rss:.0f} MB, small frame {small_rss:.0f} MB")
    assert orjson.loads(bomb_out[bomb_out.index("{"):])["reason"] == "bad_image"
    assert "30000x30000 pixels exceeds" in bomb_out
    assert orjson.loads(small_out[small_out.index("{"):])["reason"] == "scene_not_found"  # it got past decoding
    assert bomb_rss - small_rss < 200, (bomb_rss, small_rss)


def _scenes(tmp_path: Path) -> ScenesFile:
    dataset = tmp_path / "s1.zip"
    dataset.write_bytes(b"scan v1")
    return ScenesFile.model_validate({"scenes": {"s1": {"dataset": str(dataset)}}, "cameras": {}})


def _core(tmp_path: Path, scenes: ScenesFile) -> FakeCore:
    core = FakeCore()
    core.registrations.append("s1")
    core.commit("s1", scenes.scenes["s1"].dataset, scenes.scenes["s1"].config)
    return core


def _frame(b64: str, request_id: str) -> bytes:
    return orjson.dumps({"calibrate": True, "image": b64, "intrinsics": K, "scene_id": "s1", "request_id": request_id})


def test_over_mqtt_bomb_refused_good_frame_behind_it_answered_and_mime_base64_accepted(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path
) -> None:
    scenes = _scenes(tmp_path)
    core = _core(tmp_path, scenes)
    daemons(daemon_settings(broker, tmp_path / "store"), core, scenes)
    op = clients(broker, "scenescape")
    op.connect()
    op.subscribe(f"{TOPICS.prefix}/autocalibration/camera/pose/+")
    cam = clients(broker, "camera")
    cam.connect()
    good = jpeg()
    sent = [
        ("bomb-cam", base64.b64encode(png_bomb()).decode(), "bomb"),
        ("good-cam", base64.b64encode(good).decode(), "good"),
        ("mime-cam", base64.encodebytes(jpeg(640, 480, 90)).decode(), "mime"),  # 76-column lines, trailing \n
        ("crlf-cam", base64.encodebytes(good).decode().replace("\n", "\r\n"), "crlf"),
        ("junk-cam", base64.b64encode(good).decode()[:40] + "*%" + base64.b64encode(good).decode()[40:], "junk"),
        ("unicode-cam", "\u00e9" + base64.b64encode(good).decode(), "unicode"),
    ]
    assert "\n" in sent[2][1] and sent[2][1].count("\n") > 10
    for camera_id, b64, rid in sent:
        cam.publish(TOPICS.frame(camera_id), _frame(b64, rid))
    replies = {rid: op.wait_json(TOPICS.pose(camera_id), lambda d, r=rid: d.get("request_id") == r, rid)
               for camera_id, _, rid in sent}
    assert replies["bomb"]["reason"] == "bad_image" and "30000x30000" in replies["bomb"]["message"]
    for rid in ("good", "mime", "crlf"):
        assert replies[rid]["error"] == "False" and replies[rid]["success"] is True, replies[rid]
    for rid in ("junk", "unicode"):
        assert replies[rid]["reason"] == "bad_image" and "not valid base64" in replies[rid]["message"], replies[rid]
    # One worker, FIFO: the bomb was refused first, then the good frame localized; the bomb never reached the core.
    pose_topics = f"{TOPICS.prefix}/autocalibration/camera/pose/"
    order = [orjson.loads(p)["request_id"] for t, p in op.messages if t.startswith(pose_topics)]
    assert order.index("bomb") < order.index("good")
    assert len(core.started) == 3  # good, mime, crlf

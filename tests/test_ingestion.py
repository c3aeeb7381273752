"""Polycam ingestion: every malformed upload is refused with an error naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from polycam_factory import polycam_members, symlink_member, write_zip

from markerless.errors import DatasetError
from markerless.scene.config import SceneConfig
from markerless.scene.layout import read_keyframes
from markerless.scene.limits import IngestLimits
from markerless.scene.polycam import ingest

ROOT = "scan-poly/"
TS = "1700000000000000"


def _mutated(tmp_path: Path, mutate) -> Path:
    members = polycam_members()
    mutate(members)
    return write_zip(tmp_path / "scan.zip", members)


def test_valid_zip_writes_scenescape_layout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    keyframes = ingest(write_zip(tmp_path / "scan.zip", polycam_members()), out).keyframes
    assert len(keyframes) == 3
    for name in ("cameras.txt", "images.txt", "raw.glb", "mesh_info.json", "keyframes.json"):
        assert (out / name).is_file()
    assert sorted(p.name for p in (out / "rgb").iterdir()) == [f"{k.stem}.jpg" for k in keyframes]
    # per-frame intrinsics, fy kept (SceneScape drops it)
    assert keyframes[0].camera.fy == 51.0 and "PINHOLE 64 48 50.0 51.0 32.0 24.0" in (out / "cameras.txt").read_text()
    # ARKit identity pose at x=0.1 -> OpenCV axes flipped, then translated by the alignment
    pose = keyframes[1].pose_matrix
    assert np.allclose(pose[:3, :3], np.diag([1, -1, -1]))
    assert np.allclose(pose[:3, 3], [1.1, 2.0, 3.0])
    # images.txt holds world-to-camera, quaternion xyzw
    line = (out / "images.txt").read_text().splitlines()[2].split()
    assert line[0] == keyframes[1].name and np.allclose([float(v) for v in line[6:]], -pose[:3, :3].T @ pose[:3, 3])
    assert read_keyframes(out) == keyframes


def test_corrected_images_are_preferred(tmp_path: Path) -> None:
    members = polycam_members()
    for name in list(members):
        if "/images/" in name or "/cameras/" in name:
            members[name.replace("/images/", "/corrected_images/").replace("/cameras/", "/corrected_cameras/")] = (
                members[name]
            )
    cam = json.loads(members[f"{ROOT}keyframes/corrected_cameras/{TS}.json"])
    cam["fx"] = 55.0
    members[f"{ROOT}keyframes/corrected_cameras/{TS}.json"] = json.dumps(cam).encode()
    keyframes = ingest(write_zip(tmp_path / "scan.zip", members), tmp_path / "out").keyframes
    assert keyframes[0].camera.fx == 55.0


def _drop(prefix: str):
    def mutate(m: dict) -> None:
        for name in [n for n in m if n.startswith(prefix)]:
            del m[name]

    return mutate


def _set(name: str, data: bytes):
    def mutate(m: dict) -> None:
        m[name] = data

    return mutate


def _camera_field(key: str, value):
    def mutate(m: dict) -> None:
        name = f"{ROOT}keyframes/cameras/{TS}.json"
        cam = json.loads(m[name])
        if value is KeyError:
            del cam[key]
        else:
            cam[key] = value
        m[name] = json.dumps(cam).encode()

    return mutate


BAD_CASES = {
    "missing images": (_drop(f"{ROOT}keyframes/images/"), "no .jpg keyframe images"),
    "missing cameras": (_drop(f"{ROOT}keyframes/cameras/"), "no camera .json"),
    "no keyframes": (_drop(f"{ROOT}keyframes/"), "no keyframes/ folder"),
    "count mismatch": (_drop(f"{ROOT}keyframes/cameras/{TS}"), "image count mismatch: 3 images vs 2 cameras"),
    "orphan depth": (_set(f"{ROOT}keyframes/depth/99.png", b"x"), "depth maps without a keyframe image"),
    "unreadable json": (_set(f"{ROOT}keyframes/cameras/{TS}.json", b"{not json"),
                        f"cameras/{TS}.json: unreadable JSON"),
    "json not object": (_set(f"{ROOT}keyframes/cameras/{TS}.json", b"[1, 2]"), "JSON must be an object"),
    "missing fx": (_camera_field("fx", KeyError), "missing field 'fx'"),
    "string fy": (_camera_field("fy", "51"), "field 'fy' must be a finite number"),
    "nan pose": (_camera_field("t_03", float("nan")), "field 't_03' must be a finite number"),
    "non-rigid pose": (_camera_field("t_00", 3.0), "not a rigid camera-to-world transform"),
    "negative focal": (_camera_field("fx", -5.0), "fx and fy must be positive"),
    "image does not decode": (_set(f"{ROOT}keyframes/images/{TS}.jpg", b"\xff\xd8garbage"), "does not decode"),
    "image size mismatch": (_camera_field("width", 128), "image is 64x48 but its camera says 128x48"),
    "8-bit depth": (_set(f"{ROOT}keyframes/depth/{TS}.png",
                         __import__("cv2").imencode(".png", np.zeros((12, 16), np.uint8))[1].tobytes()), "16-bit PNG"),
    "missing mesh": (_drop(f"{ROOT}raw.glb"), "missing mesh raw.glb"),
    "corrupt mesh": (_set(f"{ROOT}raw.glb", b"glTF not really"), "raw.glb: not a readable glTF mesh"),
    "missing mesh_info": (_drop(f"{ROOT}mesh_info.json"), "missing mesh_info.json"),
    "bad alignment": (_set(f"{ROOT}mesh_info.json", b'{"alignmentTransform": [1, 2, 3]}'), "list of 16 numbers"),
    "two captures": (_set("other-poly/keyframes/images/1.jpg", b"x"), "several captures in one archive"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_upload_is_refused_with_clear_error(tmp_path: Path, case: str) -> None:
    mutate, expected = BAD_CASES[case]
    with pytest.raises(DatasetError) as info:
        ingest(_mutated(tmp_path, mutate), tmp_path / "out")
    assert expected in str(info.value)
    assert str(tmp_path / "scan.zip") in str(info.value)  # names the upload
    assert info.value.reason == "bad_dataset"


def test_not_a_zip(tmp_path: Path) -> None:
    bogus = tmp_path / "scan.zip"
    bogus.write_text("hello")
    with pytest.raises(DatasetError, match="not a zip archive"):
        ingest(bogus, tmp_path / "out")
    with pytest.raises(DatasetError, match="dataset file not found"):
        ingest(tmp_path / "missing.zip", tmp_path / "out")


@pytest.mark.parametrize(
    "name, expected",
    [("scan-poly/../../evil.txt", "path traversal"), ("/etc/evil", "absolute or non-POSIX path"),
     ("scan-poly\\evil", "absolute or non-POSIX path")],
)
def test_hostile_member_names(tmp_path: Path, name: str, expected: str) -> None:
    members = polycam_members()
    members[name] = b"x"
    with pytest.raises(DatasetError, match=expected):
        ingest(write_zip(tmp_path / "scan.zip", members), tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_symlink_member(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "scan.zip", polycam_members(), symlink_member("scan-poly/link"))
    with pytest.raises(DatasetError, match="symbolic link in archive"):
        ingest(path, tmp_path / "out")


def test_limits(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "scan.zip", polycam_members())
    with pytest.raises(DatasetError, match="uncompressed size exceeds the limit of 1000 bytes"):
        ingest(path, tmp_path / "a", IngestLimits(max_uncompressed_bytes=1000))
    with pytest.raises(DatasetError, match="entries exceed the limit of 5"):
        ingest(path, tmp_path / "b", IngestLimits(max_files=5))
    with pytest.raises(DatasetError, match="3 keyframes exceed the limit of 2"):
        ingest(path, tmp_path / "c", IngestLimits(max_keyframes=2))


def test_failed_registration_leaves_store_untouched(tmp_path: Path, feature_models) -> None:
    """A bad upload of a new scene: nothing is left in the store, not even an empty scene folder."""
    from markerless.pipeline.registration import register_scene
    from markerless.scene.store import SceneStore

    store = SceneStore(tmp_path / "store")
    bad = _mutated(tmp_path, _camera_field("fx", KeyError))
    with pytest.raises(DatasetError):
        register_scene(store, "s1", bad, SceneConfig(), feature_models)
    assert store.info("s1") is None
    assert list((tmp_path / "store").iterdir()) == []  # no staging, lock or empty scene folder left behind


def test_corrupt_member_is_a_dataset_error(tmp_path: Path) -> None:
    """A flipped byte inside a compressed entry (bad CRC) is reported with the member's name."""
    import zipfile

    path = tmp_path / "scan.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in polycam_members().items():
            zf.writestr(name, data)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{ROOT}keyframes/cameras/{TS}.json")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=f"cameras/{TS}.json: corrupt archive entry"):
        ingest(path, tmp_path / "out")

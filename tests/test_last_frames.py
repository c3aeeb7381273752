"""The worker's record of each camera's last frames: a failure never undoes a calibration, a success drops the
failed frame, and memory stays bounded (cameras outside scenes.yaml beyond `extra` are dropped, oldest first)."""

from __future__ import annotations

from markerless.errors import Reason
from markerless.pipeline.localization import LocalizationResult
from markerless.service.last_frames import LastFrames
from markerless.service.requests import CalibrationRequest


def request(camera_id: str, image: bytes) -> CalibrationRequest:
    return CalibrationRequest(camera_id, "s1", image, [[500.0, 0, 32], [0, 500.0, 24], [0, 0, 1]], [], "refine",
                              f"r-{image.decode()}", 0.0, 60.0, (camera_id, image.decode()))


OK = LocalizationResult(True, None, "ok", quaternion=[0, 0, 0, 1], translation=[0, 0, 0], num_inliers=90)
BAD = LocalizationResult(False, Reason.TOO_FEW_MATCHES, "3 matches < 20")


def test_a_failure_keeps_the_calibration_and_a_success_drops_the_failure() -> None:
    frames = LastFrames(frozenset({"cam1"}))
    assert frames.get("cam1") is None
    frames.failed(request("cam1", b"a"), Reason.SCENE_REGISTERING, "still registering")
    held = frames.get("cam1")
    assert held is not None and held.calibrated is None and held.latest.image == b"a"
    assert held.latest.reason == "scene_registering" and held.latest.width is None
    frames.localized(request("cam1", b"b"), OK, 64, 48)
    held = frames.get("cam1")
    assert held is not None and held.failed is None and held.calibrated is not None
    assert held.calibrated.image == b"b" and (held.calibrated.width, held.calibrated.height) == (64, 48)
    first = held.calibrated.seq
    frames.localized(request("cam1", b"c"), BAD, 64, 48)
    held = frames.get("cam1")
    assert held is not None and held.calibrated is not None and held.calibrated.seq == first  # still calibrated
    assert held.failed is not None and held.failed.reason == "too_few_matches" and held.latest.image == b"c"
    frames.localized(request("cam1", b"d"), OK, 64, 48)
    held = frames.get("cam1")
    assert held is not None and held.failed is None and held.calibrated is not None
    assert held.calibrated.seq > first and held.calibrated.image == b"d"


def test_cameras_outside_scenes_yaml_are_bounded_and_configured_ones_kept() -> None:
    frames = LastFrames(frozenset({"cam1"}), extra=2)
    frames.localized(request("cam1", b"a"), OK, 64, 48)
    for name in ("x1", "x2", "x3"):
        frames.failed(request(name, name.encode()), Reason.TIMEOUT, "late")
    assert sorted(frames.camera_ids()) == ["cam1", "x2", "x3"]  # x1, the least recently seen other, dropped
    frames.failed(request("x2", b"again"), Reason.TIMEOUT, "late")
    frames.failed(request("x4", b"x4"), Reason.TIMEOUT, "late")
    assert sorted(frames.camera_ids()) == ["cam1", "x2", "x4"]

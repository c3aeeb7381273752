"""The calibration watch's pure logic (`pipeline.calibration_watch`) and its store (`scene.calibrations`): the state
machine on frames with known poses and sigmas, fusion and its sigma, and the one-writer-per-camera file."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from markerless.errors import Reason
from markerless.pipeline.calibration_watch import (
    Calibration,
    Frame,
    WatchOptions,
    consistent,
    difference,
    fuse,
    observe,
    observe_failure,
    observe_result,
)
from markerless.pipeline.localization import LocalizationResult
from markerless.scene.calibrations import CalibrationStore

OPTIONS = WatchOptions()
K = ((500.0, 0.0, 320.0), (0.0, 500.0, 240.0), (0.0, 0.0, 1.0))
BASE = Rotation.from_euler("xyz", [10.0, -30.0, 5.0], degrees=True)


def frame(rng: np.random.Generator, centre: np.ndarray, rotation: Rotation = BASE, sp: float = 0.01,
          sr: float = 0.15, shared: np.ndarray | None = None, noise: float = 0.1, version: str = "v1",
          at: int = 0) -> Frame:
    """A frame whose error is the shared (scan) offset plus independent noise, `noise` x its stated sigma."""
    c = centre + (shared if shared is not None else 0.0) + rng.normal(0, noise * sp, 3)
    r = Rotation.from_rotvec(np.radians(rng.normal(0, noise * sr, 3))) * rotation
    q = r.as_quat()
    return Frame(tuple(q), tuple(c), K, (-0.1, 0.0, 0.0, 0.0, 0.0), "refined", sp, sr, "s1", version,
                 f"2026-01-01T00:{at // 60:02d}:{at % 60:02d}+00:00")


def knock(distance: float, degrees: float) -> tuple[np.ndarray, Rotation]:
    return np.array([1.0, 0.5, -2.0]) + np.array([distance, 0.0, 0.0]), \
        Rotation.from_rotvec(np.radians([0.0, degrees, 0.0])) * BASE


def run(frames: list[Frame], cal: Calibration | None = None) -> tuple[Calibration | None, list[str]]:
    events = []
    for f in frames:
        out = observe(cal, "cam", f, OPTIONS)
        cal = out.calibration
        events += [e.event for e in out.events]
    return cal, events


def test_static_stream_is_calibrated_once_and_never_moves_and_its_sigma_is_a_typical_frame_s() -> None:
    rng = np.random.default_rng(1)
    centre = np.array([1.0, 0.5, -2.0])
    shared = rng.normal(0, 0.01, 3)
    frames = [frame(rng, centre, sp=float(rng.uniform(0.008, 0.015)), shared=shared, at=i) for i in range(200)]
    cal, events = run(frames)
    assert events == ["calibrated"]
    assert cal is not None and cal.state == "calibrated" and cal.frames == 200
    assert len(cal.evidence) == OPTIONS.window
    sigmas = [f.position_sigma_m for f in cal.evidence]
    assert cal.position_sigma_m >= float(np.median(sigmas)) - 1e-12 >= min(sigmas) - 1e-12
    assert cal.first_solved_at == frames[0].at and cal.updated_at == frames[-1].at


@pytest.mark.parametrize(("distance", "degrees"), [(0.03, 0.8), (0.14, 2.7), (0.0, 1.0), (0.04, 0.0)])
def test_a_knock_is_pending_for_one_frame_and_moved_on_the_next(distance: float, degrees: float) -> None:
    rng = np.random.default_rng(2)
    centre = np.array([1.0, 0.5, -2.0])
    shared = rng.normal(0, 0.01, 3)  # the scan's error: the same in every frame of this view
    cal, events = run([frame(rng, centre, shared=shared, at=i) for i in range(8)])
    new_centre, new_rot = knock(distance, degrees)
    first = observe(cal, "cam", frame(rng, new_centre, new_rot, shared=shared, at=10), OPTIONS)
    assert first.consistent is False and first.events == [] and first.calibration is not None
    assert first.calibration.state == "pending"
    assert first.calibration.translation == cal.translation  # one frame never replaces a calibration
    second = observe(first.calibration, "cam", frame(rng, new_centre, new_rot, shared=shared, at=11), OPTIONS)
    assert second.moved and [e.event for e in second.events] == ["moved"]
    moved = second.events[0]
    assert moved.displacement_m == pytest.approx(distance, abs=0.004)
    assert moved.rotation_deg == pytest.approx(degrees, abs=0.05)
    new = second.calibration
    assert new is not None and new.frames == 2 and new.state == "calibrated"
    assert new.first_solved_at == first.calibration.pending[0].at
    dp, dr = difference(new.quaternion, new.translation, new_rot.as_quat(), new_centre + shared)
    assert dp < 0.003 and dr < 0.05


def test_one_bad_frame_is_dropped_when_the_next_one_agrees_with_the_calibration() -> None:
    rng = np.random.default_rng(3)
    centre = np.array([1.0, 0.5, -2.0])
    cal, _ = run([frame(rng, centre, at=i) for i in range(8)])
    bad_centre, bad_rot = knock(0.5, 20.0)
    cal, events = run([frame(rng, bad_centre, bad_rot, at=9)], cal)
    assert cal is not None and cal.state == "pending" and events == []
    cal, events = run([frame(rng, centre, at=10)], cal)
    assert cal is not None and cal.state == "calibrated" and cal.pending == () and events == []
    assert cal.frames == 9


def test_two_different_bad_frames_do_not_make_a_move() -> None:
    rng = np.random.default_rng(4)
    centre = np.array([1.0, 0.5, -2.0])
    cal, _ = run([frame(rng, centre, at=i) for i in range(8)])
    a, b = knock(0.5, 20.0), knock(-0.4, -15.0)
    cal, events = run([frame(rng, *a, at=9), frame(rng, *b, at=10)], cal)
    assert events == [] and cal is not None and cal.state == "pending"
    assert cal.pending[0].translation[0] < 1.0  # the newest bad frame is the pending one


def test_consecutive_failures_make_lost_with_the_reason_once_and_a_good_frame_recovers() -> None:
    rng = np.random.default_rng(5)
    centre = np.array([1.0, 0.5, -2.0])
    cal, _ = run([frame(rng, centre, at=i) for i in range(3)])
    events = []
    for i in range(5):
        out = observe_failure(cal, "no_verified_matches", "no keyframe verified", f"t{i}", OPTIONS)
        cal = out.calibration
        events += out.events
    assert [e.event for e in events] == ["lost"]
    assert events[0].reason == "no_verified_matches" and events[0].at == f"t{OPTIONS.lost_after - 1}"
    assert cal is not None and cal.state == "lost" and cal.failures == 5
    cal, events = run([frame(rng, centre, at=30)], cal)
    assert cal is not None and cal.state == "calibrated" and cal.failures == 0 and events == []


def test_failures_before_any_calibration_change_nothing() -> None:
    out = observe_failure(None, "bad_image", "not an image", "t", OPTIONS)
    assert out.calibration is None and out.events == [] and not out.changed


def test_a_new_scene_version_recalibrates_from_the_next_frame() -> None:
    rng = np.random.default_rng(6)
    centre = np.array([1.0, 0.5, -2.0])
    cal, _ = run([frame(rng, centre, at=i) for i in range(5)])
    out = observe(cal, "cam", frame(rng, centre + 0.3, version="v2", at=9), OPTIONS)
    assert [e.event for e in out.events] == ["recalibrated"]
    assert out.calibration is not None and out.calibration.scene_version == "v2" and out.calibration.frames == 1
    assert out.events[0].displacement_m == pytest.approx(np.sqrt(3) * 0.3, abs=0.01)


def test_fusion_drops_a_frame_far_from_the_rest_and_inflates_sigma_when_frames_scatter_more_than_stated() -> None:
    rng = np.random.default_rng(7)
    centre = np.array([1.0, 0.5, -2.0])
    good = [frame(rng, centre, at=i) for i in range(6)]
    outlier = frame(rng, centre + 1.0, at=7)
    fused = fuse([*good, outlier], OPTIONS)
    assert fused.kept == 6
    assert np.linalg.norm(np.subtract(fused.translation, centre)) < 0.003
    scattered = [frame(rng, centre, sp=0.001, noise=5.0, at=i) for i in range(10)]  # 5x their stated sigma
    assert fuse(scattered, OPTIONS).position_sigma_m > 3 * 0.001


def test_the_test_tolerates_more_when_the_calibration_s_own_frames_scatter_more() -> None:
    """Frames that agree to 1/10 of their sigma make a sharp test; frames scattering by their full sigma a loose
    one: the same 3.5 cm offset is a move for the first and not for the second."""
    rng = np.random.default_rng(8)
    centre = np.array([1.0, 0.5, -2.0])
    sharp, _ = run([frame(rng, centre, noise=0.1, at=i) for i in range(10)])
    loose, _ = run([frame(rng, centre, noise=1.0, at=i) for i in range(10)])
    probe = frame(np.random.default_rng(0), centre + np.array([0.035, 0.0, 0.0]), noise=0.0)
    assert sharp is not None and loose is not None
    assert not consistent(sharp, probe, OPTIONS)
    assert consistent(loose, probe, OPTIONS)


def test_false_moves_on_a_long_noisy_static_stream_stay_within_the_rate_the_test_promises() -> None:
    """1000 frames scattering by their full stated sigma (the worst case for the test): a false `moved` needs two
    agreeing false alarms in a row (<= false_alarm^2 per frame: 1e-3 expected here)."""
    rng = np.random.default_rng(9)
    centre = np.array([1.0, 0.5, -2.0])
    cal, events = run([frame(rng, centre, noise=1.0, at=i % 3600) for i in range(1000)])
    assert events == ["calibrated"]


def test_record_round_trip_and_store_writes_atomically_and_forgets(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    cal, _ = run([frame(rng, np.array([1.0, 0.5, -2.0]), at=i) for i in range(3)])
    assert cal is not None
    store = CalibrationStore(tmp_path)
    for camera_id in ("cam", ".hidden", "a b/c"[:3], "x" * 255):
        record = {**cal.to_dict(), "camera_id": camera_id}
        store.update(camera_id, lambda current, record=record: (record, None))
        assert Calibration.from_dict(store.read(camera_id) or {}) == Calibration.from_dict(
            {**cal.to_dict(), "camera_id": camera_id})
    assert sorted(store.camera_ids()) == sorted(["cam", ".hidden", "a b", "x" * 255])
    assert not list(store.folder.glob("*.tmp")) and not list(store.folder.glob(".*.tmp"))
    assert store.forget("cam") and not store.forget("cam") and store.read("cam") is None


def _increment(root: str, times: int) -> None:
    store = CalibrationStore(Path(root))
    for _ in range(times):
        store.update("cam", lambda current: ({"camera_id": "cam", "n": (current or {"n": 0})["n"] + 1}, None))


def test_processes_sharing_the_store_never_lose_an_update(tmp_path: Path) -> None:
    """Read-modify-write under the camera's flock: two processes, 200 increments each, 400 in the file."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_increment, args=(str(tmp_path), 200)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert (CalibrationStore(tmp_path).read("cam") or {})["n"] == 400


def test_one_rule_decides_what_a_localized_frame_is_evidence_of() -> None:
    """`observe_result`, used by the service and the replay alike: a pose with finite sigmas is observed, a failure
    that says something about the camera counts towards lost, anything else leaves the calibration alone."""
    rng = np.random.default_rng(3)
    cal, _ = run([frame(rng, np.array([1.0, 0.5, -2.0]), at=i) for i in range(3)])
    assert cal is not None and cal.frames == 3
    f = frame(rng, np.array([1.0, 0.5, -2.0]), at=9)
    pose = LocalizationResult(True, None, "ok", quaternion=list(f.quaternion), translation=list(f.translation),
                              intrinsics=[list(r) for r in K], distortion=list(f.distortion),
                              intrinsics_source="refined", position_sigma_m=0.01, rotation_sigma_deg=0.15,
                              scene_id="s1", scene_version="v1")
    seen = observe_result(cal, "cam", pose, "t9", OPTIONS)
    assert seen is not None and seen.calibration is not None and seen.calibration.frames == 4
    unweighable = LocalizationResult(**{**pose.__dict__, "position_sigma_m": float("inf")})
    assert observe_result(cal, "cam", unweighable, "t9", OPTIONS) is None
    dark = LocalizationResult(False, Reason.NO_FEATURES, "12 keypoints: dark or blocked")
    counted = observe_result(cal, "cam", dark, "t9", OPTIONS)
    assert counted is not None and counted.calibration is not None and counted.calibration.failures == 1
    assert counted.calibration.last_failure == "no_features"
    for reason in (Reason.TIMEOUT, Reason.SUPERSEDED, Reason.SCENE_REGISTERING, Reason.INTERNAL_ERROR):
        assert observe_result(cal, "cam", LocalizationResult(False, reason, "not the camera's doing"), "t9",
                              OPTIONS) is None, reason

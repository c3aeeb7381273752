"""The calibration watch on streams of real frames (kitchen scan) and of exactly known ones (synthetic room): no
`moved` while the camera stands still, `moved` within 3 frames of a knock of about 3 cm / 1 deg and of 14 cm /
2.7 deg, and after each phase the kept calibration within 1.5 cm / 0.5 deg of the truth with sigmas that cover its
error. Thresholds and why: README "Calibration watch" and docs/calibration.md.

Kitchen streams: a query frame re-captured with new exposure, white balance, noise, JPEG and people in front each
time, then neighbouring frames of the sequence as the knocked camera (those are scan keyframes: the scan's truth is
their pose exactly). Needs the kitchen scan ($MARKERLESS_KITCHEN_DIR); skipped without.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from scipy.stats import chi2

from markerless.demo.calibration_stream import stream
from markerless.pipeline.calibration_replay import Step, replay
from markerless.pipeline.calibration_watch import CAMERA_FAILURES
from markerless.scene.geometry import pose_error
from markerless.scene.queries import load_queries, query_camera, query_pose

# |error|^2 / sigma^2 of an isotropic 3D error is chi-square(3): 99 % of honest calibrations are within this factor
COVER = math.sqrt(chi2.ppf(0.99, 3))  # 3.37
WITHIN_M, WITHIN_DEG = 0.015, 0.5  # the bound on the kept calibration after each phase
STATIC, KNOCKED = 8, 3


def check(steps: list[Step], phases: list[str]) -> None:
    """The issue's "Done when" on one camera's replay, phase by phase."""
    by_phase = {p: [s for s in steps if s.phase == p] for p in phases}
    static = by_phase[phases[0]]
    assert len(static) >= STATIC
    assert [e for s in static for e in s.events] == ["calibrated"], [s.events for s in static]
    for phase in phases[1:]:
        events = [s.events for s in by_phase[phase]]
        assert [e for ev in events for e in ev] == ["moved"], (phase, events)
        assert next(i for i, ev in enumerate(events) if ev) < 3, (phase, events)
    for phase, group in by_phase.items():
        last = group[-1]
        assert last.state == "calibrated" and last.error_m is not None and last.sigma_m is not None
        assert last.error_m <= WITHIN_M and last.error_deg <= WITHIN_DEG, (phase, last)
        assert last.error_m <= COVER * last.sigma_m and last.error_deg <= COVER * last.sigma_deg, (phase, last)
    assert all("lost" not in s.events for s in steps)


def table(name: str, steps: list[Step]) -> None:
    print(f"\n{name}: phase, ok, frame err cm/deg (sigma), events, state, frames, calibration err cm/deg (sigma)")
    for s in steps:
        frame = (f"{100 * s.frame_error_m:.2f}/{s.frame_error_deg:.2f} ({100 * s.frame_sigma_m:.2f}/"
                 f"{s.frame_sigma_deg:.2f})" if s.success else s.reason)
        cal = (f"{100 * s.error_m:.2f}/{s.error_deg:.2f} ({100 * s.sigma_m:.2f}/{s.sigma_deg:.2f})"
               if s.error_m is not None else "-")
        print(f"  {s.phase:8s} {frame:32s} {','.join(s.events):12s} {s.state} {s.frames:3d} {cal}")


@pytest.fixture(scope="module")
def kitchen(kitchen_store: Path, kitchen_dir: Path, feature_models: Any) -> Any:
    from markerless.pipeline.localization import Localizer
    from markerless.scene.store import SceneStore

    scene = SceneStore(kitchen_store).load("kitchen")
    queries = load_queries(kitchen_dir / "queries.json")
    return scene, Localizer(feature_models), queries


@pytest.mark.parametrize(("name", "query", "near", "far", "heavy"), [
    ("light", 6, 31, 29, False),  # query 6 -> keyframe 31: 3.1 cm / 1.06 deg; 31 -> 29: 14.9 cm / 2.97 deg
    ("heavy", 5, 25, 23, True),  # query 5 -> keyframe 25: 3.1 cm / 1.00 deg; 25 -> 23: 14.4 cm / 2.45 deg
])
def test_kitchen_stream_static_then_knocked_twice(kitchen: Any, kitchen_dir: Path, name: str, query: int,
                                                  near: int, far: int, heavy: bool) -> None:
    scene, localizer, queries = kitchen
    q = queries[query]
    image = cv2.cvtColor(cv2.imread(str(kitchen_dir / q["image"])), cv2.COLOR_BGR2RGB)
    truth = query_pose(q)
    knocks = [pose_error(truth, scene.keyframe_pose(near)), pose_error(scene.keyframe_pose(near),
                                                                       scene.keyframe_pose(far))]
    assert 0.025 < knocks[0][0] < 0.035 and 0.8 <= knocks[0][1] < 1.1  # the sizes the issue asks for
    assert 0.13 < knocks[1][0] < 0.16 and 2.4 < knocks[1][1] < 3.0
    phases = [("static", image, truth, STATIC), ("knock-1", scene.keyframe_image(near), scene.keyframe_pose(near),
                                                   KNOCKED),
              ("knock-2", scene.keyframe_image(far), scene.keyframe_pose(far), KNOCKED)]
    frames = stream(phases, np.random.default_rng(query), heavy=heavy)
    camera = query_camera(q, q["width"], q["height"])
    assert camera is not None
    steps, _ = replay(localizer, scene, [(f.phase, f.jpeg, f.truth) for f in frames], camera, camera_id=name)
    table(name, steps)
    check(steps, ["static", "knock-1", "knock-2"])


def _dark(image: np.ndarray) -> np.ndarray:
    """The lights out: 3 % of the light, what a camera's gain leaves of a room at night."""
    return (image.astype(np.float32) * 0.03).astype(np.uint8)


def _blocked(image: np.ndarray) -> np.ndarray:
    """Something right in front of the lens (a board, a sheet over the camera): the frame a plain surface. (With a
    tenth of the view left free the camera still localizes from that strip, as it should.)"""
    return np.full_like(image, (150, 140, 120))


@pytest.mark.parametrize("what", ["dark", "blocked", "elsewhere"])
def test_kitchen_camera_that_stops_localizing_is_lost_with_the_reason(kitchen: Any, kitchen_dir: Path,
                                                                      what: str) -> None:
    """A calibrated camera whose frames stop localizing (lights out, view blocked, turned to another room) is
    `lost` on the `lost_after`-th failure in a row, once, with the localizer's reason, and keeps its calibration;
    its next good frame makes it calibrated again."""
    scene, localizer, queries = kitchen
    q = queries[6]
    image = cv2.cvtColor(cv2.imread(str(kitchen_dir / q["image"])), cv2.COLOR_BGR2RGB)
    truth = query_pose(q)
    if what == "elsewhere":
        bad = cv2.cvtColor(cv2.imread(str(sorted((kitchen_dir / "foreign").glob("*.jpg"))[0])), cv2.COLOR_BGR2RGB)
        bad = cv2.resize(bad, (image.shape[1], image.shape[0]))
    else:
        bad = {"dark": _dark, "blocked": _blocked}[what](image)
    phases = [("static", image, truth, 4), ("bad", bad, truth, 3), ("back", image, truth, 1)]
    frames = stream(phases, np.random.default_rng(6))
    camera = query_camera(q, q["width"], q["height"])
    steps, cal = replay(localizer, scene, [(f.phase, f.jpeg, f.truth) for f in frames], camera, camera_id=what)
    table(what, steps)
    bad_steps = [s for s in steps if s.phase == "bad"]
    assert [s.success for s in bad_steps] == [False] * 3, [s.reason for s in bad_steps]
    assert [s.events for s in bad_steps] == [[], [], ["lost"]]
    assert bad_steps[-1].state == "lost" and bad_steps[-1].reason in {r.value for r in CAMERA_FAILURES}
    assert bad_steps[-1].error_m is not None and bad_steps[-1].error_m <= WITHIN_M  # the calibration is kept
    assert steps[-1].success and steps[-1].state == "calibrated" and steps[-1].events == []
    assert cal is not None and cal.frames == 5


# --- synthetic room: exact poses, exact knocks ------------------------------------------------------------------

@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory, feature_models: Any) -> Any:
    from markerless.demo import synth
    from markerless.demo.room import Room
    from markerless.pipeline.localization import Localizer
    from markerless.pipeline.registration import register_scene
    from markerless.scene.config import SceneConfig
    from markerless.scene.store import SceneStore

    tmp = tmp_path_factory.mktemp("room")
    conf = {"num_keyframes": 32, "num_queries": 1, "num_foreign": 0, "seed": 5}
    synth_conf = synth.SynthConf.from_dict(conf)
    out = synth.generate(tmp / "room.zip", synth_conf)
    store = SceneStore(tmp / "store")
    register_scene(store, "room", out.zip_path, SceneConfig(), feature_models)
    c = dataclasses.asdict(synth_conf)
    world = Room(c["seed"], c["room_size"], c["texels_per_metre"])
    query = load_queries(out.queries_json)[0]
    return store.load("room"), Localizer(feature_models), world, query, c


def test_synthetic_room_stream_with_exact_knocks(room: Any) -> None:
    from markerless.demo import synth

    scene, localizer, world, query, c = room
    width, height = int(c["width"]), int(c["height"])
    camera = query_camera(query, width, height)
    assert camera is not None
    start = query_pose(query)

    def knocked(pose: np.ndarray, metres: float, degrees: float) -> np.ndarray:
        out = pose.copy()  # move sideways (camera x) and turn about the camera's vertical axis
        out[:3, 3] += metres * pose[:3, 0]
        out[:3, :3] = pose[:3, :3] @ Rotation.from_rotvec(np.radians([0.0, degrees, 0.0])).as_matrix()
        return out

    first = knocked(start, 0.03, 0.8)
    second = knocked(first, 0.14, 2.7)
    rng = np.random.default_rng(11)
    images = [world.render(synth.View(camera, pose), width, height, rng, c["image_noise"])
              for pose in (start, first, second)]
    phases = [("static", images[0], start, STATIC), ("knock-1", images[1], first, KNOCKED),
              ("knock-2", images[2], second, KNOCKED)]
    frames = stream(phases, rng, heavy=False)
    steps, _ = replay(localizer, scene, [(f.phase, f.jpeg, f.truth) for f in frames], camera, camera_id="room")
    table("synthetic room", steps)
    check(steps, ["static", "knock-1", "knock-2"])

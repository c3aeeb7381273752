"""Replays a camera's stream of frames through the localizer and the calibration watch the service runs, and
scores the calibration it keeps against each frame's true pose. For tests, `bench/bench_calibration_stream.py`
and anyone tuning `calibration.*` settings on their own recordings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from markerless.pipeline.calibration_watch import Calibration, WatchOptions, observe_result
from markerless.pipeline.image_decoding import decode_image
from markerless.pipeline.localization import Localizer
from markerless.scene.camera import Camera
from markerless.scene.geometry import pose_error, quat_trans_to_pose
from markerless.scene.store import Scene


@dataclass(frozen=True)
class Step:
    """One frame of a replay: what the localizer said, the events the watch raised, and the calibration after it
    with its error against the frame's true pose and its sigmas."""

    phase: str
    success: bool
    reason: str | None
    frame_error_m: float | None
    frame_error_deg: float | None
    frame_sigma_m: float | None
    frame_sigma_deg: float | None
    events: list[str]
    state: str | None
    frames: int
    error_m: float | None
    error_deg: float | None
    sigma_m: float | None
    sigma_deg: float | None


def replay(localizer: Localizer, scene: Scene, frames: list[tuple[str, bytes, np.ndarray]], camera: Camera | None,
           mode: str = "refine", options: WatchOptions | None = None, camera_id: str = "replay",
           calibration: Calibration | None = None) -> tuple[list[Step], Calibration | None]:
    """(phase, JPEG, true camera-to-world pose) frames in order; the steps and the calibration left at the end."""
    options = options or WatchOptions()
    steps = []
    cal = calibration
    for n, (phase, data, truth) in enumerate(frames):
        at = f"frame-{n:06d}"
        result = localizer.localize(scene, decode_image(data), camera, mode)
        outcome = observe_result(cal, camera_id, result, at, options)  # as the service: one rule for evidence
        cal = cal if outcome is None else outcome.calibration
        events = [e.event for e in outcome.events] if outcome else []
        fe = pose_error(result.pose_matrix(), truth) if result.success else (None, None)
        ce = pose_error(quat_trans_to_pose(cal.quaternion, cal.translation), truth) if cal else (None, None)
        steps.append(Step(phase, result.success, None if result.reason is None else str(result.reason), fe[0], fe[1],
                          result.position_sigma_m, result.rotation_sigma_deg, events,
                          cal.state if cal else None, cal.frames if cal else 0, ce[0], ce[1],
                          cal.position_sigma_m if cal else None, cal.rotation_sigma_deg if cal else None))
    return steps, cal

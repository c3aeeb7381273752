"""A fixed camera's stream of frames, made from frames with known poses: the same view again and again with new
exposure, white balance, noise, JPEG and people walking in front, then a neighbouring view as the camera knocked.

For tests and benchmarks of the calibration watch (`pipeline.calibration_watch`): every frame carries the pose it
was taken from, so the calibration the watch keeps can be compared with the truth after each phase.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from markerless.demo.fixed_camera import Damage, degrade


@dataclass(frozen=True)
class StreamFrame:
    """One JPEG of the stream, the camera-to-world pose it shows (scene frame, OpenCV axes) and its phase."""

    jpeg: bytes
    truth: np.ndarray
    phase: str


def people(image: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` people-sized occluders (upright rectangles, 12-25 % of the width, 45-85 % of the height, standing on
    the bottom of the frame or near it) in random flat colours with texture, drawn over a copy of `image`."""
    out = image.copy()
    h, w = out.shape[:2]
    for _ in range(count):
        pw, ph = int(w * rng.uniform(0.12, 0.25)), int(h * rng.uniform(0.45, 0.85))
        x = int(rng.integers(0, w - pw))
        y = int(h - ph - rng.integers(0, max(1, h // 10)))
        colour = rng.integers(20, 235, 3)
        patch = colour + rng.normal(0, 18, (ph, pw, 1)) * np.array([1.0, 0.9, 0.8])  # clothes are not flat
        out[y:y + ph, x:x + pw] = np.clip(patch, 0, 255).astype(np.uint8)
        cv2.circle(out, (x + pw // 2, max(0, y - pw // 3)), pw // 3, [int(c) for c in rng.integers(60, 200, 3)], -1)
    return out


def vary(image: np.ndarray, rng: np.random.Generator, heavy: bool = False) -> bytes:
    """A new capture of the same view: exposure, white balance, noise, JPEG quality and people in front, drawn
    anew. `heavy`: darker and brighter exposures, more noise, worse JPEG and up to three people."""
    if heavy:
        damage = Damage(gain=float(rng.uniform(0.5, 1.6)), white_balance=tuple(rng.uniform(0.75, 1.25, 3)),
                        noise=float(rng.uniform(4.0, 10.0)), jpeg_quality=int(rng.integers(15, 36)))
        count = int(rng.integers(1, 4))
    else:
        damage = Damage.random(rng)
        count = int(rng.integers(0, 2))
    return degrade(people(image, rng, count), damage, rng)


def stream(phases: list[tuple[str, np.ndarray, np.ndarray, int]], rng: np.random.Generator,
           heavy: bool = False) -> list[StreamFrame]:
    """Frames of phases (name, RGB image, its camera-to-world pose, how many frames), in order."""
    return [StreamFrame(vary(image, rng, heavy), np.asarray(pose, dtype=float), name)
            for name, image, pose, count in phases for _ in range(count)]

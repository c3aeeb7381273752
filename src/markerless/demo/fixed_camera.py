"""Fixed-camera frames made from ordinary frames: a larger sensor, a real lens and a cheap camera's image damage.

Site cameras are not the scanning phone: they have their own resolution, visible barrel distortion that nobody
measured, auto exposure and white balance, sensor noise and heavy JPEG compression. This turns a frame with
known intrinsics and pose into such a frame, with its exact camera, so tests and benchmarks can check what the
service estimates against the truth. The pose does not change: only the camera and the image do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from markerless.scene.camera import HALF_PIXEL, Camera

# A typical wide CCTV lens: strong barrel distortion with small tangential and higher-order terms.
DEFAULT_LENS = (-0.28, 0.09, 0.0008, -0.0006, -0.012)
# A strong barrel lens (k1 about -0.4), as on the widest fixed cameras.
STRONG_BARREL_LENS = (-0.4, 0.16, 0.0008, -0.0006, -0.02)


@dataclass(frozen=True)
class Damage:
    """Photometric damage: gain (exposure), per-channel white-balance gains, noise sigma (grey levels), JPEG quality."""

    gain: float
    white_balance: tuple[float, float, float]
    noise: float
    jpeg_quality: int

    @classmethod
    def random(cls, rng: np.random.Generator) -> Damage:
        return cls(
            gain=float(rng.uniform(0.7, 1.35)),
            white_balance=tuple(float(v) for v in rng.uniform(0.85, 1.15, 3)),
            noise=float(rng.uniform(2.0, 6.0)),
            jpeg_quality=int(rng.integers(25, 51)),
        )


def render_through_lens(
    image: np.ndarray, camera: Camera, scale: float = 2.0, lens: tuple[float, ...] = DEFAULT_LENS
) -> tuple[np.ndarray, Camera]:
    """Resample an RGB frame of `camera` as seen by a camera `scale` times larger with OpenCV distortion `lens`."""
    target = Camera(round(camera.width * scale), round(camera.height * scale), camera.fx * scale,
                    camera.fy * scale, camera.cx * scale, camera.cy * scale, tuple(lens))
    return render_as(image, camera, target), target


def narrow_camera(camera: Camera, fov_deg: float = 27.0, width: int = 1280, height: int = 960) -> Camera:
    """A varifocal zoomed in: `width` x `height` pixels with a `fov_deg` horizontal field of view, centred on the
    principal point of `camera`. Rendered from `camera`'s frame it is a central crop enlarged (a soft image)."""
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return Camera(width, height, f, f, width / 2, height / 2)


def render_as(image: np.ndarray, camera: Camera, target: Camera) -> np.ndarray:
    """Resample an RGB frame of `camera` (no distortion) as `target` sees it, from the same centre and rotation.

    For every pixel of the new image, its undistorted normalised ray is found (cv2.undistortPoints, iterative)
    and projected into the original frame; pixels whose ray leaves the original frame are black.
    """
    u, v = np.meshgrid(np.arange(target.width, dtype=np.float64), np.arange(target.height, dtype=np.float64))
    k_cv = target.matrix
    k_cv[:2, 2] -= HALF_PIXEL  # OpenCV puts the top-left pixel centre at (0, 0)
    pixels = np.stack([u.ravel(), v.ravel()], axis=1).reshape(-1, 1, 2)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-9)
    dist = np.asarray(target.distortion) if target.distortion else None
    normalised = cv2.undistortPoints(pixels, k_cv, dist, None, None, None, criteria).reshape(-1, 2)
    map_x = normalised[:, 0] * camera.fx + camera.cx - HALF_PIXEL
    map_y = normalised[:, 1] * camera.fy + camera.cy - HALF_PIXEL
    shape = (target.height, target.width)
    return cv2.remap(image, map_x.reshape(shape).astype(np.float32), map_y.reshape(shape).astype(np.float32),
                     cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def degrade(image: np.ndarray, damage: Damage, rng: np.random.Generator) -> bytes:
    """Exposure, white balance and noise applied to an RGB frame, then JPEG-encoded at low quality."""
    out = image.astype(np.float32) * damage.gain * np.asarray(damage.white_balance, np.float32)
    out += rng.normal(0.0, damage.noise, out.shape).astype(np.float32)
    bgr = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, damage.jpeg_quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def fixed_camera_frame(
    image: np.ndarray, camera: Camera, rng: np.random.Generator, scale: float = 2.0,
    lens: tuple[float, ...] = DEFAULT_LENS, target: Camera | None = None,
) -> tuple[bytes, Camera]:
    """One damaged JPEG of a fixed camera made from `image`, and that camera's exact intrinsics and distortion:
    `target` when given, else `camera` scaled by `scale` through `lens`."""
    if target is None:
        lensed, target = render_through_lens(image, camera, scale, lens)
    else:
        lensed = render_as(image, camera, target)
    return degrade(lensed, Damage.random(rng), rng), target

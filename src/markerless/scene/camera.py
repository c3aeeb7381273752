"""The one camera type of markerless, and the one place where pixel conventions meet.

Intrinsics (`Camera.cx`, `cy`, and every 3x3 matrix on the wire) follow COLMAP's, Polycam's and ARKit's
convention: the centre of the top-left pixel is (0.5, 0.5). Keypoints in feature files follow hloc's: that
centre is (0, 0). `to_camera_pixels` / `from_camera_pixels` convert between the two and `rescale_pixels` maps
pixel coordinates between two resolutions of one image; nothing else adds or removes half a pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from markerless.errors import BadIntrinsicsError

HALF_PIXEL = 0.5


def to_camera_pixels(keypoints: np.ndarray) -> np.ndarray:
    """hloc keypoints (top-left pixel centre at 0, 0) -> the camera's convention, float64."""
    return np.asarray(keypoints, dtype=np.float64) + HALF_PIXEL


def from_camera_pixels(pixels: np.ndarray) -> np.ndarray:
    """The camera's pixel convention (COLMAP) -> hloc keypoints."""
    return np.asarray(pixels) - HALF_PIXEL


def rescale_pixels(keypoints: np.ndarray, scale: float | np.ndarray) -> np.ndarray:
    """hloc keypoints of an image -> the same points in the image resized by `scale` (new size / old size)."""
    return (keypoints + HALF_PIXEL) * scale - HALF_PIXEL


@dataclass(frozen=True)
class Camera:
    """Image size, pinhole intrinsics (COLMAP pixel convention) and OpenCV distortion (k1, k2, p1, p2[, k3...])."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion: tuple[float, ...] = ()

    @classmethod
    def from_matrix(
        cls, K: Sequence[Sequence[float]], width: int, height: int, distortion: Sequence[float] | None = ()
    ) -> Camera:
        """Validate a 3x3 intrinsics matrix; raises BadIntrinsicsError naming what is wrong."""
        try:
            mat = np.asarray(K, dtype=float)
            dist = tuple(float(v) for v in (distortion or ()))
        except (TypeError, ValueError) as exc:
            raise BadIntrinsicsError(f"intrinsics must be a 3x3 matrix of numbers: {exc}") from exc
        if mat.shape != (3, 3):
            raise BadIntrinsicsError(f"intrinsics must be a 3x3 matrix, got shape {mat.shape}")
        if not np.all(np.isfinite(mat)) or not all(math.isfinite(v) for v in dist):
            raise BadIntrinsicsError("intrinsics or distortion contain a non-finite value")
        if not np.allclose(mat[2], [0, 0, 1]) or abs(mat[1, 0]) > 1e-9:
            raise BadIntrinsicsError(f"intrinsics last row must be [0, 0, 1], got {mat[2].tolist()}")
        if abs(mat[0, 1]) > 1e-6 * max(abs(mat[0, 0]), 1.0):
            raise BadIntrinsicsError(f"skewed intrinsics are not supported (K[0][1] = {mat[0, 1]})")
        camera = cls(int(width), int(height), mat[0, 0], mat[1, 1], mat[0, 2], mat[1, 2], dist)
        camera.validate()
        return camera

    def validate(self) -> None:
        size = max(self.width, self.height)
        if self.width <= 0 or self.height <= 0:
            raise BadIntrinsicsError(f"image size must be positive, got {self.width}x{self.height}")
        for name, f in (("fx", self.fx), ("fy", self.fy)):
            # 0.1 x size is a 157 deg field of view, 50 x size about 1 deg: beyond either it's a unit mistake
            if not (0.1 * size <= f <= 50 * size):
                raise BadIntrinsicsError(
                    f"{name} = {f:g} px is absurd for a {self.width}x{self.height} image (expected {0.1 * size:g}"
                    f"..{50 * size:g})"
                )
        if not (0 <= self.cx <= self.width and 0 <= self.cy <= self.height):
            raise BadIntrinsicsError(
                f"principal point ({self.cx:g}, {self.cy:g}) lies outside the {self.width}x{self.height} image"
            )
        if len(self.distortion) not in (0, 4, 5, 8):
            raise BadIntrinsicsError(
                f"distortion must have 0, 4, 5 or 8 OpenCV coefficients, got {len(self.distortion)}"
            )
        if any(abs(v) > 10 for v in self.distortion):
            raise BadIntrinsicsError(f"distortion coefficients out of range: {list(self.distortion)}")

    @property
    def focal(self) -> float:
        """The focal length in pixels, sqrt(fx * fy): one value for both axes, to turn angles into pixels with."""
        return math.sqrt(self.fx * self.fy)

    @property
    def matrix(self) -> np.ndarray:
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def scaled(self, sx: float, sy: float | None = None) -> Camera:
        """The same camera for the image resized by (sx, sy); COLMAP-convention intrinsics scale as they are."""
        sy = sx if sy is None else sy
        return replace(self, width=round(self.width * sx), height=round(self.height * sy), fx=self.fx * sx,
                       fy=self.fy * sy, cx=self.cx * sx, cy=self.cy * sy)

    def rays(self, keypoints: np.ndarray) -> np.ndarray:
        """hloc keypoints (N, 2) -> camera-frame directions (N, 3) with z = 1 (pinhole: distortion ignored)."""
        pixels = to_camera_pixels(keypoints)
        x = (pixels[:, 0] - self.cx) / self.fx
        y = (pixels[:, 1] - self.cy) / self.fy
        return np.stack([x, y, np.ones_like(x)], axis=1)

    def to_pycolmap(self) -> Any:  # pycolmap.Camera
        """PINHOLE without distortion, OPENCV with four coefficients, FULL_OPENCV with more."""
        import pycolmap

        d = list(self.distortion)
        if not d:
            model, params = "PINHOLE", [self.fx, self.fy, self.cx, self.cy]
        elif len(d) == 4:
            model, params = "OPENCV", [self.fx, self.fy, self.cx, self.cy, *d]
        else:  # k1 k2 p1 p2 k3 [k4 k5 k6]
            d = (d + [0.0] * 8)[:8]
            model, params = "FULL_OPENCV", [self.fx, self.fy, self.cx, self.cy, *d]
        return pycolmap.Camera(model=model, width=self.width, height=self.height, params=params)

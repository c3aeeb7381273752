"""Camera frames as bytes -> RGB arrays, refusing decompression bombs before a single pixel is decoded.

The size comes from the file header (markerless.image_headers), so a 100 KB PNG declaring 30000 x 30000
pixels is refused in microseconds instead of costing seconds of worker time and gigabytes of memory. Only
JPEG and PNG are accepted: those are the formats whose headers are checked.
"""

from __future__ import annotations

import cv2
import numpy as np

from markerless.errors import BadImageError
from markerless.image_headers import ImageHeaderError, read_image_header
from markerless.scene.limits import MAX_IMAGE_PIXELS


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """JPEG/PNG bytes -> HxWx3 uint8 RGB; raises BadImageError (reason `bad_image`) for anything else."""
    if not data:
        raise BadImageError("image is empty")
    try:
        header = read_image_header(data)
    except ImageHeaderError as exc:
        raise BadImageError(f"image refused ({len(data)} bytes): {exc}") from exc
    if header.pixels > max_pixels:
        raise BadImageError(
            f"{header.format.upper()} of {header.width}x{header.height} pixels exceeds the {max_pixels}-pixel limit"
        )
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise BadImageError(f"{header.format.upper()} of {header.width}x{header.height} does not decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

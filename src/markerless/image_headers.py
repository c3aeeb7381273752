"""Image sizes read from file headers, before any pixel is decoded.

A decoder allocates what the header declares: a 100 KB PNG can declare 30000 x 30000 pixels (2.7 GB once
decoded). Reading the header first lets every caller (frames from cameras, keyframes and depth maps of an
upload) refuse a file by its declared size in microseconds. Only the formats parsed here are accepted; anything
else cv2.imdecode might read (TIFF, WebP, BMP, ...) is refused, because its size could not be checked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers carry the image size (baseline, extended, progressive, lossless, arithmetic); C4 (DHT),
# C8 (JPG extension) and CC (DAC) share the range but are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM have no length field
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_PNG_COLOR_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


class ImageHeaderError(ValueError):
    """The bytes are not a JPEG or PNG whose header can be read."""


@dataclass(frozen=True)
class ImageHeader:
    """What a header declares: format, size, bits per sample and samples per pixel."""

    format: str  # "jpeg" or "png"
    width: int
    height: int
    bit_depth: int
    channels: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_image_header(data: bytes) -> ImageHeader:
    """Parse a JPEG or PNG header (the first bytes of the file suffice); raises ImageHeaderError."""
    if data.startswith(PNG_SIGNATURE):
        return _png_header(data)
    if data.startswith(JPEG_SOI):
        return _jpeg_header(data)
    raise ImageHeaderError("not a JPEG or PNG (unsupported or unknown image format)")


def _png_header(data: bytes) -> ImageHeader:
    # The first chunk must be IHDR: length 13, type, width, height, bit depth, colour type, ...
    if len(data) < 33 or data[12:16] != b"IHDR" or struct.unpack(">I", data[8:12])[0] != 13:
        raise ImageHeaderError("PNG without a valid IHDR header")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    if color_type not in _PNG_COLOR_CHANNELS or bit_depth not in (1, 2, 4, 8, 16):
        raise ImageHeaderError(f"PNG with invalid colour type {color_type} or bit depth {bit_depth}")
    return _checked(ImageHeader("png", width, height, bit_depth, _PNG_COLOR_CHANNELS[color_type]))


def _jpeg_header(data: bytes) -> ImageHeader:
    """Walk the marker segments up to the first start-of-frame (EXIF thumbnails sit inside APP1 and are skipped)."""
    pos = 2
    while True:
        while pos < len(data) and data[pos] != 0xFF:  # junk between segments is tolerated, as libjpeg does
            pos += 1
        while pos < len(data) and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= len(data):
            raise ImageHeaderError("JPEG ends before its frame header")
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI):
            raise ImageHeaderError("JPEG has no frame header before its scan data")
        if pos + 2 > len(data):
            raise ImageHeaderError("JPEG ends inside a segment header")
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise ImageHeaderError(f"JPEG segment with invalid length {length}")
        if marker in _JPEG_SOF:
            if length < 8 or pos + 8 > len(data):
                raise ImageHeaderError("JPEG frame header is truncated")
            precision, height, width, components = struct.unpack(">BHHB", data[pos + 2 : pos + 8])
            return _checked(ImageHeader("jpeg", width, height, precision, components))
        pos += length


def _checked(header: ImageHeader) -> ImageHeader:
    if header.width <= 0 or header.height <= 0:
        raise ImageHeaderError(f"{header.format.upper()} declares an empty size {header.width}x{header.height}")
    return header

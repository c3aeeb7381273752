"""markerless: markerless camera calibration against scanned 3D scenes."""

__version__ = "0.1.0"

"""Typed failures with a machine-readable reason, shared by every layer (CLI, daemon, tests).

A failure is never a fallback pose: each carries `reason` (a stable snake_case code that clients switch on)
and a human message that names the file, field or value at fault.
"""

from __future__ import annotations


class MarkerlessError(Exception):
    """Base class: `reason` is the wire code, `str(exc)` the human message."""

    reason = "internal_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class DatasetError(MarkerlessError):
    """A scan upload that cannot be registered (corrupt zip, missing folder, bad JSON, ...)."""

    reason = "bad_dataset"


class SceneNotFoundError(MarkerlessError):
    reason = "scene_not_found"


class BadImageError(MarkerlessError):
    reason = "bad_image"


class BadIntrinsicsError(MarkerlessError):
    reason = "bad_intrinsics"


class MissingWeightsError(MarkerlessError):
    """A pretrained file a scene needs is absent: the message names the file, the search path and the fetch command."""

    reason = "missing_weights"


class IntrinsicsUndeterminedError(MarkerlessError):
    """`estimate` mode, and the matches cover too little of the image to determine the focal length."""

    reason = "intrinsics_undetermined"

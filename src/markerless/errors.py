"""Typed failures with a machine-readable reason, shared by every layer (CLI, daemon, tests).

A failure is never a fallback pose: each carries `reason` (a stable snake_case code that clients switch on)
and a human message that names the file, field or value at fault. `Reason` is the one closed list of those codes:
the localizer, the store, the models, the daemon and the demo all name theirs from it, and the AsyncAPI document
publishes it as the enum of `PoseResult.reason` and `RegistrationStatus.reason`.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Every failure code markerless emits (a `str`: it compares, formats and serializes as its value)."""

    # localization of a frame (pipeline.localization, pipeline.pose)
    NO_FEATURES = "no_features"  # too few keypoints in the image
    NO_MATCHES = "no_matches"  # no descriptor match with any retrieved keyframe
    NO_VERIFIED_MATCHES = "no_verified_matches"  # no retrieved keyframe agrees on a pose: another place
    TOO_FEW_MATCHES = "too_few_matches"  # gate minimum_number_of_matches
    PNP_FAILED = "pnp_failed"  # no pose from the verified matches
    LOW_INLIER_RATIO = "low_inlier_ratio"  # gate inlier_threshold
    UNCERTAIN_POSE = "uncertain_pose"  # gate max_position_sigma_m
    INTRINSICS_UNDETERMINED = "intrinsics_undetermined"  # `estimate` mode: the matches cannot fix the focal length
    # inputs
    BAD_REQUEST = "bad_request"  # not JSON, wrong types, missing fields, a bad queries file
    TOO_LARGE = "too_large"  # payload above worker.max_payload_bytes
    BAD_IMAGE = "bad_image"  # not base64, or not a decodable JPEG/PNG within the size limits
    BAD_INTRINSICS = "bad_intrinsics"  # missing, wrong shape, non-finite, non-positive focal, unknown mode
    CAMERA_MISMATCH = "camera_mismatch"  # the frame's `id` is not the camera of its topic
    UNKNOWN_CAMERA = "unknown_camera"  # camera not in scenes.yaml and the frame names no scene
    BAD_DATASET = "bad_dataset"  # the scan upload cannot be registered
    FORBIDDEN_PATH = "forbidden_path"  # a register request names a dataset outside the allowed directories
    BAD_SCENE_ID = "bad_scene_id"  # not a usable scene id
    BAD_SCENE_CONFIG = "bad_scene_config"  # overrides a dense matcher's preset does not have
    # scenes
    SCENE_NOT_FOUND = "scene_not_found"  # scene neither configured nor registered
    SCENE_REGISTERING = "scene_registering"  # first registration of the scene still running
    SCENE_OUTDATED = "scene_outdated"  # stored with settings or a format this code does not use: register again
    # pretrained weights
    MISSING_WEIGHTS = "missing_weights"  # a file the scene needs is absent (the message says how to fetch it)
    BAD_WEIGHTS = "bad_weights"  # a weights file that is not the expected checkpoint
    BAD_MANIFEST = "bad_manifest"  # the weights manifest is unreadable
    UNKNOWN_WEIGHTS = "unknown_weights"  # a name the manifest does not list
    WEIGHTS_CHECKSUM_MISMATCH = "weights_checksum_mismatch"  # a file differs from its manifest checksum
    DOWNLOAD_FAILED = "download_failed"  # `markerless weights fetch` could not download
    # the service
    SUPERSEDED = "superseded"  # a newer frame from the same camera replaced this queued one
    TIMEOUT = "timeout"  # still queued past worker.deadline_s (demo: no reply in time)
    OVERLOADED = "overloaded"  # calibration queue full
    BUSY = "busy"  # registration queue full
    SHUTTING_DOWN = "shutting_down"  # the service stopped before handling the request
    INTERRUPTED = "interrupted"  # the service died while this registration was accepted or running
    INTERNAL_ERROR = "internal_error"  # a bug: traceback in the log
    # the demo
    BAD_SETTINGS = "bad_settings"  # an embedded broker asked to listen beyond loopback
    BROKER_UNAVAILABLE = "broker_unavailable"  # no MQTT broker to talk to


class MarkerlessError(Exception):
    """Base class: `reason` is the wire code, `str(exc)` the human message."""

    reason: Reason = Reason.INTERNAL_ERROR

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class DatasetError(MarkerlessError):
    """A scan upload that cannot be registered (corrupt zip, missing folder, bad JSON, ...)."""

    reason = Reason.BAD_DATASET


class SceneNotFoundError(MarkerlessError):
    reason = Reason.SCENE_NOT_FOUND


class SceneOutdatedError(MarkerlessError):
    """A stored scene version made with other data-shaping settings or an older storage format."""

    reason = Reason.SCENE_OUTDATED


class BadImageError(MarkerlessError):
    reason = Reason.BAD_IMAGE


class BadIntrinsicsError(MarkerlessError):
    reason = Reason.BAD_INTRINSICS


class MissingWeightsError(MarkerlessError):
    """A pretrained file a scene needs is absent: the message names the file, the search path and the fetch command."""

    reason = Reason.MISSING_WEIGHTS


class IntrinsicsUndeterminedError(MarkerlessError):
    """`estimate` mode, and the matches cover too little of the image to determine the focal length."""

    reason = Reason.INTRINSICS_UNDETERMINED

"""`scenes.yaml`: which scan each scene is, how it is registered and where it sits; which scene each camera sees.

It is its own file, apart from the service settings, because operators edit it far more often. Dataset paths may
use ${VARS} and are relative to the file; unknown keys are refused, as in the settings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy.spatial.transform import Rotation

from markerless.pipeline.intrinsics_mode import IntrinsicsMode
from markerless.scene.config import SceneConfig
from markerless.service.settings import read_mapping

_ENV_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")  # what os.path.expandvars expands

Matrix3 = Annotated[
    list[Annotated[list[float], Field(min_length=3, max_length=3)]], Field(min_length=3, max_length=3)
]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScenePose(_Entry):
    """SceneScape's scene pose (mesh_translation / mesh_rotation / mesh_scale), applied to every result."""

    translation: list[float] = Field(
        default_factory=lambda: [0.0, 0.0, 0.0], min_length=3, max_length=3, title="Translation", description="Metres."
    )
    rotation: list[float] = Field(
        default_factory=lambda: [0.0, 0.0, 0.0],
        min_length=3,
        max_length=3,
        title="Rotation",
        description="Euler angles in degrees, intrinsic 'XYZ' as SceneScape's getPoseMatrix.",
    )
    scale: list[float] = Field(
        default_factory=lambda: [1.0, 1.0, 1.0], min_length=3, max_length=3, title="Scale", description="Per axis."
    )

    @field_validator("translation", "rotation", "scale")
    @classmethod
    def _finite(cls, value: list[float]) -> list[float]:
        if not all(np.isfinite(value)):
            raise ValueError(f"non-finite value in {value}")
        return value

    @field_validator("scale")
    @classmethod
    def _positive_scale(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value):
            raise ValueError(f"scale must be positive, got {value}")
        return value

    def matrix(self) -> np.ndarray:
        """4x4 `[R_euler | t] @ diag(scale, 1)`, SceneScape's scene pose matrix."""
        m = np.eye(4)
        m[:3, :3] = Rotation.from_euler("XYZ", self.rotation, degrees=True).as_matrix()
        m[:3, 3] = self.translation
        return m @ np.diag([*self.scale, 1.0])

    def apply(self, quaternion: list[float], translation: list[float]) -> tuple[list[float], list[float]]:
        """Map a camera-to-world pose from the raw.glb frame into scene coordinates.

        The camera centre goes through the full matrix (scale included); the orientation is rotated only, so the
        quaternion stays a rotation even with a non-unit scale (SceneScape would feed a scaled matrix to
        `from_matrix`)."""
        rot = Rotation.from_euler("XYZ", self.rotation, degrees=True)
        centre = self.matrix() @ np.array([*translation, 1.0])
        orientation = rot * Rotation.from_quat(quaternion)  # scipy quaternions are [x, y, z, w] like ours
        return orientation.as_quat().tolist(), centre[:3].tolist()


class SceneEntry(_Entry):
    """One scene: where its scan is, how to register it, where it sits in the SceneScape scene."""

    name: str | None = Field(None, title="Name", description="Human name (echoed as scene_name in busy replies).")
    dataset: Path = Field(title="Dataset", description="Polycam raw-data zip. ${VARS} are expanded.")
    config: SceneConfig = Field(
        default_factory=SceneConfig, title="Scene config", description="SceneScape's six calibration fields."
    )
    pose: ScenePose = Field(default_factory=ScenePose, title="Scene pose", description="Applied to every result.")


class CameraEntry(_Entry):
    """A camera: its scene, and intrinsics for frames that carry none (SceneScape's REST fallback)."""

    scene: str = Field(min_length=1, title="Scene", description="Scene id the camera looks at.")
    intrinsics: Matrix3 | None = Field(None, title="Intrinsics", description="3x3 K, used when a frame has none.")
    distortion: list[float] = Field(
        default_factory=list, max_length=8, title="Distortion", description="OpenCV k1, k2, p1, p2[, k3]."
    )
    intrinsics_mode: IntrinsicsMode = Field(
        "refine", title="Intrinsics mode",
        description="fixed: exact; refine: a starting point (focal and radial distortion estimated when the matches "
        "determine them); estimate: unknown, no intrinsics needed. A frame's own intrinsics_mode overrides it.",
    )
    watch: bool = Field(
        True, title="Watch calibration",
        description="Keep this camera's calibration and watch it for moves (calibration.enabled must be on too).",
    )


class ScenesFile(_Entry):
    """`scenes.yaml`."""

    scenes: dict[str, SceneEntry] = Field(default_factory=dict, title="Scenes", description="Scene id -> scene.")
    cameras: dict[str, CameraEntry] = Field(
        default_factory=dict, title="Cameras", description="Camera id -> scene id, or -> {scene, intrinsics}."
    )

    @field_validator("cameras", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"scene": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _cameras_name_known_scenes(self) -> ScenesFile:
        unknown = {cam: c.scene for cam, c in self.cameras.items() if c.scene not in self.scenes}
        if unknown:
            raise ValueError(f"cameras refer to scenes not in 'scenes': {unknown}")
        return self

    @classmethod
    def load(cls, path: Path | None) -> ScenesFile:
        """Read scenes.yaml; dataset paths get ${VARS} expanded and are made absolute against the file."""
        if path is None:
            return cls()
        path = Path(path)
        data = read_mapping(path, "scenes file", "a mapping with 'scenes' and 'cameras'")
        parsed = cls.model_validate(data)
        base = path.resolve().parent
        scenes = {}
        for scene_id, entry in parsed.scenes.items():
            unset = sorted({a or b for a, b in _ENV_VAR.findall(str(entry.dataset))} - set(os.environ))
            if unset:  # expandvars would leave "${VAR}" in the path, and the scan would be "not found" later
                raise ValueError(f"{path}: scene {scene_id!r}: dataset {str(entry.dataset)!r} uses the environment "
                                 f"variable{'s' if len(unset) > 1 else ''} {', '.join(unset)}, which "
                                 f"{'are' if len(unset) > 1 else 'is'} not set")
            dataset = Path(os.path.expandvars(str(entry.dataset)))
            absolute = dataset if dataset.is_absolute() else base / dataset
            scenes[scene_id] = entry.model_copy(update={"dataset": absolute})
        return parsed.model_copy(update={"scenes": scenes})

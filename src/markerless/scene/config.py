"""Scene configuration: SceneScape's six per-scene fields, validated at the edge.

The field names, shapes and defaults follow SceneScape's `Scene` model (dicts of conf name -> overrides for
`local_feature` and `matcher`), except `global_feature`, whose default is `vlad`: it needs no pretrained weights,
so a fresh offline install works. `netvlad` is accepted and loads the official hloc weights when present.
An unsupported value is refused with the list of supported ones, instead of SceneScape's KeyError at run time.

Overrides are partial hloc confs, merged recursively into the preset. Those of `sift` and of the sparse matchers
are validated here (`SiftOverrides`, `NearestNeighborOverrides`: an unknown key is refused, never ignored) and,
unlike SceneScape, which applies them to the query only, shape the stored keyframe features as well; `-` takes
none; the dense matchers' keys are checked against their preset when the scene is registered or used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GLOBAL_FEATURES = ("vlad", "netvlad")
LOCAL_FEATURES = ("sift", "-")
SPARSE_MATCHERS = ("NN-ratio", "NN-mutual")
DENSE_MATCHERS = ("qta_indoor", "qta_indoor_fast", "qta_outdoor")


class _Overrides(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiftOptions(_Overrides):
    """pycolmap SIFT extraction options that may override the `sift` preset (None: the preset's value)."""

    first_octave: int | None = Field(None, ge=-1, le=2, description="-1 upsamples the image first.")
    peak_threshold: float | None = Field(None, gt=0, description="DoG contrast threshold.")
    edge_threshold: float | None = Field(None, gt=0, description="Edge response threshold.")
    max_num_features: int | None = Field(None, ge=1, description="Strongest keypoints kept.")
    num_octaves: int | None = Field(None, ge=1, le=8)
    octave_resolution: int | None = Field(None, ge=1, le=8)
    max_num_orientations: int | None = Field(None, ge=1, le=4)
    upright: bool | None = Field(None, description="No orientation estimation.")


class SiftPreprocessing(_Overrides):
    resize_max: int | None = Field(None, ge=64, description="Longer image side; images are only shrunk.")


class SiftOverrides(_Overrides):
    """`local_feature: {"sift": {...}}`: hloc's conf shape, `options` and `preprocessing`."""

    options: SiftOptions = SiftOptions()
    preprocessing: SiftPreprocessing = SiftPreprocessing()


class NearestNeighborModel(_Overrides):
    ratio_threshold: float | None = Field(None, gt=0, le=1, description="Lowe's ratio; also given to NN-mutual.")


class NearestNeighborOverrides(_Overrides):
    """`matcher: {"NN-ratio": {...}}` or `NN-mutual`: hloc's conf shape, `model`. Query-time only."""

    model: NearestNeighborModel = NearestNeighborModel()


class SceneConfig(BaseModel):
    """How a scene is registered and how cameras are localized against it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    global_feature: str = Field(
        "vlad",
        title="Global feature",
        description="Retrieval descriptor: 'vlad' (RootSIFT VLAD trained on the scene, no weights) or 'netvlad'.",
    )
    local_feature: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"sift": {}},
        title="Local feature",
        description="Conf name -> overrides, one entry. 'sift' (sparse) or '-' (dense matching, no local features).",
    )
    matcher: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"NN-ratio": {}},
        title="Matcher",
        description="Conf name -> overrides, one entry paired with local_feature: NN-ratio/NN-mutual, "
        "or qta_* if dense.",
    )
    number_of_localizations: int = Field(
        50, ge=1, le=10000, title="Retrieved keyframes",
        description="Top-K keyframes matched (clamped to the scene size).",
    )
    minimum_number_of_matches: int = Field(
        20, ge=4, title="Minimum matches", description="Quality gate: fewest verified 2D-3D matches accepted."
    )
    inlier_threshold: float = Field(
        0.5, ge=0.0, le=1.0, title="Inlier ratio", description="Quality gate: PnP inliers / verified matches."
    )
    max_position_sigma_m: float | None = Field(
        None, gt=0.0, title="Maximum position uncertainty",
        description="Optional quality gate (not SceneScape's): refuse a pose whose camera centre has a larger "
        "1-sigma uncertainty along its worst axis, in metres, with reason 'uncertain_pose'. Off by default.",
    )

    @field_validator("global_feature")
    @classmethod
    def _known_global(cls, value: str) -> str:
        if value not in GLOBAL_FEATURES:
            raise ValueError(f"unsupported global_feature {value!r}; supported: {', '.join(GLOBAL_FEATURES)}")
        return value

    @model_validator(mode="after")
    def _known_local_and_matcher(self) -> SceneConfig:
        if len(self.local_feature) != 1 or len(self.matcher) != 1:
            raise ValueError("Specify a local feature for each matcher! (exactly one local_feature and one matcher)")
        (local,) = self.local_feature
        (matcher,) = self.matcher
        if local not in LOCAL_FEATURES:
            raise ValueError(f"unsupported local_feature {local!r}; supported: {', '.join(LOCAL_FEATURES)}")
        allowed = DENSE_MATCHERS if local == "-" else SPARSE_MATCHERS
        if matcher not in allowed:
            raise ValueError(
                f"unsupported matcher {matcher!r} for local_feature {local!r}; supported: {', '.join(allowed)}"
            )
        if local == "-":
            if self.local_feature[local]:
                raise ValueError(
                    f"local_feature '-' (dense matching) takes no overrides, got {self.local_feature[local]}"
                )
        else:
            _check_overrides(f"local_feature {local!r}", SiftOverrides, self.local_feature[local])
            _check_overrides(f"matcher {matcher!r}", NearestNeighborOverrides, self.matcher[matcher])
        return self

    @property
    def sift_overrides(self) -> SiftOverrides:
        """The validated overrides of `sift` (none for dense scenes)."""
        return SiftOverrides.model_validate(self.local_feature.get("sift", {}))

    @property
    def matcher_overrides(self) -> dict[str, Any]:
        """Sparse matchers: the validated `model` keys given; dense: the overrides as given (checked on use)."""
        overrides = self.matcher[self.matcher_name]
        if self.dense:
            return dict(overrides)
        return NearestNeighborOverrides.model_validate(overrides).model.model_dump(exclude_none=True)

    @property
    def local_name(self) -> str:
        return next(iter(self.local_feature))

    @property
    def matcher_name(self) -> str:
        return next(iter(self.matcher))

    @property
    def dense(self) -> bool:
        return self.local_name == "-"

    @classmethod
    def from_file(cls, path: Path) -> SceneConfig:
        """Read a YAML or JSON file holding the six fields (unknown keys are refused)."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read scene config: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: scene config must be a mapping of the six fields")
        return cls.model_validate(data)


def _check_overrides(what: str, model: type[_Overrides], overrides: dict[str, Any]) -> None:
    """Refuse overrides `model` does not describe, naming each bad key and what is accepted."""
    try:
        model.model_validate(overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        accepted = ", ".join(
            f"{name}.{key}" for name, field in model.model_fields.items()
            for key in field.annotation.model_fields  # type: ignore[union-attr]
        )
        raise ValueError(f"{what} overrides: {problems} (accepted: {accepted})") from None

"""A scene config resolved into the confs its stages run with, in one place.

Registration, the scene identity and localization all need the presets of a scene's six fields with its overrides
merged in; `stage_confs` resolves them once, so that the three read one object instead of each merging on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markerless.pipeline.dense import cache_settings
from markerless.pipeline.features import sift_conf
from markerless.pipeline.matching import confs as matcher_confs
from markerless.pipeline.retrieval import confs as retrieval_confs
from markerless.scene.config import SceneConfig


@dataclass(frozen=True)
class StageConfs:
    """What each stage of a scene runs with (hloc's conf layout)."""

    global_feature: str  # the retrieval conf's name: `vlad` or `netvlad`
    retrieval: dict[str, Any]  # its conf
    sift: dict[str, Any]  # the `sift` preset with the scene's overrides (keyframes and queries alike)
    ratio: float | None  # the sparse matcher's ratio test; None without one, and for a dense scene
    dense: dict[str, Any] | None  # what the dense matcher's keyframe cache depends on; None for a sparse scene

    @property
    def needs_sift(self) -> bool:
        """Keyframe SIFT, or the SIFT of the VLAD vocabulary."""
        return self.dense is None or self.global_feature == "vlad"


def stage_confs(config: SceneConfig) -> StageConfs:
    """The confs of a scene of `config`.

    Raises MarkerlessError (`bad_scene_config`) for dense-matcher overrides the preset does not have.
    """
    sparse_matcher = None if config.dense else {**matcher_confs[config.matcher_name]["model"],
                                                **config.matcher_overrides}
    return StageConfs(
        global_feature=config.global_feature,
        retrieval=retrieval_confs[config.global_feature],
        sift=sift_conf(config.sift_overrides),
        ratio=None if sparse_matcher is None else sparse_matcher["ratio_threshold"],
        dense=cache_settings(config.matcher_name, config.matcher_overrides) if config.dense else None,
    )

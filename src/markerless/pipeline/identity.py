"""What a stored scene is: every setting that shapes its stored data, recorded at registration, compared on use.

hloc names its output files after the conf that made them; here the manifest records the settings themselves
(`scene_identity`), so keyframes stored with other extraction settings are never matched against queries extracted
with the current ones. `needs_registration` sees the difference (the daemon then registers the scene again) and
the localizer refuses such a scene with reason `scene_outdated` until then. Query-time knobs (the gates,
`number_of_localizations`, the sparse matcher's ratio, `LocalizationOptions`) are not part of it: changing them
never re-extracts anything.
"""

from __future__ import annotations

import json
from typing import Any

from markerless.pipeline.dense import cache_settings
from markerless.pipeline.features import sift_conf
from markerless.pipeline.retrieval import confs as retrieval_confs
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import DepthConfig


def scene_identity(config: SceneConfig, use_depth: bool) -> dict[str, Any]:
    """The data-shaping settings of a scene registered with `config` by this code, as the manifest stores them.

    Raises MarkerlessError (`bad_scene_config`) for dense-matcher overrides the preset does not have.
    """
    identity: dict[str, Any] = {
        "global_feature": {config.global_feature: retrieval_confs[config.global_feature]},
        "use_depth": use_depth,
    }
    if not config.dense or config.global_feature == "vlad":  # keyframe SIFT, or the SIFT of the VLAD vocabulary
        identity["local_feature"] = {"sift": sift_conf(config.sift_overrides)}
    if config.dense:
        identity["dense"] = cache_settings(config.matcher_name, config.matcher_overrides)
    else:  # stored 3D points: lifted from depth with these thresholds, else from the mesh
        identity["depth"] = DepthConfig().model_dump()
    return json.loads(json.dumps(identity))  # as read back from the manifest (tuples become lists)


def identity_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ, as `name: recorded -> current`, for a message that says what changed."""
    return [
        f"{key}: {recorded.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    ]

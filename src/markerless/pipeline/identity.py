"""What a stored scene is: every setting that shapes its stored data, recorded at registration, compared on use.

hloc names its output files after the conf that made them; here the manifest records the settings themselves
(`scene_identity`), so keyframes stored with other extraction settings are never matched against queries extracted
with the current ones. `needs_registration` sees the difference (the daemon then registers the scene again) and
the localizer refuses such a scene with reason `scene_outdated` until then (`check_served`, at a loaded scene's
first frame: its identity cannot change while it is held). Query-time knobs (the gates, `number_of_localizations`,
the sparse matcher's ratio, `LocalizationOptions`) are not part of it: changing them never re-extracts anything.
"""

from __future__ import annotations

import json
from typing import Any

from markerless.errors import SceneOutdatedError
from markerless.pipeline.stage_confs import StageConfs, stage_confs
from markerless.scene.config import SceneConfig
from markerless.scene.geometry import DepthConfig
from markerless.scene.store import SceneInfo


def scene_identity(config: SceneConfig, use_depth: bool) -> dict[str, Any]:
    """The data-shaping settings of a scene registered with `config` by this code, as the manifest stores them.

    Raises MarkerlessError (`bad_scene_config`) for dense-matcher overrides the preset does not have.
    """
    return confs_identity(stage_confs(config), use_depth)


def confs_identity(confs: StageConfs, use_depth: bool) -> dict[str, Any]:
    """`scene_identity` of a config already resolved into `confs`."""
    identity: dict[str, Any] = {
        "global_feature": {confs.global_feature: confs.retrieval},
        "use_depth": use_depth,
    }
    if confs.needs_sift:
        identity["local_feature"] = {"sift": confs.sift}
    if confs.dense is not None:
        identity["dense"] = confs.dense
    else:  # stored 3D points: lifted from depth with these thresholds, else from the mesh
        identity["depth"] = DepthConfig().model_dump()
    return json.loads(json.dumps(identity))  # as read back from the manifest (tuples become lists)


def check_served(info: SceneInfo, confs: StageConfs) -> None:
    """Raises SceneOutdatedError unless the version of `info` was stored with the settings of `confs` (its config
    resolved by this code): its keyframes would not match queries extracted now."""
    current = confs_identity(confs, info.use_depth)
    if info.identity != current:
        changes = "; ".join(identity_changes(info.identity, current))
        raise SceneOutdatedError(f"scene {info.scene_id!r} version {info.version} was stored with other "
                                 f"settings than this markerless uses ({changes}): register it again")


def identity_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ, as `name: recorded -> current`, for a message that says what changed."""
    return [
        f"{key}: {recorded.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    ]

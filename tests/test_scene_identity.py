"""Settings that shape stored data are the scene's identity: recorded at registration, compared on use; overrides
are honoured or refused; query-time knobs never re-extract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from mqtt_fixtures import TOPICS, Broker, FakeCore, daemon_settings, frame, jpeg, k_for
from polycam_factory import subset_zip
from pydantic import ValidationError

from markerless.errors import MarkerlessError, Reason, SceneOutdatedError
from markerless.pipeline.features import FeatureModels, confs, sift_conf
from markerless.pipeline.identity import identity_changes, scene_identity
from markerless.pipeline.localization import Localizer
from markerless.pipeline.registration import needs_registration, register_scene
from markerless.scene.camera import Camera
from markerless.scene.config import SceneConfig, SiftOverrides
from markerless.scene.h5io import read_local_features
from markerless.scene.store import MANIFEST, STORE_FORMAT, SceneStore
from markerless.service.scenes_file import ScenesFile

DENSE = {"local_feature": {"-": {}}, "matcher": {"qta_indoor": {}}}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"local_feature": {"sift": {"options": {"peak_treshold": 0.01}}}},
         "local_feature 'sift' overrides: options.peak_treshold: Extra inputs are not permitted"),
        ({"local_feature": {"sift": {"nms": 4}}}, "accepted: options.first_octave"),
        ({"local_feature": {"sift": {"options": {"peak_threshold": -1}}}}, "greater than 0"),
        ({"matcher": {"NN-ratio": {"ratio_threshold": 0.9}}}, "accepted: model.ratio_threshold"),
        ({"local_feature": {"-": {"resize_max": 640}}, "matcher": {"qta_indoor": {}}}, "'-' .* takes no overrides"),
    ],
)
def test_overrides_that_would_be_ignored_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SceneConfig(**fields)


def test_sift_overrides_are_merged_into_the_preset_and_honoured() -> None:
    config = SceneConfig(local_feature={"sift": {"options": {"max_num_features": 40}, "preprocessing": {}}})
    conf = sift_conf(config.sift_overrides)
    assert conf["options"] == {**confs["sift"]["options"], "max_num_features": 40}
    assert conf["preprocessing"] == confs["sift"]["preprocessing"]
    rng = np.random.default_rng(0)
    gray = cv2.GaussianBlur(rng.integers(0, 255, (240, 320), dtype=np.uint8), (0, 0), 1.5)
    models = FeatureModels(device="cpu")
    default, capped = models.sift()(gray), models.sift(conf)(gray)
    assert 0 < 4 * len(capped["keypoints"]) < len(default["keypoints"])  # COLMAP caps per octave: about 40
    assert models.sift(sift_conf(SiftOverrides())) is models.sift()  # one extractor per distinct conf


def test_identity_holds_what_shapes_stored_data_and_no_query_time_knob() -> None:
    base = scene_identity(SceneConfig(), use_depth=True)
    knobs = SceneConfig(number_of_localizations=5, minimum_number_of_matches=40, inlier_threshold=0.7,
                        max_position_sigma_m=0.1, matcher={"NN-mutual": {"model": {"ratio_threshold": 0.9}}})
    assert scene_identity(knobs, use_depth=True) == base
    changed = {
        "sift": scene_identity(SceneConfig(local_feature={"sift": {"preprocessing": {"resize_max": 800}}}), True),
        "global": scene_identity(SceneConfig(global_feature="netvlad"), True),
        "depth": scene_identity(SceneConfig(), False),
    }
    assert all(identity != base for identity in changed.values())
    assert identity_changes(base, changed["depth"]) == ["use_depth: True -> False"]
    dense = scene_identity(SceneConfig(**DENSE), True)
    assert dense["dense"]["resize_max"] != 640
    assert scene_identity(SceneConfig(**{**DENSE, "matcher": {"qta_indoor": {"resize_max": 640}}}), True) != dense
    with pytest.raises(MarkerlessError, match="unknown keys") as refused:
        scene_identity(SceneConfig(**{**DENSE, "matcher": {"qta_indoor": {"rezise_max": 640}}}), True)
    assert refused.value.reason is Reason.BAD_SCENE_CONFIG


def test_a_version_of_another_store_format_is_refused_on_load(tmp_path: Path) -> None:
    store = SceneStore(tmp_path / "store")
    manifest = {"scene_id": "s", "version": "v1", "dataset_sha256": "0", "config": SceneConfig().model_dump(),
                "use_depth": True, "num_keyframes": 0, "registered_at": "now"}
    with store.staging("s", "v1") as staging:
        info = store.commit("s", staging, manifest)
    assert info.store_format == STORE_FORMAT
    (info.path / MANIFEST).write_text(json.dumps(manifest))  # written by a markerless before format 2
    with pytest.raises(SceneOutdatedError, match=f"store format 1; this markerless reads format {STORE_FORMAT}"):
        store.load("s")


def test_query_time_knobs_reuse_the_stored_data_and_changed_settings_reextract(
    kitchen_dir: Path, tmp_path: Path, feature_models
) -> None:
    scan = subset_zip(kitchen_dir / "kitchen-poly.zip", tmp_path / "small.zip", keep=6)
    store = SceneStore(tmp_path / "store")
    first = register_scene(store, "k", scan, SceneConfig(), feature_models)
    assert first.identity == scene_identity(SceneConfig(), True)
    assert not needs_registration(store, "k", scan, SceneConfig())

    gates = SceneConfig(inlier_threshold=0.6, number_of_localizations=3)
    assert needs_registration(store, "k", scan, gates)  # a new version carries the new gates ...
    second = register_scene(store, "k", scan, gates, feature_models)
    manifest = json.loads((second.path / MANIFEST).read_text())
    assert manifest["reused_from"] == first.version and second.config == gates  # ... without extracting again
    for name in ("feats-sift.h5", "points3d-sift.h5", "vlad-vocabulary.npy"):
        assert (second.path / name).stat().st_ino == (first.path / name).stat().st_ino

    stricter = SceneConfig(local_feature={"sift": {"options": {"peak_threshold": 0.02}}})
    assert needs_registration(store, "k", scan, stricter)
    third = register_scene(store, "k", scan, stricter, feature_models)
    assert "reused_from" not in json.loads((third.path / MANIFEST).read_text())
    assert third.identity["local_feature"]["sift"]["options"]["peak_threshold"] == 0.02
    counts = [sum(len(f["keypoints"]) for f in read_local_features(v.path / "feats-sift.h5").values())
              for v in (second, third)]
    assert 0 < counts[1] < counts[0]  # the override reached the stored keyframe features
    scene = store.load("k")

    query = cv2.cvtColor(cv2.imread(str(kitchen_dir / "queries" / "1700000000166665.jpg")), cv2.COLOR_BGR2RGB)
    camera = Camera(640, 480, 525.0, 525.0, 320.0, 240.0)
    localizer = Localizer(feature_models)
    assert localizer.localize(scene, query, camera).reason is not Reason.SCENE_OUTDATED
    recorded = json.loads((third.path / MANIFEST).read_text())
    recorded["identity"]["local_feature"]["sift"]["options"]["peak_threshold"] = 0.01  # as an older code stored it
    (third.path / MANIFEST).write_text(json.dumps(recorded))
    result = localizer.localize(SceneStore(tmp_path / "store").load("k"), query, camera)
    assert result.reason is Reason.SCENE_OUTDATED and not result.success
    assert "'peak_threshold': 0.01" in result.message and "register it again" in result.message
    assert needs_registration(store, "k", scan, stricter)


class _OutdatedCore(FakeCore):
    """Scene `old` is stored in a format this code does not read."""

    def load(self, scene_id: str) -> Any:
        if scene_id == "old":
            raise SceneOutdatedError(f"scene {scene_id!r} is in store format 1: register the scene again")
        return super().load(scene_id)


def test_the_daemon_serves_its_other_scenes_and_answers_scene_outdated(
    broker: Broker, clients: Any, daemons: Any, tmp_path: Path
) -> None:
    core = _OutdatedCore()
    for scene_id in ("s1", "old"):
        (tmp_path / f"{scene_id}.zip").write_bytes(scene_id.encode())
        core.registrations.append(scene_id)
        core.commit(scene_id, tmp_path / f"{scene_id}.zip", SceneConfig())
    core.gate.set()
    daemons(daemon_settings(broker, tmp_path / "store"), core, ScenesFile())  # loading `old` fails: start-up does not
    op, cam = clients(broker, "scenescape"), clients(broker, "camera")
    assert not op.connect().is_failure and not cam.connect().is_failure
    op.subscribe(f"{TOPICS.prefix}/autocalibration/camera/pose/+")
    for camera_id, scene_id in (("c-old", "old"), ("c-s1", "s1")):
        cam.publish(TOPICS.frame(camera_id), frame(jpeg(), intrinsics=k_for(), scene_id=scene_id))
    old = op.wait_json(TOPICS.pose("c-old"), lambda d: True, "reply for the outdated scene")
    assert old["reason"] == "scene_outdated" and "register the scene again" in old["message"]
    assert op.wait_json(TOPICS.pose("c-s1"), lambda d: True, "reply for s1")["success"] is True

"""`global_feature: netvlad` end to end through the same registration and localization path as the default.

Test double: the official Pitts30K weights cannot be downloaded here, so the checkpoint is generated in the
exact official `.mat` structure with random weights (markerless.models.netvlad.write_random_checkpoint). No
accuracy claim rests on retrieval: the scene is a 12-keyframe subset of the kitchen, all of which are matched.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
from polycam_factory import subset_zip

from markerless.errors import MissingWeightsError
from markerless.models.netvlad import write_random_checkpoint
from markerless.pipeline.evaluation import localize_queries
from markerless.pipeline.features import FeatureModels
from markerless.pipeline.localization import Localizer
from markerless.pipeline.registration import register_scene
from markerless.scene.config import SceneConfig
from markerless.scene.queries import load_queries
from markerless.scene.store import SceneStore


@pytest.fixture(scope="module")
def small_kitchen(kitchen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return subset_zip(kitchen_dir / "kitchen-poly.zip", tmp_path_factory.mktemp("zip") / "small.zip", keep=12)


def test_netvlad_scene_registers_and_localizes(small_kitchen: Path, kitchen_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MARKERLESS_WEIGHTS_DIR", raising=False)
    weights = tmp_path / "weights"
    weights.mkdir()
    write_random_checkpoint(weights / "VGG16-NetVLAD-Pitts30K.mat")
    models = FeatureModels(weights_dir=weights)
    store = SceneStore(tmp_path / "store")
    config = SceneConfig(global_feature="netvlad")
    info = register_scene(store, "k", small_kitchen, config, models)
    scene = store.load("k")
    with h5py.File(info.path / "global-feats-netvlad.h5") as fd:  # hloc's layout
        assert fd["rgb"][f"{scene.keyframes[0].stem}.jpg"]["global_descriptor"].shape == (4096,)
    assert scene.global_descriptors.shape == (12, 4096)
    query = load_queries(kitchen_dir / "queries.json")[:1]  # frame 5, between keyframes 0 and 1
    outcome = localize_queries(Localizer(models), scene, query, kitchen_dir)[0]
    assert outcome.success and outcome.translation_error_m < 0.05


def test_missing_netvlad_weights_fail_registration_clearly(small_kitchen: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MARKERLESS_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("NETVLAD_MODEL_DIR", raising=False)
    store = SceneStore(tmp_path / "store")
    with pytest.raises(MissingWeightsError) as info:
        register_scene(store, "k", small_kitchen, SceneConfig(global_feature="netvlad"),
                       FeatureModels(weights_dir=tmp_path / "empty"))
    message = str(info.value)
    assert "VGG16-NetVLAD-Pitts30K.mat" in message and str(tmp_path / "empty") in message
    assert "markerless weights fetch netvlad-pitts30k" in message
    assert store.info("k") is None

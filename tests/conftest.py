"""Shared fixtures: the real kitchen scan (from $MARKERLESS_KITCHEN_DIR) registered once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixtures shared by the broker and service tests (pki, broker, clients, daemons, fake_serve).
pytest_plugins = ["mqtt_fixtures", "serve_helpers"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu", action="store_true", help="run the tests marked gpu on the CPU (no CUDA needed)")


@pytest.fixture(scope="session")
def gpu_device(request: pytest.FixtureRequest) -> str:
    """The device under test of the tests marked gpu: CUDA when present, the CPU with --cpu, else skipped."""
    if request.config.getoption("--cpu"):
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (run with --cpu to exercise the GPU code paths on the CPU)")
    return "cuda"


@pytest.fixture(scope="session")
def kitchen_dir() -> Path:
    path = os.environ.get("MARKERLESS_KITCHEN_DIR")
    if not path or not (Path(path) / "kitchen-poly.zip").exists():
        message = "MARKERLESS_KITCHEN_DIR not set or without kitchen-poly.zip"
        if os.environ.get("CI") == "true":  # in CI a missing scan is a broken setup, never a skip
            pytest.fail(f"{message}: CI needs the real kitchen scan")
        pytest.skip(f"{message}: real-data test skipped (CI sets it)")
    return Path(path)


@pytest.fixture(scope="session")
def feature_models():
    from markerless.pipeline.features import FeatureModels

    return FeatureModels()


@pytest.fixture(scope="session")
def kitchen_store(tmp_path_factory: pytest.TempPathFactory, kitchen_dir: Path, feature_models) -> Path:
    """A store root holding scene 'kitchen' (default config, depth + mesh), registered once per session."""
    from markerless.pipeline.registration import register_scene
    from markerless.scene.config import SceneConfig
    from markerless.scene.store import SceneStore

    root = tmp_path_factory.mktemp("kitchen-store")
    register_scene(SceneStore(root), "kitchen", kitchen_dir / "kitchen-poly.zip", SceneConfig(), feature_models)
    return root


@pytest.fixture(scope="session")
def kitchen_scene(kitchen_store: Path):
    """The registered kitchen, loaded once (read-only for every test that localizes against it)."""
    from markerless.scene.store import SceneStore

    return SceneStore(kitchen_store).load("kitchen")


@pytest.fixture(scope="session")
def kitchen_localizer(feature_models):
    from markerless.pipeline.localization import Localizer

    return Localizer(feature_models)

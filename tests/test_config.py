"""Scene configuration: SceneScape's six fields, unsupported values refused with the supported list."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from markerless.scene.config import SceneConfig


def test_defaults_match_scenescape_shapes() -> None:
    c = SceneConfig()
    assert c.local_feature == {"sift": {}} and c.matcher == {"NN-ratio": {}}
    assert (c.number_of_localizations, c.minimum_number_of_matches, c.inlier_threshold) == (50, 20, 0.5)
    assert c.global_feature == "vlad"  # offline default; netvlad needs weights


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"global_feature": "openibl"}, "supported: vlad, netvlad"),
        ({"local_feature": {"superpoint_max": {}}}, "supported: sift, -"),
        ({"matcher": {"superglue": {}}}, "supported: NN-ratio, NN-mutual"),
        ({"local_feature": {"-": {}}}, "supported: qta_indoor, qta_indoor_fast, qta_outdoor"),
        ({"local_feature": {"sift": {}, "-": {}}}, "Specify a local feature for each matcher"),
        ({"inlier_threshold": 1.5}, "less than or equal to 1"),
        ({"number_of_localizations": 0}, "greater than or equal to 1"),
        ({"colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_values_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SceneConfig(**fields)


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "scene.yaml"
    path.write_text("global_feature: netvlad\nnumber_of_localizations: 10\n")
    assert SceneConfig.from_file(path).number_of_localizations == 10
    path.write_text("- not a mapping")
    with pytest.raises(ValueError, match="must be a mapping"):
        SceneConfig.from_file(path)

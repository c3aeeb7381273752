"""docs/openapi.yaml: generated from the HTTP app, committed, valid OpenAPI, and free of what broke SceneScape's
(duplicate path keys, which silently dropped its POST operations)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from openapi_spec_validator import validate

from markerless.service.openapi import openapi_yaml

DOC = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with a key twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        duplicates = {k for k in keys if keys.count(k) > 1}
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def test_committed_openapi_matches_the_app() -> None:
    assert DOC.is_file(), "docs/openapi.yaml missing: run python -m markerless.service.openapi --write docs/"
    assert DOC.read_text() == openapi_yaml(), "docs/openapi.yaml drifted: run python -m markerless.service.openapi " \
        "--write docs/"


def test_openapi_is_valid_without_duplicate_keys_and_has_every_scenescape_operation() -> None:
    doc = yaml.load(DOC.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    validate(doc)
    operations = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert operations == {
        ("/v1/status", "get"),
        ("/v1/scenes/{sceneId}/registration", "post"), ("/v1/scenes/{sceneId}/registration", "get"),
        ("/v1/scenes/{sceneId}/registration", "patch"),
        ("/v1/cameras/{cameraId}/calibration", "post"), ("/v1/cameras/{cameraId}/calibration", "get"),
        ("/v1/cameras/{cameraId}/calibration/overlay", "get"),  # markerless's: the console's images
    }
    assert list(doc["paths"]["/v1/cameras/{cameraId}/calibration/overlay"]["get"]["responses"]["200"]["content"]) \
        == ["image/png"]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert "422" not in operation["responses"], (path, method)  # invalid requests are 400 here
            assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
                "/ErrorBody")
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"sceneId": "^[a-zA-Z0-9\\-_.]+$"} == {
        p["name"]: p["schema"]["pattern"] for p in doc["paths"]["/v1/scenes/{sceneId}/registration"]["get"][
            "parameters"]}

"""Service settings and scenes.yaml: strict sections, environment overrides, secrets from files, scene pose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.spatial.transform import Rotation

from markerless.service.scenes_file import ScenePose, ScenesFile
from markerless.service.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("MARKERLESS__"):
            monkeypatch.delenv(key)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_shipped_configs_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKERLESS_KITCHEN_DIR", "/data/kitchen")
    settings = Settings.load(REPO / "configs" / "markerless.yaml")
    assert settings.mqtt.tls is not None and settings.mqtt.tls.ca_file.is_absolute()
    assert settings.scenes_file == REPO / "configs" / "scenes.yaml"
    scenes = ScenesFile.load(settings.scenes_file)
    assert scenes.scenes["kitchen"].dataset == Path("/data/kitchen/kitchen-poly.zip")
    assert scenes.cameras["kitchen-cam-1"].scene == "kitchen"
    assert scenes.cameras["kitchen-cam-2"].intrinsics[0][0] == 525.0


def test_environment_overrides_file_and_paths_resolve_against_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path / "m.yaml", "mqtt: {host: filehost, port: 8883, tls: {ca_file: certs/ca.crt}}\n"
                                     "store: {root: st}\nworker: {queue_size: 4}\n")
    monkeypatch.setenv("MARKERLESS__MQTT__HOST", "envhost")
    monkeypatch.setenv("MARKERLESS__WORKER__DEADLINE_S", "7.5")
    monkeypatch.setenv("MARKERLESS__REGISTRATION__DATASET_DIRS", '["/data"]')
    monkeypatch.setenv("MARKERLESS__REGISTRATION__LIMITS__MAX_KEYFRAMES", "500")
    s = Settings.load(cfg)
    assert (s.mqtt.host, s.mqtt.port) == ("envhost", 8883)  # env wins, the rest of the section stays
    assert (s.worker.queue_size, s.worker.deadline_s) == (4, 7.5)
    assert s.mqtt.tls.ca_file == tmp_path / "certs" / "ca.crt"
    assert s.store.root == tmp_path / "st"
    assert s.registration.dataset_dirs == [Path("/data")]
    assert s.registration.limits.max_keyframes == 500 and s.registration.limits.max_files == 100_000


@pytest.mark.parametrize(
    "text, message",
    [
        ("mqtt: {hots: x}\n", "hots"),  # typo in a key
        ("mqtt: {port: 70000}\n", "port"),
        ("mqtt: {protocol: '4'}\n", "protocol"),
        ("mqtt: {username: svc}\n", "username and mqtt.password_file"),
        ("mqtt: {tls: {ca_file: ca.crt, cert_file: c.crt}}\n", "cert_file and tls.key_file"),
        ("mqtt: {topic_prefix: 'a/#'}\n", "topic_prefix"),
        ("worker: {queue_size: 0}\n", "queue_size"),
        ("registration: {limits: {max_keyframez: 5}}\n", "max_keyframez"),
        ("registration: {limits: {max_keyframes: 0}}\n", "max_keyframes must be positive"),
        ("registration: {workers: 0}\n", "workers"),
        ("http: {port: 8443, certfile: s.crt}\n", "http.certfile and http.keyfile"),
        ("http: {port: 8443, client_ca_file: ca.crt}\n", "needs http.certfile"),
        ("http: {prot: 8443}\n", "prot"),
        ("bogus: 1\n", "bogus"),
        ("- a list\n", "mapping"),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises((ValidationError, ValueError), match=message):
        Settings.load(write(tmp_path / "m.yaml", text))


def test_http_section_off_by_default_port_from_environment_paths_resolved_token_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings().http.port is None  # no HTTP front door unless asked
    cfg = write(tmp_path / "m.yaml", "http: {certfile: tls/s.crt, keyfile: tls/s.key, token_file: token}\n")
    monkeypatch.setenv("MARKERLESS__HTTP__PORT", "8443")
    s = Settings.load(cfg)
    assert s.http.port == 8443 and s.http.certfile == tmp_path / "tls" / "s.crt"
    write(tmp_path / "token", "t0ken\n")
    assert s.http.token().get_secret_value() == "t0ken"
    with pytest.raises(ValueError, match="empty"):
        Settings(http={"token_file": write(tmp_path / "e", "\n")}).http.token()


def test_password_comes_from_a_file(tmp_path: Path) -> None:
    pw = write(tmp_path / "pw", "s3cret\n")
    s = Settings(mqtt={"username": "svc", "password_file": pw})
    assert s.mqtt.password().get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    with pytest.raises(ValueError, match="empty"):
        Settings(mqtt={"username": "svc", "password_file": write(tmp_path / "e", "")}).mqtt.password()
    with pytest.raises(ValueError, match="cannot read"):
        Settings(mqtt={"username": "svc", "password_file": tmp_path / "absent"}).mqtt.password()


def test_scenes_file_expands_vars_resolves_relative_and_checks_cameras(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCANS", "/scans")
    f = write(tmp_path / "scenes.yaml", "scenes:\n  a: {dataset: \"${SCANS}/a.zip\"}\n  b: {dataset: rel/b.zip}\n"
                                        "cameras:\n  c1: a\n  c2: {scene: b, intrinsics: [[1,0,0],[0,1,0],[0,0,1]]}\n")
    sf = ScenesFile.load(f)
    assert sf.scenes["a"].dataset == Path("/scans/a.zip")
    assert sf.scenes["b"].dataset == tmp_path / "rel" / "b.zip"
    assert sf.scenes["a"].config.number_of_localizations == 50
    with pytest.raises(ValidationError, match="not in 'scenes'"):
        ScenesFile.model_validate({"scenes": {}, "cameras": {"c": "nowhere"}})
    with pytest.raises(ValidationError, match="unsupported matcher"):
        ScenesFile.model_validate({"scenes": {"a": {"dataset": "a.zip", "config": {"matcher": {"superglue": {}}}}}})


def test_scene_pose_matches_scenescape_transform() -> None:
    """SceneScape: M = [R_euler('XYZ', deg) | t] @ diag(scale, 1) @ [R(q) | t_cam]; quaternion of M[:3,:3] (x, y,
    z, w), translation M[:3, 3]. With unit scale ours must be identical; with a scale the centre scales and the
    orientation stays a pure rotation."""
    pose = ScenePose(translation=[1.0, -2.0, 0.5], rotation=[90.0, 10.0, -30.0])
    q_cam = Rotation.from_euler("xyz", [5, 20, 70], degrees=True).as_quat().tolist()
    t_cam = [0.3, 0.2, 1.7]
    cam = np.eye(4)
    cam[:3, :3] = Rotation.from_quat(q_cam).as_matrix()
    cam[:3, 3] = t_cam
    m = pose.matrix() @ cam
    q, t = pose.apply(q_cam, t_cam)
    np.testing.assert_allclose(t, m[:3, 3], atol=1e-12)
    assert (Rotation.from_quat(q).inv() * Rotation.from_matrix(m[:3, :3])).magnitude() < 1e-9
    scaled = ScenePose(translation=[1.0, 0.0, 0.0], scale=[2.0, 2.0, 2.0])
    q2, t2 = scaled.apply([0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0])
    assert t2 == [3.0, 2.0, 2.0]
    np.testing.assert_allclose(q2, [0.0, 0.0, 0.0, 1.0])
    with pytest.raises(ValidationError, match="positive"):
        ScenePose(scale=[1.0, 0.0, 1.0])

"""What an operator sees from the real command line: one-line errors that say what to do, progress bars that
pycolmap's glog does not tear, and the repository's mosquitto configurations accepted by mosquitto 2."""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mqtt_fixtures import ACL, TOPICS, Broker, Client, Pki
from polycam_factory import subset_zip

from markerless.scene.queries import load_queries

REPO = Path(__file__).resolve().parents[1]
GLOG_LINE = re.compile(r"^[IWEF]\d{8} \d\d:\d\d:\d\d\.\d+ ", re.MULTILINE)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MARKERLESS__")}
    return subprocess.run([sys.executable, "-m", "markerless.cli", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=600)


def test_register_missing_file_or_folder_is_a_one_line_error(tmp_path: Path) -> None:
    for target, expected in ((tmp_path / "nope.zip", "dataset file not found"),
                             (tmp_path, "is a folder; expected a Polycam raw-data export (.zip)")):
        result = cli("register", str(target), "--scene", "s", "--store", str(tmp_path / "store"))
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert lines[0] == f"markerless: registration failed (bad_dataset): {target}: {expected}"
    assert not list((tmp_path / "store").iterdir())


def test_register_progress_bars_carry_no_glog_lines(kitchen_dir: Path, tmp_path: Path) -> None:
    scan = subset_zip(kitchen_dir / "kitchen-poly.zip", tmp_path / "small.zip", keep=10)
    result = cli("register", str(scan), "--scene", "s", "--store", str(tmp_path / "store"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("registered scene s version ")
    segments = result.stderr.replace("\r", "\n")
    assert "features:" in segments and "points3d:" in segments and "global:" in segments  # the bars were drawn
    assert not GLOG_LINE.search(segments), result.stderr  # e.g. "I20261202 ... sift.cc] Creating SIFT ..."


def test_register_progress_advances_in_a_log_file(kitchen_dir: Path, tmp_path: Path) -> None:
    """stderr to a file (not a terminal): each stage's bar advances to 100 % and is never restarted, although the
    stages report in turn (features and points3d alternate keyframe by keyframe); no cursor escape codes."""
    scan = subset_zip(kitchen_dir / "kitchen-poly.zip", tmp_path / "small.zip", keep=10)
    log = tmp_path / "register.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MARKERLESS__")}
    with log.open("w") as stderr:
        done = subprocess.run([sys.executable, "-m", "markerless.cli", "register", str(scan), "--scene", "s",
                               "--store", str(tmp_path / "store")], stderr=stderr, stdout=subprocess.PIPE,
                              text=True, env=base, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\x1b[" not in text, repr(text[:500])
    seen: dict[str, list[int]] = {}
    for stage, percent in re.findall(r"(\w+):\s+(\d+)%\|", text):
        seen.setdefault(stage, []).append(int(percent))
    for stage in ("ingest", "features", "points3d", "global"):
        steps = seen.get(stage, [])
        assert steps == sorted(steps), (stage, steps)  # advancing, never back to 0
        assert steps[-1] == 100 and len(set(steps)) >= 3, (stage, steps)
    assert "features" in seen and text.count("features:") == len(seen["features"])


def test_localize_prints_no_glog_lines(kitchen_dir: Path, kitchen_store: Path) -> None:
    query = load_queries(kitchen_dir / "queries.json")[0]
    result = cli("localize", str(kitchen_dir / query["image"]), "--scene", "kitchen", "--store", str(kitchen_store),
                 "--intrinsics", ",".join(str(v) for v in _fxfycxcy(query["intrinsics"])))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pose (camera-to-world")
    assert not GLOG_LINE.search(result.stderr), result.stderr  # "I2026... sift.cc:764] Creating SIFT ..."
    verbose = cli("-v", "localize", str(kitchen_dir / query["image"]), "--scene", "kitchen", "--store",
                  str(kitchen_store), "--intrinsics-mode", "estimate")
    assert verbose.returncode == 0 and GLOG_LINE.search(verbose.stderr), verbose.stderr  # -v asks for them


def _fxfycxcy(k: list[list[float]]) -> list[float]:
    return [k[0][0], k[1][1], k[0][2], k[1][2]]


def test_register_killed_leaves_no_process_behind(kitchen_dir: Path, tmp_path: Path) -> None:
    """SIGKILL of a `markerless register` while its SIFT workers extract: 15 s later none of the processes it
    started (forkserver, resource tracker, workers; 150 MB each) is still running."""
    psutil = pytest.importorskip("psutil")  # the demo extra
    from markerless.pipeline.registration import usable_cpus

    if usable_cpus() < 2:
        pytest.skip("one usable CPU: registration extracts SIFT in its own process, with no workers")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MARKERLESS__")}
    proc = subprocess.Popen([sys.executable, "-m", "markerless.cli", "register", str(kitchen_dir / "kitchen-poly.zip"),
                             "--scene", "s", "--store", str(tmp_path / "store")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=base)
    started: list[Any] = []
    try:
        assert proc.stderr is not None
        buffer = ""
        while "features:" not in buffer:  # the workers are extracting
            chunk = proc.stderr.read(64)
            assert chunk, f"register ended before extracting: {buffer[-2000:]}"
            buffer += chunk
        started = psutil.Process(proc.pid).children(recursive=True)
        forkservers = [p for p in started if p.ppid() == proc.pid and "forkserver" in " ".join(p.cmdline())]
        assert len(forkservers) == 1 and forkservers[0].children(), started  # the SIFT workers are its children
        assert len(started) >= 4, started  # forkserver, resource tracker, workers
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(started, timeout=15.0)
        assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in started:  # never leave them to the rest of the suite
            if p.is_running():
                p.kill()


def test_exit_status_follows_one_rule_and_json_is_always_json(tmp_path: Path) -> None:
    """0 success (test_localize_prints_no_glog_lines), 1 the request failed with a reason, 2 usage; with --json
    stdout is JSON in every case; negative numbers are values of --intrinsics / --distortion."""
    import cv2
    import numpy as np

    image = tmp_path / "frame.jpg"
    cv2.imwrite(str(image), np.full((48, 64, 3), 128, np.uint8))
    store = ["--store", str(tmp_path / "empty-store")]
    cases = [  # (arguments, exit status, reason in the JSON)
        (["--scene", "s", "--intrinsics", "1,2"], 2, "bad_request"),  # not fx,fy,cx,cy
        (["--scene", "s", "--intrinsics", "a,b,c,d"], 2, "bad_request"),
        (["--scene", "s", "--distortion", "-0.28,0.09,0,0"], 2, "bad_request"),  # a lens without its camera
        (["--scene", "s", "--intrinsics-mode", "fixed"], 2, "bad_request"),  # fixed what?
        (["--intrinsics", "64,64,32,24"], 2, "bad_request"),  # no --scene
        (["--scene", "s", "--intrinsics", "64,64,32,24", "--distortion", "-0.28,0.09,0,0"], 1, "scene_not_found"),
        (["--scene", "s", "--intrinsics", "-64,64,32,24"], 1, "scene_not_found"),  # a value, not an option
        (["--scene", "s", "--intrinsics-mode", "estimate"], 1, "scene_not_found"),
    ]
    for extra, status, reason in cases:
        for as_json in (True, False):
            result = cli("localize", str(image), *extra, *store, *(["--json"] if as_json else []))
            assert result.returncode == status, (extra, result.stdout, result.stderr)
            assert "Traceback" not in result.stderr, result.stderr
            if as_json:
                data = json.loads(result.stdout)
                assert data["success"] is False and data["reason"] == reason and data["message"], (extra, data)
            else:
                assert result.stdout == "" and result.stderr.strip(), (extra, result.stderr)
    missing = cli("localize", str(tmp_path / "absent.jpg"), "--scene", "s", *store)
    assert missing.returncode == 1 and "(bad_image)" in missing.stderr, missing.stderr
    assert "exit status" in cli("--help").stdout
    bad_config = cli("register", str(image), "--scene", "s", "--matcher", "superglue", *store)
    assert bad_config.returncode == 2 and "invalid scene configuration" in bad_config.stderr, bad_config.stderr


@pytest.mark.parametrize(("options", "name", "file"), [
    (["--global-feature", "netvlad"], "netvlad-pitts30k", "VGG16-NetVLAD-Pitts30K.mat"),
    (["--local-feature", "-", "--matcher", "qta_indoor"], "qta-indoor", "qta-indoor.ckpt"),
])
def test_register_without_its_weights_fails_before_any_work(
    kitchen_dir: Path, tmp_path: Path, options: list[str], name: str, file: str
) -> None:
    """Refused before ingest and extraction (no progress drawn, nothing in the store), with a hint that names the
    file and where it must go (the download URL's file name differs: Pitts30K_struct.mat)."""
    scan = subset_zip(kitchen_dir / "kitchen-poly.zip", tmp_path / "small.zip", keep=10)
    weights = tmp_path / "weights"
    home = {"HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch"), "NETVLAD_MODEL_DIR": ""}
    result = cli("register", str(scan), "--scene", "s", "--store", str(tmp_path / "store"), "--weights-dir",
                 str(weights), *options, env=home)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ingest" not in result.stderr and "features" not in result.stderr, result.stderr
    assert lines[0].startswith(f"markerless: registration failed (missing_weights): weights {name!r} missing")
    assert f"markerless weights fetch {name}" in lines[0]
    assert f"save it as {weights / file} (under the name {file}" in lines[0]
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def _settings(tmp_path: Path, ca_file: Path, scenes: str) -> Path:
    (tmp_path / "scenes.yaml").write_text(scenes)
    (tmp_path / "markerless.password").write_text("secret\n")
    config = {"mqtt": {"host": "localhost", "port": 1, "username": "markerless",
                       "password_file": "markerless.password", "tls": {"ca_file": str(ca_file)},
                       "connect_timeout_s": 5},
              "store": {"root": "store"}, "scenes_file": "scenes.yaml"}
    path = tmp_path / "markerless.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_serve_without_the_ca_file_says_to_run_make_dev_certs(tmp_path: Path) -> None:
    result = cli("serve", "--config", str(_settings(tmp_path, tmp_path / "dev" / "ca.crt", "scenes: {}\n")))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"The CA file {tmp_path / 'dev' / 'ca.crt'} does not exist" in result.stderr
    assert "run mosquitto/make-dev-certs.sh" in result.stderr


def test_serve_names_an_unset_variable_of_scenes_yaml(tmp_path: Path) -> None:
    scenes = "scenes:\n  kitchen:\n    dataset: ${MARKERLESS_TEST_UNSET}/kitchen-poly.zip\n"
    result = cli("serve", "--config", str(_settings(tmp_path, tmp_path / "ca.crt", scenes)))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert ("scene 'kitchen': dataset '${MARKERLESS_TEST_UNSET}/kitchen-poly.zip' uses the environment variable "
            "MARKERLESS_TEST_UNSET, which is not set") in result.stderr


def _render(conf: str, pki: Pki, broker: Broker) -> str:
    """A repository config with its certificate, ACL and data paths pointed at the test's, on the test's port."""
    local = {"password_file": pki.dir / "passwd", "acl_file": ACL, "persistence_location": f"{broker.workdir}/data/",
             "cafile": pki.ca, "certfile": pki.dir / "server.crt", "keyfile": pki.dir / "server.key",
             "listener": f"{broker.port} 127.0.0.1"}
    for directive, value in local.items():
        conf, n = re.subn(rf"^{directive} .*$", f"{directive} {value}", conf, flags=re.MULTILINE)
        assert n == 1, directive
    return f"user {getpass.getuser()}\n" + conf  # as root, mosquitto would switch to the user 'mosquitto'


def _settings_lines(conf: str) -> list[str]:
    return [line for line in conf.splitlines() if line.strip() and not line.startswith("#")]


def test_repository_mosquitto_configs_run_on_mosquitto_2_with_tcp_nodelay(pki: Pki, tmp_path: Path) -> None:
    """mosquitto.conf (Docker) and local.conf (no Docker) differ only in paths and the listen address, and both
    run on mosquitto 2 with a TLS round trip."""
    rendered = {}
    for name in ("mosquitto.conf", "local.conf"):
        conf = (REPO / "mosquitto" / name).read_text()
        assert re.search(r"^set_tcp_nodelay true$", conf, re.MULTILINE), name
        broker = Broker(pki, tmp_path / name)
        rendered[name] = _render(conf, pki, broker).replace(str(broker.workdir), "<workdir>").replace(
            str(broker.port), "<port>")
        broker.conf.write_text(_render(conf, pki, broker))
        broker.start()
        try:
            client = Client(broker, "scenescape")
            client.connect()
            client.subscribe(TOPICS.status)
            client.publish(TOPICS.status, "isAlive")
            client.wait(lambda client=client: client.received(TOPICS.status) == [b"isAlive"],
                        f"round trip through {name}")
            client.close()
        finally:
            broker.stop()
        log = broker.log.read_text()
        assert "Error" not in log and "Unknown configuration variable" not in log, log
    assert _settings_lines(rendered["local.conf"]) == _settings_lines(rendered["mosquitto.conf"])

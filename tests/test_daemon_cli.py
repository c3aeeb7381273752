"""`markerless serve` as a process: clear exit on a bad CA, last will on a crash, `stopped` on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from mqtt_fixtures import TOPICS, WAIT_S, Broker, Pki


def write_config(tmp_path: Path, broker: Broker, ca: Path) -> Path:
    (tmp_path / "scenes.yaml").write_text("scenes: {}\ncameras: {}\n")
    config = {
        "mqtt": {"host": "localhost", "port": broker.port, "client_id": "markerless-cli-test",
                 "username": "markerless", "password_file": str(broker.pki.password_file("markerless")),
                 "tls": {"ca_file": str(ca)}, "connect_timeout_s": 20, "reconnect_min_s": 0.5},
        "store": {"root": "store"},
        "scenes_file": "scenes.yaml",
    }
    path = tmp_path / "markerless.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def serve(config: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKERLESS__")}
    return subprocess.Popen([sys.executable, "-c", "import sys; from markerless.cli import main; sys.exit(main())",
                             "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_wrong_ca_exits_with_a_clear_error_and_never_connects_in_plaintext(
    broker: Broker, wrong_pki: Pki, tmp_path: Path
) -> None:
    proc = serve(write_config(tmp_path, broker, wrong_pki.ca))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert "TLS handshake with the broker" in stderr and "Not falling back to plain TCP" in stderr, stderr
    assert "certificate verify failed" in stderr


def test_last_will_on_crash_and_stopped_on_sigterm(broker: Broker, clients: Any, tmp_path: Path) -> None:
    watcher = clients(broker, "scenescape")
    watcher.connect()
    watcher.subscribe(TOPICS.availability)

    def availability() -> list[bytes]:
        return watcher.received(TOPICS.availability)

    config = write_config(tmp_path, broker, broker.pki.ca)
    proc = serve(config)
    try:
        watcher.wait(lambda: availability()[-1:] == [b"online"], "online", timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=WAIT_S)
        watcher.wait(lambda: availability()[-1:] == [b"offline"], "last will offline")

        proc = serve(config)
        watcher.wait(lambda: availability()[-1:] == [b"online"], "online again", timeout=120)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        watcher.wait(lambda: availability()[-1:] == [b"stopped"], "stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

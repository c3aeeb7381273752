"""SIGTERM (what `docker stop` sends) to a real `markerless serve` with the real core, mid-work: exit 0,
availability `stopped`, every queued frame answered `shutting_down`, the running registration reported.

pycolmap installs glog's failure-signal handler when imported, which turned SIGTERM into a native abort (exit
143, nothing answered); this runs the real process with the real models so that regression cannot hide.
Needs the kitchen scan ($MARKERLESS_KITCHEN_DIR); skipped without.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mqtt_fixtures import TOPICS, Broker, frame

from markerless.scene.queries import load_queries

STARTUP_WAIT_S = 300.0  # failure bounds on a loaded 2-core machine, not measurements
WORK_WAIT_S = 600.0
CAMERAS = 12

pytestmark = pytest.mark.slow


def test_sigterm_mid_work_stops_cleanly_and_answers_everything(
    broker: Broker, clients: Any, kitchen_dir: Path, kitchen_store: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "kitchen").symlink_to(kitchen_store / "kitchen")  # served; never written (not in scenes.yaml)
    (tmp_path / "scenes.yaml").write_text(yaml.safe_dump(
        {"scenes": {"kitchen2": {"dataset": str(kitchen_dir / "kitchen-poly.zip")}}, "cameras": {}}))
    config = tmp_path / "markerless.yaml"
    config.write_text(yaml.safe_dump({
        "mqtt": {"host": "localhost", "port": broker.port, "client_id": "markerless-sigterm",
                 "username": "markerless", "password_file": str(broker.pki.password_file("markerless")),
                 "tls": {"ca_file": str(broker.pki.ca)}, "connect_timeout_s": 60},
        "worker": {"queue_size": 64, "deadline_s": WORK_WAIT_S},
        "registration": {"on_start": True, "progress_interval_s": 0},  # kitchen2 registers at start
        "store": {"root": str(store)},
        "scenes_file": "scenes.yaml",
    }))
    op = clients(broker, "scenescape")
    op.connect()
    op.subscribe(f"{TOPICS.prefix}/autocalibration/camera/pose/+", TOPICS.register("kitchen2"), TOPICS.availability)
    cam = clients(broker, "camera")
    cam.connect()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKERLESS__")}
    proc = subprocess.Popen([sys.executable, "-m", "markerless.cli", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        op.wait(lambda: op.received(TOPICS.availability)[-1:] == [b"online"], "online", timeout=STARTUP_WAIT_S)
        op.wait_json(TOPICS.register("kitchen2"), lambda d: d.get("status") == "registering", "kitchen2 registering",
                     timeout=STARTUP_WAIT_S)
        queries = load_queries(kitchen_dir / "queries.json")
        for i in range(CAMERAS):
            q = queries[i % len(queries)]
            body = frame((kitchen_dir / q["image"]).read_bytes(), intrinsics=q["intrinsics"], scene_id="kitchen",
                         request_id=f"r{i}")
            cam.publish(TOPICS.frame(f"cam{i}"), body)

        def answers() -> dict[str, list[dict[str, Any]]]:
            return {f"r{i}": [d for d in op.json_on(TOPICS.pose(f"cam{i}")) if d.get("request_id") == f"r{i}"]
                    for i in range(CAMERAS)}

        op.wait(lambda: any(answers().values()), "a first reply: the worker is busy, the rest queued",
                timeout=WORK_WAIT_S)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=WORK_WAIT_S)
        assert proc.returncode == 0, stderr[-3000:]
        assert "Aborted" not in stderr and "SIGTERM" not in stderr  # no glog crash report
        op.wait(lambda: op.received(TOPICS.availability)[-1:] == [b"stopped"], "stopped")
        op.wait(lambda: all(answers().values()), "a reply to every frame")
        got = answers()
        assert all(len(v) == 1 for v in got.values()), {k: len(v) for k, v in got.items()}
        reasons = [v[0].get("reason") for v in got.values()]
        assert set(reasons) <= {None, "shutting_down"}, reasons
        assert reasons[0] is None and "shutting_down" in reasons, reasons
        final = op.wait_json(TOPICS.register("kitchen2"), lambda d: "reason" in d, "kitchen2's final status")
        assert final["reason"] == "shutting_down" and "abandoned" in final["status"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

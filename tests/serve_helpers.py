"""Helpers for tests that run the daemon as processes (`serve_fake.py`) and watch it over MQTT.

Import the fixture you use: `from serve_helpers import fake_serve  # noqa: F401`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from mqtt_fixtures import TOPICS, WAIT_S, Broker, daemon_settings

HERE = Path(__file__).resolve().parent


def until(predicate: Any, what: str, timeout: float = WAIT_S) -> Any:
    """Poll state outside any client (a file, an endpoint), bounded."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)
    return value


def scenes_spec(tmp_path: Path, cameras: int = 6) -> dict[str, Any]:
    dataset = tmp_path / "s1.zip"
    if not dataset.exists():
        dataset.write_bytes(b"scan v1")
    return {"scenes": {"s1": {"dataset": str(dataset)}}, "cameras": {f"cam{i}": "s1" for i in range(1, cameras + 1)}}


class FakeServe:
    """serve_fake.py processes of one client id, on one store (one service, restarted). `name` tells replicas
    apart: each has its own client id, marker and log; `extra` goes into the spec (e.g. `release`)."""

    def __init__(self, broker: Broker, tmp_path: Path, protocol: str, name: str = "serve",
                 mqtt: dict[str, Any] | None = None, **extra: Any) -> None:
        settings = daemon_settings(broker, tmp_path / "store", protocol, registration={"on_start": False},
                                   mqtt=mqtt or {})
        self.settings = settings.model_dump(mode="json")
        self.tmp_path = tmp_path
        self.name = name
        self.marker = tmp_path / f"{name}-localizing"
        self.log = tmp_path / f"{name}.log"
        self.scenes = scenes_spec(tmp_path)
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, mode: str) -> None:
        self.marker.unlink(missing_ok=True)
        spec = self.tmp_path / f"spec-{self.name}-{mode}.json"
        spec.write_bytes(orjson.dumps({"settings": self.settings, "scenes": self.scenes, "mode": mode,
                                       "marker": str(self.marker), **self.extra}))
        log = open(self.log, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([sys.executable, str(HERE / "serve_fake.py"), str(spec)], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=HERE)
        log.close()

    def signal(self, sig: int) -> int:
        """Send `sig` and wait for the exit; a process that does not exit dumps its threads' stacks into the log
        (faulthandler on SIGUSR1), which the failure shows."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            pytest.fail(f"{self.name} did not exit {WAIT_S} s after signal {sig}; its log ends:\n"
                        + self.log.read_text(errors="replace")[-6000:])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def fake_serve(broker: Broker, tmp_path: Path, request: Any) -> Any:
    made: list[FakeServe] = []

    def make(protocol: str = "3.1.1", **kwargs: Any) -> FakeServe:
        made.append(FakeServe(broker, tmp_path, protocol, **kwargs))
        return made[-1]

    yield make
    for f in made:
        f.close()


def watcher(clients: Any, broker: Broker) -> Any:
    op = clients(broker, "scenescape")
    assert not op.connect().is_failure
    op.subscribe(f"{TOPICS.prefix}/autocalibration/camera/pose/+", f"{TOPICS.prefix}/cmd/autocalibration/scene/+",
                 TOPICS.status, TOPICS.availability)
    return op


def availability_is(op: Any, value: bytes) -> Any:
    return lambda: op.received(TOPICS.availability)[-1:] == [value]


def replies(op: Any, camera: str, request_id: str) -> list[dict[str, Any]]:
    return [d for d in op.json_on(TOPICS.pose(camera)) if d.get("request_id") == request_id]

"""A local rig for the service benches: a real mosquitto, `markerless serve` processes, cameras and a collector.

Plain TCP on 127.0.0.1 with anonymous access (the benches measure the service, not TLS), persistence on so a
broker restart keeps sessions, and the inflight window of mosquitto/mosquitto.conf. The broker wrapper and the
MQTT client are the tests' and the demo's (`markerless.demo.mosquitto`, `markerless.demo.mqtt_client`); the tests
configure theirs with TLS, passwords and the ACL (tests/mqtt_fixtures.py).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
import yaml

from markerless.demo.mosquitto import Mosquitto
from markerless.demo.mqtt_client import RecordingClient, json_object

PREFIX = "scenescape"


class Broker(Mosquitto):
    """mosquitto on a free port, anonymous, unlogged; `restart()` keeps port and persisted sessions."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, general=["allow_anonymous true", "max_inflight_messages 100",
                                           "max_queued_messages 1000", "set_tcp_nodelay true", "log_dest none"])


def serve_config(path: Path, port: int, store: Path, scenes: dict[str, Any], **sections: Any) -> Path:
    mqtt_section = {"host": "127.0.0.1", "port": port, "client_id": "markerless-bench", "reconnect_min_s": 0.2,
                    "reconnect_max_s": 1.0, **sections.pop("mqtt", {})}
    (path.parent / f"{path.stem}-scenes.yaml").write_text(yaml.safe_dump(scenes))
    path.write_text(yaml.safe_dump({"mqtt": mqtt_section, "store": {"root": str(store)},
                                    "scenes_file": f"{path.stem}-scenes.yaml", **sections}))
    return path


def start_serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKERLESS__")}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "markerless.cli", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


_ids = itertools.count()


def client(port: int, client_id: str | None = None, persistent: bool = False) -> RecordingClient:
    """A connected MQTT 5 client (a camera), reconnecting quickly after a broker restart."""
    c = RecordingClient("127.0.0.1", port, client_id=client_id or f"bench-{os.getpid()}-{next(_ids)}",
                        persistent=persistent, reconnect_delay_s=(0.2, 1))
    c.connect()
    return c


class Collector(RecordingClient):
    """Records every reply by request id, and registration statuses and availability, on a persistent session."""

    FILTERS = (f"{PREFIX}/autocalibration/camera/pose/+", f"{PREFIX}/cmd/autocalibration/scene/+",
               f"{PREFIX}/sys/autocalibration/availability/#", f"{PREFIX}/sys/autocalibration/availability")

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port, client_id=f"bench-collector-{os.getpid()}", persistent=True,
                         reconnect_delay_s=(0.2, 1))
        self.replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.registrations: list[dict[str, Any]] = []
        self.availability: dict[str, bytes] = {}
        self.connect()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe([(f, 1) for f in self.FILTERS])  # again after each reconnect
        super()._on_connect(client, userdata, flags, rc, props)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            if "/availability" in msg.topic:
                self.availability[msg.topic] = msg.payload
            elif (data := json_object(msg.payload)) is not None:
                if "/pose/" in msg.topic and "request_id" in data:
                    self.replies[data["request_id"]].append(data)
                elif "/scene/" in msg.topic:
                    self.registrations.append(data)
            self._cond.notify_all()

    def collected(self, predicate: Any, timeout: float) -> bool:
        """Whether `predicate()` over what was collected became true within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

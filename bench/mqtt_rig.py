"""A local rig for the service benches: a real mosquitto, `markerless serve` processes, cameras and a collector.

Plain TCP on 127.0.0.1 with anonymous access (the benches measure the service, not TLS), persistence on so a
broker restart keeps sessions, and the inflight window of mosquitto/mosquitto.conf. Not a test fixture: the
tests use tests/mqtt_fixtures.py (TLS, passwords, ACL).
"""

from __future__ import annotations

import getpass
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PREFIX = "scenescape"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    """mosquitto on a free port; `restart()` keeps port and persisted sessions."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join([
            f"user {getpass.getuser()}", "allow_anonymous true", "persistence true",
            f"persistence_location {workdir / 'data'}/", "max_inflight_messages 100", "max_queued_messages 1000",
            "set_tcp_nodelay true", f"listener {self.port} 127.0.0.1", "log_dest none", ""]))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
            self.proc = None


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


def client(port: int, client_id: str | None = None, persistent: bool = False) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                    client_id=client_id or f"bench-{os.getpid()}-{next(_ids)}", protocol=MQTTProtocolVersion.MQTTv5)
    c.reconnect_delay_set(0.2, 1)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600 if persistent else 0
    c.connect("127.0.0.1", port, 30, clean_start=not persistent, properties=props)
    c.loop_start()
    return c


class Collector:
    """Records every reply by request id, and registration statuses and availability, on a persistent session."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Condition()
        self.replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.registrations: list[dict[str, Any]] = []
        self.availability: dict[str, bytes] = {}
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"bench-collector-{os.getpid()}", protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe([
            (f"{PREFIX}/autocalibration/camera/pose/+", 1), (f"{PREFIX}/cmd/autocalibration/scene/+", 1),
            (f"{PREFIX}/sys/autocalibration/availability/#", 1), (f"{PREFIX}/sys/autocalibration/availability", 1)])
        self.client.reconnect_delay_set(0.2, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, 30, clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            if "/availability" in msg.topic:
                self.availability[msg.topic] = msg.payload
            else:
                try:
                    data = orjson.loads(msg.payload)
                except orjson.JSONDecodeError:
                    return
                if not isinstance(data, dict):
                    return
                if "/pose/" in msg.topic and "request_id" in data:
                    self.replies[data["request_id"]].append(data)
                elif "/scene/" in msg.topic:
                    self.registrations.append(data)
            self.lock.notify_all()

    def wait(self, predicate: Any, timeout: float) -> bool:
        with self.lock:
            return self.lock.wait_for(predicate, timeout)

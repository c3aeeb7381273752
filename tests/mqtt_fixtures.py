"""Real mosquitto brokers for the daemon tests, the shared recording MQTT client on them, a vision-core test double.

Brokers are the real `/usr/sbin/mosquitto` (`markerless.demo.mosquitto`) with the repository's ACL file, TLS from
`mosquitto/make-dev-certs.sh` and its password file, persistence on (QoS 1 sessions survive a restart), on a free
port, as a subprocess a test can stop and start again on the same port. Without mosquitto the tests skip and say
why (CI installs it). The client is `markerless.demo.mqtt_client.RecordingClient`, the demo's and the benches'.

Import the fixtures you use into a test module: `from mqtt_fixtures import broker, pki  # noqa: F401`.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from markerless.demo.mosquitto import MOSQUITTO, Mosquitto, free_port
from markerless.demo.mqtt_client import RecordingClient
from markerless.service.daemon import Backend, Daemon
from markerless.service.scenes_file import ScenesFile
from markerless.service.settings import Settings
from markerless.service.topics import Topics

REPO = Path(__file__).resolve().parents[1]
CERT_SCRIPT = REPO / "mosquitto" / "make-dev-certs.sh"
ACL = REPO / "mosquitto" / "acl"
WAIT_S = 30.0  # upper bound for anything the tests wait on (a failure bound, never a measurement)

TOPICS = Topics("scenescape")


def _require_tools() -> None:
    missing = [t for t in ("openssl", "mosquitto_passwd") if shutil.which(t) is None]
    if not MOSQUITTO.is_file():
        missing.append(str(MOSQUITTO))
    if missing:
        pytest.skip(f"mosquitto broker tests need {', '.join(missing)} (CI installs mosquitto and mosquitto-clients)")


@dataclass(frozen=True)
class Pki:
    """Output of make-dev-certs.sh: CA, server/client certificates and per-user passwords."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def password_file(self, user: str) -> Path:
        return self.dir / f"{user}.password"

    def password(self, user: str) -> str:
        return self.password_file(user).read_text().strip()


def make_pki(path: Path) -> Pki:
    _require_tools()
    subprocess.run(["bash", str(CERT_SCRIPT), str(path)], check=True, capture_output=True, timeout=120)
    return Pki(path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def wrong_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second, unrelated CA: the broker's certificate does not chain to it."""
    return make_pki(tmp_path_factory.mktemp("wrong-pki"))


class Broker(Mosquitto):
    """mosquitto with TLS, passwords and the repo ACL on `port`; `stop()` + `start()` keeps port and sessions."""

    def __init__(self, pki: Pki, workdir: Path) -> None:
        self.pki = pki
        super().__init__(
            workdir,
            general=["per_listener_settings false", "allow_anonymous false", f"password_file {pki.dir / 'passwd'}",
                     f"acl_file {ACL}", "log_dest stdout", "log_type all"],
            listener=[f"cafile {pki.ca}", f"certfile {pki.dir / 'server.crt'}", f"keyfile {pki.dir / 'server.key'}",
                      "tls_version tlsv1.2"],
        )


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[Broker]:
    b = Broker(pki, tmp_path / "broker")
    b.start()
    yield b
    b.stop()


_ids = itertools.count()


class Client(RecordingClient):
    """The shared recording client on a test broker: TLS with its CA, `user` with its password (or `password`)."""

    def __init__(self, broker: Broker, user: str | None, *, protocol: str = "5", client_id: str | None = None,
                 persistent: bool = False, password: str | None = None) -> None:
        self.broker = broker
        if user is not None and password is None:
            password = broker.pki.password(user)
        super().__init__("localhost", broker.port, user=user, password=password, ca=broker.pki.ca,
                         protocol=protocol, client_id=client_id or f"test-{user}-{os.getpid()}-{next(_ids)}",
                         persistent=persistent)


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """Factory of connected test clients, all closed at teardown."""
    made: list[Client] = []

    def make(broker: Broker, user: str | None, **kwargs: Any) -> Client:
        c = Client(broker, user, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def daemon_settings(broker: Broker, store: Path, protocol: str = "3.1.1", **sections: dict[str, Any]) -> Settings:
    """Settings of a daemon talking to `broker` as user `markerless` over TLS."""
    mqtt_section = {
        "host": "localhost",
        "port": broker.port,
        "client_id": f"markerless-test-{os.getpid()}-{next(_ids)}",
        "protocol": protocol,
        "username": "markerless",
        "password_file": broker.pki.password_file("markerless"),
        "tls": {"ca_file": broker.pki.ca},
        "reconnect_min_s": 0.5,
        "reconnect_max_s": 2.0,
        "connect_timeout_s": 20.0,
        **sections.pop("mqtt", {}),
    }
    return Settings(mqtt=mqtt_section, store={"root": store}, **sections)


def frame(image: bytes, *, intrinsics: Any = None, **extra: Any) -> bytes:
    """A Percebro-style calibration frame."""
    import base64

    body: dict[str, Any] = {"timestamp": "2026-01-01T00:00:00Z", "image": base64.b64encode(image).decode(),
                            "calibrate": True, **extra}
    if intrinsics is not None:
        body["intrinsics"] = intrinsics
    return orjson.dumps(body)


def jpeg(width: int = 64, height: int = 48, value: int = 128) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.full((height, width, 3), value, np.uint8))
    return buf.tobytes()


def k_for(width: int = 64, height: int = 48) -> list[list[float]]:
    return [[float(width), 0.0, width / 2], [0.0, float(width), height / 2], [0.0, 0.0, 1.0]]


# --- test double of the vision core ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeInfo:
    scene_id: str
    version: str
    dataset_sha256: str
    config: Any


@dataclass
class FakeScene:
    info: FakeInfo


@dataclass
class FakeCore:
    """Test double: replaces the vision core (models, store, localizer, registration) to isolate transport and
    concurrency behaviour. Image decoding and intrinsics validation stay the real ones.

    A localized pose has a 1 cm / 0.1 deg sigma and the camera it was given; a frame brighter than 200 stands for
    the camera knocked 0.5 m along y (for the calibration watch).

    `gate` (set = open) holds the worker inside `localize`; `started` counts localize calls that began, so a test
    knows the worker is busy without sleeping. `register_gate` holds a registration likewise. A localized pose's
    translation x is the scene version's sequence number, so tests see which version served.
    """

    gate: threading.Event = field(default_factory=threading.Event)
    register_gate: threading.Event = field(default_factory=threading.Event)
    started: list[str] = field(default_factory=list)
    registrations: list[str] = field(default_factory=list)
    infos: dict[str, FakeInfo] = field(default_factory=dict)
    lock: threading.Condition = field(default_factory=threading.Condition)
    crash_on_value: int = 7  # an all-7 image makes localize raise (a stand-in for a bug in the core)

    def __post_init__(self) -> None:
        self.gate.set()
        self.register_gate.set()

    # store
    def scene_ids(self) -> list[str]:
        return sorted(self.infos)

    def info(self, scene_id: str) -> FakeInfo | None:
        from markerless.scene.store import check_scene_id

        check_scene_id(scene_id)
        with self.lock:
            return self.infos.get(scene_id)

    def load(self, scene_id: str) -> FakeScene:
        from markerless.errors import SceneNotFoundError

        info = self.info(scene_id)
        if info is None:
            raise SceneNotFoundError(f"scene {scene_id!r} is not registered")
        return FakeScene(info)

    def commit(self, scene_id: str, dataset: Path, config: Any) -> FakeInfo:
        with self.lock:
            n = sum(1 for r in self.registrations if r == scene_id)
            info = FakeInfo(scene_id, f"v{n}", _sha(dataset), config)
            self.infos[scene_id] = info
            self.lock.notify_all()
            return info

    # registration
    def register_scene(self, store: Any, scene_id: str, dataset: Path, config: Any, models: Any,
                       progress: Callable[[str, float], None] | None = None) -> FakeInfo:
        with self.lock:
            self.registrations.append(scene_id)
            self.lock.notify_all()
        report = progress or (lambda s, f: None)
        report("ingest", 0.0)
        if not self.register_gate.wait(WAIT_S):
            raise RuntimeError("register_gate never opened")
        report("features", 1.0)
        return self.commit(scene_id, dataset, config)

    def needs_registration(self, store: Any, scene_id: str, dataset: Path, config: Any) -> bool:
        info = self.info(scene_id)
        return info is None or info.config != config or info.dataset_sha256 != _sha(dataset)

    # localization
    def localize(self, scene: FakeScene, image: np.ndarray, camera: Any, mode: str = "refine") -> Any:
        from markerless.pipeline.localization import LocalizationResult

        with self.lock:
            self.started.append(scene.info.version)
            self.lock.notify_all()
        if not self.gate.wait(WAIT_S):
            raise RuntimeError("gate never opened")
        if int(image.mean().round()) == self.crash_on_value:
            raise RuntimeError("test double: simulated bug in the core")
        version = scene.info.version
        if image.mean() < 20:  # a dark frame stands for a foreign image: gates fail
            return LocalizationResult(False, "too_few_matches", "3 matches < 20", num_matches=3,
                                      scene_id=scene.info.scene_id, scene_version=version)
        knocked = 0.5 if image.mean() > 200 else 0.0
        k = camera.matrix.tolist() if camera is not None else [[64.0, 0.0, 32.0], [0.0, 64.0, 24.0], [0.0, 0.0, 1.0]]
        return LocalizationResult(True, None, "ok", quaternion=[0.0, 0.0, 0.0, 1.0],
                                  translation=[float(version[1:]), knocked, 0.0], num_matches=100, num_inliers=90,
                                  inlier_ratio=0.9, timings_ms={"match": 1.0}, scene_id=scene.info.scene_id,
                                  scene_version=version, intrinsics=k, distortion=[], intrinsics_source="given",
                                  position_sigma_m=0.01, rotation_sigma_deg=0.1)

    def wait_started(self, count: int) -> None:
        with self.lock:
            if not self.lock.wait_for(lambda: len(self.started) >= count, WAIT_S):
                raise AssertionError(f"worker never started request #{count}")

    def backend(self) -> Backend:
        from markerless.pipeline.image_decoding import decode_image
        from markerless.scene.camera import Camera

        core = self
        return Backend(
            store=core,
            new_models=lambda: object(),
            new_localizer=lambda models: core,
            decode_image=decode_image,
            make_camera=lambda k, w, h, d: Camera.from_matrix(k, w, h, d),
            register_scene=core.register_scene,
            needs_registration=core.needs_registration,
        )


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ManualClock:
    """An injectable monotonic clock a test can move forward (deadline tests without sleeping)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """Starts daemons (settings, FakeCore or None for the real core, scenes) and stops them all at teardown."""
    started: list[Daemon] = []

    def start(settings: Settings, core: FakeCore | None = None, scenes: ScenesFile | None = None,
              **kwargs: Any) -> Daemon:
        daemon = Daemon(settings, backend=core.backend() if core else None, scenes=scenes or ScenesFile(), **kwargs)
        daemon.start()
        started.append(daemon)
        if not daemon.wait_ready(WAIT_S):
            raise AssertionError("daemon worker not ready")
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


__all__ = [
    "Broker", "Client", "FakeCore", "ManualClock", "Pki", "broker", "clients", "daemon_settings", "frame", "jpeg",
    "k_for", "make_pki", "pki", "daemons", "wrong_pki", "free_port", "TOPICS", "WAIT_S",
]

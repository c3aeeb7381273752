"""SIGTERM at each point of a real `markerless serve` start-up, over a real mosquitto: always exit 0 and no
traceback; `stopped` retained whenever `online` was published, nothing published when the broker was never
reached, and no registration left half-written in the store.

An orchestrator stops a service at any moment (a cancelled rolling update, `docker stop` right after `up`); before
the fix a stop during the first seconds (native imports) was a native abort, exit 143, with no availability.
The points are reached by watching what the process logs and publishes, never by sleeping.
Needs the kitchen scan ($MARKERLESS_KITCHEN_DIR) for a real scene to load; skipped without.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from mqtt_fixtures import TOPICS, Broker, Pki

STARTUP_WAIT_S = 300.0  # failure bounds on a loaded 2-core machine, not measurements

pytestmark = pytest.mark.slow


class Serve:
    """A real `markerless serve` process whose stderr lines are collected as they come."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MARKERLESS__")}
        self.proc = subprocess.Popen([sys.executable, "-m", "markerless.cli", "serve", "--config", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def wait_line(self, text: str) -> None:
        while True:
            line = self._new.get(timeout=STARTUP_WAIT_S)
            if line is None:
                raise AssertionError(f"serve exited before logging {text!r}:\n{''.join(self.lines)[-3000:]}")
            if text in line:
                return

    def terminate(self) -> str:
        """SIGTERM, then the exit status must be 0 with no traceback; returns the whole stderr."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=STARTUP_WAIT_S)
        while self._new.get(timeout=STARTUP_WAIT_S) is not None:
            pass
        stderr = "".join(self.lines)
        assert self.proc.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr and "Aborted" not in stderr, stderr[-3000:]
        assert "SIGTERM received" not in stderr, stderr[-3000:]  # glog's crash report
        return stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def retained_availability(clients: Any, broker: Broker) -> list[bytes]:
    """The availability retained on the broker now. Retained messages come with the SUBACK, before the echo of a
    message published after it, so once the echo is in, the retained message (if any) is too."""
    probe = clients(broker, "scenescape")
    probe.connect()
    probe.subscribe(TOPICS.availability, TOPICS.status)
    probe.publish(TOPICS.status, b"probe")
    probe.wait(lambda: b"probe" in probe.received(TOPICS.status), "the probe's echo")
    return probe.received(TOPICS.availability)


@pytest.fixture
def setup(broker: Broker, kitchen_dir: Path, kitchen_store: Path, tmp_path: Path) -> Any:
    """Config writer: the registered kitchen is served (loaded at start); `register_at_start` adds kitchen2,
    registered from the scan at start-up."""

    def make(register_at_start: bool = False, port: int = broker.port) -> tuple[Path, Path]:
        store = tmp_path / "store"
        store.mkdir()
        (store / "kitchen").symlink_to(kitchen_store / "kitchen")  # served; never written (not in scenes.yaml)
        scenes = {"kitchen2": {"dataset": str(kitchen_dir / "kitchen-poly.zip")}} if register_at_start else {}
        (tmp_path / "scenes.yaml").write_text(yaml.safe_dump({"scenes": scenes, "cameras": {}}))
        config = tmp_path / "markerless.yaml"
        config.write_text(yaml.safe_dump({
            "mqtt": {"host": "localhost", "port": port, "client_id": "markerless-startup",
                     "username": "markerless", "password_file": str(broker.pki.password_file("markerless")),
                     "tls": {"ca_file": str(broker.pki.ca)}, "connect_timeout_s": STARTUP_WAIT_S,
                     "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "registration": {"on_start": register_at_start, "progress_interval_s": 0},
            "store": {"root": str(store)},
            "scenes_file": "scenes.yaml",
        }))
        return config, store

    return make


def test_sigterm_during_native_imports(broker: Broker, clients: Any, setup: Any) -> None:
    config, _ = setup()
    serve = Serve(config)
    try:
        serve.wait_line("starting: a stop signal from now on")  # logged before pycolmap and torch are imported
        stderr = serve.terminate()
    finally:
        serve.kill()
    if "connected to" in stderr:  # the imports won the race with this process reading the pipe: still the rule
        assert retained_availability(clients, broker)[-1:] == [b"stopped"]
    else:
        assert retained_availability(clients, broker) == []


def test_sigterm_before_the_broker_is_reached_publishes_nothing(
    pki: Pki, clients: Any, setup: Any, tmp_path: Path
) -> None:
    late = Broker(pki, tmp_path / "late-broker")  # its port is chosen now; it starts after the daemon has stopped
    config, _ = setup(port=late.port)
    serve = Serve(config)
    try:
        serve.wait_line("unreachable")  # retrying the connection
        stderr = serve.terminate()
    finally:
        serve.kill()
    assert "connected to" not in stderr
    late.start()
    try:
        assert retained_availability(clients, late) == []
    finally:
        late.stop()


@pytest.mark.parametrize("point", ["online", "scene loading"])
def test_sigterm_after_online_leaves_stopped(broker: Broker, clients: Any, setup: Any, point: str) -> None:
    config, _ = setup()
    op = clients(broker, "scenescape")
    op.connect()
    op.subscribe(TOPICS.availability)
    serve = Serve(config)
    try:
        if point == "online":
            op.wait(lambda: op.received(TOPICS.availability)[-1:] == [b"online"], "online", timeout=STARTUP_WAIT_S)
        else:
            serve.wait_line("scene kitchen: loading")  # the worker reads the stored scene; `online` is out
        serve.terminate()
    finally:
        serve.kill()
    assert op.received(TOPICS.availability)[0] == b"online"
    op.wait(lambda: op.received(TOPICS.availability)[-1:] == [b"stopped"], "stopped")
    assert retained_availability(clients, broker) == [b"stopped"]


def test_sigterm_during_a_start_up_registration_leaves_no_partial_scene(
    broker: Broker, clients: Any, setup: Any
) -> None:
    config, store = setup(register_at_start=True)
    op = clients(broker, "scenescape")
    op.connect()
    op.subscribe(TOPICS.availability, TOPICS.register("kitchen2"))
    serve = Serve(config)
    try:
        op.wait_json(TOPICS.register("kitchen2"), lambda d: d.get("status") == "registering", "kitchen2 registering",
                     timeout=STARTUP_WAIT_S)
        serve.terminate()
    finally:
        serve.kill()
    final = op.wait_json(TOPICS.register("kitchen2"), lambda d: "reason" in d, "kitchen2's final status")
    assert final["reason"] == "shutting_down"
    assert retained_availability(clients, broker) == [b"stopped"]
    # a first registration cut short leaves no scene folder at all: no staging dir, no version lock, no version
    assert not (store / "kitchen2").exists(), list((store / "kitchen2").rglob("*"))[:20]
    assert not list(store.glob("*/.staging-*")) and not list(store.glob("*/.lock-*"))


def test_sigkill_during_a_registration_leaves_no_worker(broker: Broker, clients: Any, setup: Any) -> None:
    """SIGKILL (no clean-up runs) while the registrar's SIFT workers extract: 15 s later none of the processes
    the service started (forkserver, resource tracker, workers) is left running."""
    psutil = pytest.importorskip("psutil")  # the demo extra
    from markerless.pipeline.registration import usable_cpus

    if usable_cpus() < 2:
        pytest.skip("one usable CPU: registration extracts SIFT in its own process, with no workers")
    config, _ = setup(register_at_start=True)
    op = clients(broker, "scenescape")
    op.connect()
    op.subscribe(TOPICS.register("kitchen2"))
    serve = Serve(config)
    started: list[Any] = []
    try:
        op.wait_json(TOPICS.register("kitchen2"), lambda d: d.get("stage") == "features",
                     "kitchen2 extracting features", timeout=STARTUP_WAIT_S)
        started = psutil.Process(serve.proc.pid).children(recursive=True)
        assert any(p.children() for p in started if p.ppid() == serve.proc.pid), started  # forkserver + workers
        serve.proc.kill()
        serve.proc.wait()
        _, alive = psutil.wait_procs(started, timeout=15.0)
        assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
    finally:
        serve.kill()
        for p in started:
            if p.is_running():
                p.kill()

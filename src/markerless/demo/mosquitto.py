"""A real mosquitto broker as a subprocess on a free loopback port, for the tests and the benches.

Persistence is on, so `stop()` (SIGTERM: mosquitto saves its sessions and queued QoS 1 messages) and `start()`
again on the same port keep the sessions. What else the broker does (TLS, passwords, ACL, anonymous access,
inflight windows, logging) is the caller's: `general` lines of mosquitto.conf, and `listener` lines that follow the
listener they configure. Its stdout goes to `log`.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

MOSQUITTO = Path(shutil.which("mosquitto") or "/usr/sbin/mosquitto")
START_WAIT_S = 30.0  # a failure bound, never a measurement


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` at this moment: another process may take it before the caller binds it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """mosquitto on 127.0.0.1:`port` with its config, persistence and log under `workdir`."""

    def __init__(self, workdir: Path, general: Sequence[str] = (), listener: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "data").mkdir(exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join([
            f"user {getpass.getuser()}",  # mosquitto drops root to 'mosquitto' otherwise
            *general,
            "persistence true",
            f"persistence_location {workdir / 'data'}/",
            f"listener {self.port} 127.0.0.1",
            *listener,
            "",
        ]))
        self.log = workdir / "mosquitto.log"

    def start(self) -> None:
        """Start it and return once it accepts connections; RuntimeError with its log if it does not."""
        log = open(self.log, "ab")  # noqa: SIM115 - owned by the subprocess
        self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: mosquitto saves its persistence DB (sessions, queued QoS 1 messages) and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=START_WAIT_S)
        self.proc = None

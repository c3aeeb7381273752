"""An MQTT broker inside the process (amqtt), for the demo and tests: no mosquitto to install or run.

amqtt is asyncio-only; the rest of markerless is threads, so the broker runs its own event loop in a daemon thread
and `start()` / `stop()` block until it is listening / closed. It accepts anonymous clients, which is why it
binds to a loopback address only: it is not a production broker.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from types import TracebackType
from typing import Any

from markerless.demo.mosquitto import free_port
from markerless.errors import MarkerlessError, Reason

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0
_START_ATTEMPTS = 3  # a free port picked up front can be taken before the broker binds it: retry


class EmbeddedBroker:
    """MQTT 3.1.1 broker on a loopback address; `port=0` picks a free port (read it back from `.port`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise MarkerlessError(
                f"embedded broker host {host!r} is not a loopback IP address: it allows anonymous clients, "
                "so it only listens on 127.0.0.1 / ::1", reason=Reason.BAD_SETTINGS,
            )
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def running(self) -> bool:
        return self._broker is not None

    def start(self) -> None:
        """Start the loop thread and the broker; returns once it accepts connections."""
        if self.running:
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mqtt-broker", daemon=True)
        self._thread.start()
        fixed_port = self.port != 0
        last_error: Exception | None = None
        for _ in range(1 if fixed_port else _START_ATTEMPTS):
            port = self.port if fixed_port else free_port(self.host)
            future = asyncio.run_coroutine_threadsafe(self._start_broker(port), self._loop)
            try:
                self._broker = future.result(timeout=_START_TIMEOUT_S)
            except Exception as exc:  # amqtt raises BrokerError wrapping the OSError of a taken port
                last_error = exc
                continue
            self.port = port
            logger.info("embedded MQTT broker listening on %s:%d", self.host, port)
            return
        self._stop_loop()
        raise MarkerlessError(f"embedded MQTT broker could not start on {self.host}: {last_error}",
                              reason=Reason.BROKER_UNAVAILABLE)

    async def _start_broker(self, port: int) -> Any:
        from amqtt.broker import Broker

        host = f"[{self.host}]" if ":" in self.host else self.host
        broker = Broker({
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            # Only authentication: anonymous (loopback only, see the class docstring); no $SYS, no packet logging.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        })
        await broker.start()
        return broker

    def stop(self) -> None:
        """Disconnect every client, close the listener and end the loop thread."""
        if self._broker is not None and self._loop is not None:
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            try:
                future.result(timeout=_START_TIMEOUT_S)
            except Exception:  # shutting down anyway: a client that vanished mid-shutdown must not block exit
                logger.warning("embedded MQTT broker did not shut down cleanly", exc_info=True)
            self._broker = None
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_START_TIMEOUT_S)
        self._loop.close()
        self._loop = None
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

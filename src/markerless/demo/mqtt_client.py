"""An MQTT client that records every message it receives and waits on what it has received.

One client for the demo (a camera and an operator talking to the daemon), the tests (request/response assertions
against a real broker) and the benches. paho runs its network loop in a thread; the client keeps every
(topic, payload) in arrival order under one condition, so a caller waits for a predicate over what has arrived:
a PUBACK, a SUBACK, the next reply echoing a request id. A wait that runs out raises `MqttTimeout`.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

DEFAULT_WAIT_S = 30.0  # a failure bound, never a measurement

_ids = itertools.count()


class MqttTimeout(AssertionError):
    """A wait ran out: an AssertionError, so a test that waits in vain fails with what it waited for."""


def json_object(payload: bytes) -> dict[str, Any] | None:
    """The payload as a JSON object, or None (raw strings such as SceneScape's `register` are not replies)."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


class RecordingClient:
    """A paho client on `host:port` (TLS with `ca`, a user with `user`/`password`), MQTT 5 or 3.1.1."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        user: str | None = None,
        password: str | None = None,
        ca: Path | None = None,
        protocol: str = "5",
        client_id: str | None = None,
        persistent: bool = False,
        reconnect_delay_s: tuple[float, float] = (1, 2),
    ) -> None:
        self.host, self.port = host, port
        self.v5 = protocol == "5"
        self.persistent = persistent
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"markerless-{user or 'client'}-{os.getpid()}-{next(_ids)}",
            protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.v5 else not persistent,
        )
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.reconnect_delay_set(*reconnect_delay_s)
        self.messages: list[tuple[str, bytes]] = []
        self.retained: list[tuple[str, bytes]] = []  # those of `messages` the broker kept and sent on subscribe
        self.acks: dict[int, Any] = {}
        self.connack: Any = None
        self._taken: set[int] = set()  # indices of messages handed out by `take_json`
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    # callbacks (paho's network thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, msg.payload))
            if msg.retain:
                self.retained.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._cond:
            self.acks[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self._cond:
            self.acks[mid] = rcs
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = DEFAULT_WAIT_S) -> Any:
        """The predicate's value once it is true; MqttTimeout naming `what` after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise MqttTimeout(f"timed out after {timeout} s waiting for {what}")
            return predicate()

    # actions
    def connect(self) -> Any:
        """Connect and start the network loop; returns the CONNACK reason code."""
        kwargs: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if self.persistent else 0
            kwargs = {"clean_start": not self.persistent, "properties": props}
        self.client.connect(self.host, self.port, 30, **kwargs)
        self.client.loop_start()
        return self.wait(lambda: self.connack, "CONNACK")

    def subscribe(self, *filters: str) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK."""
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        self.wait(lambda: mid in self.acks, f"SUBACK {filters}")

    def publish(self, topic: str, payload: bytes | str, wait: bool = True, *, qos: int = 1,
                retain: bool = False) -> Any:
        """Publish (QoS 1 unless told); with `wait`, returns the PUBACK's reason code (QoS 0: once sent), else the
        message id."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if wait:
            self.wait(lambda: info.mid in self.acks, f"PUBACK on {topic}")
            return self.acks[info.mid]
        return info.mid

    def received(self, topic: str) -> list[bytes]:
        with self._cond:
            return [p for t, p in self.messages if t == topic]

    def json_on(self, topic: str) -> list[dict[str, Any]]:
        """JSON objects received on `topic` (raw strings such as our own `register` skipped)."""
        return [data for p in self.received(topic) if (data := json_object(p)) is not None]

    def wait_json(self, topic: str, predicate: Callable[[dict[str, Any]], bool], what: str,
                  timeout: float = DEFAULT_WAIT_S) -> dict[str, Any]:
        """The first JSON object on `topic` that satisfies `predicate`, received or to come."""
        def find() -> dict[str, Any] | None:
            for t, p in self.messages:
                if t == topic and (data := json_object(p)) is not None and predicate(data):
                    return data
            return None

        return self.wait(find, what, timeout)

    def take_json(self, topic: str, predicate: Callable[[dict[str, Any]], bool], what: str,
                  timeout: float = DEFAULT_WAIT_S) -> dict[str, Any]:
        """Like `wait_json`, but each message is handed out once: successive calls walk a stream of statuses."""
        def find() -> tuple[int, dict[str, Any]] | None:
            for i, (t, p) in enumerate(self.messages):
                if i not in self._taken and t == topic and (data := json_object(p)) is not None and predicate(data):
                    return i, data
            return None

        index, data = self.wait(find, what, timeout)
        with self._cond:
            self._taken.add(index)
        return data

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

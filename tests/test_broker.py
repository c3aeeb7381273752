"""The embedded broker carries real MQTT traffic between paho clients, and stays on loopback."""

from __future__ import annotations

import queue
import socket
import threading

import paho.mqtt.client as mqtt
import pytest

from markerless.demo.broker import EmbeddedBroker
from markerless.errors import MarkerlessError

TIMEOUT_S = 10


def _client(broker: EmbeddedBroker, name: str, subscribe: str | None = None) -> tuple[mqtt.Client, queue.Queue]:
    """A connected paho client; with `subscribe`, returns once the broker acknowledged the subscription."""
    received: queue.Queue = queue.Queue()
    ready = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)

    def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        if subscribe is None:
            ready.set()
        else:
            c.subscribe(subscribe, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = lambda *args: ready.set()
    client.on_message = lambda c, u, msg: received.put((msg.topic, msg.payload, msg.retain))
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert ready.wait(TIMEOUT_S), f"{name} did not connect/subscribe"
    return client, received


def _close(*clients: mqtt.Client) -> None:
    for client in clients:
        client.disconnect()
        client.loop_stop()


def test_publish_reaches_wildcard_subscriber() -> None:
    with EmbeddedBroker() as broker:
        assert broker.port > 0
        sub, received = _client(broker, "sub", "scenescape/autocalibration/camera/pose/+")
        pub, _ = _client(broker, "pub")
        payload = b"\x00" * 3_000_000  # a large JPEG-in-JSON frame must pass
        pub.publish("scenescape/autocalibration/camera/pose/cam1", payload, qos=1).wait_for_publish(TIMEOUT_S)
        pub.publish("scenescape/other/cam1", b"not for sub", qos=1).wait_for_publish(TIMEOUT_S)
        pub.publish("scenescape/autocalibration/camera/pose/cam2", b"second", qos=0)
        topic, data, _ = received.get(timeout=TIMEOUT_S)
        assert topic == "scenescape/autocalibration/camera/pose/cam1" and data == payload
        topic, data, _ = received.get(timeout=TIMEOUT_S)
        assert (topic, data) == ("scenescape/autocalibration/camera/pose/cam2", b"second")
        assert received.empty()
        _close(sub, pub)


def test_retained_message_reaches_late_subscriber() -> None:
    with EmbeddedBroker() as broker:
        pub, _ = _client(broker, "pub")
        pub.publish("markerless/status", b"online", qos=1, retain=True).wait_for_publish(TIMEOUT_S)
        sub, received = _client(broker, "late", "markerless/status")
        assert received.get(timeout=TIMEOUT_S) == ("markerless/status", b"online", True)
        _close(pub, sub)


def test_stop_closes_the_port_and_two_brokers_do_not_collide() -> None:
    first, second = EmbeddedBroker(), EmbeddedBroker()
    first.start()
    second.start()
    try:
        assert first.port != second.port
        with socket.create_connection((first.host, first.port), timeout=TIMEOUT_S):
            pass
    finally:
        second.stop()
        port = first.port
        first.stop()
    assert not first.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S).close()


def test_refuses_non_loopback_host() -> None:
    """It allows anonymous clients, so it must never listen beyond this machine."""
    for host in ("0.0.0.0", "192.168.1.10", "example.com"):
        with pytest.raises(MarkerlessError, match="loopback"):
            EmbeddedBroker(host=host)

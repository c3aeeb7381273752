"""The embedded broker carries real MQTT traffic between MQTT clients, and stays on loopback."""

from __future__ import annotations

import socket

import pytest

from markerless.demo.broker import EmbeddedBroker
from markerless.demo.mqtt_client import RecordingClient
from markerless.errors import MarkerlessError

TIMEOUT_S = 10


def _client(broker: EmbeddedBroker, *filters: str) -> RecordingClient:
    """The shared recording client, connected (the embedded broker speaks MQTT 3.1.1) and subscribed to `filters`."""
    client = RecordingClient(broker.host, broker.port, protocol="3.1.1")
    assert not client.connect().is_failure
    if filters:
        client.subscribe(*filters)
    return client


def _close(*clients: RecordingClient) -> None:
    for client in clients:
        client.close()


def test_publish_reaches_wildcard_subscriber() -> None:
    with EmbeddedBroker() as broker:
        assert broker.port > 0
        sub = _client(broker, "scenescape/autocalibration/camera/pose/+")
        pub = _client(broker)
        payload = b"\x00" * 3_000_000  # a large JPEG-in-JSON frame must pass
        pub.publish("scenescape/autocalibration/camera/pose/cam1", payload)
        pub.publish("scenescape/other/cam1", b"not for sub")
        pub.publish("scenescape/autocalibration/camera/pose/cam2", b"second", wait=False, qos=0)
        sub.wait(lambda: len(sub.messages) >= 2, "two messages", TIMEOUT_S)
        assert sub.messages == [("scenescape/autocalibration/camera/pose/cam1", payload),
                                ("scenescape/autocalibration/camera/pose/cam2", b"second")]
        _close(sub, pub)


def test_retained_message_reaches_late_subscriber() -> None:
    with EmbeddedBroker() as broker:
        pub = _client(broker)
        pub.publish("markerless/status", b"online", retain=True)
        sub = _client(broker, "markerless/status")
        sub.wait(lambda: sub.messages, "the retained message", TIMEOUT_S)
        assert sub.messages == sub.retained == [("markerless/status", b"online")]
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

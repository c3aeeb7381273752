"""The MQTT connection: paho 2.x with a persistent QoS 1 session, availability, and no silent insecure fallback.

Kept apart from the dispatcher so the protocol rules live in one place: stable client id and persistent session
(the broker queues frames while the service restarts), subscribe and retained availability in every
`on_connect`, last will `offline`, `stopped` on a clean exit, exponential reconnect. Received messages are
acknowledged manually: the dispatcher gets an `Ack` and calls it once the request's reply has been delivered
(`publish(..., on_delivered=ack)`), so a request in flight when the process dies is redelivered, not lost. With
`shared_group` the request topics are MQTT 5 shared subscriptions and availability is per replica.
Start-up fails loudly (TransportError) when TLS cannot be set up or the handshake fails, or when the broker
refuses the CONNACK: SceneScape silently fell back to unauthenticated plain TCP in that case.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from markerless.service.messages import OFFLINE, ONLINE, STOPPED
from markerless.service.settings import MqttSettings
from markerless.service.topics import Topics

log = logging.getLogger(__name__)

QOS = 1  # every subscription and publish: at-least-once, so no request or reply is lost across reconnects
_CANCEL_POLL_S = 0.1  # how often a start-up waiting for CONNACK looks for a stop



class Ack:
    """Acknowledges one received message to the broker, once (later calls do nothing)."""

    def __init__(self, client: mqtt.Client, mid: int, qos: int) -> None:
        self._client = client
        self._mid = mid
        self._qos = qos
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        if self._qos > 0:
            self._client.ack(self._mid, self._qos)  # disconnected: lost, and the broker redelivers (deduplicated)


MessageHandler = Callable[[str, bytes, bool, Ack], None]  # (topic, payload, duplicate, ack)


class TransportError(RuntimeError):
    """The broker cannot be used safely (TLS, credentials, refusal): the service must exit with this message."""


class MqttTransport:
    """One MQTT client. Constructing does nothing; `start()` connects or raises TransportError."""

    def __init__(self, settings: MqttSettings, topics: Topics, handler: MessageHandler) -> None:
        self.settings = settings
        self.topics = topics
        self._handler = handler
        self._client: mqtt.Client | None = None
        self._first_connack = threading.Event()
        self._refusal: str | None = None
        self.connected = threading.Event()
        self.availability_topic = (
            topics.replica_availability(settings.client_id) if settings.shared_group else topics.availability
        )
        self._availability = ONLINE
        # on_delivered callbacks by mid; a PUBACK can arrive before publish() returns the mid (`_early`)
        self._pending: dict[int, Callable[[], None] | None] = {}
        self._early: set[int] = set()
        self._pending_lock = threading.Lock()
        self._connect_lock = threading.Lock()  # `online` is announced, or `stop()` has begun, never both at once
        self._closing = False
        self.on_connected: list[Callable[[], None]] = []  # run on the network thread after every accepted CONNACK

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, cancel: threading.Event | None = None) -> bool:
        """Connect (retrying unreachable brokers until `connect_timeout_s`), start the network thread, and wait
        for an accepted CONNACK. Raises TransportError on TLS failure, refusal or timeout. Returns False when
        `cancel` is set first (a stop during start-up); `stop()` then ends what was begun."""
        s = self.settings
        cancel = cancel or threading.Event()
        client = self._build_client()
        deadline = time.monotonic() + s.connect_timeout_s
        delay = s.reconnect_min_s
        while True:
            if cancel.is_set():
                return False
            try:
                client.connect(s.host, s.port, s.keepalive_s, **self._connect_kwargs())
                break
            except ssl.SSLError as exc:
                raise TransportError(
                    f"TLS handshake with the broker {s.host}:{s.port} failed ({exc}); check mqtt.tls.ca_file "
                    f"{s.tls.ca_file if s.tls else ''} and the broker certificate. Not falling back to plain TCP."
                ) from exc
            except OSError as exc:
                if time.monotonic() + delay > deadline:
                    raise TransportError(f"cannot reach the broker {s.host}:{s.port}: {exc}") from exc
                log.warning("broker %s:%s unreachable (%s); retrying in %.1f s", s.host, s.port, exc, delay)
                cancel.wait(delay)
                delay = min(delay * 2, s.reconnect_max_s)
        self._client = client  # before the loop: a resumed session's queued requests arrive right after CONNACK
        client.loop_start()
        connack_by = max(deadline, time.monotonic() + 1.0)
        while not self._first_connack.wait(_CANCEL_POLL_S):
            if cancel.is_set():
                return False
            if time.monotonic() < connack_by:
                continue
            self._abort(client)
            raise TransportError(f"the broker {s.host}:{s.port} did not answer CONNECT within {s.connect_timeout_s} s")
        if self._refusal is not None:
            self._abort(client)
            raise TransportError(
                f"the broker {s.host}:{s.port} refused the connection: {self._refusal} "
                f"(user {s.username!r}, client id {s.client_id!r})"
            )
        return True

    def stop(self) -> None:
        """Publish retained `stopped`, then disconnect cleanly (so the last will `offline` is not sent)."""
        with self._connect_lock:  # a CONNACK arriving from now on announces nothing (see `_on_connect`)
            self._closing = True
            client, self._client = self._client, None
            announced = self.connected.is_set()
        if client is None:
            return
        if announced:
            info = self._send(client, self.availability_topic, STOPPED, True, None)
            try:
                info.wait_for_publish(timeout=5.0)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish 'stopped': %s", exc)
        if self.settings.shared_group:
            # End the session with the connection: mosquitto would otherwise keep assigning this member its share
            # of new requests, queued for a replica that was stopped on purpose, until the session expires.
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            client.disconnect(properties=props)
        else:
            client.disconnect()
        client.loop_stop()
        self.connected.clear()

    def publish(
        self, topic: str, payload: bytes | str, retain: bool = False, on_delivered: Callable[[], None] | None = None
    ) -> None:
        """Publish at QoS 1; `on_delivered` runs (on the network thread) when the broker has acknowledged it.
        While the broker is away paho keeps the message and sends it on reconnect."""
        client = self._client
        if client is None:
            log.error("not started: dropping publish on %s", topic)
            return
        self._send(client, topic, payload, retain, on_delivered)

    def _send(
        self, client: mqtt.Client, topic: str, payload: bytes | str, retain: bool,
        on_delivered: Callable[[], None] | None,
    ) -> mqtt.MQTTMessageInfo:
        info = client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("publish on %s failed: %s", topic, mqtt.error_string(info.rc))
            return info
        with self._pending_lock:
            delivered = info.mid in self._early
            if delivered:
                self._early.discard(info.mid)
            else:
                self._pending[info.mid] = on_delivered
        if delivered and on_delivered is not None:
            on_delivered()
        return info

    def set_availability(self, value: str) -> None:
        """Publish retained availability (`online`, `stalled`) now and after every reconnect."""
        self._availability = value
        if self.connected.is_set():
            self.publish(self.availability_topic, value, retain=True)

    # -- paho wiring -----------------------------------------------------------------------------------------
    def _build_client(self) -> mqtt.Client:
        s = self.settings
        v5 = s.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,  # v3.1.1 persistent session; v5 uses clean_start + expiry
            reconnect_on_failure=True,
            manual_ack=True,
        )
        client.reconnect_delay_set(min_delay=s.reconnect_min_s, max_delay=s.reconnect_max_s)  # type: ignore[arg-type]
        if s.tls is not None:
            try:
                client.tls_set(
                    ca_certs=str(s.tls.ca_file),
                    certfile=str(s.tls.cert_file) if s.tls.cert_file else None,
                    keyfile=str(s.tls.key_file) if s.tls.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (ssl.SSLError, OSError, ValueError) as exc:
                hint = "" if s.tls.ca_file.is_file() else (
                    f" The CA file {s.tls.ca_file} does not exist: for a development broker, run "
                    "mosquitto/make-dev-certs.sh (it writes mosquitto/dev/ca.crt), or point mqtt.tls.ca_file at "
                    "your CA."
                )
                raise TransportError(
                    f"TLS is configured but cannot be set up ({exc}): ca_file={s.tls.ca_file}, "
                    f"cert_file={s.tls.cert_file}, key_file={s.tls.key_file}. Not falling back to plain TCP.{hint}"
                ) from exc
            client.tls_insecure_set(s.tls.insecure_skip_hostname_check)
        if s.username is not None:
            try:
                password = s.password()
            except ValueError as exc:
                raise TransportError(str(exc)) from exc
            client.username_pw_set(s.username, password.get_secret_value() if password else None)
        client.will_set(self.availability_topic, OFFLINE, qos=QOS, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _connect_kwargs(self) -> dict[str, object]:
        if self.settings.protocol != "5":
            return {}
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        return {"clean_start": False, "properties": props}

    def _abort(self, client: mqtt.Client) -> None:
        self._client = None
        client.disconnect()
        client.loop_stop()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refusal = str(reason_code)
            log.error("broker refused the connection: %s", reason_code)
            self._first_connack.set()
            return
        s = self.settings
        with self._connect_lock:
            if self._closing:  # stopped while connecting: never announce `online` after `stopped` was decided
                return
            log.info("connected to %s:%s (session present: %s)", s.host, s.port, flags.session_present)
            client.subscribe([(f, QOS) for f in self.topics.subscriptions(s.shared_group)])
            self._send(client, self.availability_topic, self._availability, True, None)
            self._refusal = None
            self.connected.set()
        self._first_connack.set()
        for hook in self.on_connected:
            try:
                hook()
            except Exception:
                log.exception("on_connected hook failed")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        if self._client is not None:
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        # An exception escaping a paho callback would kill the network thread: the handler must not raise, and
        # this is the last line of defence.
        ack = Ack(client, message.mid, message.qos)
        try:
            self._handler(message.topic, message.payload, bool(message.dup), ack)
        except Exception:
            log.exception("message handler failed on %r", message._topic[:200])
            ack()

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        with self._pending_lock:
            if mid not in self._pending:
                self._early.add(mid)
                return
            callback = self._pending.pop(mid)
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("delivery callback of message %s failed", mid)

"""The MQTT connection: paho 2.x with a persistent QoS 1 session, availability, and no silent insecure fallback.

Kept apart from the dispatcher so the protocol rules live in one place: stable client id and persistent session
(the broker queues frames while the service restarts), subscribe and retained `online` in every `on_connect`,
last will `offline`, `stopped` on a clean exit, exponential reconnect. Start-up fails loudly (TransportError) when
TLS cannot be set up or the handshake fails, or when the broker refuses the CONNACK: SceneScape silently fell
back to unauthenticated plain TCP in that case.
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

MessageHandler = Callable[[str, bytes, bool], None]  # (topic, payload, duplicate)


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

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect (retrying unreachable brokers until `connect_timeout_s`), start the network thread, and wait
        for an accepted CONNACK. Raises TransportError on TLS failure, refusal or timeout."""
        s = self.settings
        client = self._build_client()
        deadline = time.monotonic() + s.connect_timeout_s
        delay = s.reconnect_min_s
        while True:
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
                time.sleep(delay)
                delay = min(delay * 2, s.reconnect_max_s)
        client.loop_start()
        if not self._first_connack.wait(max(deadline - time.monotonic(), 1.0)):
            self._abort(client)
            raise TransportError(f"the broker {s.host}:{s.port} did not answer CONNECT within {s.connect_timeout_s} s")
        if self._refusal is not None:
            self._abort(client)
            raise TransportError(
                f"the broker {s.host}:{s.port} refused the connection: {self._refusal} "
                f"(user {s.username!r}, client id {s.client_id!r})"
            )
        self._client = client

    def stop(self) -> None:
        """Publish retained `stopped`, then disconnect cleanly (so the last will `offline` is not sent)."""
        client = self._client
        if client is None:
            return
        self._client = None
        if self.connected.is_set():
            info = client.publish(self.topics.availability, STOPPED, qos=QOS, retain=True)
            try:
                info.wait_for_publish(timeout=5.0)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish 'stopped': %s", exc)
        client.disconnect()
        client.loop_stop()
        self.connected.clear()

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        """Publish at QoS 1. While the broker is away paho keeps the message and sends it on reconnect."""
        client = self._client
        if client is None:
            log.error("not started: dropping publish on %s", topic)
            return
        info = client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("publish on %s failed: %s", topic, mqtt.error_string(info.rc))

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
        client.will_set(self.topics.availability, OFFLINE, qos=QOS, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _connect_kwargs(self) -> dict[str, object]:
        if self.settings.protocol != "5":
            return {}
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        return {"clean_start": False, "properties": props}

    @staticmethod
    def _abort(client: mqtt.Client) -> None:
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
        log.info("connected to %s:%s (session present: %s)", s.host, s.port, flags.session_present)
        client.subscribe([(f, QOS) for f in self.topics.subscriptions()])
        client.publish(self.topics.availability, ONLINE, qos=QOS, retain=True)
        self._refusal = None
        self.connected.set()
        self._first_connack.set()

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
        try:
            self._handler(message.topic, message.payload, bool(message.dup))
        except Exception:
            log.exception("message handler failed on %r", message._topic[:200])

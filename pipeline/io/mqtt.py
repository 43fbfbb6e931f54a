"""The one MQTT wrapper (paho-mqtt 2.x, MQTT 5 or 3.1.1): connect, reconnect with backoff, resubscribe.

Topics (``<prefix>`` defaults to ``ecgmon``; docs/asyncapi.yaml documents each payload):

- ``<prefix>/ecg/<device>``: ECG windows from sensors (JSON or binary).
- ``<prefix>/beats/<device>``: beats completed by each window (QoS 0).
- ``<prefix>/alarms/<device>``: alarm lifecycle events (QoS 1).
- ``<prefix>/errors/<device>``: rejected messages and the reason (QoS 0, rate-limited per device);
  ``<prefix>/errors`` for messages whose device id is invalid.
- ``<prefix>/active/<device>/<type>``: the open alarms, retained (emptied when cleared); on a RabbitMQ cluster,
  not retained: the daemons publish them there when asked on ``<prefix>/query/active``.
- ``<prefix>/status``: daemon availability, retained, with a last will (``offline``); with many daemons on
  one broker (``source: rabbitmq``) each has its own, ``<prefix>/status/<daemon>``.
- ``<prefix>/stats``: periodic daemon statistics (QoS 0); ``<prefix>/stats/<daemon>`` likewise.
- ``<prefix>/probe/<client id>``: the daemon's probes of its own link, sent to itself (not for subscribers).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

MAX_CACHED_TOPICS = 100_000
DEVICE_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix; `daemon`: the daemon's id where many share the broker (its status and stats
    topics are its own)."""

    prefix: str
    daemon: str | None = None

    def ecg(self, device: str = "+") -> str:
        return f"{self.prefix}/ecg/{device}"

    def beats(self, device: str = "+") -> str:
        return f"{self.prefix}/beats/{device}"

    def alarms(self, device: str = "+") -> str:
        return f"{self.prefix}/alarms/{device}"

    def acks(self, device: str = "+") -> str:
        """Staff acknowledgements of a device's alarms (from a central station)."""
        return f"{self.prefix}/acks/{device}"

    def errors(self, device: str = "+") -> str:
        """Rejections of a device's messages; an invalid device id gets the bare `<prefix>/errors`."""
        return f"{self.prefix}/errors/{device}" if device == "+" or DEVICE_ID.match(device) else \
            f"{self.prefix}/errors"

    def probe(self, client_id: str) -> str:
        """Where a daemon sends itself probes through the broker: each that comes back proves that every message
        the broker had for it before has arrived."""
        return f"{self.prefix}/probe/{client_id}"

    def active(self, device: str = "+", alarm_type: str = "+") -> str:
        """Retained copy of an open alarm's last message."""
        return f"{self.prefix}/active/{device}/{alarm_type}"

    @property
    def query_active(self) -> str:
        """Where a subscriber asks the daemons on a RabbitMQ cluster, which keeps no retained copies, to publish
        their open alarms again on `active(device, type)`."""
        return f"{self.prefix}/query/active"

    @property
    def active_marker(self) -> str:
        """Where the daemon marks the end of the retained open alarms it reads at start (not retained)."""
        return f"{self.prefix}/active"

    @property
    def status(self) -> str:
        return f"{self.prefix}/status" + (f"/{self.daemon}" if self.daemon else "")

    @property
    def every_status(self) -> str:
        """The filter for every daemon's status (`<prefix>/status/#` matches `<prefix>/status` too)."""
        return f"{self.prefix}/status/#"

    @property
    def stats(self) -> str:
        return f"{self.prefix}/stats" + (f"/{self.daemon}" if self.daemon else "")

    def device_of(self, topic: str) -> str:
        """The device segment of a per-device topic."""
        return topic.rsplit("/", 1)[-1]


def encode_json(doc: dict[str, Any]) -> bytes:
    """A message as it goes out: compact JSON."""
    return json.dumps(doc, separators=(",", ":")).encode()


class ConnectError(ConnectionError):
    """The broker could not be reached or refused the connection."""


# handler(topic, payload): the message is acknowledged (QoS 1) once the handlers have run.
MessageHandler = Callable[[str, bytes], None]
# handler(topic, payload, ack) of a subscription that acknowledges its QoS 1 messages itself: calling `ack` (from any
# thread) acknowledges this message; never calling it leaves it to the next connection of the persistent session.
ManualAckHandler = Callable[[str, bytes, Callable[[], None]], None]


class MqttClient:
    """A paho client (MQTT 5, or 3.1.1), persistent session, optional last will and automatic resubscription.

    `on_connected(reconnect)` runs on the network thread after every accepted connection, once the
    subscriptions have been sent again.
    """

    def __init__(self, host: str, port: int, client_id: str, *, username: str | None = None,
                 password: str | None = None, keepalive_s: int = 30, session_expiry_s: int = 0,
                 will: tuple[str, bytes] | None = None, reconnect_min_s: float = 0.5,
                 reconnect_max_s: float = 30.0, tls: dict[str, Any] | None = None,
                 on_connected: Callable[[bool], None] | None = None, protocol: str = "5") -> None:
        self.host, self.port, self.keepalive_s, self.client_id = host, port, keepalive_s, client_id
        self._session_expiry_s = session_expiry_s
        self._on_connected = on_connected
        self._v5 = protocol == "5"
        if self._v5:
            self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                                       manual_ack=True)
        else:
            self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                                       clean_session=session_expiry_s == 0, manual_ack=True)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set(**tls)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=max(1, round(reconnect_min_s)), max_delay=round(reconnect_max_s))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        # Tracked QoS 1 messages not known to be acknowledged, in the order queued: (when queued (s), its info).
        # No on_publish callback: with one set, paho builds a reason code and properties for every QoS 0 message.
        self._tracked: deque[tuple[float, paho.MQTTMessageInfo]] = deque()
        self._tracked_lock = threading.Lock()
        self._subscriptions: dict[str, tuple[int, MessageHandler]] = {}
        self._manual: dict[str, ManualAckHandler] = {}  # topic filter -> handler that acknowledges itself
        # topic -> the matching handlers (those acknowledged here, those that acknowledge themselves), cached
        self._handlers_of: dict[str, tuple[list[MessageHandler], list[ManualAckHandler]]] = {}
        self._pending_acks: dict[int, threading.Event] = {}  # SUBSCRIBE message id -> set on SUBACK
        self._resubscribed: list[threading.Event] = []  # SUBACKs of the subscriptions sent on connect
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self.reconnects = 0
        self._closing = False
        self._connected_before = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and start the network thread; raise ConnectError if no CONNACK within `timeout_s`.

        Subscriptions made before are sent on connect; returns once the broker has acknowledged them."""
        try:
            if self._v5:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = self._session_expiry_s
                self._client.connect(self.host, self.port, self.keepalive_s, clean_start=self._session_expiry_s == 0,
                                     properties=properties)
            else:
                self._client.connect(self.host, self.port, self.keepalive_s)
        except OSError as err:
            raise ConnectError(f"cannot reach MQTT broker {self.host}:{self.port}: {err}") from err
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self._client.loop_stop()
            raise ConnectError(f"MQTT broker {self.host}:{self.port} did not accept the connection "
                               f"within {timeout_s:g} s")
        with self._lock:
            awaited = list(self._resubscribed)
        if not all(acked.wait(timeout_s) for acked in awaited):
            log.warning("no SUBACK within %g s for a subscription; it is retried on reconnect", timeout_s)

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Subscribe now (or on connect, if not connected yet) and after every reconnect; `handler(topic,
        payload)` runs on the network thread.

        When connected, returns once the broker has acknowledged the subscription (or after `timeout_s`,
        with a warning).
        """
        with self._lock:
            self._subscriptions[topic] = (qos, handler)
            self._handlers_of.clear()
        acked = threading.Event()
        with self._lock:
            _, mid = self._client.subscribe(topic, qos)
            if mid is None:  # not connected: on_connect subscribes once the connection is back
                return
            self._pending_acks[mid] = acked
        if not acked.wait(timeout_s):
            log.warning("no SUBACK for %s within %g s; the subscription is retried on reconnect", topic, timeout_s)

    def subscribe_manual_ack(self, topic: str, handler: ManualAckHandler, qos: int = 1) -> None:
        """Like `subscribe`, but `handler(topic, payload, ack)` acknowledges each message itself, when it likes."""
        with self._lock:
            self._manual[topic] = handler
        self.subscribe(topic, lambda t, p: None, qos)  # the filter and QoS; the handler is `handler`

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic, None)
            self._manual.pop(topic, None)
            self._handlers_of.clear()
        self._client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> paho.MQTTMessageInfo:
        """Queue a message; QoS 1 messages queued while disconnected go out after reconnect."""
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def publish_tracked(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Queue a QoS 1 message that counts in `unacknowledged` until the broker acknowledges it."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        with self._tracked_lock:
            self._tracked.append((time.monotonic(), info))

    def unacknowledged(self) -> tuple[int, float | None]:
        """How many tracked messages the broker has not acknowledged yet, and when the oldest was queued (s,
        monotonic; None if none)."""
        with self._tracked_lock:
            self._sweep()
            return len(self._tracked), self._tracked[0][0] if self._tracked else None

    def wait_acknowledged(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` until the broker has acknowledged every tracked message; returns how many it
        has not."""
        with self._tracked_lock:
            last = next((info for _, info in reversed(self._tracked) if info.rc == paho.MQTT_ERR_SUCCESS), None)
        if last is not None:
            last.wait_for_publish(timeout_s)
        return self.unacknowledged()[0]

    def _sweep(self) -> None:
        """Forget the tracked messages known to be acknowledged (with the lock held). The broker acknowledges QoS 1
        messages in the order paho sends them, which is the order queued, so one acknowledged means all before it
        were. One queued while disconnected keeps paho's "no connection" code and never says it was published: it
        is known acknowledged once a later one is."""
        done = 0
        for k, (_, info) in enumerate(self._tracked):
            if info.rc != paho.MQTT_ERR_SUCCESS:
                continue
            if not info.is_published():
                break
            done = k + 1
        for _ in range(done):
            self._tracked.popleft()

    def publish_json(self, topic: str, doc: dict[str, Any], qos: int = 0, retain: bool = False
                     ) -> paho.MQTTMessageInfo:
        return self.publish(topic, encode_json(doc), qos=qos, retain=retain)

    def read_retained(self, topic_filter: str, marker_topic: str, timeout_s: float = 10.0) -> list[tuple[str, bytes]]:
        """The messages retained under `topic_filter`, read to the end.

        The broker sends a subscription's retained messages before anything published after the
        SUBSCRIBE, so a marker published to `marker_topic` (which the filter must match) comes back
        after the last of them. Raises ConnectError if the marker is not back within `timeout_s`.
        """
        marker = uuid.uuid4().hex.encode()
        done = threading.Event()
        got: list[tuple[str, bytes]] = []

        def on_message(topic: str, payload: bytes) -> None:
            if topic == marker_topic:
                if payload == marker:
                    done.set()
            elif not done.is_set():
                got.append((topic, payload))

        self.subscribe(topic_filter, on_message, qos=1, timeout_s=timeout_s)
        try:
            self.publish(marker_topic, marker, qos=1)
            if not done.wait(timeout_s):
                raise ConnectError(f"retained messages under {topic_filter} not read within {timeout_s:g} s")
        finally:
            self.unsubscribe(topic_filter)
        return got

    def disconnect(self) -> None:
        """Disconnect cleanly (the last will is not sent) and stop the network thread."""
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    # paho callbacks (network thread)
    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            log.error("MQTT broker %s:%d refused the connection: %s", self.host, self.port, reason)
            return
        if self.reconnects:
            log.info("MQTT reconnected to %s:%d (session present: %s)", self.host, self.port, flags.session_present)
        with self._lock:
            self._resubscribed = []
            for topic, (qos, _) in self._subscriptions.items():
                _, mid = client.subscribe(topic, qos)
                if mid is not None:
                    self._pending_acks[mid] = threading.Event()
                    self._resubscribed.append(self._pending_acks[mid])
        reconnect = self._connected_before
        self._connected_before = True
        self._connected.set()
        if self._on_connected is not None:
            self._on_connected(reconnect)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags, reason: ReasonCode,
                       properties: Properties | None) -> None:
        if self._connected.is_set() and not self._closing:
            self.reconnects += 1
            log.warning("MQTT connection to %s:%d lost (%s); reconnecting with backoff", self.host, self.port,
                        reason)
        self._connected.clear()

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        with self._lock:
            acked = self._pending_acks.pop(mid, None)
        if acked is not None:
            acked.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        topic = message.topic
        handlers = self._handlers_of.get(topic)
        if handlers is None:
            with self._lock:
                handlers = ([h for f, (_, h) in self._subscriptions.items()
                             if f not in self._manual and paho.topic_matches_sub(f, topic)],
                            [h for f, h in self._manual.items() if paho.topic_matches_sub(f, topic)])
                if len(self._handlers_of) >= MAX_CACHED_TOPICS:
                    self._handlers_of.clear()
                self._handlers_of[topic] = handlers
        automatic, manual = handlers
        payload = bytes(message.payload)
        for handler in automatic:
            handler(topic, payload)
        if not manual:
            client.ack(message.mid, message.qos)
            return
        mid, qos = message.mid, message.qos

        def ack() -> None:
            client.ack(mid, qos)

        for manual_handler in manual:
            manual_handler(topic, payload, ack)

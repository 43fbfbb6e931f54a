"""Where windows come from (sources) and where results go (sinks), behind small interfaces.

Sources: MQTT (here), and the partition queues of a RabbitMQ cluster (pipeline/rabbit.py: each
device on exactly one daemon). Sinks: MQTT (here), and AMQP to the same cluster (pipeline/rabbit_sink.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as paho

from pipeline.mqtt import ConnectError, MqttClient, Topics

log = logging.getLogger(__name__)


class Deliver(Protocol):
    """Hands the daemon one window: device id, payload, arrival time (s, monotonic), and `done`, which the daemon
    calls once it has finished with the window (analysed, rejected or dropped), for a source that acknowledges
    then (None: the source has acknowledged it already)."""

    def __call__(self, device: str, payload: bytes, received: float, done: Callable[[], None] | None = None
                 ) -> None: ...


class DeviceStates(Protocol):
    """The daemon's side of handing devices from one daemon to another, for a source that moves them
    (pipeline/rabbit.py), and of telling which alarms are open there. `save_devices`, `restore_devices` and
    `publish_open_alarms` touch the analysis state: call them through `call_soon`, which runs them on the
    daemon's worker between windows."""

    def call_soon(self, task: Callable[[], None]) -> None: ...

    def save_devices(self, devices: list[str], forget: bool) -> bytes: ...

    def restore_devices(self, blob: bytes, source: str) -> int: ...

    def publish_open_alarms(self) -> None: ...


class WindowSource(Protocol):
    """Delivers raw ECG window payloads per device, in arrival order per device."""

    def start(self, deliver: Deliver) -> None: ...

    def stop(self) -> None:
        """Deliver no more; windows that arrive from now on stay with the source for the next run if it can."""

    def close(self) -> None:
        """Let go of the connection, once the daemon has finished with every window delivered."""


class ResultSink(Protocol):
    """Receives everything the daemon reports: the messages of pipeline/messages.py."""

    def open(self) -> None:
        """Connect (raise ConnectError if the broker cannot be reached)."""

    def close(self, timeout_s: float) -> None:
        """Send what is still on its way (for up to `timeout_s`), then disconnect."""

    def counts(self) -> dict[str, int]:
        """The sink's counters for the stats message (`reconnects` at least)."""

    def beats(self, doc: dict[str, Any]) -> None: ...

    def alarm(self, doc: dict[str, Any]) -> None: ...

    def rejected(self, doc: dict[str, Any]) -> None: ...

    def stats(self, doc: dict[str, Any]) -> None: ...

    def status(self, doc: dict[str, Any]) -> None: ...

    def open_alarm(self, doc: dict[str, Any]) -> None:
        """The last message of an alarm still open, again, on its `active` topic (a subscriber asked)."""

    def open_alarms(self) -> list[dict[str, Any]] | None:
        """The last message of every alarm the subscribers saw raised and not cleared; None if unknown."""


class MqttSource:
    """ECG windows from `<prefix>/ecg/+`."""

    def __init__(self, client: MqttClient, topics: Topics, qos: int) -> None:
        self._client, self._topics, self._qos = client, topics, qos
        self._taking = False

    def start(self, deliver: Deliver) -> None:
        """Subscribe (or, before the client connects, have it subscribe on connect)."""
        def on_message(topic: str, payload: bytes) -> bool:
            if self._taking:  # else left unacknowledged: the broker keeps it for the next run
                deliver(self._topics.device_of(topic), payload, time.monotonic())
            return self._taking

        self._taking = True
        self._client.subscribe(self._topics.ecg(), on_message, self._qos)

    def stop(self) -> None:
        """Take no more windows, but keep the subscription: with a persistent session the broker keeps
        every window from now on, unacknowledged ones included, for the daemon's next run (QoS 1)."""
        self._taking = False

    def close(self) -> None:
        """Nothing to do: the daemon's MQTT client is disconnected with its sink."""


class MqttSink:
    """Results to MQTT: beats QoS 0, alarms QoS 1, status retained."""

    def __init__(self, client: MqttClient, topics: Topics, publish_beats: bool) -> None:
        self._client, self._topics, self._publish_beats = client, topics, publish_beats
        self._last_status: paho.MQTTMessageInfo | None = None

    def open(self) -> None:
        """Connect the client (which the MQTT source shares), once the source has subscribed."""
        self._client.connect()

    def close(self, timeout_s: float) -> None:
        """Wait for the last status to reach the broker (if connected), then disconnect."""
        if self._last_status is not None and self._client.connected:
            self._last_status.wait_for_publish(timeout=timeout_s)
        self._client.disconnect()

    def counts(self) -> dict[str, int]:
        return {"reconnects": self._client.reconnects}

    def beats(self, doc: dict[str, Any]) -> None:
        if self._publish_beats:
            self._client.publish_json(self._topics.beats(doc["device"]), doc, qos=0)

    def alarm(self, doc: dict[str, Any]) -> None:
        """The event (QoS 1), and the open-alarm list: its retained copy, emptied when it clears."""
        self._client.publish_json(self._topics.alarms(doc["device"]), doc, qos=1)
        active = self._topics.active(doc["device"], doc["type"])
        if doc["state"] == "cleared":
            self._client.publish(active, b"", qos=1, retain=True)
        else:
            self._client.publish_json(active, doc, qos=1, retain=True)

    def open_alarm(self, doc: dict[str, Any]) -> None:
        """Its retained copy again."""
        self._client.publish_json(self._topics.active(doc["device"], doc["type"]), doc, qos=1, retain=True)

    def rejected(self, doc: dict[str, Any]) -> None:
        self._client.publish_json(self._topics.errors(doc["device"]), doc, qos=0)

    def open_alarms(self) -> list[dict[str, Any]] | None:
        try:
            retained = self._client.read_retained(f"{self._topics.active_marker}/#", self._topics.active_marker)
        except ConnectError as err:
            log.error("cannot read the open alarms from the broker (%s): none reconciled", err)
            return None
        docs = []
        for topic, payload in retained:
            try:
                docs.append(json.loads(payload))
            except ValueError:
                log.warning("ignored a malformed open alarm on %s", topic)
        return [d for d in docs if isinstance(d, dict)]

    def stats(self, doc: dict[str, Any]) -> None:
        self._client.publish_json(self._topics.stats, doc, qos=0)

    def status(self, doc: dict[str, Any]) -> None:
        self._last_status = self._client.publish_json(self._topics.status, doc, qos=1, retain=True)

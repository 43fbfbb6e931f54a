"""Where windows come from (sources) and where results go (sinks), behind small interfaces.

MQTT is the one implementation of each today; a partitioned queue on a broker cluster
(per-device affinity) can join as a second source without touching the daemon.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from pipeline.alarms import AlarmEvent
from pipeline.mqtt import MqttClient, Topics

log = logging.getLogger(__name__)

# deliver(device_id, payload, received_monotonic_s)
Deliver = Callable[[str, bytes, float], None]


class WindowSource(Protocol):
    """Delivers raw ECG window payloads per device, in arrival order per device."""

    def start(self, deliver: Deliver) -> None: ...

    def stop(self) -> None: ...


class ResultSink(Protocol):
    """Receives everything the daemon reports."""

    def beats(self, device: str, doc: dict[str, Any]) -> None: ...

    def alarm(self, event: AlarmEvent) -> None: ...

    def rejected(self, device: str, doc: dict[str, Any]) -> None: ...

    def stats(self, doc: dict[str, Any]) -> None: ...

    def status(self, doc: dict[str, Any]) -> None: ...


class MqttSource:
    """ECG windows from `<prefix>/ecg/+`."""

    def __init__(self, client: MqttClient, topics: Topics, qos: int) -> None:
        self._client, self._topics, self._qos = client, topics, qos

    def start(self, deliver: Deliver) -> None:
        def on_message(topic: str, payload: bytes) -> None:
            deliver(self._topics.device_of(topic), payload, time.monotonic())

        self._client.subscribe(self._topics.ecg(), on_message, self._qos)

    def stop(self) -> None:
        self._client.unsubscribe(self._topics.ecg())


def alarm_document(event: AlarmEvent) -> dict[str, Any]:
    """The alarm message (docs/asyncapi.yaml, AlarmEvent)."""
    return {"alarm_id": event.alarm_id, "device": event.device, "type": event.type, "kind": event.kind,
            "priority": event.priority, "state": event.state, "time": event.time, "message": event.message,
            "evidence": event.evidence}


class MqttSink:
    """Results to MQTT: beats QoS 0, alarms QoS 1, status retained."""

    def __init__(self, client: MqttClient, topics: Topics, publish_beats: bool) -> None:
        self._client, self._topics, self._publish_beats = client, topics, publish_beats

    def beats(self, device: str, doc: dict[str, Any]) -> None:
        if self._publish_beats:
            self._client.publish_json(self._topics.beats(device), doc, qos=0)

    def alarm(self, event: AlarmEvent) -> None:
        self._client.publish_json(self._topics.alarms(event.device), alarm_document(event), qos=1)

    def rejected(self, device: str, doc: dict[str, Any]) -> None:
        self._client.publish_json(self._topics.errors(device), doc, qos=0)

    def stats(self, doc: dict[str, Any]) -> None:
        self._client.publish_json(self._topics.stats, doc, qos=0)

    def status(self, doc: dict[str, Any]) -> None:
        self._client.publish_json(self._topics.status, doc, qos=1, retain=True)

"""Where windows come from (sources) and where results go (sinks), behind small interfaces.

Sources: MQTT (here), and the partition queues of a RabbitMQ cluster (pipeline/io/rabbit.py: each
device on exactly one daemon). Sinks: MQTT (here), and AMQP to the same cluster (pipeline/io/rabbit_sink.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import paho.mqtt.client as paho

from pipeline.io.mqtt import ConnectError, MqttClient, Topics, encode_json

log = logging.getLogger(__name__)


class Progress(NamedTuple):
    """How far a device's results have gone out: the seq of its last window whose alarm events are handed over,
    that window's end, and the end of the last window whose beats are (they may wait to be gathered with later
    windows') (s, the device's clock)."""

    seq: int
    end: float
    beats_until: float


class Deliver(Protocol):
    """Hands the daemon one window: device id, payload, arrival time (s, monotonic), and `done`, which the daemon
    calls once it has finished with the window (analysed, rejected or dropped), for a source that acknowledges
    then (None: the source has acknowledged it already)."""

    def __call__(self, device: str, payload: bytes, received: float, done: Callable[[], None] | None = None
                 ) -> None: ...


class Acknowledge(Protocol):
    """Hands the daemon a staff acknowledgement of one of `device`'s alarms: device id and payload
    (`pipeline.io.codec.decode_ack`)."""

    def __call__(self, device: str, payload: bytes) -> None: ...


class DeviceStates(Protocol):
    """The daemon's side of handing devices from one daemon to another, for a source that moves them
    (pipeline/io/rabbit.py), and of telling which alarms are open there. `save_devices`, `restore_devices` and
    `publish_open_alarms` touch the analysis state: call them through `call_soon`, which runs them on the
    daemon's worker between windows."""

    def call_soon(self, task: Callable[[], None]) -> None: ...

    def save_devices(self, devices: list[str], forget: bool) -> bytes: ...

    def restore_devices(self, blob: bytes | None, source: str, published: dict[str, Progress]) -> int: ...

    def publish_open_alarms(self) -> None: ...


class WindowSource(Protocol):
    """Delivers raw ECG window payloads per device, in arrival order per device, and the staff's acknowledgements
    of alarms."""

    def start(self, deliver: Deliver, acknowledge: Acknowledge) -> None: ...

    def proven_until(self, now: float) -> float:
        """A time (s, monotonic, at most `now`) up to which every window sent to the daemon has been delivered: a
        device is silent only up to then, not while the daemon's own link is down or stalled."""

    def stop(self) -> None:
        """Deliver no more; windows that arrive from now on stay with the source for the next run if it can."""

    def close(self) -> None:
        """Let go of the connection, once the daemon has finished with every window delivered."""


class ResultSink(Protocol):
    """Receives everything the daemon reports: the messages of pipeline/io/messages.py."""

    def open(self) -> None:
        """Connect (raise ConnectError if the broker cannot be reached)."""

    def close(self, timeout_s: float) -> None:
        """Send what is still on its way (for up to `timeout_s`), then disconnect."""

    def counts(self) -> dict[str, int | float]:
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

    def forget_open_alarm(self, device: str, alarm_type: str) -> None:
        """Empty the copy of `device`'s open `alarm_type` alarm kept for subscribers (the daemon holds none)."""

    def progress(self, done: dict[str, Progress]) -> None:
        """How far each device's results are handed over (called after them): for a sink whose source replays
        windows, the mark up to which the next daemon to hold the device analyses them again without publishing
        (pipeline/io/rabbit_sink.py)."""


class MqttSource:
    """ECG windows from `<prefix>/ecg/+`, each acknowledged to the broker (QoS 1) only when the daemon calls its
    `done`; alarm acknowledgements from `<prefix>/acks/+`; and probes of the daemon's own link through the broker,
    every PROBE_S."""

    PROBE_S = 1.0

    def __init__(self, client: MqttClient, topics: Topics, qos: int) -> None:
        self._client, self._topics, self._qos = client, topics, qos
        self._taking = False
        self._probe_topic = topics.probe(client.client_id)
        self._probes: dict[bytes, float] = {}  # probe payload -> when it was sent (s, monotonic)
        self._last_probe = 0.0
        self._proven = time.monotonic()

    def start(self, deliver: Deliver, acknowledge: Acknowledge) -> None:
        """Subscribe (or, before the client connects, have it subscribe on connect)."""
        def on_window(topic: str, payload: bytes, ack: Callable[[], None]) -> None:
            if self._taking:  # else left unacknowledged: the broker keeps it for the next run
                deliver(self._topics.device_of(topic), payload, time.monotonic(), ack)

        def on_ack(topic: str, payload: bytes) -> None:
            if self._taking:
                acknowledge(self._topics.device_of(topic), payload)

        self._taking = True
        self._proven = time.monotonic()
        self._client.subscribe(self._probe_topic, self._on_probe, self._qos)
        self._client.subscribe(self._topics.acks(), on_ack, self._qos)
        self._client.subscribe_manual_ack(self._topics.ecg(), on_window, self._qos)

    def _on_probe(self, topic: str, payload: bytes) -> None:
        """A probe came back: every message the broker had for this client before it has arrived."""
        sent = self._probes.pop(payload, None)
        if sent is not None:
            self._proven = max(self._proven, sent)
            for older in [p for p, t in self._probes.items() if t < sent]:
                del self._probes[older]

    def proven_until(self, now: float) -> float:
        """When the last probe that came back was sent; sends the next probe every PROBE_S."""
        if now - self._last_probe >= self.PROBE_S:
            self._last_probe = now
            payload = str(now).encode()
            self._probes[payload] = now
            self._client.publish(self._probe_topic, payload, qos=self._qos)
        return min(now, self._proven)

    def stop(self) -> None:
        """Take no more windows, but keep the subscription: with a persistent session the broker keeps
        every window from now on, unacknowledged ones included, for the daemon's next run (QoS 1)."""
        self._taking = False

    def close(self) -> None:
        """Nothing to do: the daemon's MQTT client is disconnected with its sink."""


class MqttSink:
    """Results to MQTT: beats QoS 0, alarms QoS 1, status retained.

    Alarms go ahead of beats, rejections and stats: while an alarm message has waited more than BACKLOG_S for the
    broker's acknowledgement, or MAX_QOS0_BACKLOG QoS 0 messages wait to be written to the socket, those are dropped
    and counted (`results_dropped`) instead of queueing in front of the next alarms; alarm messages are never
    dropped. `alarms_pending` and `alarm_delay_s` say how far behind the alarm messages are, `alarms_lost` counts
    those the broker had not acknowledged when the daemon stopped.
    """

    BACKLOG_S = 5.0
    MAX_QOS0_BACKLOG = 20_000

    def __init__(self, client: MqttClient, topics: Topics, publish_beats: bool) -> None:
        self._client, self._topics, self._publish_beats = client, topics, publish_beats
        self._qos0: deque[paho.MQTTMessageInfo] = deque()  # QoS 0 messages perhaps not written yet, in order
        self._dropped = 0
        self._lost = 0

    def open(self) -> None:
        """Connect the client (which the MQTT source shares), once the source has subscribed."""
        self._client.connect()

    def close(self, timeout_s: float) -> None:
        """Wait (if connected, up to `timeout_s`) for the broker to acknowledge the alarm messages and the last
        status; log and count those it did not; disconnect."""
        connected = self._client.connected
        lost = self._client.wait_acknowledged(timeout_s) if connected else self._client.unacknowledged()[0]
        if lost:
            self._lost += lost
            log.error("%d alarm and status messages were not acknowledged by the broker before the daemon stopped; "
                      "the next start publishes the open alarms again", lost)
        self._client.disconnect()

    def counts(self) -> dict[str, int | float]:
        """`reconnects`; `results_dropped` (beats, rejections and stats not sent, to let alarms through);
        `alarms_pending`, `alarm_delay_s` (how long the oldest has waited, s) and `alarms_lost` (see the class)."""
        pending, oldest = self._client.unacknowledged()
        return {"reconnects": self._client.reconnects, "results_dropped": self._dropped, "alarms_pending": pending,
                "alarms_lost": self._lost,
                "alarm_delay_s": 0.0 if oldest is None else round(time.monotonic() - oldest, 3)}

    def _backlogged(self) -> bool:
        _, oldest = self._client.unacknowledged()
        if oldest is not None and time.monotonic() - oldest > self.BACKLOG_S:
            return True
        while self._qos0 and (self._qos0[0].rc != paho.MQTT_ERR_SUCCESS or self._qos0[0].is_published()):
            self._qos0.popleft()  # written (or never queued: paho drops QoS 0 messages while disconnected)
        return len(self._qos0) >= self.MAX_QOS0_BACKLOG

    def _publish_lossy(self, topic: str, doc: dict[str, Any]) -> None:
        """A QoS 0 message, unless the alarms are backlogged (then counted as dropped)."""
        if self._backlogged():
            self._dropped += 1
            return
        self._qos0.append(self._client.publish_json(topic, doc, qos=0))

    def beats(self, doc: dict[str, Any]) -> None:
        if self._publish_beats:
            self._publish_lossy(self._topics.beats(doc["device"]), doc)

    def alarm(self, doc: dict[str, Any]) -> None:
        """The open-alarm list first (its retained copy, emptied when it clears), then the event (QoS 1): in that order
        on one connection, whoever has seen the event will find the copy, a daemon restarted after kill -9 too."""
        payload = encode_json(doc)
        active = self._topics.active(doc["device"], doc["type"])
        self._client.publish_tracked(active, b"" if doc["state"] == "cleared" else payload, retain=True)
        self._client.publish_tracked(self._topics.alarms(doc["device"]), payload)

    def open_alarm(self, doc: dict[str, Any]) -> None:
        """Its retained copy again."""
        self._client.publish_tracked(self._topics.active(doc["device"], doc["type"]), encode_json(doc),
                                     retain=True)

    def forget_open_alarm(self, device: str, alarm_type: str) -> None:
        self._client.publish_tracked(self._topics.active(device, alarm_type), b"", retain=True)

    def progress(self, done: dict[str, Progress]) -> None:
        """Nothing to mark: an MQTT source replays nothing a daemon has acknowledged."""

    def rejected(self, doc: dict[str, Any]) -> None:
        self._publish_lossy(self._topics.errors(doc["device"]), doc)

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
        self._publish_lossy(self._topics.stats, doc)

    def status(self, doc: dict[str, Any]) -> None:
        self._client.publish_tracked(self._topics.status, encode_json(doc), retain=True)

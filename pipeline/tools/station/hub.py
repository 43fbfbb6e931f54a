"""The station's link to the broker, and to the browsers: messages in, the wall's updates out to every page.

Subscribes (with the station's staff login) to the ECG, beats, alarms, open alarms and daemon status; asks a
RabbitMQ cluster for the open alarms on connect (mosquitto has them retained). Each browser gets its own bounded
queue: one that falls behind loses ECG updates (counted, its trace shows the gap), never alarms or bed changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

from pipeline.config import MqttConfig
from pipeline.io import messages
from pipeline.io.mqtt import MqttClient, Topics, encode_json
from pipeline.tools.station.wall import Wall

log = logging.getLogger(__name__)

CLIENT_QUEUE = 2000  # updates waiting for one browser before its ECG updates are dropped
TICK_S = 0.5  # how often silent beds and the broker link are checked (s)


class Browser:
    """One connected page: its queue of updates (JSON text) on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.dropped = 0

    def offer(self, update: dict[str, Any], text: str) -> None:
        """Called on the event loop: queue `text`, unless it is ECG and the page is behind."""
        if update["type"] == "ecg" and self.queue.qsize() >= CLIENT_QUEUE:
            self.dropped += 1
            return
        self.queue.put_nowait(text)


class Hub:
    """Broker messages into the wall; the wall's updates to every browser; acknowledgements to the daemon."""

    def __init__(self, mqtt: MqttConfig, keep_s: float, silent_s: float, beds_file: Any) -> None:
        self.topics = Topics(mqtt.topic_prefix)
        self.wall = Wall(keep_s, silent_s, beds_file, self._broadcast)
        self.daemons: dict[str, str] = {}  # daemon id ("" for a single daemon) -> its state (online/offline)
        self._browsers: set[Browser] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._broker_up = False
        tls = None if mqtt.tls is None else mqtt.tls.paho_options()
        self._client = MqttClient(mqtt.host, mqtt.port, mqtt.client_id, username=mqtt.username,
                                  password=mqtt.secret(), keepalive_s=mqtt.keepalive_s,
                                  reconnect_min_s=mqtt.reconnect_min_s, reconnect_max_s=mqtt.reconnect_max_s,
                                  tls=tls, on_connected=self._on_connected, protocol=mqtt.protocol)
        self._ticker = threading.Thread(target=self._tick, name="station-tick", daemon=True)

    @property
    def broker_up(self) -> bool:
        return self._broker_up

    def start(self) -> None:
        """Subscribe and connect (ConnectError if the broker cannot be reached or refuses the login)."""
        t = self.topics
        self._client.subscribe(t.active(), self._on_open_alarm, qos=1)  # before the events that follow them
        self._client.subscribe(t.alarms(), lambda topic, p: self.wall.on_alarm(_doc(p)), qos=1)
        self._client.subscribe(t.beats(), lambda topic, p: self.wall.on_beats(t.device_of(topic), _doc(p)), qos=0)
        self._client.subscribe(t.ecg(), lambda topic, p: self.wall.on_ecg(t.device_of(topic), p), qos=0)
        self._client.subscribe(t.every_status, self._on_status, qos=1)
        self._client.connect()
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        self._client.disconnect()

    def acknowledge(self, device: str, alarm_id: str, action: str, by: str) -> None:
        """Publish staff login `by`'s acknowledgement ("acknowledge" or "silence") of `device`'s alarm."""
        self._client.publish(self.topics.acks(device), encode_json(messages.ack(alarm_id, action, by)), qos=1)
        log.info("%s: %s of %s sent by %s", device, action, alarm_id, by)

    def attach(self, browser: Browser) -> dict[str, Any]:
        """Start sending updates to `browser`; returns the snapshot its page starts from."""
        with self._lock:
            self._browsers.add(browser)
            daemons = dict(self.daemons)
        return {"type": "snapshot", **self.wall.snapshot(), "broker_up": self._broker_up, "daemons": daemons}

    def detach(self, browser: Browser) -> None:
        with self._lock:
            self._browsers.discard(browser)
        if browser.dropped:
            log.warning("a page fell behind: %d ECG updates were not sent to it (its traces showed gaps)",
                        browser.dropped)

    # --- internals ----------------------------------------------------------------------------------
    def _broadcast(self, update: dict[str, Any]) -> None:
        text = json.dumps(update, separators=(",", ":"))
        with self._lock:
            browsers = list(self._browsers)
        for b in browsers:
            b.loop.call_soon_threadsafe(b.offer, update, text)

    def _on_connected(self, reconnect: bool) -> None:
        self._client.publish(self.topics.query_active, b"", qos=1)  # a RabbitMQ cluster answers on `active`

    def _on_open_alarm(self, topic: str, payload: bytes) -> None:
        if payload:
            self.wall.on_alarm(_doc(payload), open_copy=True)
        else:  # emptied: the alarm was cleared
            _, device, alarm_type = topic.rsplit("/", 2)
            self.wall.on_forgotten(device, alarm_type)

    def _on_status(self, topic: str, payload: bytes) -> None:
        daemon = topic.split("/status", 1)[1].lstrip("/")
        state = str(_doc(payload).get("state", "offline")) if payload else "removed"
        with self._lock:
            self.daemons[daemon] = state
        self._broadcast({"type": "daemon", "daemon": daemon, "state": state})

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            up = self._client.connected
            if up != self._broker_up:
                self._broker_up = up
                log.log(logging.INFO if up else logging.ERROR, "station %s the broker", "reached" if up else "lost")
                self._broadcast({"type": "broker", "up": up})
            self.wall.check_silent(time.monotonic())



def _doc(payload: bytes) -> dict[str, Any]:
    """A message's JSON object; {} (which the wall ignores) for anything else."""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}

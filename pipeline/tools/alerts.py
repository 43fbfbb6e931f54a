"""`ecgmon alerts`: subscribe to alarms and print them readably (optionally as JSON lines too)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from pipeline.io.mqtt import MqttClient, Topics


def format_alarm(doc: dict[str, Any]) -> str:
    """One line: time, priority, state, device, message, heart rate, id."""
    when = time.strftime("%H:%M:%S", time.localtime(float(doc.get("time", 0))))
    evidence = doc.get("evidence", {})
    details = []
    if evidence.get("heart_rate_bpm") is not None:
        details.append(f"HR {evidence['heart_rate_bpm']:.0f} bpm")
    for key in ("seconds_without_qrs", "seconds_without_data", "v_beats_last_minute", "reason"):
        if key in evidence:
            details.append(f"{key.replace('_', ' ')}: {evidence[key]}")
    if isinstance(evidence.get("leads"), dict):  # lead_fault: each faulty lead and its fault
        details.append("leads: " + ", ".join(f"{lead} {fault}" for lead, fault in evidence["leads"].items()))
    return (f"{when}  {doc.get('priority', '?').upper():<6} {doc.get('state', '?'):<8} {doc.get('device', '?'):<16} "
            f"{doc.get('message', doc.get('type', '?'))}{'  (' + ', '.join(details) + ')' if details else ''}"
            f"  [{doc.get('alarm_id', '?')}]")


class AlarmPrinter:
    """Prints the alarms open when it starts ("(open)"), then every alarm event and daemon status change; appends
    the events as JSON lines when `json_out` is given."""

    def __init__(self, out: TextIO, json_out: TextIO | None = None,
                 on_alarm: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._out, self._json_out, self._on_alarm = out, json_out, on_alarm
        self._lock = threading.Lock()
        self._shown: dict[str, tuple[str, float]] = {}  # open alarm id -> (state, time) of its last message printed
        self.count = 0

    def attach(self, client: MqttClient, topics: Topics) -> None:
        """Subscribe to the alarms, the open alarms (retained on mosquitto; on a RabbitMQ cluster, asked for on
        `<prefix>/query/active`) and every daemon's status."""
        client.subscribe(topics.active(), self._open, qos=1)  # first: what was open before the events after
        client.subscribe(topics.alarms(), self._alarm, qos=1)
        client.subscribe(topics.every_status, self._status, qos=1)
        client.publish(topics.query_active, b"", qos=1)

    def _alarm(self, topic: str, payload: bytes) -> None:
        doc = json.loads(payload)
        with self._lock:
            self.count += 1
            self._write(self._out, format_alarm(doc))
            if self._json_out is not None:
                self._write(self._json_out, json.dumps(doc))
            if doc.get("state") == "cleared":
                self._shown.pop(str(doc.get("alarm_id")), None)
            else:
                self._shown[str(doc.get("alarm_id"))] = (doc.get("state"), doc.get("time"))
        if self._on_alarm is not None:
            self._on_alarm(doc)

    def _open(self, topic: str, payload: bytes) -> None:
        """An open alarm's last message: printed unless it was printed as an event (an emptied copy: cleared)."""
        if not payload:
            return
        doc = json.loads(payload)
        with self._lock:
            if self._shown.get(str(doc.get("alarm_id"))) != (doc.get("state"), doc.get("time")):
                self._shown[str(doc.get("alarm_id"))] = (doc.get("state"), doc.get("time"))
                self._write(self._out, "(open) " + format_alarm(doc))

    def _status(self, topic: str, payload: bytes) -> None:
        doc = json.loads(payload) if payload else {}  # an emptied retained status: a daemon removed for good
        daemon = topic.split("/status", 1)[1].lstrip("/")
        with self._lock:
            degraded = ", DEGRADED" if doc.get("degraded") else ""
            self._write(self._out, f"daemon{' ' + daemon if daemon else ''} {doc.get('state')} "
                                   f"(model {doc.get('model_version', '?')}{degraded})")

    @staticmethod
    def _write(stream: TextIO, line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

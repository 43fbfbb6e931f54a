"""The daemon's own source/sink seam, in memory: for tests that must make the daemon's output misbehave."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.io.sources import Acknowledge, Deliver, Progress


class MemorySource:
    """Windows handed to the daemon by the test."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._acknowledge: Acknowledge | None = None
        self.started = threading.Event()

    def start(self, deliver: Deliver, acknowledge: Acknowledge) -> None:
        self._deliver, self._acknowledge = deliver, acknowledge
        self.started.set()

    def proven_until(self, now: float) -> float:
        return now

    def stop(self) -> None:
        self._deliver = None

    def close(self) -> None:
        """Nothing to let go of."""

    def send(self, device: str, payload: bytes) -> None:
        if self._deliver is not None:
            self._deliver(device, payload, time.monotonic())

    def acknowledge(self, device: str, payload: bytes) -> None:
        if self._acknowledge is not None:
            self._acknowledge(device, payload)


class MemorySink:
    """Keeps every output; `on_beats(device)` runs first for each beats message (it may block or raise)."""

    def __init__(self, on_beats: Callable[[str], None] = lambda device: None) -> None:
        self.on_beats = on_beats
        self.messages: list[tuple[str, dict[str, Any]]] = []  # (kind, document)
        self._cond = threading.Condition()

    def _add(self, kind: str, doc: dict[str, Any]) -> None:
        with self._cond:
            self.messages.append((kind, doc))
            self._cond.notify_all()

    def beats(self, doc: dict[str, Any]) -> None:
        self.on_beats(doc["device"])
        self._add("beats", doc)

    def alarm(self, doc: dict[str, Any]) -> None:
        self._add("alarm", doc)

    def rejected(self, doc: dict[str, Any]) -> None:
        self._add("rejected", doc)

    def stats(self, doc: dict[str, Any]) -> None:
        self._add("stats", doc)

    def status(self, doc: dict[str, Any]) -> None:
        self._add("status", doc)

    def open_alarms(self) -> list[dict[str, Any]] | None:
        return None

    def open_alarm(self, doc: dict[str, Any]) -> None:
        self._add("open_alarm", doc)

    def forget_open_alarm(self, device: str, alarm_type: str) -> None:
        self._add("forget_open_alarm", {"device": device, "type": alarm_type})

    def progress(self, done: dict[str, Progress]) -> None:
        self._add("progress", {device: mark._asdict() for device, mark in done.items()})

    def open(self) -> None:
        """Nothing to connect to."""

    def close(self, timeout_s: float) -> None:
        """Nothing to let go of."""

    def counts(self) -> dict[str, int | float]:
        return {"reconnects": 0}

    def wait_for(self, kind: str, predicate: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 30.0) -> list[dict[str, Any]]:
        def docs() -> list[dict[str, Any]]:
            return [d for k, d in self.messages if k == kind]

        with self._cond:
            if not self._cond.wait_for(lambda: predicate(docs()), timeout):
                raise AssertionError(f"timed out waiting on {kind}; got {docs()[-3:]}")
            return docs()

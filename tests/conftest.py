"""Shared fixtures: the real PhysioNet folder beside the repo, a real mosquitto per test, daemons."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.broker import LocalBroker
from pipeline.config import DaemonConfig
from pipeline.daemon import Daemon
from pipeline.mqtt import MqttClient

REPO = Path(__file__).resolve().parent.parent
PHYSIONET = Path(os.environ.get("ECGMON_PHYSIONET", REPO.parent / "shared" / "physionet"))


@pytest.fixture(scope="session")
def physionet() -> Path:
    if not (PHYSIONET / "mitdb" / "100.hea").exists():
        pytest.fail(f"PhysioNet data not found at {PHYSIONET} (set ECGMON_PHYSIONET)")
    return PHYSIONET


# --- MQTT: a real mosquitto per test, collectors, in-process daemons -----------------------------


@pytest.fixture()
def broker() -> Iterator[LocalBroker]:
    with LocalBroker() as b:
        yield b


class Collector:
    """Subscribes to a topic filter and keeps every message (topic, payload)."""

    def __init__(self, broker: LocalBroker, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self.client = MqttClient(broker.host, broker.port, f"collector-{id(self)}")
        self.client.connect()
        self.client.subscribe(topic, self._on, qos=1)
        time.sleep(0.1)  # let the SUBACK arrive before the test publishes

    def _on(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.messages.append((topic, payload))
            self._cond.notify_all()

    def docs(self, part: str = "") -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(p) for t, p in self.messages if part in t]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], part: str = "",
                 timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                docs = [json.loads(p) for t, p in self.messages if part in t]
                if predicate(docs):
                    return docs
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting on {part or 'messages'}; got {len(docs)}: "
                                         f"{docs[-3:]}")
                self._cond.wait(remaining)

    def close(self) -> None:
        self.client.disconnect()


@pytest.fixture()
def collect(broker: LocalBroker) -> Iterator[Callable[[str], Collector]]:
    made: list[Collector] = []

    def make(topic: str = "ecgmon/#") -> Collector:
        made.append(Collector(broker, topic))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture()
def start_daemon(broker: LocalBroker) -> Iterator[Callable[..., Daemon]]:
    """Start an in-process daemon on the test broker; `overrides` are merged into the config."""
    started: list[Daemon] = []

    def start(**overrides: Any) -> Daemon:
        raw: dict[str, Any] = {"mqtt": {"host": broker.host, "port": broker.port,
                                        "client_id": f"daemon-{len(started)}"},
                               "metrics": {"port": 0}}
        for section, values in overrides.items():
            raw.setdefault(section, {}).update(values) if isinstance(values, dict) else raw.update({section: values})
        daemon = Daemon(DaemonConfig.model_validate(raw))
        assert daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for d in started:
        d.stop()


@pytest.fixture()
def publisher(broker: LocalBroker) -> Iterator[MqttClient]:
    client = MqttClient(broker.host, broker.port, "test-publisher")
    client.connect()
    yield client
    client.disconnect()

"""Shared fixtures: the real PhysioNet folder beside the repo, a real mosquitto per test, daemons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.config import DaemonConfig
from pipeline.io.mqtt import MqttClient
from pipeline.process.daemon import Daemon
from pipeline.tools import DEFAULT_PHYSIONET_DIR
from pipeline.tools.broker import LocalBroker, free_port

REPO = Path(__file__).resolve().parent.parent
PHYSIONET = Path(os.environ.get("ECGMON_PHYSIONET", REPO / DEFAULT_PHYSIONET_DIR)).resolve()
MESSAGE_SCHEMAS = yaml.safe_load((REPO / "docs" / "asyncapi.yaml").read_text())["components"]["schemas"]
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a plausible t0 (s, Unix time) for windows made up by tests


@pytest.fixture(scope="session")
def physionet() -> Path:
    if not (PHYSIONET / "mitdb" / "100.hea").exists():
        pytest.fail(f"PhysioNet data not found at {PHYSIONET} (set ECGMON_PHYSIONET)")
    return PHYSIONET


# --- MQTT: a real mosquitto per test, collectors, in-process daemons -----------------------------


@pytest.fixture(scope="session")
def tiny_cv(physionet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ecgmon cross-validate` of a tiny recipe: 3 folds of 3 DS1 records, seed 0, folds trained at once."""
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("cv")
    settings = {"name": "tiny", "data.physionet_dir": physionet, "model.hidden_size": 16, "model.encoder_dim": 16,
                "data.train_records": "[mitdb/101, mitdb/106, mitdb/108, mitdb/112, mitdb/115, mitdb/116, mitdb/119, "
                                      "mitdb/122, mitdb/124]",
                "data.val_records": "[]", "optim.epochs": 5, "optim.segment_s": 30, "optim.chunk_s": 10,
                "optim.batch_streams": 4, "optim.ema_decay": 0, "optim.threads": 1, "optim.lr": 0.01,
                "optim.amplitude_scale_fraction": 0, "optim.lead_dropout": 0}
    config = REPO / "configs" / "train-lstm-leads.yaml"  # the two-lead recipe, tiny
    code = main(["--log-level", "WARNING", "cross-validate", "--config", str(config),
                 "--folds", "3", "--seeds", "0", "--jobs", "3", "--out", str(out),
                 *(arg for key, value in settings.items() for arg in ("--set", f"{key}={value}"))])
    assert code == 0
    return out


def validate(doc: dict[str, Any], schema: str) -> None:
    """Raise jsonschema.ValidationError unless `doc` is a valid `schema` message of docs/asyncapi.yaml."""
    jsonschema.validate(doc, MESSAGE_SCHEMAS[schema])


@pytest.fixture()
def broker() -> Iterator[LocalBroker]:
    with LocalBroker() as b:
        yield b


class Collector:
    """Subscribes to a topic filter and keeps every message (topic, payload)."""

    def __init__(self, host: str, port: int, topic: str, protocol: str = "5", client_id: str | None = None,
                 **options: Any) -> None:
        """`options`: more of MqttClient's (session_expiry_s, username, password, tls)."""
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self.client = MqttClient(host, port, client_id or f"collector-{id(self)}", protocol=protocol, **options)
        self.client.subscribe(topic, self._on, qos=1)  # on connect, before what a persistent session kept arrives
        self.client.connect()  # returns once the broker has acknowledged the subscription

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
        made.append(Collector(broker.host, broker.port, topic))
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


# --- `ecgmon serve` as a real process --------------------------------------------------------------


def write_config(tmp_path: Path, **sections: object) -> Path:
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def serve_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "serve", "--config", str(config), *extra]


@pytest.fixture()
def serve_process(broker: LocalBroker, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(**sections: Any) -> subprocess.Popen[str]:
        """`ecgmon serve` on the test broker (config sections merged in); its log goes to serve-<n>.log."""
        mqtt = {"host": broker.host, "port": broker.port, "keepalive_s": 5, **sections.pop("mqtt", {})}
        metrics = {"port": free_port(), **sections.pop("metrics", {})}
        config = write_config(tmp_path, mqtt=mqtt, metrics=metrics, **sections)
        with (tmp_path / f"serve-{len(procs)}.log").open("w") as log:
            procs.append(subprocess.Popen(serve_command(config), stdout=log, stderr=subprocess.STDOUT, text=True))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def stream_live(publisher: MqttClient, devices: list[str], payloads: list[bytes],
                interval_s: float = 0.1) -> threading.Thread:
    """Devices sending as live sensors do, in a thread (started): payload k from each device at QoS 1, then a
    pause of `interval_s` (s: the sensors' pace, not a synchronisation)."""
    def send() -> None:
        for payload in payloads:
            for device in devices:
                publisher.publish(f"ecgmon/ecg/{device}", payload, qos=1)
            time.sleep(interval_s)

    thread = threading.Thread(target=send, name="live-devices")
    thread.start()
    return thread


def wait_online(status: Collector) -> None:
    status.wait_for(lambda d: bool(d) and d[-1]["state"] == "online", timeout=30)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait until `condition()` holds, polling what it reads (a public figure of a process in this one)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {condition.__name__}")
        time.sleep(0.02)


def wait_for_log(path: Path, text: str, timeout: float = 30.0) -> None:
    """Wait until a process's log file `path` says `text` (its own account of an event)."""
    def said() -> bool:
        return text in (path.read_text() if path.exists() else "")

    wait_until(said, timeout)

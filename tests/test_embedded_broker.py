"""The demo's fallback broker: the daemon, the replay tool and the alarm printer work over it too."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import DaemonConfig, MetricsConfig, MqttConfig
from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.alerts import AlarmPrinter
from pipeline.tools.embedded_broker import EmbeddedBroker
from pipeline.tools.replay import ReplayPlan, load_signals, replay
from tests.conftest import wait_until
from tests.tcp_proxy import TcpProxy

TOPICS = Topics("ecgmon")


@pytest.fixture()
def embedded() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker


def client(broker: EmbeddedBroker, name: str, will: tuple[str, bytes] | None = None) -> MqttClient:
    c = MqttClient(broker.host, broker.port, name, will=will)
    c.connect()
    return c


def test_daemon_replay_and_alarms_over_the_embedded_broker(embedded: EmbeddedBroker, physionet: Path) -> None:
    daemon = Daemon(DaemonConfig(mqtt=MqttConfig(host=embedded.host, port=embedded.port),
                                 metrics=MetricsConfig(port=None)))
    assert daemon.start()
    out = io.StringIO()
    watcher = client(embedded, "watcher")
    AlarmPrinter(out).attach(watcher, TOPICS)
    beats: list[bytes] = []
    watcher.subscribe(TOPICS.beats(), lambda t, p: beats.append(p), qos=0)  # returns on the SUBACK
    publisher = client(embedded, "publisher")
    sent = replay(publisher, TOPICS, load_signals(["mitdb/200"], physionet, ["MLII"]),
                  ReplayPlan(speed=1e6, duration_s=120))
    wait_until(lambda: len(beats) >= sent)
    assert len(beats) == sent == 120
    assert sum(len(json.loads(b)["beats"]) for b in beats) > 100
    daemon.stop()
    wait_until(lambda: "daemon offline" in out.getvalue())
    text = out.getvalue()
    assert "daemon online" in text and "daemon offline" in text
    assert "ventricular" in text.lower()  # record 200 has PVC couplets and bigeminy in its first 2 minutes
    for c in (publisher, watcher):
        c.disconnect()


def test_retained_messages_and_last_will(embedded: EmbeddedBroker) -> None:
    with TcpProxy(embedded.host, embedded.port) as proxy:
        dying = MqttClient(embedded.host, proxy.port, "dying", will=("ecgmon/status", b'{"state":"offline"}'),
                           reconnect_min_s=30, reconnect_max_s=60)
        dying.connect()
        dying.publish("ecgmon/status", b'{"state":"online"}', qos=1, retain=True).wait_for_publish(5)
        seen: list[bytes] = []
        late = client(embedded, "late")
        late.subscribe("ecgmon/status", lambda t, p: seen.append(p))
        wait_until(lambda: bool(seen))
        assert seen == [b'{"state":"online"}']  # retained, delivered on subscribe
        proxy.cut()  # an abrupt end, as if the process died
        wait_until(lambda: len(seen) >= 2)
        assert seen[-1] == b'{"state":"offline"}'
        late.disconnect()
        dying.disconnect()


def test_demo_falls_back_to_the_embedded_broker_without_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.tools.broker as broker_module

    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    with broker_module.local_broker() as broker:
        assert isinstance(broker, EmbeddedBroker)
        c = client(broker, "probe")
        c.disconnect()

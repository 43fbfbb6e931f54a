"""Daemons on a real 3-node RabbitMQ cluster (Debian's rabbitmq-server, started on loopback ports): devices
publish MQTT to the cluster, the partitioned source gives each partition to one daemon, results go out over the
cluster's MQTT plugin."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.codec import encode_binary
from pipeline.config import DaemonConfig
from pipeline.daemon import Daemon
from pipeline.mqtt import MqttClient, Topics
from pipeline.tools.rabbit_cluster import RabbitCluster, RabbitNode
from pipeline.tools.records import load_record
from tests.conftest import T0, Collector, wait_until
from train.evaluate import stream_records

PARTITIONS = 8


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    with RabbitCluster(3) as c:
        yield c


@pytest.fixture()
def daemons(cluster: RabbitCluster, request: pytest.FixtureRequest) -> Iterator[list[Daemon]]:
    """Three daemons, each connected to its own node; the topic prefix is the test's own."""
    prefix = request.node.name.replace("_", "")[-20:]
    started = []
    for k, node in enumerate(cluster.nodes):
        config = DaemonConfig.model_validate({
            "source": "rabbitmq", "rabbitmq": {"nodes": [f"{cluster.host}:{node.amqp_port}"], "partitions": PARTITIONS},
            "mqtt": {"host": cluster.host, "port": node.mqtt_port, "client_id": f"{prefix}-daemon-{k}",
                     "topic_prefix": prefix, "protocol": "3.1.1"},
            "metrics": {"port": None}})
        daemon = Daemon(config)
        assert daemon.start()
        started.append(daemon)
    yield started
    for daemon in started:
        daemon.stop()


def mqtt(node: RabbitNode, name: str) -> MqttClient:
    client = MqttClient("127.0.0.1", node.mqtt_port, name, protocol="3.1.1")
    client.connect()
    return client


def send(client: MqttClient, topics: Topics, x: np.ndarray, devices: int, seqs: range) -> None:
    """Window `seq` of device d is x's second 3 d + seq (binary, QoS 1)."""
    for seq in seqs:
        for d in range(devices):
            a = (3 * d + seq) * 360
            client.publish(topics.ecg(f"bed-{d}"), encode_binary(seq, T0 + seq, 360.0, "MLII",
                                                                 np.round(x[a:a + 360] * 200).astype(np.int16), 200.0),
                           qos=1)


@dataclasses.dataclass
class Ward:
    """Devices publishing to one node, a subscriber to the beats on another."""

    topics: Topics
    x: np.ndarray  # the signal every device sends a part of (mV, rounded to the ADC step)
    beats: Collector
    publisher: MqttClient


@pytest.fixture()
def ward(physionet: Path, cluster: RabbitCluster, daemons: list[Daemon]) -> Iterator[Ward]:
    topics = daemons[0].topics
    x = np.round(load_record(physionet / "mitdb", "100").signal_mv * 200) / 200
    w = Ward(topics, x, Collector(cluster.host, cluster.nodes[1].mqtt_port, topics.beats(), protocol="3.1.1"),
             mqtt(cluster.nodes[2], f"{topics.prefix}-devices"))
    yield w
    w.publisher.disconnect()
    w.beats.close()


def test_each_window_is_analysed_once_by_one_daemon_as_a_single_daemon_would(
        physionet: Path, ward: Ward, daemons: list[Daemon]) -> None:
    topics, x, beats, publisher = ward.topics, ward.x, ward.beats, ward.publisher
    devices, windows = 6, 20
    send(publisher, topics, x, devices, range(windows))
    docs = beats.wait_for(lambda d: len(d) >= devices * windows, timeout=60)
    assert sorted((d["device"], d["seq"]) for d in docs) == sorted(
        (f"bed-{d}", s) for d in range(devices) for s in range(windows))  # every window once
    assert sum(daemon.stats().get("windows", 0) for daemon in daemons) == devices * windows
    assert sum(daemon.stats()["active_streams"] for daemon in daemons) == devices  # each device on one daemon
    record = load_record(physionet / "mitdb", "100")
    for d in range(devices):  # the beats a single daemon finds in the same signal
        part = dataclasses.replace(record, signal_mv=x[3 * d * 360:(3 * d + windows) * 360])
        samples, classes = stream_records(daemons[0].model, [part], 1.0)[0]
        online = [b for doc in sorted((doc for doc in docs if doc["device"] == f"bed-{d}"), key=lambda doc: doc["seq"])
                  for b in doc["beats"]]
        assert [b["class"] for b in online] == classes.tolist()
        np.testing.assert_allclose([b["time"] - T0 for b in online], samples / 360.0, atol=1.5 / 360)


def test_a_stopped_daemons_partitions_go_to_the_others_and_no_window_is_lost(ward: Ward,
                                                                            daemons: list[Daemon]) -> None:
    topics, x, beats, publisher = ward.topics, ward.x, ward.beats, ward.publisher
    devices = 4
    send(publisher, topics, x, devices, range(10))
    beats.wait_for(lambda d: len(d) == devices * 10, timeout=60)
    busy = [daemon for daemon in daemons if daemon.stats()["active_streams"]]
    for daemon in busy:  # the daemons that hold devices go away
        daemon.stop()
    send(publisher, topics, x, devices, range(10, 20))
    docs = beats.wait_for(lambda d: len(d) >= devices * 20, timeout=60)
    assert sorted((d["device"], d["seq"]) for d in docs) == sorted(
        (f"bed-{d}", s) for d in range(devices) for s in range(20))
    rest = [daemon for daemon in daemons if daemon not in busy]
    wait_until(lambda: sum(daemon.stats()["active_streams"] for daemon in rest) == devices)

"""Daemons on a real 3-node RabbitMQ cluster (Debian's rabbitmq-server, started on loopback ports): devices
publish MQTT to the cluster, the partitioned source gives each partition to one daemon, results go out over the
cluster's MQTT plugin."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.codec import encode_binary
from pipeline.config import DaemonConfig
from pipeline.daemon import Daemon
from pipeline.mqtt import MqttClient, Topics
from pipeline.rabbit import PartitionedSource, owners
from pipeline.tools.rabbit_cluster import RabbitCluster, RabbitNode
from pipeline.tools.records import load_record
from tests.conftest import T0, Collector, serve_command, wait_until
from train.evaluate import stream_records

PARTITIONS = 12


def assigned(daemon: Daemon) -> list[int]:
    assert isinstance(daemon.source, PartitionedSource)
    return daemon.source.assigned


def spread(live: list[Daemon]) -> bool:
    """Every partition consumed by exactly one of `live`, and every one of them consuming some."""
    parts = [assigned(d) for d in live]
    return sorted(p for ps in parts for p in ps) == list(range(PARTITIONS)) and all(parts)


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
    wait_until(lambda: spread(started), timeout=20)  # the daemons have shared the partitions out
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
    # each window counted by one daemon (counted just after its beats go out), each device on one daemon
    wait_until(lambda: sum(daemon.stats().get("windows", 0) for daemon in daemons) == devices * windows)
    assert sum(daemon.stats()["active_streams"] for daemon in daemons) == devices
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
    gone = next(daemon for daemon in daemons if daemon.stats()["active_streams"])
    held = gone.stats()["active_streams"]
    gone.stop()  # a daemon that holds devices goes away
    rest = [daemon for daemon in daemons if daemon is not gone]
    before = sum(daemon.stats()["active_streams"] for daemon in rest)
    send(publisher, topics, x, devices, range(10, 20))
    expected = sorted((f"bed-{d}", s) for d in range(devices) for s in range(20))
    docs = beats.wait_for(lambda d: {(doc["device"], doc["seq"]) for doc in d} >= set(expected), timeout=60)
    assert sorted((d["device"], d["seq"]) for d in docs) == expected  # none lost, none twice
    wait_until(lambda: sum(daemon.stats()["active_streams"] for daemon in rest) == before + held)


def test_partitions_spread_over_the_daemons_and_move_when_one_goes_or_comes(cluster: RabbitCluster,
                                                                            daemons: list[Daemon]) -> None:
    assert all(assigned(d) for d in daemons)  # every daemon has some (the fixture waited for a partition each)
    gone = daemons[0]
    gone.stop()
    wait_until(lambda: spread(daemons[1:]), timeout=20)  # its partitions go to the others
    config = gone.config.model_copy(update={"mqtt": gone.config.mqtt.model_copy(update={"client_id": "newcomer"})})
    newcomer = Daemon(config)
    assert newcomer.start()
    try:
        wait_until(lambda: spread([*daemons[1:], newcomer]), timeout=20)  # a daemon added: a share moves to it
    finally:
        newcomer.stop()


def test_owners_are_balanced_and_a_newcomer_moves_little_more_than_its_share() -> None:
    three = owners(64, ["a", "b", "c"])
    four = owners(64, ["a", "b", "c", "d"])
    assert max(three.count(m) for m in "abc") == 22 and min(three.count(m) for m in "abc") >= 20
    assert sorted(four.count(m) for m in "abcd") == [16, 16, 16, 16]
    moved = sum(old != new for old, new in zip(three, four, strict=True))
    assert 16 <= moved <= 24  # d's 16, and a few to even the others out
    assert owners(64, ["c", "a", "b"]) == three  # the order members are heard in does not matter


def test_a_killed_daemons_partitions_and_windows_move_to_the_others(
        cluster: RabbitCluster, daemons: list[Daemon], ward: Ward, tmp_path: Path) -> None:
    """`ecgmon serve` joins as a fourth daemon, takes a share, and is killed (SIGKILL) while windows arrive: the
    others take its partitions over within a few seconds, and no window is lost (those it had taken but not
    finished with come back from their partitions; one it analysed just before dying may be analysed twice)."""
    config = daemons[0].config.model_dump(mode="json")
    config["mqtt"]["client_id"] = "victim"
    config["rabbitmq"]["password"] = "guest"
    (tmp_path / "daemon.yaml").write_text(yaml.safe_dump(config))
    victim = subprocess.Popen(serve_command(tmp_path / "daemon.yaml"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: sum(len(assigned(d)) for d in daemons) < PARTITIONS, timeout=30)  # it holds a share
        send(ward.publisher, ward.topics, ward.x, 8, range(5))
    finally:
        victim.kill()
        victim.wait()
    killed = time.monotonic()
    wait_until(lambda: spread(daemons), timeout=20)
    assert time.monotonic() - killed < 10
    send(ward.publisher, ward.topics, ward.x, 8, range(5, 10))
    expected = {(f"bed-{d}", s) for d in range(8) for s in range(10)}
    ward.beats.wait_for(lambda docs: {(d["device"], d["seq"]) for d in docs} >= expected, timeout=60)

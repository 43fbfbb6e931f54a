"""deploy/rabbitmq on a real RabbitMQ node: node.conf's TLS-only listeners and logins, make-users.sh's logins and
topic permissions, and a daemon on them over TLS. One node on loopback ports: node.conf with its listeners on the
test's ports, its certificates from the test, and without the peer discovery of rabbit1..rabbit3."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pika
import pika.exceptions
import pytest

from pipeline.config import DaemonConfig
from pipeline.io.mqtt import ConnectError, MqttClient, Topics
from pipeline.io.rabbit import PartitionedSource
from pipeline.process.daemon import Daemon
from pipeline.tools.rabbit_cluster import RabbitCluster
from pipeline.tools.records import load_record
from tests.conftest import REPO, T0, Collector, wait_until
from tests.test_security import make_certs
from tests.wire import binary_v1

DEPLOY = REPO / "deploy" / "rabbitmq"
TOPICS = Topics("ecgmon")
PASSWORDS = {"ecgmon-1": "d-pass", "bed-1": "b1-pass", "bed-2": "b2-pass", "nurse-station": "n-pass"}


def loopback_node_conf(certs: Path) -> str:
    """deploy/rabbitmq/node.conf as a RabbitCluster template for one node on loopback."""
    lines = []
    for line in (DEPLOY / "node.conf").read_text().splitlines():
        if line.startswith("cluster_formation."):
            continue
        line = line.replace("{", "{{").replace("}", "}}").replace("/etc/rabbitmq/certs", str(certs))
        line = line.replace("listeners.ssl.default = 5671", "listeners.ssl.default = {host}:{amqp_port}")
        line = line.replace("listeners.ssl.default = 8883", "listeners.ssl.default = {host}:{mqtt_port}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def make_users(node: RabbitCluster, role: str, *users: str) -> None:
    """deploy/rabbitmq/make-users.sh, answering its password prompts."""
    command, env = node.ctl_command(node.nodes[0])
    subprocess.run(["bash", str(DEPLOY / "make-users.sh"), role, *users], input="".join(
        PASSWORDS[u] + "\n" for u in users), env={**env, "RABBITMQCTL": " ".join(command)}, check=True,
        capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rabbit-certs")
    make_certs(d)
    return d


@pytest.fixture(scope="module")
def node(certs: Path) -> Iterator[RabbitCluster]:
    with RabbitCluster(1, conf=loopback_node_conf(certs)) as n:
        make_users(n, "daemon", "ecgmon-1")
        make_users(n, "device", "bed-1", "bed-2")
        make_users(n, "station", "nurse-station")
        yield n


def device(node: RabbitCluster, certs: Path, login: str) -> MqttClient:
    client = MqttClient(node.host, node.nodes[0].mqtt_port, login, username=login, password=PASSWORDS[login],
                        tls={"ca_certs": str(certs / "ca.crt")}, protocol="3.1.1")
    client.connect()
    return client


def window(x: np.ndarray, seq: int) -> bytes:
    return binary_v1(seq, T0 + seq, 360.0, "MLII", np.round(x[seq * 360:(seq + 1) * 360] * 200).astype(np.int16),
                         200.0)


def test_the_node_takes_tls_and_known_logins_only(node: RabbitCluster, certs: Path) -> None:
    with pytest.raises(pika.exceptions.AMQPConnectionError):  # plain AMQP: the listener speaks TLS only
        pika.BlockingConnection(pika.ConnectionParameters(node.host, node.nodes[0].amqp_port, connection_attempts=1,
                                                          socket_timeout=5))
    for username, password in ((None, None), ("bed-1", "wrong")):  # anonymous, or a wrong password: refused
        client = MqttClient(node.host, node.nodes[0].mqtt_port, "intruder", username=username, password=password,
                            tls={"ca_certs": str(certs / "ca.crt")}, protocol="3.1.1")
        with pytest.raises(ConnectError):
            client.connect(timeout_s=5)
        client.disconnect()


def test_a_daemon_on_tls_serves_devices_that_may_write_only_their_own_topic(physionet: Path, node: RabbitCluster,
                                                                              certs: Path) -> None:
    """The daemon logs in as make-users.sh's daemon over TLS; each device publishes its windows on its own topic and
    a nurses' station reads the beats; a device that publishes on another device's topic is cut off, and that
    window never reaches the daemon."""
    config = DaemonConfig.model_validate({
        "source": "rabbitmq", "rabbitmq": {"nodes": [f"{node.host}:{node.nodes[0].amqp_port}"], "partitions": 4,
                                           "username": "ecgmon-1", "password": PASSWORDS["ecgmon-1"],
                                           "tls": {"ca_file": str(certs / "ca.crt")}},
        "mqtt": {"client_id": "ecgmon-1"}, "metrics": {"port": None}})
    station = Collector(node.host, node.nodes[0].mqtt_port, TOPICS.beats(), protocol="3.1.1",
                        client_id="nurse-station", username="nurse-station", password=PASSWORDS["nurse-station"],
                        tls={"ca_certs": str(certs / "ca.crt")})
    asked = station.client.publish(TOPICS.query_active, b"", qos=1)  # a station may ask for the open alarms
    asked.wait_for_publish(timeout=10)
    assert asked.is_published()  # acknowledged: RabbitMQ 3.10 closes the connection of a publish it refuses
    daemon = Daemon(config)
    assert daemon.start()
    bed_1, bed_2 = device(node, certs, "bed-1"), device(node, certs, "bed-2")
    x = load_record(physionet / "mitdb", "100").signal_mv
    try:
        for seq in range(3):
            bed_1.publish(TOPICS.ecg("bed-1"), window(x, seq), qos=1)
        station.wait_for(lambda docs: [d["seq"] for d in docs if d["device"] == "bed-1"] == [0, 1, 2], timeout=60)
        bed_1.publish(TOPICS.ecg("bed-2"), window(x, 5), qos=1)  # forged: bed-2's stream would jump to seq 5
        wait_until(lambda: bed_1.reconnects >= 1, timeout=30)  # the node closed bed-1's connection
        for seq in range(2):
            bed_2.publish(TOPICS.ecg("bed-2"), window(x, seq), qos=1)
        docs = station.wait_for(lambda docs: len([d for d in docs if d["device"] == "bed-2"]) == 2, timeout=60)
        assert [d["seq"] for d in docs if d["device"] == "bed-2"] == [0, 1]
        assert daemon.stats().get("rejected", 0) == 0
        source = daemon.source
        assert isinstance(source, PartitionedSource)
        wait_until(lambda: source.checkpoints >= 1, timeout=30)  # its login may write checkpoints too
        assert source.reconnects == 0 and daemon.stats()["reconnects"] == 0  # nothing it did was refused
        assert station.client.reconnects == 0
    finally:
        bed_1.disconnect()
        bed_2.disconnect()
        daemon.stop()
        station.close()

"""Daemons on a real 3-node RabbitMQ cluster (Debian's rabbitmq-server, started on loopback ports): devices
publish MQTT to the cluster, the partitioned source gives each partition to one daemon, results go back to the
cluster over AMQP and reach the subscribers through its MQTT plugin."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import subprocess
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.config import DaemonConfig, MqttConfig
from pipeline.io.mqtt import MqttClient, Topics
from pipeline.io.rabbit import PartitionedSource, owners
from pipeline.process.daemon import Daemon
from pipeline.tools.bench_cluster import run_cluster_point
from pipeline.tools.rabbit_cluster import RabbitCluster, RabbitNode
from pipeline.tools.records import load_record
from pipeline.tools.station.hub import Hub
from tests.conftest import T0, Collector, serve_command, wait_until
from tests.ecg_synth import beat_templates, synthesize
from tests.wire import binary_v1
from train.evaluate import stream_records

PARTITIONS = 12
CHECKPOINT_S = 8.0  # the daemons' (a test waits for one)


def partitioned(daemon: Daemon) -> PartitionedSource:
    assert isinstance(daemon.source, PartitionedSource)
    return daemon.source


def assigned(daemon: Daemon) -> list[int]:
    return partitioned(daemon).assigned


def spread(live: list[Daemon]) -> bool:
    """Every partition consumed by exactly one of `live`, and every one of them consuming some."""
    parts = [assigned(d) for d in live]
    return sorted(p for ps in parts for p in ps) == list(range(PARTITIONS)) and all(parts)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    with RabbitCluster(3) as c:
        yield c
    # pika leaves the socket (and its wake-up socket pair) of a connection cut by a killed node unclosed: collect
    # them here, where the tests cut connections on purpose, rather than in whichever test runs next
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture()
def daemons(cluster: RabbitCluster, request: pytest.FixtureRequest) -> Iterator[list[Daemon]]:
    """Three daemons, each reading from and publishing to its own node first (the others to fail over to); the topic
    prefix is the test's own."""
    prefix = request.node.name.replace("_", "")[-20:]
    started = []
    for k, node in enumerate(cluster.nodes):
        nodes = [node, *(other for other in cluster.nodes if other is not node)]
        config = DaemonConfig.model_validate({
            "source": "rabbitmq", "rabbitmq": {"nodes": [f"{cluster.host}:{n.amqp_port}" for n in nodes],
                                               "partitions": PARTITIONS, "checkpoint_s": CHECKPOINT_S},
            "mqtt": {"client_id": f"{prefix}-daemon-{k}", "topic_prefix": prefix},
            "metrics": {"port": None}, "alarms": {"signal_loss_s": 60}})  # the tests pause the devices at times
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


def send(client: MqttClient, topics: Topics, x: np.ndarray, devices: int, seqs: range, stagger_s: int = 3) -> None:
    """Window `seq` of device d is x's second stagger_s d + seq (binary, QoS 1)."""
    for seq in seqs:
        for d in range(devices):
            a = (stagger_s * d + seq) * 360
            client.publish(topics.ecg(f"bed-{d}"), binary_v1(seq, T0 + seq, 360.0, "MLII",
                                                                 np.round(x[a:a + 360] * 200).astype(np.int16), 200.0),
                           qos=1)


def queued(cluster: RabbitCluster, node: RabbitNode, prefix: str) -> int:
    """Windows in the partition queues, ready or delivered and not yet acknowledged (rabbitmqctl)."""
    out = cluster.ctl(node, "list_queues", "name", "messages", "--no-table-headers", "--silent").stdout
    return sum(int(n) for name, n in (line.split() for line in out.splitlines() if line.strip())
               if name.startswith(f"{prefix}.ecg.p"))


def answered(beats: Collector, expected: set[tuple[str, int]], daemons: list[Daemon], timeout: float
             ) -> list[dict[str, Any]]:
    """The beats messages once there is one for each (device, seq) of `expected`; if not within `timeout` (s), fail
    saying which are missing and where the daemons stand."""
    try:
        return beats.wait_for(lambda docs: {(d["device"], d["seq"]) for d in docs} >= expected, timeout=timeout)
    except AssertionError:
        missing = sorted(expected - {(d["device"], d["seq"]) for d in beats.docs()})
        states = [(d.config.mqtt.client_id, partitioned(d).assigned, partitioned(d).reconnects, d.stats())
                  for d in daemons]
        raise AssertionError(f"no beats for {len(missing)} windows: {missing[:50]}; daemons: {states}") from None


def by_seq(docs: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """A device's beats messages in seq order, each once: one analysed twice (after a kill -9) must be the same."""
    once: dict[int, dict[str, Any]] = {}
    for doc in docs:
        if doc["device"] == device:
            assert once.setdefault(doc["seq"], doc)["beats"] == doc["beats"]
    return [once[seq] for seq in sorted(once)]


def asystole_signal(physionet: Path) -> np.ndarray:
    """51 s of normal beats with 7 s without a QRS from 20 s (mV, rounded to the ADC step as the devices send it)."""
    beat = beat_templates(physionet)["N"][0]
    x = synthesize({"N": [beat]}, [("N", 0.8)] * 25 + [("N", 7.0)] + [("N", 0.8)] * 25)
    return np.round(x * 200) / 200


def assert_one_asystole_each(alarms: list[dict[str, Any]], devices: int) -> None:
    """Each device raised one asystole alarm and cleared it under the same id; a raise is repeated, identical, only
    where windows were analysed again (after a daemon's last checkpoint, or a node's death)."""
    for d in range(devices):
        mine = [a for a in alarms if a["device"] == f"bed-{d}"]
        assert [(a["type"], a["state"]) for a in (mine[0], mine[-1])] == [("asystole", "raised"),
                                                                        ("asystole", "cleared")], mine
        assert {a["alarm_id"] for a in mine} == {mine[0]["alarm_id"]}, mine
        assert all(a == mine[0] for a in mine if a["state"] == "raised"), mine


@contextlib.contextmanager
def victim(daemons: list[Daemon], tmp_path: Path) -> Iterator[None]:
    """`ecgmon serve` joins `daemons` as a fourth daemon and takes a share of the partitions; after the block it is
    killed (SIGKILL), and the others must have taken its partitions over within 10 s, told of its death by the
    cluster (its connection closed), not by missing its heartbeats."""
    config = daemons[0].config.model_dump(mode="json")
    config["mqtt"]["client_id"] = "victim"
    config["rabbitmq"]["password"] = "guest"
    (tmp_path / "daemon.yaml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(serve_command(tmp_path / "daemon.yaml"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: sum(len(assigned(d)) for d in daemons) < PARTITIONS, timeout=60)  # it holds a share
        yield
    finally:
        process.kill()
        process.wait()
    killed = time.monotonic()
    wait_until(lambda: spread(daemons), timeout=20)
    assert time.monotonic() - killed < 10
    assert sum(partitioned(d).deaths_noticed for d in daemons) >= 1


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
        part = dataclasses.replace(record.only([0]), signals_mv=x[None, 3 * d * 360:(3 * d + windows) * 360])
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
    status = Collector(ward.beats.client.host, ward.beats.client.port, topics.every_status, protocol="3.1.1")
    gone.stop()  # a daemon that holds devices goes away, and says so
    status.wait_for(lambda docs: any(d["state"] == "offline" and d.get("model_version") == gone.model_version
                                     for d in docs), part=gone.topics.status)
    status.close()
    rest = [daemon for daemon in daemons if daemon is not gone]
    before = sum(daemon.stats()["active_streams"] for daemon in rest)
    send(publisher, topics, x, devices, range(10, 20))
    expected = sorted((f"bed-{d}", s) for d in range(devices) for s in range(20))
    docs = answered(beats, set(expected), daemons, timeout=60)
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
    status = Collector(cluster.host, cluster.nodes[1].mqtt_port, ward.topics.every_status, protocol="3.1.1")
    with victim(daemons, tmp_path):
        send(ward.publisher, ward.topics, ward.x, 8, range(5))
    send(ward.publisher, ward.topics, ward.x, 8, range(5, 10))
    expected = {(f"bed-{d}", s) for d in range(8) for s in range(10)}
    answered(ward.beats, expected, daemons, timeout=60)
    # it could not say so itself: the daemons left say it is offline, as the broker says an MQTT daemon's last will
    status.wait_for(lambda docs: {"state": "offline", "reason": "connection lost"} in docs, part="/status/victim")
    status.close()


def test_a_killed_daemons_devices_continue_from_its_checkpoint_and_nothing_it_published_goes_out_twice(
        physionet: Path, cluster: RabbitCluster, daemons: list[Daemon], ward: Ward, tmp_path: Path) -> None:
    """A fourth daemon (`ecgmon serve`) analyses 40 devices' first 20 s, checkpoints them, goes on until each has
    raised an asystole alarm, and is killed (SIGKILL) while more windows arrive. Whoever takes its partitions
    restores the checkpoint and analyses the windows since again without publishing what the victim published:
    every device's beats are those of one uninterrupted pass (a cold start would differ for the 10 s warm-up), the
    windows before the alarm are published once, and each asystole alarm is raised once and cleared under its id."""
    topics, devices = ward.topics, 40
    alarms = Collector(cluster.host, cluster.nodes[1].mqtt_port, topics.alarms(), protocol="3.1.1")
    x = asystole_signal(physionet)
    windows = int(len(x) / 360)
    with victim(daemons, tmp_path):
        send(ward.publisher, topics, x, devices, range(20), stagger_s=0)
        answered(ward.beats, {(f"bed-{d}", s) for d in range(devices) for s in range(20)}, daemons, timeout=60)
        wait_until(lambda: queued(cluster, cluster.nodes[0], topics.prefix) == 0, timeout=30)  # all checkpointed
        drained = time.monotonic()
        send(ward.publisher, topics, x, devices, range(20, 29), stagger_s=0)
        alarms.wait_for(lambda a: len({d["device"] for d in a}) == devices, timeout=30)  # each raised: then kill
    killed = time.monotonic()
    send(ward.publisher, topics, x, devices, range(29, windows), stagger_s=0)
    expected = {(f"bed-{d}", s) for d in range(devices) for s in range(windows)}
    docs = answered(ward.beats, expected, daemons, timeout=90)
    assert sum(partitioned(d).restored for d in daemons) > 0  # some devices were the victim's
    if killed - drained < CHECKPOINT_S - 3:  # no checkpoint since the one waited for: its windows came again
        assert sum(d.stats().get("replayed", 0) for d in daemons) > 0
    record = load_record(physionet / "mitdb", "100")
    part = dataclasses.replace(record.only([0]), signals_mv=x[None, :windows * 360])
    samples, classes = stream_records(daemons[0].model, [part], 1.0)[0]
    for d in range(devices):
        online = [b for doc in by_seq(docs, f"bed-{d}") for b in doc["beats"]]
        assert [b["class"] for b in online] == classes.tolist()
        np.testing.assert_allclose([b["time"] - T0 for b in online], samples / 360.0, atol=1.5 / 360)
    before_alarm = Counter((doc["device"], doc["seq"]) for doc in docs if doc["seq"] < 23)  # asystole from 24 s
    assert set(before_alarm.values()) == {1}, [k for k, n in before_alarm.items() if n > 1]
    raised = alarms.wait_for(lambda a: sum(doc["state"] == "cleared" for doc in a) >= devices, timeout=30)
    assert_one_asystole_each(raised, devices)
    assert sorted(doc["device"] for doc in raised if doc["state"] == "raised") == sorted(
        f"bed-{d}" for d in range(devices))  # none raised twice
    alarms.close()


def test_a_killed_broker_node_loses_no_window_and_no_alarm(physionet: Path, cluster: RabbitCluster,
                                                           daemons: list[Daemon], ward: Ward) -> None:
    """kill -9 of the node the first daemon reads from and publishes its results through (it holds some of the
    partition queues' leaders) while 40 devices publish to another at QoS 1, before each raises an asystole alarm:
    the daemon fails over to another node, the queues to their replicas, every window is analysed (some twice,
    with the same beats) and every alarm reaches a nurses' station that was away, through its persistent session.
    A station that comes while the alarms are open asks for them and gets each one's last message."""
    topics, devices = ward.topics, 40
    x = asystole_signal(physionet)
    windows = int(len(x) / 360)
    station_id = f"{topics.prefix}-station"
    Collector(cluster.host, cluster.nodes[1].mqtt_port, topics.alarms(), protocol="3.1.1", client_id=station_id,
              session_expiry_s=3600).close()  # a station, away; its persistent session keeps what comes for it
    alarms = Collector(cluster.host, cluster.nodes[1].mqtt_port, topics.alarms(), protocol="3.1.1")
    send(ward.publisher, topics, x, devices, range(10), stagger_s=0)
    ward.beats.wait_for(lambda docs: len({(d["device"], d["seq"]) for d in docs}) == devices * 10, timeout=60)
    gone = cluster.nodes[0]
    try:
        send(ward.publisher, topics, x, devices, range(10, 13), stagger_s=0)
        cluster.kill_node(gone)
        send(ward.publisher, topics, x, devices, range(13, 26), stagger_s=0)  # each device's asystole is on
        alarms.wait_for(lambda a: {d["device"] for d in a} == {f"bed-{d}" for d in range(devices)}, timeout=90)
        late = Collector(cluster.host, cluster.nodes[1].mqtt_port, topics.active(), protocol="3.1.1")
        late.client.publish(topics.query_active, b"", qos=1)
        answers = late.wait_for(lambda docs: len({d["device"] for d in docs}) == devices, timeout=30)
        assert {(d["type"], d["state"]) for d in answers} <= {("asystole", "raised"), ("asystole", "updated")}
        alarms.wait_for(lambda a: all(d in a for d in answers))  # each open alarm's last message, as published
        late.close()
        send(ward.publisher, topics, x, devices, range(26, windows), stagger_s=0)
        expected = {(f"bed-{d}", s) for d in range(devices) for s in range(windows)}
        docs = answered(ward.beats, expected, daemons, timeout=90)
        for d in range(devices):
            assert [doc["seq"] for doc in by_seq(docs, f"bed-{d}")] == list(range(windows))
        assert partitioned(daemons[0]).reconnects >= 1 and daemons[0].stats()["reconnects"] >= 1  # source and sink
        alarms.wait_for(lambda a: {d["device"] for d in a if d["state"] == "cleared"} == {
            f"bed-{d}" for d in range(devices)}, timeout=30)
        back = Collector(cluster.host, cluster.nodes[1].mqtt_port, topics.alarms(), protocol="3.1.1",
                         client_id=station_id, session_expiry_s=3600)  # the station comes back
        kept = back.wait_for(lambda a: sum(d["state"] == "cleared" for d in a) >= devices, timeout=30)
        assert_one_asystole_each(kept, devices)
        back.close()
    finally:
        alarms.close()
        cluster.start_node(gone)  # back for the tests after this one
        cluster.await_node(gone)


def test_the_cluster_bench_measures_a_point(physionet: Path, cluster: RabbitCluster) -> None:
    """`ecgmon bench --cluster`'s measurement on the test cluster: one daemon, a few devices, every window answered."""
    point = run_cluster_point(cluster, 1, 10, 5.0, ["mitdb/100"], physionet)
    assert point.sent == 50 and point.lost == 0 and point.twice == 0 and point.alarms_twice == 0
    assert point.daemons_cpu_s > 0 and point.brokers_cpu_s > 0 and point.latency_p99_ms < 5000


def test_the_central_station_reads_the_cluster_and_its_acknowledgement_reaches_the_holder(
        physionet: Path, cluster: RabbitCluster, daemons: list[Daemon], ward: Ward) -> None:
    """The station's hub, coming after four devices raised asystole, gets their open alarms through
    `query/active` (the cluster keeps no retained copies) and their ECG; its acknowledgement is applied by the
    daemon holding the device, checkpointed at once (not at the next `checkpoint_s`: a kill then does not lose it),
    and comes back in the alarm's events until it clears."""
    topics, devices = ward.topics, 4
    alarms = Collector(cluster.host, cluster.nodes[1].mqtt_port, topics.alarms(), protocol="3.1.1")
    x = asystole_signal(physionet)
    send(ward.publisher, topics, x, devices, range(26), stagger_s=0)
    alarms.wait_for(lambda docs: sum(d["state"] == "raised" for d in docs) >= devices, timeout=60)
    hub = Hub(MqttConfig(host=cluster.host, port=cluster.nodes[0].mqtt_port, client_id=f"{topics.prefix}-station",
                         topic_prefix=topics.prefix, protocol="3.1.1"), keep_s=60.0, silent_s=60.0, beds_file=None)
    hub.start()
    try:
        def open_alarms() -> list[dict[str, Any]]:
            return [a for bed in hub.wall.snapshot()["beds"] for a in bed["alarms"]]

        wait_until(lambda: len(open_alarms()) >= devices, timeout=30)
        raised = next(a for a in open_alarms() if a["device"] == "bed-0")
        checkpoints = sum(partitioned(d).checkpoints for d in daemons)
        hub.acknowledge("bed-0", raised["alarm_id"], "silence", "nurse-ana")
        acked = alarms.wait_for(lambda docs: any(d["acknowledged"] for d in docs), timeout=30)
        wait_until(lambda: sum(partitioned(d).checkpoints for d in daemons) > checkpoints, timeout=CHECKPOINT_S / 3)
        assert [(d["alarm_id"], d["acknowledged"]["by"]) for d in acked if d["acknowledged"]] == [
            (raised["alarm_id"], "nurse-ana")]
        send(ward.publisher, topics, x, devices, range(26, int(len(x) / 360)), stagger_s=0)
        cleared = alarms.wait_for(lambda docs: any(d["state"] == "cleared" and d["device"] == "bed-0" for d in docs),
                                  timeout=60)
        assert next(d for d in cleared if d["state"] == "cleared" and d["device"] == "bed-0")["acknowledged"][
            "by"] == "nurse-ana"
        wait_until(lambda: any(bed["leads"] == ["MLII"] for bed in hub.wall.snapshot()["beds"]), timeout=10)  # ECG
    finally:
        hub.stop()
        alarms.close()

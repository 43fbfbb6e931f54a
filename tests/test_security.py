"""The production broker config (deploy/mosquitto) with certificates made at test time: TLS, passwords, ACLs,
client ids bound to logins. The helpers here also serve tests/test_deploy_*.py."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest

from pipeline.config import DaemonConfig, load_config
from pipeline.io import messages
from pipeline.io.mqtt import ConnectError, MqttClient, Topics, encode_json
from pipeline.process.daemon import Daemon
from pipeline.tools.broker import LocalBroker, free_port
from tests.wire import binary_v1

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "mosquitto"
TOPICS = Topics("ecgmon")
T0 = time.time()  # the daemon rejects windows far from its clock
STAFF = ("ecgmon-daemon", "nurse-station", "ecgmon-ops", "ecgmon-station")
USERS = {"ecgmon-daemon": "d-pass", "nurse-station": "n-pass", "ecgmon-ops": "o-pass", "ecgmon-station": "s-pass",
         "bed-1": "b1-pass", "bed-2": "b2-pass"}


def make_certs(d: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ecgmon test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.crt")


def write_broker_files(etc: Path, certs: Path | None = None) -> None:
    """What deploy/mosquitto/mosquitto.conf finds in /etc/mosquitto/ecgmon/: certs/ (copied from `certs`, else
    made), a password file with USERS, the deploy ACL file."""
    (etc / "certs").mkdir(parents=True, exist_ok=True)
    if certs is None:
        make_certs(etc / "certs")
    else:
        for name in ("ca.crt", "server.crt", "server.key"):
            (etc / "certs" / name).write_bytes((certs / name).read_bytes())
    passwords = etc / "passwords"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwords), user, password],
                       check=True, capture_output=True)
    (etc / "acl").write_text((DEPLOY / "acl").read_text())


def deploy_config(etc: Path, port: int, persistence_dir: Path | None, keep_user: bool = False) -> str:
    """deploy/mosquitto/mosquitto.conf, changed only where a test must: its files in `etc`, the listener on
    127.0.0.1:`port`, persistence in `persistence_dir` (off when None), and without its `user` line unless
    `keep_user` (LocalBroker and the tests add their own: mosquitto refuses two)."""
    config = (DEPLOY / "mosquitto.conf").read_text()

    def replace(old: str, new: str) -> None:
        nonlocal config
        assert old in config, f"deploy/mosquitto/mosquitto.conf no longer has {old!r}: update the tests"
        config = config.replace(old, new)

    replace("/etc/mosquitto/ecgmon/", f"{etc}/")
    replace("\nlistener 8883\n", f"\nlistener {port} 127.0.0.1\n")
    if persistence_dir is None:
        replace("\npersistence true\n", "\npersistence false\n")
    else:
        replace("\npersistence_location /var/lib/mosquitto/\n", f"\npersistence_location {persistence_dir}/\n")
    if not keep_user:
        replace("\nuser mosquitto\n", "\n")
    return config


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalBroker, Path]]:
    d = tmp_path_factory.mktemp("secure")
    write_broker_files(d)
    port = free_port()
    with LocalBroker(port=port, config=deploy_config(d, port, persistence_dir=None)) as broker:
        yield broker, d / "certs" / "ca.crt"


def client(broker: LocalBroker, ca: Path, user: str | None, name: str, session_expiry_s: int = 0) -> MqttClient:
    """A client logged in as `user`, asking for client id `name` (the broker uses the user name instead)."""
    return MqttClient(broker.host, broker.port, name, username=user, password=USERS.get(user or ""),
                      tls={"ca_certs": str(ca)}, session_expiry_s=session_expiry_s)


class Inbox:
    """Every message a client's subscriptions bring, in order; wait for one on a given topic."""

    def __init__(self, c: MqttClient, *topic_filters: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        for f in topic_filters:
            c.subscribe(f, self._on, qos=1)  # before connect: sent on connect, which waits for the SUBACKs

    def _on(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.messages.append((topic, payload))
            self._cond.notify_all()

    def topics(self) -> list[str]:
        with self._cond:
            return [t for t, _ in self.messages]

    def wait_for(self, topic: str, payload: bytes | None = None, timeout_s: float = 10.0) -> list[str]:
        """The topics received so far, once a message on `topic` (with `payload`, if given) is among them."""
        def arrived() -> bool:
            return any(t == topic and payload in (None, p) for t, p in self.messages)

        with self._cond:
            if not self._cond.wait_for(arrived, timeout_s):
                raise AssertionError(f"nothing on {topic} within {timeout_s:g} s; got {self.topics()}")
            return [t for t, _ in self.messages]


def window(seq: int) -> bytes:
    return binary_v1(seq, T0 + seq, 360.0, "MLII", np.zeros(360, np.int16), 200.0)


def published(info: paho.MQTTMessageInfo) -> None:
    """Wait for the PUBACK: the broker has then routed the message or refused it."""
    info.wait_for_publish(5)
    assert info.is_published()


def test_daemon_over_tls_and_the_acls(secure_broker: tuple[LocalBroker, Path]) -> None:
    broker, ca = secure_broker
    config: DaemonConfig = load_config(None, env={"ECGMON_MQTT__PASSWORD": USERS["ecgmon-daemon"],
                                                  "ECGMON_MQTT__USERNAME": "ecgmon-daemon",
                                                  "ECGMON_MQTT__HOST": broker.host,
                                                  "ECGMON_MQTT__PORT": str(broker.port),
                                                  "ECGMON_MQTT__TLS__CA_FILE": str(ca),
                                                  "ECGMON_METRICS__PORT": "null"})
    daemon = Daemon(config)
    assert daemon.start()
    nurse, bed1, bed2, station = (client(broker, ca, user, user)
                                  for user in ("nurse-station", "bed-1", "bed-2", "ecgmon-station"))
    inbox = Inbox(nurse, TOPICS.beats(), TOPICS.alarms())
    seen = Inbox(station, TOPICS.ecg(), TOPICS.errors())
    for c in (nurse, bed1, bed2, station):
        c.connect(timeout_s=5)
    try:
        # What must be refused goes first, each acknowledged (so routed or refused) before the one window that
        # must be analysed: anything let through would reach the daemon and the nurse station before it.
        published(bed1.publish(TOPICS.ecg("bed-2"), window(0), qos=1))  # another device's topic: denied
        published(bed2.publish(TOPICS.alarms("bed-2"), b'{"fake": "alarm"}', qos=1))  # sensors cannot raise alarms
        published(nurse.publish(TOPICS.ecg("bed-1"), window(1), qos=1))  # subscribers cannot publish ECG...
        published(nurse.publish(TOPICS.alarms("bed-1"), b'{"fake": "alarm"}', qos=1))  # ...nor alarms
        ack = encode_json(messages.ack("bed-1/asystole/1", "silence", "bed-2"))
        published(bed2.publish(TOPICS.acks("bed-1"), ack, qos=1))  # sensors cannot silence alarms
        published(station.publish(TOPICS.ecg("bed-1"), window(1), qos=1))  # the station cannot publish ECG
        published(bed1.publish(TOPICS.ecg("bed-1"), window(0), qos=1))  # its own topic: analysed
        got = inbox.wait_for(TOPICS.beats("bed-1"))
        assert [t for t in got if "/beats/" in t] == [TOPICS.beats("bed-1")]
        assert all(b"fake" not in payload for _, payload in inbox.messages)  # only the daemon's own alarms arrive
        assert daemon.stats()["windows"] == 1
        seen.wait_for(TOPICS.ecg("bed-1"))  # the station reads the ECG it shows...
        published(station.publish(TOPICS.acks("bed-1"), encode_json(messages.ack("bed-1/asystole/1", "silence",
                                                                                 "nurse-ana")), qos=1))
        seen.wait_for(TOPICS.errors("bed-1"))  # ...and its acknowledgement reaches the daemon (no such alarm here)
        rejected = daemon.metrics.registry.get_sample_value
        assert rejected("ecgmon_messages_rejected_total", {"reason": "unknown_alarm"}) == 1  # not the sensor's
    finally:
        for c in (nurse, bed1, bed2, station):
            c.disconnect()
        daemon.stop()


@pytest.mark.parametrize(("user", "password"), [(None, None), ("bed-1", "wrong")])
def test_anonymous_and_wrong_password_are_refused(secure_broker: tuple[LocalBroker, Path], user: str | None,
                                                  password: str | None) -> None:
    broker, ca = secure_broker
    c = MqttClient(broker.host, broker.port, "intruder", username=user, password=password, tls={"ca_certs": str(ca)})
    with pytest.raises(ConnectError):
        c.connect(timeout_s=1.5)


def test_plain_tcp_is_refused(secure_broker: tuple[LocalBroker, Path]) -> None:
    broker, _ = secure_broker
    c = MqttClient(broker.host, broker.port, "plain", username="bed-1", password=USERS["bed-1"])
    with pytest.raises(ConnectError):
        c.connect(timeout_s=1.5)


def test_a_login_cannot_take_the_daemons_client_id(secure_broker: tuple[LocalBroker, Path]) -> None:
    """A sensor's login asking for the daemon's client id gets its own (its user name): the daemon's connection
    and persistent session stay. Before use_username_as_clientid, the broker closed the daemon's connection."""
    broker, ca = secure_broker
    daemon = client(broker, ca, "ecgmon-daemon", "ecgmon-daemon", session_expiry_s=3600)
    inbox = Inbox(daemon, TOPICS.status)
    daemon.connect(timeout_s=5)
    intruder = client(broker, ca, "bed-1", "ecgmon-daemon")
    try:
        intruder.connect(timeout_s=5)  # accepted, as "bed-1"
        # Had the intruder taken the id, the broker would have closed the daemon's connection before accepting
        # the intruder's: a round trip on the daemon's connection shows it is still the same one.
        published(daemon.publish(TOPICS.status, b"still here", qos=1))
        inbox.wait_for(TOPICS.status, b"still here")
        assert daemon.connected and daemon.reconnects == 0
        assert intruder.connected and intruder.reconnects == 0
    finally:
        intruder.disconnect()
        daemon.disconnect()


def test_staff_logins_cannot_publish_ecg(secure_broker: tuple[LocalBroker, Path]) -> None:
    """`pattern write ecgmon/ecg/%u` applies to every login: nurse-station and ecgmon-ops could publish ECG as
    devices named after themselves, and have it analysed, without the deny lines of their ACL blocks."""
    broker, ca = secure_broker
    reader = client(broker, ca, "ecgmon-daemon", "reader")
    inbox = Inbox(reader, TOPICS.ecg("#"))
    staff = [client(broker, ca, user, user) for user in ("nurse-station", "ecgmon-ops")]
    bed1 = client(broker, ca, "bed-1", "bed-1")
    for c in (reader, *staff, bed1):
        c.connect(timeout_s=5)
    try:
        for c, user in zip(staff, ("nurse-station", "ecgmon-ops"), strict=True):
            published(c.publish(TOPICS.ecg(user), window(0), qos=1))
        published(reader.publish(TOPICS.ecg("ecgmon-daemon"), window(0), qos=1))
        published(bed1.publish(TOPICS.ecg("bed-1"), window(0), qos=1))  # after the others: arrives after them
        assert inbox.wait_for(TOPICS.ecg("bed-1")) == [TOPICS.ecg("bed-1")]
    finally:
        for c in (reader, *staff, bed1):
            c.disconnect()


def test_who_reads_errors_and_open_alarms(secure_broker: tuple[LocalBroker, Path]) -> None:
    """ecgmon-ops reads every rejection (the bare ecgmon/errors too) and the open alarms; a sensor reads its own
    rejections only; nurse stations read the open alarms but no rejections; nobody but the daemon sees the
    bare ecgmon/active marker."""
    broker, ca = secure_broker
    daemon = client(broker, ca, "ecgmon-daemon", "ecgmon-daemon")
    ops, nurse, bed1 = (client(broker, ca, user, user) for user in ("ecgmon-ops", "nurse-station", "bed-1"))
    everything = ("ecgmon/errors/#", "ecgmon/active/#", "ecgmon/alarms/#")
    boxes = {user: Inbox(c, *everything) for user, c in (("ops", ops), ("nurse", nurse), ("bed-1", bed1))}
    for c in (daemon, ops, nurse, bed1):
        c.connect(timeout_s=5)
    active = "ecgmon/active/bed-1/vt"
    order = [("ecgmon/errors/bed-2", False), ("ecgmon/errors", False), ("ecgmon/active", False), (active, True),
             ("ecgmon/errors/bed-1", False), ("ecgmon/alarms/bed-1", False)]

    def seen(box: str, last: str) -> list[str]:  # this test's messages (an earlier test left an open alarm)
        return [t for t in boxes[box].wait_for(last) if t in dict(order)]

    try:
        for topic, retain in order:  # one connection: each subscriber gets what it may read in this order
            published(daemon.publish(topic, b'{"test": true}', qos=1, retain=retain))
        assert seen("ops", "ecgmon/errors/bed-1") == ["ecgmon/errors/bed-2", "ecgmon/errors", active,
                                                      "ecgmon/errors/bed-1"]
        assert seen("bed-1", "ecgmon/errors/bed-1") == ["ecgmon/errors/bed-1"]
        assert seen("nurse", "ecgmon/alarms/bed-1") == [active, "ecgmon/alarms/bed-1"]
    finally:
        published(daemon.publish(active, b"", qos=1, retain=True))  # clear the retained open alarm
        for c in (daemon, ops, nurse, bed1):
            c.disconnect()


def test_every_staff_login_is_denied_ecg_of_its_own_name() -> None:
    """The ACL's ECG pattern grants every login its own ECG topic: each `user` block must deny it."""
    blocks = re.split(r"^user ", (DEPLOY / "acl").read_text(), flags=re.MULTILINE)[1:]
    assert {b.split()[0] for b in blocks} >= set(STAFF)
    for block in blocks:
        user, lines = block.split("\n", 1)
        denied = re.findall(r"^topic deny (\S+)$", lines, flags=re.MULTILINE)
        assert {"ecgmon/ecg/#", f"ecgmon/ecg/{user}"} & set(denied), f"{user} may publish ECG as a device"

"""The production broker config (deploy/mosquitto) with certificates made at test time: TLS, passwords, ACLs."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.broker import LocalBroker, free_port
from pipeline.codec import encode_binary
from pipeline.config import DaemonConfig, load_config
from pipeline.daemon import Daemon
from pipeline.mqtt import ConnectError, MqttClient, Topics

REPO = Path(__file__).resolve().parent.parent
TOPICS = Topics("ecgmon")
USERS = {"ecgmon-daemon": "d-pass", "nurse-station": "n-pass", "bed-1": "b1-pass", "bed-2": "b2-pass"}


def make_certs(d: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ecgmon test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.crt")


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalBroker, Path]]:
    d = tmp_path_factory.mktemp("secure")
    (d / "certs").mkdir()
    make_certs(d / "certs")
    passwords = d / "passwords"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwords), user, password],
                       check=True, capture_output=True)
    (d / "acl").write_text((REPO / "deploy" / "mosquitto" / "acl").read_text())
    port = free_port()
    config = (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    config = (config.replace("/etc/mosquitto/ecgmon/", f"{d}/").replace("listener 8883", f"listener {port} 127.0.0.1")
              .replace("persistence true", "persistence false").replace("persistence_location /var/lib/mosquitto/\n",
                                                                        ""))
    with LocalBroker(port=port, config=config) as broker:
        yield broker, d / "certs" / "ca.crt"


def client(broker: LocalBroker, ca: Path, user: str | None, name: str) -> MqttClient:
    c = MqttClient(broker.host, broker.port, name, username=user, password=USERS.get(user or ""),
                   tls={"ca_certs": str(ca)})
    c.connect(timeout_s=5)
    return c


def window(seq: int) -> bytes:
    return encode_binary(seq, 100.0 + seq, 360.0, "MLII", np.zeros(360, np.int16), 200.0)


def collect(c: MqttClient, topic: str) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    c.subscribe(topic, lambda t, p: got.append((t, p)), qos=1)
    time.sleep(0.3)
    return got


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
    nurse = client(broker, ca, "nurse-station", "nurse")
    beats, alarms = collect(nurse, TOPICS.beats()), collect(nurse, TOPICS.alarms())
    bed1, bed2 = client(broker, ca, "bed-1", "bed-1"), client(broker, ca, "bed-2", "bed-2")
    try:
        bed1.publish(TOPICS.ecg("bed-1"), window(0), qos=1)  # its own topic: analysed
        bed1.publish(TOPICS.ecg("bed-2"), window(0), qos=1)  # another device's topic: denied
        bed2.publish(TOPICS.alarms("bed-2"), b'{"fake": "alarm"}', qos=1)  # sensors cannot raise alarms
        nurse.publish(TOPICS.ecg("bed-1"), window(1), qos=1)  # subscribers cannot publish ECG...
        nurse.publish(TOPICS.alarms("bed-1"), b'{"fake": "alarm"}', qos=1)  # ...nor alarms
        deadline = time.monotonic() + 10
        while not beats and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # time for anything that should not arrive
        assert [t for t, _ in beats] == [TOPICS.beats("bed-1")]
        assert all(b"fake" not in payload for _, payload in alarms)  # only the daemon's own alarms arrive
        assert daemon.stats()["windows"] == 1
    finally:
        for c in (nurse, bed1, bed2):
            c.disconnect()
        daemon.stop()


@pytest.mark.parametrize(("user", "password"), [(None, None), ("bed-1", "wrong")])
def test_anonymous_and_wrong_password_are_refused(secure_broker: tuple[LocalBroker, Path], user: str | None,
                                                  password: str | None) -> None:
    broker, ca = secure_broker
    c = MqttClient(broker.host, broker.port, "intruder", username=user, password=password, tls={"ca_certs": str(ca)})
    with pytest.raises(ConnectError):
        c.connect(timeout_s=3)


def test_plain_tcp_is_refused(secure_broker: tuple[LocalBroker, Path]) -> None:
    broker, _ = secure_broker
    c = MqttClient(broker.host, broker.port, "plain", username="bed-1", password=USERS["bed-1"])
    with pytest.raises(ConnectError):
        c.connect(timeout_s=3)

"""deploy/mosquitto's persistence: alarms queued for an offline nurse station survive a broker crash (SIGKILL),
and, started as root the way the Debian drop-in and compose.yaml start it, mosquitto (running as the user
"mosquitto") can read its files and write its persistence directory."""

from __future__ import annotations

import getpass
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest
import yaml

from pipeline.io.mqtt import MqttClient
from pipeline.tools.broker import find_mosquitto, free_port
from tests.test_security import DEPLOY, REPO, TOPICS, USERS, deploy_config, make_certs, published, write_broker_files


class Mosquitto:
    """mosquitto run by the test itself (pipeline.tools.broker.LocalBroker cannot be killed with SIGKILL)."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.host, self.port, self.config, self.log = "127.0.0.1", port, config, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        binary = find_mosquitto()
        assert binary is not None, "mosquitto not found: install it (Debian: apt-get install mosquitto)"
        with self.log.open("ab") as log:  # the configs here log to stderr
            self.process = subprocess.Popen([binary, "-c", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"mosquitto is not listening on {self.port}: {self.log.read_text()[-800:]}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:g} s")
        time.sleep(0.005)


def station(broker: Mosquitto, ca: Path, got: list[bytes], done: threading.Event, expected: int) -> MqttClient:
    """A nurse station with a persistent session (MQTT v5 session expiry) and a QoS 1 subscription to alarms."""
    c = MqttClient(broker.host, broker.port, "nurse-station", username="nurse-station",
                   password=USERS["nurse-station"], tls={"ca_certs": str(ca)}, session_expiry_s=3600)

    def on_alarm(topic: str, payload: bytes) -> None:
        got.append(payload)
        if len(got) >= expected:
            done.set()

    c.subscribe(TOPICS.alarms("#"), on_alarm, qos=1)  # registered before connect: sent on (re)connect
    return c


Prepare = Callable[[Path, Path], tuple[Path, Path]]  # (scratch, src) -> (the broker's etc, persistence dir)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    make_certs(d)
    return d


def test_queued_alarms_survive_a_broker_crash(tmp_path: Path, certs: Path) -> None:
    etc, data = tmp_path / "etc", tmp_path / "data"
    write_broker_files(etc, certs)
    data.mkdir()
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(deploy_config(etc, port, data) + f"user {getpass.getuser()}\n")
    ca = etc / "certs" / "ca.crt"
    alarms = [json.dumps({"alarm_id": f"bed-1-vt-{i}", "device": "bed-1", "type": "vt", "state": "raised"}).encode()
              for i in range(3)]
    got: list[bytes] = []
    done = threading.Event()
    with Mosquitto(config, port, tmp_path / "mosquitto.log") as broker:
        nurse = station(broker, ca, got, done, len(alarms))
        nurse.connect(timeout_s=5)
        nurse.disconnect()  # offline: the broker keeps its session and queues its alarms
        daemon = MqttClient(broker.host, broker.port, "ecgmon-daemon", username="ecgmon-daemon",
                            password=USERS["ecgmon-daemon"], tls={"ca_certs": str(ca)})
        daemon.connect(timeout_s=5)
        for alarm in alarms:
            published(daemon.publish(TOPICS.alarms("bed-1"), alarm, qos=1))
        daemon.disconnect()
        # mosquitto 2.0 acknowledges a publish, then saves (a millisecond later, measured; a SIGKILL in between
        # loses the message, docs/deploy.md). So wait for the save, which the old `autosave_interval 30` only
        # made 30 s after the broker started.
        database = data / "mosquitto.db"
        wait_until(lambda: database.exists() and all(a in database.read_bytes() for a in alarms), 3,
                   "the alarms were not saved")
        broker.kill()
        assert not got
        broker.start()  # on the same persistence directory
        nurse = station(broker, ca, got, done, len(alarms))
        nurse.connect(timeout_s=5)
        try:
            assert done.wait(10), f"got {len(got)} of {len(alarms)} alarms after the crash"
            assert sorted(set(got)) == sorted(alarms)
        finally:
            nurse.disconnect()


@pytest.fixture()
def scratch() -> Iterator[Path]:
    """A scratch directory the user mosquitto may enter (pytest's tmp_path is private to its user)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mosquitto switches to the user mosquitto only when started as root")
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no user mosquitto (Debian's mosquitto package creates it)")
    base = Path(tempfile.mkdtemp(prefix="ecgmon-deploy-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def prepare_like_compose(base: Path, src: Path) -> tuple[Path, Path]:
    """Run compose.yaml's mosquitto-init step on directories standing for its volumes (made by root, as Docker
    makes a new volume)."""
    etc, data = base / "etc", base / "data"
    etc.mkdir()
    data.mkdir()
    service = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())["services"]["mosquitto-init"]
    assert service["entrypoint"] == ["/bin/sh", "-ec"] and service["user"] == "root"
    mounts = {mount.split(":")[1]: mount.split(":")[0] for mount in service["volumes"]}
    assert set(mounts) == {"/src", "/etc/mosquitto/ecgmon", "/var/lib/mosquitto"}
    script = (service["command"][0].replace("/etc/mosquitto/ecgmon", str(etc))
              .replace("/var/lib/mosquitto", str(data)).replace("/src/", f"{src}/"))
    subprocess.run(["/bin/sh", "-ec", script], check=True, capture_output=True)
    return etc, data


def prepare_like_systemd(base: Path, src: Path) -> tuple[Path, Path]:
    """Run the ExecStartPre= commands of the Debian drop-in, with the files in place (/etc/mosquitto/ecgmon)."""
    data = base / "data"
    dropin = (DEPLOY / "mosquitto.service.d" / "ecgmon.conf").read_text()
    assert "\nExecStart=/usr/sbin/mosquitto -c /etc/mosquitto/ecgmon/mosquitto.conf\n" in dropin
    commands = re.findall(r"^ExecStartPre=(.+)$", dropin, flags=re.MULTILINE)
    assert commands
    for command in commands:
        command = command.replace("/etc/mosquitto/ecgmon", str(src)).replace("/var/lib/mosquitto", str(data))
        subprocess.run(shlex.split(command), check=True, capture_output=True)
    return src, data


@pytest.mark.parametrize("prepare", [prepare_like_compose, prepare_like_systemd], ids=["compose", "systemd"])
def test_started_as_root_it_runs_as_mosquitto_and_persists(scratch: Path, certs: Path, prepare: Prepare) -> None:
    src = scratch / "src"
    write_broker_files(src, certs)
    for secret in (src / "passwords", src / "certs" / "server.key"):  # as make-passwords.sh and openssl leave them
        secret.chmod(0o600)
    etc, data = prepare(scratch, src)
    port = free_port()
    config = scratch / "mosquitto.conf"
    config.write_text(deploy_config(etc, port, data, keep_user=True))
    log = scratch / "mosquitto.log"
    with Mosquitto(config, port, log) as broker:  # reads the password file, ACL and TLS files as mosquitto
        assert broker.process is not None
        uid = pwd.getpwnam("mosquitto").pw_uid
        assert f"\nUid:\t{uid}\t" in Path(f"/proc/{broker.process.pid}/status").read_text()
        nurse = station(broker, etc / "certs" / "ca.crt", [], threading.Event(), 1)
        nurse.connect(timeout_s=5)  # a persistent session: a change, saved at once
        nurse.disconnect()
        database = data / "mosquitto.db"
        wait_until(lambda: database.exists() or "Error saving" in log.read_text(), 5, "no save")
        assert "Error saving" not in log.read_text()
        assert database.stat().st_uid == uid

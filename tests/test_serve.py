"""`ecgmon serve` as a real process: config checks, start-up failures, signals, last will, metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.broker import LocalBroker, free_port
from tests.conftest import T0, Collector, serve_command, wait_for_log, wait_online, wait_until, write_config
from tests.wire import binary_v1, json_v1

TOPICS = Topics("ecgmon")


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    good = write_config(tmp_path, mqtt={"port": 1884})
    ok = subprocess.run(serve_command(good, "--check-config"), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = write_config(tmp_path, mqtt={"port": 1884, "hostname": "x"}, alarms={"asystole_s": -1})
    res = subprocess.run(serve_command(bad, "--check-config"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "mqtt.hostname" in res.stderr and "alarms.asystole_s" in res.stderr


def test_signal_loss_must_come_before_eviction(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"signal_loss_s must be shorter than streams\.idle_evict_s"):
        load_config(write_config(tmp_path, streams={"idle_evict_s": 60}, alarms={"signal_loss_s": 60}))


def test_the_shipped_daemon_configs_validate() -> None:
    from pipeline.config import load_config

    configs = Path(__file__).resolve().parent.parent / "configs"
    assert load_config(configs / "daemon.yaml", env={}).source == "mqtt"
    cluster = load_config(configs / "daemon-cluster.yaml", env={"ECGMON_MQTT__CLIENT_ID": "ecgmon-2"})
    assert cluster.source == "rabbitmq" and cluster.state.path is None and cluster.mqtt.client_id == "ecgmon-2"


def test_each_compose_daemon_reads_and_publishes_through_its_own_node_first() -> None:
    from pipeline.config import load_config

    root = Path(__file__).resolve().parent.parent
    services = yaml.safe_load((root / "deploy/rabbitmq/compose.yaml").read_text())["services"]
    for k in (1, 2, 3):
        env = {name: str(value) for name, value in services[f"ecgmon-{k}"]["environment"].items()}
        config = load_config(root / "configs/daemon-cluster.yaml", env=env)
        assert config.rabbitmq.nodes[0] == f"rabbit{k}:5671"
        assert sorted(config.rabbitmq.nodes) == ["rabbit1:5671", "rabbit2:5671", "rabbit3:5671"]
        assert config.mqtt.client_id == config.rabbitmq.username == f"ecgmon-{k}"


def test_a_cluster_daemon_keeps_no_state_file(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"state\.path must be null with source: rabbitmq"):
        load_config(write_config(tmp_path, source="rabbitmq", state={"path": str(tmp_path / "state.bin")}),
                    env={})


def test_secrets_come_from_the_environment(tmp_path: Path) -> None:
    from pipeline.config import load_config

    config = load_config(write_config(tmp_path, mqtt={"username": "ecgmon"}),
                         {"ECGMON_MQTT__PASSWORD": "s3cret: 1", "ECGMON_MQTT__PORT": "8883"})
    assert config.mqtt.password is not None and config.mqtt.password.get_secret_value() == "s3cret: 1"
    assert config.mqtt.port == 8883 and "s3cret" not in repr(config)


@pytest.mark.parametrize("problem", ["missing_model", "no_broker"])
def test_start_up_failure_exits_non_zero(tmp_path: Path, problem: str) -> None:
    sections: dict[str, dict[str, object]] = {"mqtt": {"port": free_port()}, "metrics": {"port": None}}
    if problem == "missing_model":
        sections["model"] = {"path": str(tmp_path / "nope.onnx")}
    res = subprocess.run(serve_command(write_config(tmp_path, **sections)), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1
    assert ("model file not found" if problem == "missing_model" else "cannot reach MQTT broker") in res.stderr


def test_sigterm_drains_publishes_offline_and_exits_zero(serve_process: Callable[..., subprocess.Popen[str]],
                                                         publisher: MqttClient, collect: Callable[[str], Collector],
                                                         tmp_path: Path) -> None:
    status, beats = collect(TOPICS.status), collect(TOPICS.beats())
    metrics_port = free_port()
    proc = serve_process(metrics={"port": metrics_port})
    wait_online(status)
    rng = np.random.default_rng(0)
    for seq in range(20):
        publisher.publish(TOPICS.ecg("bed"), json_v1(seq, T0 + seq, 360.0, "MLII", rng.normal(0, 0.05, 360)), qos=1)
    wait_until(lambda: received(metrics_port) == 20)  # every window taken by the daemon before the signal
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert len(beats.wait_for(lambda d: len(d) == 20)) == 20  # in-flight windows were finished
    final = status.wait_for(lambda d: d[-1]["state"] == "offline")[-1]
    assert "reason" not in final  # published by the daemon itself, not the last will
    assert "shutting down gracefully" in (tmp_path / "serve-0.log").read_text()


def received(metrics_port: int) -> float:
    """The daemon's count of ECG window messages received (its metrics endpoint)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        found = re.search(r"^ecgmon_messages_in_total (\S+)$", response.read().decode(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_second_signal_cuts_the_drain_short_and_still_tears_down(
        serve_process: Callable[..., subprocess.Popen[str]], publisher: MqttClient,
        collect: Callable[[str], Collector], tmp_path: Path) -> None:
    status, beats = collect(TOPICS.status), collect(TOPICS.beats())
    # One window per model run and a long drain: the graceful stop is still draining at the second signal.
    proc = serve_process(batching={"max_batch": 1, "max_wait_ms": 0}, drain_timeout_s=60,
                         state={"path": str(tmp_path / "state.bin")})
    wait_online(status)
    window = binary_v1(0, T0, 360.0, "MLII", np.zeros(360, np.int16), 200.0)
    for device in range(4000):
        publisher.publish(TOPICS.ecg(f"bed-{device}"), window, qos=0)
    beats.wait_for(lambda d: len(d) >= 100)
    proc.send_signal(signal.SIGINT)
    wait_for_log(tmp_path / "serve-0.log", "shutting down gracefully")  # the first signal was handled
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert len(beats.docs()) < 4000
    final = status.wait_for(lambda d: d[-1]["state"] == "offline")[-1]
    assert "reason" not in final  # the daemon said so itself: the teardown ran
    assert (tmp_path / "state.bin").exists()  # and saved the state


def test_killed_daemon_leaves_its_last_will(serve_process: Callable[[], subprocess.Popen[str]],
                                            collect: Callable[[str], Collector]) -> None:
    status = collect(TOPICS.status)
    proc = serve_process()
    wait_online(status)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    will = status.wait_for(lambda d: d[-1]["state"] == "offline", timeout=30)[-1]
    assert will["reason"] == "connection lost"


def test_availability_is_retained(broker: LocalBroker, start_daemon: Callable[..., Daemon],
                                  collect: Callable[[str], Collector]) -> None:
    daemon = start_daemon()  # returns once it has announced itself
    late = collect(TOPICS.status)  # subscribes after the daemon announced itself
    assert late.wait_for(lambda d: bool(d))[-1] == {**late.docs()[-1], "state": "online"}
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "ecgmon_messages_in_total" in text and "ecgmon_window_latency_seconds_bucket" in text
    assert "ecgmon_result_delay_seconds_bucket" in text and "ecgmon_analysis_alive 1.0" in text


def test_alerts_command_prints_and_writes_json_lines(broker: LocalBroker, publisher: MqttClient,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "alarms.jsonl"
    still_open = {"alarm_id": "bed-8/tachycardia/900", "device": "bed-8", "type": "tachycardia",
                  "kind": "physiological", "priority": "medium", "state": "updated", "time": 950.0,
                  "message": "Tachycardia",
                  "evidence": {"heart_rate_bpm": 151.0, "raised_at": 900.0, "model_version": "x"}}
    info = publisher.publish(TOPICS.active("bed-8", "tachycardia"), json.dumps(still_open), qos=1, retain=True)
    info.wait_for_publish(timeout=10)  # raised before the alerts start: the broker keeps its last message
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "alerts", "--broker",
                             f"{broker.host}:{broker.port}", "--json-out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        alarm = {"alarm_id": "bed-7/asystole/1000", "device": "bed-7", "type": "asystole", "kind": "physiological",
                 "priority": "high", "state": "raised", "time": 1000.0, "message": "Asystole: no QRS detected",
                 "evidence": {"seconds_without_qrs": 4.2, "raised_at": 1000.0, "model_version": "x"}}
        deadline = time.monotonic() + 30
        while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
            publisher.publish_json(TOPICS.alarms("bed-7"), alarm, qos=1)  # until the subscriber is up
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    first = out.read_text().splitlines()[0]
    assert json.loads(first) == alarm
    assert "HIGH" in stdout and "raised" in stdout and "Asystole" in stdout and "seconds without qrs: 4.2" in stdout
    assert stdout.splitlines()[0].startswith("(open) ") and "bed-8" in stdout.splitlines()[0]  # before the events
    assert "bed-8" not in out.read_text()  # the JSON lines are the events


def test_password_from_a_file(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, load_config

    secret = tmp_path / "mqtt-password"
    secret.write_text("from-a-file\n")
    config = load_config(None, {"ECGMON_MQTT__PASSWORD_FILE": str(secret)})
    assert config.mqtt.secret() == "from-a-file"
    missing = load_config(None, {"ECGMON_MQTT__PASSWORD_FILE": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="password_file"):
        missing.mqtt.secret()

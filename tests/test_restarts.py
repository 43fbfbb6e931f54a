"""Connections that drop and daemons that restart: availability, queued windows and open alarms stay right."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.codec import encode_binary
from pipeline.daemon import Daemon
from pipeline.mqtt import MqttClient, Topics
from pipeline.tools.broker import LocalBroker
from pipeline.tools.records import load_record
from tests.conftest import T0, Collector, wait_online
from tests.tcp_proxy import TcpProxy

TOPICS = Topics("ecgmon")


def window(x_mv: np.ndarray, seq: int) -> bytes:
    adc = np.round(x_mv[seq * 360:(seq + 1) * 360] * 200).astype(np.int16)
    return encode_binary(seq, T0 + seq, 360.0, "MLII", adc, 200.0)


@pytest.fixture()
def proxy(broker: LocalBroker) -> Iterator[TcpProxy]:
    with TcpProxy(broker.host, broker.port) as p:
        yield p


def test_status_is_online_again_after_a_dropped_connection(proxy: TcpProxy, start_daemon: Callable[..., Daemon],
                                                          publisher: MqttClient,
                                                          collect: Callable[[str], Collector]) -> None:
    status, beats = collect(TOPICS.status), collect(TOPICS.beats())
    start_daemon(mqtt={"port": proxy.port, "reconnect_max_s": 1})
    wait_online(status)
    proxy.cut()  # the network drops the daemon's TCP connection: the broker publishes its last will
    status.wait_for(lambda d: d[-1] == {"state": "offline", "reason": "connection lost"})
    wait_online(status)  # reconnected through the proxy, and says so
    assert proxy.connections == 2
    publisher.publish(TOPICS.ecg("bed"), window(np.zeros(360), 0), qos=1)
    beats.wait_for(lambda d: len(d) == 1)


def test_restore_does_not_clear_the_signal_loss_of_a_silent_device(tmp_path: Path, publisher: MqttClient,
                                                                  start_daemon: Callable[..., Daemon],
                                                                  collect: Callable[[str], Collector]) -> None:
    alarms, stats = collect(TOPICS.alarms()), collect(TOPICS.stats)
    settings = {"state": {"path": str(tmp_path / "state.json.gz")}, "alarms": {"signal_loss_s": 1.5},
                "output": {"stats_interval_s": 0.1}}
    first = start_daemon(**settings)
    for seq in range(3):
        publisher.publish(TOPICS.ecg("bed"), window(np.zeros(3 * 360), seq), qos=1)
    alarms.wait_for(lambda d: [a["state"] for a in d if a["type"] == "signal_loss"] == ["raised"])
    first.stop()
    seen = len(stats.docs())
    start_daemon(**settings)
    stats.wait_for(lambda d: len(d) >= seen + 3)  # three housekeeping rounds of the restored daemon
    assert [a["state"] for a in alarms.docs() if a["type"] == "signal_loss"] == ["raised"]


def saturated(seq: int) -> bytes:
    adc = np.concatenate([np.zeros(300), np.full(60, 1400)]).astype(np.int16)  # 7 mV for 1/6 s
    return encode_binary(seq, T0 + seq, 360.0, "MLII", adc, 200.0)


def clean(seq: int) -> bytes:
    return window(np.random.default_rng(seq).normal(0, 0.05, (seq + 1) * 360), seq)


@pytest.mark.parametrize("state_file", [False, True])
def test_an_alarm_raised_before_a_crash_is_cleared_after_the_restart(
        state_file: bool, tmp_path: Path, serve_process: Callable[..., subprocess.Popen[str]], broker: LocalBroker,
        publisher: MqttClient, collect: Callable[[str], Collector]) -> None:
    """kill -9 right after an alarm was raised: with no state file, or with one saved before the alarm."""
    messages, status = collect("ecgmon/#"), collect(TOPICS.status)
    sections = {"state": {"path": str(tmp_path / "state.json.gz")}} if state_file else {}
    if state_file:  # a clean run saves the device's state (no alarm yet)
        proc = serve_process(**sections)
        wait_online(status)
        publisher.publish(TOPICS.ecg("bed"), clean(0), qos=1)
        messages.wait_for(lambda d: len(d) == 1, "/beats/")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    proc = serve_process(**sections)
    wait_online(status)
    publisher.publish(TOPICS.ecg("bed"), saturated(1), qos=1)
    raised = messages.wait_for(lambda d: any(a["state"] == "raised" for a in d), "/alarms/")[0]
    assert raised["type"] == "saturation"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    serve_process(**sections)
    cleared = messages.wait_for(lambda d: any(a["state"] == "cleared" for a in d), "/alarms/")[-1]
    assert cleared["alarm_id"] == raised["alarm_id"] and "restarted" in cleared["evidence"]["reason"]
    wait_online(status)
    reader = MqttClient(broker.host, broker.port, "reader")
    reader.connect()
    try:
        assert reader.read_retained("ecgmon/active/#", TOPICS.active_marker) == []  # no open alarm is left
    finally:
        reader.disconnect()


def test_a_graceful_restart_continues_its_open_alarms(tmp_path: Path,
                                                     serve_process: Callable[..., subprocess.Popen[str]],
                                                     publisher: MqttClient,
                                                     collect: Callable[[str], Collector]) -> None:
    messages, status = collect("ecgmon/#"), collect(TOPICS.status)
    state = {"state": {"path": str(tmp_path / "state.json.gz")}}
    proc = serve_process(**state)
    wait_online(status)
    publisher.publish(TOPICS.ecg("bed"), saturated(0), qos=1)
    raised = messages.wait_for(bool, "/alarms/")[0]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    serve_process(**state)
    wait_online(status)
    publisher.publish(TOPICS.ecg("bed"), clean(1), qos=1)  # clean again
    alarms = messages.wait_for(lambda d: len(d) == 2, "/alarms/")
    assert [(a["alarm_id"], a["state"]) for a in alarms] == [(raised["alarm_id"], "raised"),
                                                            (raised["alarm_id"], "cleared")]
    assert "reason" not in alarms[1]["evidence"]  # cleared by the signal, not by the restart


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_restart_loses_no_window_and_resets_no_device(physionet: Path, tmp_path: Path,
                                                       serve_process: Callable[..., subprocess.Popen[str]],
                                                       publisher: MqttClient,
                                                       collect: Callable[[str], Collector], protocol: str) -> None:
    """SIGTERM, 5 s down, start again: the broker kept the windows of the persistent session meanwhile, under
    either MQTT version."""
    messages, status = collect("ecgmon/#"), collect(TOPICS.status)
    x = load_record(physionet / "mitdb", "100").signal_mv
    n_windows = 120
    state = {"state": {"path": str(tmp_path / "state.json.gz")}, "mqtt": {"protocol": protocol}}
    proc = serve_process(**state)
    wait_online(status)
    def send() -> None:  # 10 windows a second, throughout
        for seq in range(n_windows):
            publisher.publish(TOPICS.ecg("bed"), window(x, seq), qos=1)
            time.sleep(0.1)

    sending = threading.Thread(target=send)
    sending.start()
    messages.wait_for(lambda d: len(d) >= 20, "/beats/")
    stopped = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    time.sleep(max(0.0, 5.0 - (time.monotonic() - stopped)))  # the restart takes 5 s; windows keep coming
    serve_process(**state)
    sending.join()
    beats = messages.wait_for(lambda d: len({b["seq"] for b in d}) == n_windows, "/beats/", timeout=60)
    assert sorted(b["seq"] for b in beats) == list(range(n_windows))  # each window analysed exactly once
    assert not [a for a in messages.docs("/alarms/") if a["type"] == "data_gap"]  # no device reset


def test_the_open_alarm_gauge_counts_restored_alarms_and_their_eviction(tmp_path: Path, publisher: MqttClient,
                                                                        start_daemon: Callable[..., Daemon],
                                                                        collect: Callable[[str], Collector]) -> None:
    alarms = collect(TOPICS.alarms())
    settings = {"state": {"path": str(tmp_path / "state.json.gz")}, "streams": {"idle_evict_s": 6.0},
                "alarms": {"signal_loss_s": 5.9}}  # the restart happens well inside the silence
    first = start_daemon(**settings)
    publisher.publish(TOPICS.ecg("bed"), saturated(0), qos=1)
    kind = alarms.wait_for(lambda d: len(d) == 1)[0]["type"]
    first.stop()
    second = start_daemon(**settings)
    assert second.metrics.registry.get_sample_value("ecgmon_active_alarms") == 1  # restored, still open
    docs = alarms.wait_for(lambda d: any(a["type"] == kind and a["state"] == "cleared" for a in d), timeout=20)
    evicted = next(a for a in docs if a["type"] == kind and a["state"] == "cleared")
    assert "evicted" in evicted["evidence"]["reason"]
    assert second.metrics.registry.get_sample_value("ecgmon_active_alarms") == 0

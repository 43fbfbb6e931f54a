"""Connections that drop and daemons that restart: availability, queued windows and open alarms stay right."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.broker import LocalBroker
from pipeline.tools.records import load_record
from tests.conftest import T0, Collector, stream_live, wait_online, wait_until
from tests.tcp_proxy import TcpProxy
from tests.wire import binary_v1

TOPICS = Topics("ecgmon")


def window(x_mv: np.ndarray, seq: int) -> bytes:
    adc = np.round(x_mv[seq * 360:(seq + 1) * 360] * 200).astype(np.int16)
    return binary_v1(seq, T0 + seq, 360.0, "MLII", adc, 200.0)


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
    settings = {"state": {"path": str(tmp_path / "state.bin")}, "alarms": {"signal_loss_s": 1.5},
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
    return binary_v1(seq, T0 + seq, 360.0, "MLII", adc, 200.0)


def clean(seq: int) -> bytes:
    return window(np.random.default_rng(seq).normal(0, 0.05, (seq + 1) * 360), seq)


@pytest.mark.parametrize("state_file", [False, True])
def test_a_crash_keeps_the_open_alarms_of_a_silent_device(
        state_file: bool, tmp_path: Path, serve_process: Callable[..., subprocess.Popen[str]], broker: LocalBroker,
        publisher: MqttClient, collect: Callable[[str], Collector]) -> None:
    """A device goes silent with an alarm open, its signal is lost, then kill -9 (no state file, or one saved after
    the loss): after the restart nothing is cleared until the device's data returns, and then by the rules."""
    messages, status = collect("ecgmon/#"), collect(TOPICS.status)
    sections: dict[str, Any] = {"alarms": {"signal_loss_s": 2}, "output": {"stats_interval_s": 0.2}}
    if state_file:
        sections["state"] = {"path": str(tmp_path / "state.bin"), "save_interval_s": 0.5}
    proc = serve_process(**sections)
    wait_online(status)
    publisher.publish(TOPICS.ecg("bed"), saturated(0), qos=1)
    alarms = messages.wait_for(lambda d: [a["type"] for a in d] == ["saturation", "signal_loss"], "/alarms/")
    if state_file:  # a save after the loss: two save intervals later
        messages.wait_for(lambda d: bool(d) and d[-1].get("unsaved_windows") == 0
                          and d[-1]["time"] > alarms[-1]["time"] + 2 * sections["state"]["save_interval_s"], "stats")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    seen = len(messages.docs("stats"))
    serve_process(**sections)
    # Two signal-loss times of the new process's housekeeping (its stats come after it) pass without a clear.
    messages.wait_for(lambda d: len(d) > seen + 20, "stats")
    assert [(a["type"], a["state"]) for a in messages.docs("/alarms/")] == [("saturation", "raised"),
                                                                          ("signal_loss", "raised")]
    assert messages.docs("stats")[-1]["dormant_devices"] == (0 if state_file else 1)
    publisher.publish(TOPICS.ecg("bed"), clean(1), qos=1)  # the device is back, clean
    back = messages.wait_for(lambda d: len(d) == 4, "/alarms/")
    assert sorted((a["alarm_id"], a["state"]) for a in back[2:]) == sorted((a["alarm_id"], "cleared") for a in alarms)
    assert all("reason" not in a["evidence"] for a in back)  # cleared by the signal, not by the restart
    reader = MqttClient(broker.host, broker.port, "reader")
    reader.connect()
    try:
        assert reader.read_retained("ecgmon/active/#", TOPICS.active_marker) == []  # no open alarm is left
    finally:
        reader.disconnect()


def test_a_device_that_went_silent_just_before_a_crash_gets_its_signal_loss(
        tmp_path: Path, serve_process: Callable[..., subprocess.Popen[str]], publisher: MqttClient,
        collect: Callable[[str], Collector]) -> None:
    """With the state file, a device silent for less than signal_loss_s at the kill is known after the restart."""
    messages, status = collect("ecgmon/#"), collect(TOPICS.status)
    sections = {"alarms": {"signal_loss_s": 4}, "output": {"stats_interval_s": 0.2},
                "state": {"path": str(tmp_path / "state.bin"), "save_interval_s": 0.5}}
    proc = serve_process(**sections)
    wait_online(status)
    for seq in range(3):
        publisher.publish(TOPICS.ecg("bed"), clean(seq), qos=1)
    messages.wait_for(lambda d: len(d) == 3, "/beats/")
    messages.wait_for(lambda d: bool(d) and d[-1].get("unsaved_windows") == 0 and d[-1]["active_streams"] == 1,
                      "stats")
    os.kill(proc.pid, signal.SIGKILL)  # well before its signal loss
    proc.wait(30)
    assert messages.docs("/alarms/") == []
    serve_process(**sections)
    lost = messages.wait_for(lambda d: len(d) == 1, "/alarms/", timeout=30)[0]
    assert (lost["device"], lost["type"], lost["state"]) == ("bed", "signal_loss", "raised")


def test_a_graceful_restart_continues_its_open_alarms(tmp_path: Path,
                                                     serve_process: Callable[..., subprocess.Popen[str]],
                                                     publisher: MqttClient,
                                                     collect: Callable[[str], Collector]) -> None:
    messages, status = collect("ecgmon/#"), collect(TOPICS.status)
    state = {"state": {"path": str(tmp_path / "state.bin")}}
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
    state = {"state": {"path": str(tmp_path / "state.bin")}, "mqtt": {"protocol": protocol}}
    proc = serve_process(**state)
    wait_online(status)
    sending = stream_live(publisher, ["bed"], [window(x, seq) for seq in range(n_windows)])  # 10 a second
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


def test_the_open_alarm_gauge_counts_restored_alarms_and_keeps_them_after_eviction(
        tmp_path: Path, publisher: MqttClient, start_daemon: Callable[..., Daemon],
        collect: Callable[[str], Collector]) -> None:
    alarms = collect(TOPICS.alarms())
    settings = {"state": {"path": str(tmp_path / "state.bin")}, "streams": {"idle_evict_s": 6.0},
                "alarms": {"signal_loss_s": 5.9}}  # the restart happens well inside the silence
    first = start_daemon(**settings)
    publisher.publish(TOPICS.ecg("bed"), saturated(0), qos=1)
    alarms.wait_for(lambda d: len(d) == 1)
    first.stop()
    second = start_daemon(**settings)
    assert second.metrics.registry.get_sample_value("ecgmon_active_alarms") == 1  # restored, still open
    alarms.wait_for(lambda d: len(d) == 2, timeout=20)  # its signal loss
    wait_until(lambda: second.stats().get("evicted") == 1)
    assert second.stats()["dormant_devices"] == 1
    assert second.metrics.registry.get_sample_value("ecgmon_active_alarms") == 2  # both still open
    assert [a["state"] for a in alarms.docs()] == ["raised", "raised"]

"""Overload and churn: bounded queues say so when they overflow; idle-device eviction keeps memory flat."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.broker import LocalBroker
from tests.conftest import T0, Collector, wait_online, wait_until
from tests.wire import binary_v1

TOPICS = Topics("ecgmon")


def test_overload_publishes_degraded_status_and_technical_alarms(publisher: MqttClient,
                                                                 start_daemon: Callable[..., Daemon],
                                                                 collect: Callable[[str], Collector]) -> None:
    messages = collect("ecgmon/#")
    daemon = start_daemon(streams={"queue_windows": 10}, batching={"max_batch": 4}, alarms={"overload_hold_s": 1})
    adc = (np.random.default_rng(0).normal(0, 0.1, 360) * 200).astype(np.int16)
    for seq in range(30):
        for device in range(40):
            publisher.publish(TOPICS.ecg(f"bed-{device}"), binary_v1(seq, T0 + seq, 360.0, "MLII", adc, 200.0),
                              qos=0)
    messages.wait_for(lambda d: any(s.get("degraded") is True for s in d), "status")
    raised = messages.wait_for(lambda d: any(a["type"] == "windows_dropped" for a in d), "alarms")
    alarm = next(a for a in raised if a["type"] == "windows_dropped")
    assert alarm["kind"] == "technical" and alarm["evidence"]["windows_dropped"] >= 1
    assert daemon.stats()["dropped_overload"] > 0
    beats = messages.wait_for(lambda d: len(d) + daemon.stats()["dropped_overload"] >= 1200, "beats")
    assert daemon.metrics.registry.get_sample_value("ecgmon_messages_in_total") == 1200  # dropped ones too
    assert len(beats) < 1200
    # Once the burst is over the daemon catches up, says so, and clears the alarms.
    messages.wait_for(lambda d: d[-1].get("degraded") is False and d[-1].get("state") == "online", "status")
    messages.wait_for(lambda d: any(a["type"] == "windows_dropped" and a["state"] == "cleared" for a in d), "alarms")


def test_idle_eviction_keeps_memory_flat_under_churn(publisher: MqttClient, start_daemon: Callable[..., Daemon],
                                                     collect: Callable[[str], Collector]) -> None:
    collect(TOPICS.beats())  # a subscriber takes the beats, as in service
    daemon = start_daemon(streams={"idle_evict_s": 1.0}, alarms={"signal_loss_s": 0.9}, output={"beats": True})
    window = binary_v1(0, T0, 360.0, "MLII", np.zeros(360, np.int16), 200.0)
    capacities = []
    for round_ in range(3):  # 2,000 devices appear once and vanish, three times over
        for device in range(2000):
            publisher.publish(TOPICS.ecg(f"r{round_}-{device}"), window, qos=1)  # none lost on the way
        expected = 2000 * (round_ + 1)
        # the daemon's own count: the beats go out at QoS 0, which the broker may drop on the way to a subscriber
        wait_until(lambda: daemon.stats().get("windows", 0) >= expected, timeout=60)  # noqa: B023 - used at once
        wait_until(lambda: daemon.stats()["active_streams"] == 0)  # evicted after 1 s of silence
        capacities.append(daemon.stats()["stream_slots"])
    assert capacities[0] == capacities[1] == capacities[2]  # slots are reused, not added
    assert daemon.stats()["evicted"] == 6000


def scrape(port: int) -> dict[str, float]:
    """The `ecgmon serve` process's Prometheus metrics: name{labels} -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


@pytest.mark.slow
def test_a_sustained_overload_loses_no_alarm_silently_and_leaves_the_open_alarms_right(
        tmp_path: Path, broker: LocalBroker, serve_process: Callable[..., subprocess.Popen[str]],
        collect: Callable[[str], Collector]) -> None:
    """20 s of several times what the daemon can analyse, at QoS 1: every alarm event it emits reaches a QoS 1
    subscriber or is counted lost, and afterwards the retained open alarms are exactly the daemon's open alarms."""
    events, status = collect(TOPICS.alarms()), collect(TOPICS.status)
    stats = collect(TOPICS.stats)
    proc = serve_process(streams={"queue_windows": 100}, batching={"max_batch": 8},
                         alarms={"overload_hold_s": 2, "signal_loss_s": 30}, output={"stats_interval_s": 1})
    wait_online(status)
    port = yaml.safe_load((tmp_path / "daemon.yaml").read_text())["metrics"]["port"]
    adc = (np.random.default_rng(0).normal(0, 0.1, 360) * 200).astype(np.int16)
    publisher = MqttClient(broker.host, broker.port, "overload-publisher")
    publisher.connect()
    try:
        end, seq = time.monotonic() + 20.0, 0
        while time.monotonic() < end:  # 200 devices as fast as the broker takes them
            for device in range(200):
                publisher.publish_tracked(TOPICS.ecg(f"bed-{device}"),
                                          binary_v1(seq, T0 + seq, 360.0, "MLII", adc, 200.0))
            seq += 1
            publisher.wait_acknowledged(30)
    finally:
        publisher.disconnect()
    assert any(s.get("degraded") for s in stats.docs()), "the daemon was overloaded"
    # Caught up: not degraded, every alarm message acknowledged by the broker, then one stats message more.
    caught_up = stats.wait_for(lambda d: len(d) > 2 and not d[-2]["degraded"] and d[-2]["alarms_pending"] == 0
                               and not d[-1]["degraded"] and d[-1]["alarms_pending"] == 0, timeout=120)[-1]
    metrics = scrape(port)
    emitted = sum(v for k, v in metrics.items() if k.startswith("ecgmon_alarm_events_total{"))
    received = events.docs()
    assert emitted > 0 and len(received) + caught_up["alarms_lost"] == emitted
    open_now: dict[tuple[str, str], str] = {}
    for a in received:  # the subscriber's view, in order
        if a["state"] == "cleared":
            open_now.pop((a["device"], a["type"]), None)
        else:
            open_now[(a["device"], a["type"])] = a["alarm_id"]
    reader = MqttClient(broker.host, broker.port, "reader")
    reader.connect()
    try:
        retained = [json.loads(p) for _, p in reader.read_retained("ecgmon/active/#", TOPICS.active_marker)]
    finally:
        reader.disconnect()
    assert {(a["device"], a["type"]): a["alarm_id"] for a in retained} == open_now
    assert len(open_now) == metrics["ecgmon_active_alarms"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0

"""Overload and churn: bounded queues say so when they overflow; idle-device eviction keeps memory flat."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.codec import encode_binary
from pipeline.daemon import Daemon
from pipeline.mqtt import MqttClient, Topics
from tests.conftest import T0, Collector, wait_until

TOPICS = Topics("ecgmon")


def test_overload_publishes_degraded_status_and_technical_alarms(publisher: MqttClient,
                                                                 start_daemon: Callable[..., Daemon],
                                                                 collect: Callable[[str], Collector]) -> None:
    messages = collect("ecgmon/#")
    daemon = start_daemon(streams={"queue_windows": 10}, batching={"max_batch": 4}, alarms={"overload_hold_s": 1})
    adc = (np.random.default_rng(0).normal(0, 0.1, 360) * 200).astype(np.int16)
    for seq in range(30):
        for device in range(40):
            publisher.publish(TOPICS.ecg(f"bed-{device}"), encode_binary(seq, T0 + seq, 360.0, "MLII", adc, 200.0),
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
    window = encode_binary(0, T0, 360.0, "MLII", np.zeros(360, np.int16), 200.0)
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

"""mosquitto restarted mid-stream: the daemon reconnects, resubscribes, and no alarm is lost."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.config import DaemonConfig
from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.broker import LocalBroker, free_port
from pipeline.tools.records import load_record
from tests.conftest import T0, wait_until
from tests.wire import binary_v1

TOPICS = Topics("ecgmon")


def test_a_device_silent_across_a_broker_restart_is_alarmed_once_the_daemon_can_see_again(physionet: Path,
                                                                                          tmp_path: Path) -> None:
    """While the broker is down the daemon cannot tell a silent device from its own lost link: no signal loss then;
    once the link is back and proven, the device still silent gets it, delivered to the nurse's session."""
    port = free_port()
    config = (f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
              f"persistence_location {tmp_path}/\nmax_queued_messages 100000\n")
    broker = LocalBroker(port=port, config=config).start()
    daemon = Daemon(DaemonConfig.model_validate({
        "mqtt": {"host": broker.host, "port": port, "reconnect_max_s": 2},
        "metrics": {"port": None}, "alarms": {"signal_loss_s": 1.5}}))
    assert daemon.start()
    alarms: list[dict[str, object]] = []
    nurse = MqttClient(broker.host, port, "nurse", session_expiry_s=3600, reconnect_max_s=2)
    nurse.connect()
    nurse.subscribe(TOPICS.alarms(), lambda t, p: alarms.append(json.loads(p)), qos=1)
    sensor = MqttClient(broker.host, port, "sensor", reconnect_max_s=2)
    sensor.connect()
    x = load_record(physionet / "mitdb", "100").signal_mv
    adc = np.round(x * 200).astype(np.int16)

    def send(seqs: range) -> None:
        for seq in seqs:
            sensor.publish(TOPICS.ecg("bed"), binary_v1(seq, T0 + seq, 360.0, "MLII",
                                                            adc[seq * 360:(seq + 1) * 360], 200.0), qos=1)

    def signal_loss_raised() -> float | None:  # counted by the daemon when raised, delivered or not
        return daemon.metrics.registry.get_sample_value(
            "ecgmon_alarm_events_total", {"type": "signal_loss", "state": "raised"})

    try:
        send(range(5))
        wait_until(lambda: daemon.stats().get("windows") == 5)
        broker.stop()  # the broker goes away; the device's data with it
        wait_until(lambda: daemon.stats().get("reconnects", 0) >= 1)
        time.sleep(3.0)  # the outage lasts twice signal_loss_s (a duration of the scenario, not a synchronisation)
        assert not daemon.connected and signal_loss_raised() is None
        broker = LocalBroker(port=port, config=config).start()
        wait_until(lambda: any(a["type"] == "signal_loss" for a in alarms))  # queued for the nurse, delivered
        assert [a["state"] for a in alarms if a["type"] == "signal_loss"][:1] == ["raised"]
        assert daemon.stats()["reconnects"] >= 1
        send(range(5, 10))  # the device is back: the daemon resubscribed and analyses it again
        wait_until(lambda: any(a["type"] == "signal_loss" and a["state"] == "cleared" for a in alarms))
        assert [a["state"] for a in alarms if a["type"] == "signal_loss"] == ["raised", "cleared"]
    finally:
        for c in (nurse, sensor):
            c.disconnect()
        daemon.stop()
        broker.stop()

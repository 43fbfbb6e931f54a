"""Staff acknowledgements of alarms (`ecgmon/acks/<device>`): recorded in the alarm, published in its next event,
kept across a restart; malformed or stale ones rejected with a reason while the daemon goes on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from tests.conftest import T0, Collector
from tests.wire import binary_v1

TOPICS = Topics("ecgmon")


def window(seq: int, flat: bool) -> bytes:
    """One second at 360 Hz of a flat line (leads off) or of noise with some amplitude."""
    adc = np.zeros(360) if flat else np.random.default_rng(seq).normal(0, 0.3, 360) * 200
    return binary_v1(seq, T0 + seq, 360.0, "MLII", np.round(adc).astype(np.int16), 200.0)


def ack(publisher: MqttClient, device: str, doc: dict[str, Any]) -> None:
    publisher.publish(TOPICS.acks(device), json.dumps(doc).encode(), qos=1)


def raise_leads_off(publisher: MqttClient, messages: Collector, device: str) -> dict[str, Any]:
    for seq in range(12):
        publisher.publish(TOPICS.ecg(device), window(seq, flat=True), qos=1)
    return messages.wait_for(lambda d: any(a["type"] == "leads_off" for a in d), TOPICS.alarms(device))[0]


def test_acknowledgement_is_recorded_published_and_kept_across_a_restart(
        publisher: MqttClient, start_daemon: Callable[..., Daemon], collect: Callable[[str], Collector],
        tmp_path: Path) -> None:
    messages = collect("ecgmon/#")
    state = {"state": {"path": str(tmp_path / "state.json")}}
    daemon = start_daemon(**state)
    raised = raise_leads_off(publisher, messages, "bed1")
    assert raised["state"] == "raised" and raised["acknowledged"] is None
    ack(publisher, "bed1", {"alarm_id": raised["alarm_id"], "action": "silence", "by": "nurse-ana"})
    updated = messages.wait_for(lambda d: any(a["acknowledged"] for a in d), TOPICS.alarms("bed1"))[-1]
    assert updated["alarm_id"] == raised["alarm_id"] and updated["state"] == "updated"
    acknowledged = updated["acknowledged"]
    assert acknowledged["by"] == "nurse-ana"
    assert acknowledged["silenced_until"] == acknowledged["at"] + 120.0
    daemon.stop()

    start_daemon(**state)  # restored from the state file: the signal returns and clears the alarm
    for seq in range(12, 30):
        publisher.publish(TOPICS.ecg("bed1"), window(seq, flat=False), qos=1)
    def leads_off_cleared(alarms: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [a for a in alarms if a["alarm_id"] == raised["alarm_id"] and a["state"] == "cleared"]

    cleared = leads_off_cleared(messages.wait_for(lambda d: bool(leads_off_cleared(d)), TOPICS.alarms("bed1")))
    assert len(cleared) == 1 and cleared[0]["acknowledged"] == acknowledged  # other alarms may follow it


def test_bad_and_stale_acknowledgements_are_rejected_and_the_daemon_goes_on(
        publisher: MqttClient, start_daemon: Callable[..., Daemon], collect: Callable[[str], Collector]) -> None:
    messages = collect("ecgmon/#")
    daemon = start_daemon()
    raised = raise_leads_off(publisher, messages, "bed2")
    ack(publisher, "bed2", {"alarm_id": raised["alarm_id"], "action": "mute forever", "by": "nurse-ana"})
    ack(publisher, "bed3", {"alarm_id": raised["alarm_id"], "action": "acknowledge", "by": "nurse-ana"})  # not bed3's
    ack(publisher, "bed2", {"alarm_id": raised["alarm_id"], "action": "acknowledge", "by": "nurse-ana"})
    assert messages.wait_for(bool, TOPICS.errors("bed2"))[0]["reason"] == "bad_ack"
    assert messages.wait_for(bool, TOPICS.errors("bed3"))[0]["reason"] == "unknown_alarm"
    updated = messages.wait_for(lambda d: any(a["acknowledged"] for a in d), TOPICS.alarms("bed2"))[-1]
    assert updated["acknowledged"]["silenced_until"] is None
    assert daemon.stats()["acknowledged"] == 1 and daemon.analysis_alive
    assert daemon.metrics.registry.get_sample_value("ecgmon_messages_rejected_total", {"reason": "bad_ack"}) == 1

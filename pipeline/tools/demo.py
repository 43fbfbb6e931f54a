"""`ecgmon demo`: the whole product on one machine, with embedded defaults.

Starts a local broker, the daemon with the shipped model, an alarm printer, and replays a
MIT-BIH record as a live device with both its leads; alarms are printed as they happen. Part-way through, the
second lead's electrode comes off for a while (a flat line): the daemon raises `lead_fault` naming it and keeps
monitoring the patient on the first lead.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np

from pipeline.config import DaemonConfig, MetricsConfig, MqttConfig
from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.alerts import AlarmPrinter
from pipeline.tools.broker import local_broker
from pipeline.tools.replay import ReplayPlan, ReplaySignal, load_signals, replay

log = logging.getLogger(__name__)
LEAD_OFF_S = (40.0, 70.0)  # when the demo's second lead is off (s since the record's start)


def lead_off(signal: ReplaySignal, lead: int, start_s: float, end_s: float) -> ReplaySignal:
    """`signal` with lead `lead` (index) held at its baseline (0 mV: electrode off) from `start_s` to `end_s`."""
    if lead >= len(signal.leads):
        return signal
    adc = signal.adc.copy()
    adc[lead, round(start_s * signal.fs):round(end_s * signal.fs)] = signal.baseline[lead]
    return dataclasses.replace(signal, adc=adc.astype(np.int16))


def run_demo(records: list[str], physionet_dir: Path, speed: float, duration_s: float | None,
             encoding: str) -> int:
    """Run broker, daemon, printer and replay; return the number of alarm events printed."""
    signals = [lead_off(s, 1, *LEAD_OFF_S) for s in load_signals(records, physionet_dir, None)]
    with local_broker() as broker:
        config = DaemonConfig(mqtt=MqttConfig(host=broker.host, port=broker.port),
                              metrics=MetricsConfig(port=0))
        daemon = Daemon(config)
        if not daemon.start():
            raise SystemExit("daemon failed to start")
        topics = Topics(config.mqtt.topic_prefix)
        printer = AlarmPrinter(sys.stdout)
        watcher = MqttClient(broker.host, broker.port, "ecgmon-demo-alerts")
        watcher.connect()
        printer.attach(watcher, topics)
        publisher = MqttClient(broker.host, broker.port, "ecgmon-demo-replay")
        publisher.connect()
        try:
            log.info("replaying %s (leads %s) at %gx real time; lead 2 off from %g to %g s", ", ".join(
                s.name for s in signals), ", ".join(signals[0].leads), speed, *LEAD_OFF_S)
            replay(publisher, topics, signals, ReplayPlan(devices=len(signals), speed=speed, duration_s=duration_s,
                                                          encoding=encoding))
        finally:
            publisher.disconnect()
            daemon.stop()
            watcher.disconnect()
    return printer.count

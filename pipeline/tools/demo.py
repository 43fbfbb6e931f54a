"""`ecgmon demo`: the whole product on one machine, with embedded defaults.

Starts a local broker, the daemon with the shipped model, an alarm printer, and replays a
MIT-BIH record as a live device; alarms are printed as they happen.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.config import DaemonConfig, MetricsConfig, MqttConfig
from pipeline.daemon import Daemon
from pipeline.mqtt import MqttClient, Topics
from pipeline.tools.alerts import AlarmPrinter
from pipeline.tools.broker import local_broker
from pipeline.tools.replay import ReplayPlan, load_signals, replay

log = logging.getLogger(__name__)


def run_demo(records: list[str], physionet_dir: Path, speed: float, duration_s: float | None,
             encoding: str) -> int:
    """Run broker, daemon, printer and replay; return the number of alarm events printed."""
    signals = load_signals(records, physionet_dir, "MLII")
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
            log.info("replaying %s at %gx real time", ", ".join(s.name for s in signals), speed)
            replay(publisher, topics, signals, ReplayPlan(devices=len(signals), speed=speed, duration_s=duration_s,
                                                          encoding=encoding))
        finally:
            publisher.disconnect()
            daemon.stop()
            watcher.disconnect()
    return printer.count

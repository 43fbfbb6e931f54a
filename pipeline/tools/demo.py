"""`ecgmon demo`: the whole product on one machine, with embedded defaults.

Starts a local broker, the daemon with the shipped model, an alarm printer, the central station (its address and
a one-time staff login printed), and replays PhysioNet records as live devices with every lead they have; alarms
are printed as they happen and shown on the station's page. Part-way through, the second lead's electrode comes off
for a while (a flat line): the daemon raises `lead_fault` naming it and keeps monitoring the patient on the first
lead. With `screenshots`, the station's bed wall and a review strip are photographed at the end (the README's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

from pipeline.config import DaemonConfig, MetricsConfig, MqttConfig
from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.alerts import AlarmPrinter
from pipeline.tools.broker import local_broker
from pipeline.tools.replay import ReplayPlan, ReplaySignal, load_signals, replay

log = logging.getLogger(__name__)
LEAD_OFF_S = (40.0, 70.0)  # when the demo's second lead is off (s since the record's start)
STATION_PORT = 8080  # the station's page, where free (else any free port)
DEMO_USER = "demo"
SHOT_ALARM = "ventricular_fibrillation"  # the alarm the screenshots show (cu01's VF)


@dataclasses.dataclass
class DemoStation:
    url: str
    password: str


@contextlib.contextmanager
def demo_station(host: str, port: int, page_port: int, tmp: Path, out: TextIO) -> Iterator[DemoStation | None]:
    """The central station on the demo's broker, with a one-time password for the login `demo`, its address written
    to `out` (None, with a warning, where the station's extra is not installed)."""
    try:
        from pipeline.tools.station.app import Station
        from pipeline.tools.station.config import StationConfig, StationMqttConfig
        from pipeline.tools.station.users import set_user
    except ImportError as err:
        log.warning("no central station (%s): pip install -e '.[station]'", err)
        yield None
        return
    password = secrets.token_urlsafe(9)
    set_user(tmp / "users", DEMO_USER, password)
    mqtt = StationMqttConfig(host=host, port=port, client_id="ecgmon-demo-station", username=None)
    station = None
    for candidate in (page_port, 0):
        try:
            station = Station(StationConfig(port=candidate, users_file=tmp / "users", mqtt=mqtt))
            station.start()
            break
        except OSError:
            continue
    if station is None:
        raise SystemExit("the central station could not start")
    out.write(f"central station: {station.url} (login {DEMO_USER}, password {password})\n")
    out.flush()
    try:
        yield DemoStation(station.url, password)
    finally:
        station.stop()


def lead_off(signal: ReplaySignal, lead: int, start_s: float, end_s: float) -> ReplaySignal:
    """`signal` with lead `lead` (index) held at its baseline (0 mV: electrode off) from `start_s` to `end_s`."""
    if lead >= len(signal.leads):
        return signal
    adc = signal.adc.copy()
    adc[lead, round(start_s * signal.fs):round(end_s * signal.fs)] = signal.baseline[lead]
    return dataclasses.replace(signal, adc=adc.astype(np.int16))


def run_demo(records: list[str], physionet_dir: Path, speed: float, duration_s: float | None,
             encoding: str, station_port: int = STATION_PORT, screenshots: Path | None = None) -> int:
    """Run broker, daemon, printer, station and replay; return the number of alarm events printed."""
    signals = [lead_off(s, 1, *LEAD_OFF_S) for s in load_signals(records, physionet_dir, None)]
    with local_broker() as broker, tempfile.TemporaryDirectory() as tmp, \
            demo_station(broker.host, broker.port, station_port, Path(tmp), sys.stdout) as station:
        config = DaemonConfig(mqtt=MqttConfig(host=broker.host, port=broker.port),
                              metrics=MetricsConfig(port=0))
        daemon = Daemon(config)
        if not daemon.start():
            raise SystemExit("daemon failed to start")
        topics = Topics(config.mqtt.topic_prefix)
        shot_when = threading.Event()  # the screenshots' moment: VF raised, while the ECG still flows
        printer = AlarmPrinter(sys.stdout, on_alarm=lambda doc: shot_when.set() if (
            doc.get("type") == SHOT_ALARM and doc.get("state") == "raised") else None)
        watcher = MqttClient(broker.host, broker.port, "ecgmon-demo-alerts")
        watcher.connect()
        printer.attach(watcher, topics)
        publisher = MqttClient(broker.host, broker.port, "ecgmon-demo-replay")
        publisher.connect()
        try:
            log.info("replaying %s (leads %s) at %gx real time; lead 2 off from %g to %g s", ", ".join(
                s.name for s in signals), ", ".join(signals[0].leads), speed, *LEAD_OFF_S)
            plan = ReplayPlan(devices=len(signals), speed=speed, duration_s=duration_s, encoding=encoding)
            replayer = threading.Thread(target=replay, args=(publisher, topics, signals, plan), name="demo-replay")
            replayer.start()
            if screenshots is not None and station is not None and shot_when.wait(timeout=3600):
                from pipeline.tools.station.shots import take_screenshots

                take_screenshots(station.url, DEMO_USER, station.password, screenshots, SHOT_ALARM)
            replayer.join()
        finally:
            publisher.disconnect()
            daemon.stop()
            watcher.disconnect()
    return printer.count

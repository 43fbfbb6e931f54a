"""The central station in a real browser (Debian's chromium, headless, through Playwright) against a real broker, a
real daemon and a replayed MIT-BIH record: login, tiles and traces, alarms within 2 s, acknowledge from the page
back through the daemon, review strips, and a device that stops."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from pipeline.config import DaemonConfig, MetricsConfig, MqttConfig
from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.broker import LocalBroker
from pipeline.tools.replay import ReplayPlan, load_signals, replay
from pipeline.tools.station.app import Station
from pipeline.tools.station.config import StationConfig, StationMqttConfig
from pipeline.tools.station.users import set_user
from tests.conftest import T0
from tests.wire import binary_v1

TOPICS = Topics("ecgmon")
USER, PASSWORD = "nurse-ana", "correct horse"
SIGNAL_LOSS_S = 3.0  # the daemon's alarms.signal_loss_s and the station's silent_s here


@dataclass
class Alarms:
    """Every alarm message on the broker, with when it arrived (s, monotonic)."""

    seen: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def on(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.seen.append((time.monotonic(), json.loads(payload)))
            self.cond.notify_all()

    def wait(self, predicate: Callable[[float, dict[str, Any]], bool], timeout: float = 60.0
             ) -> tuple[float, dict[str, Any]]:
        """The first message (arrival time, document) for which `predicate(arrival, doc)` holds."""
        with self.cond:
            assert self.cond.wait_for(lambda: any(predicate(t, d) for t, d in self.seen), timeout), self.seen[-3:]
            return next((t, d) for t, d in self.seen if predicate(t, d))


@dataclass
class Ward:
    broker: LocalBroker
    station: Station
    alarms: Alarms
    publisher: MqttClient


@pytest.fixture(scope="module")
def ward(tmp_path_factory: pytest.TempPathFactory, physionet: Path) -> Iterator[Ward]:
    """Broker, daemon, station and a replay of MIT-BIH 200 (both leads, 4x real time) running for the module."""
    users = tmp_path_factory.mktemp("station") / "users"
    set_user(users, USER, PASSWORD)
    signals = load_signals(["mitdb/200"], physionet, None)
    with LocalBroker() as broker:
        mqtt = MqttConfig(host=broker.host, port=broker.port)
        daemon = Daemon(DaemonConfig(mqtt=mqtt, metrics=MetricsConfig(port=0),
                                     alarms={"signal_loss_s": SIGNAL_LOSS_S}))
        assert daemon.start()
        station = Station(StationConfig(port=0, users_file=users, silent_s=SIGNAL_LOSS_S,
                                        mqtt=StationMqttConfig(host=broker.host, port=broker.port, username=None)))
        station.start()
        alarms = Alarms()
        watcher = MqttClient(broker.host, broker.port, "test-alarms")
        watcher.subscribe(TOPICS.alarms(), alarms.on, qos=1)
        watcher.connect()
        publisher = MqttClient(broker.host, broker.port, "test-replay")
        publisher.connect()
        stop = threading.Event()
        replayer = threading.Thread(target=replay, args=(publisher, TOPICS, signals,
                                                         ReplayPlan(speed=4.0, duration_s=600.0), stop))
        replayer.start()
        try:
            yield Ward(broker, station, alarms, publisher)
        finally:
            stop.set()
            replayer.join()
            publisher.disconnect()
            watcher.disconnect()
            station.stop()
            daemon.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium is not None, "the station's tests need Debian's chromium (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


def logged_in(browser: Browser, ward: Ward) -> Page:
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    page.goto(ward.station.url)
    page.fill("#user", USER)
    page.fill("#password", PASSWORD)
    page.click("#submit")
    page.wait_for_selector(".tile")
    return page


def test_a_station_logged_out_shows_nothing(browser: Browser, ward: Ward) -> None:
    page = browser.new_page()
    page.goto(ward.station.url)
    assert page.url.endswith("/login") and page.locator(".tile").count() == 0
    page.fill("#user", USER)
    page.fill("#password", "wrong password")
    page.click("#submit")
    page.wait_for_selector("#failed:not([hidden])")
    closed = page.evaluate("""() => new Promise((done) => {
        const ws = new WebSocket(`ws://${location.host}/ws`);
        ws.onmessage = () => done("data");
        ws.onclose = (e) => done(e.code);
    })""")
    assert closed == 1008
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(ward.station.url + "api/review/mitdb-200%2Fpvc_burden%2F1")
    assert refused.value.code == 401
    refused.value.close()
    page.close()


def test_tiles_render_their_traces_advance_and_alarms_appear_within_2_s(browser: Browser, ward: Ward) -> None:
    page = logged_in(browser, ward)
    tile = page.locator('.tile[data-device="mitdb-200"]')
    tile.wait_for()
    page.wait_for_function("() => document.querySelector('.tile').dataset.playhead !== undefined")
    first = float(tile.get_attribute("data-playhead") or 0)
    page.wait_for_function(f"() => parseFloat(document.querySelector('.tile').dataset.playhead) > {first + 0.5}")
    assert tile.locator(".lead option").all_inner_texts() == ["MLII", "V1"]

    opened = time.monotonic()  # an alarm raised from now on reaches the open page as an update
    published, raised = ward.alarms.wait(lambda t, d: t > opened and d["state"] == "raised")
    remaining_ms = max(0.0, 2.0 - (time.monotonic() - published)) * 1000
    page.select_option("#filter-state", "")  # every event
    page.wait_for_selector(f'#alarms tr[data-alarm-id="{raised["alarm_id"]}"]', timeout=remaining_ms + 1)
    assert tile.get_attribute("data-priority") in ("high", "medium", "low")
    page.close()


def test_acknowledge_from_the_page_comes_back_in_the_alarms_next_event(browser: Browser, ward: Ward) -> None:
    page = logged_in(browser, ward)
    page.wait_for_selector("#alarms tr button.acknowledge")  # an open alarm
    alarm_id = page.locator("#alarms tr:has(button.acknowledge)").first.get_attribute("data-alarm-id")
    row = page.locator(f'#alarms tr[data-alarm-id="{alarm_id}"]')
    row.locator("button.acknowledge").click()
    _, updated = ward.alarms.wait(lambda t, d: d["alarm_id"] == alarm_id and d["acknowledged"] is not None,
                                  timeout=10.0)
    assert updated["acknowledged"]["by"] == USER and updated["acknowledged"]["silenced_until"] is None
    page.wait_for_selector(f'#alarms tr[data-alarm-id="{alarm_id}"] .acked')

    row.click()  # the review strip: every lead, the beats marked
    page.wait_for_selector("#review[open] canvas.strip")
    assert page.locator("#review canvas.strip").count() == 2
    assert int(page.get_attribute("#review", "data-beats") or 0) > 5
    page.close()


def test_a_device_that_stops_shows_no_signal_within_the_signal_loss_time(browser: Browser, ward: Ward) -> None:
    page = logged_in(browser, ward)
    for seq in range(3):
        ward.publisher.publish(TOPICS.ecg("bed-stops"), _window(seq), qos=1)
    tile = page.locator('.tile[data-device="bed-stops"]')
    tile.wait_for()
    stopped = time.monotonic()
    page.wait_for_selector('.tile[data-device="bed-stops"][data-silent="true"]',
                           timeout=(SIGNAL_LOSS_S + 1.5) * 1000)
    assert time.monotonic() - stopped <= SIGNAL_LOSS_S + 1.5
    assert "NO SIGNAL" in tile.inner_text()
    page.close()


def _window(seq: int) -> bytes:
    """One second of a 1 mV sine at 360 Hz."""
    adc = np.round(np.sin(np.arange(360) / 20.0) * 200).astype(np.int16)
    return binary_v1(seq, T0 + seq, 360.0, "II", adc, 200.0)


def test_a_daemon_gone_offline_and_a_lost_broker_fill_the_page_with_a_banner(browser: Browser, tmp_path: Path) -> None:
    users = tmp_path / "users"
    set_user(users, USER, PASSWORD)
    broker = LocalBroker().start()
    station = Station(StationConfig(port=0, users_file=users,
                                    mqtt=StationMqttConfig(host=broker.host, port=broker.port, username=None)))
    try:
        daemon = Daemon(DaemonConfig(mqtt=MqttConfig(host=broker.host, port=broker.port),
                                     metrics=MetricsConfig(port=None)))
        assert daemon.start()
        station.start()
        page = browser.new_page()
        page.goto(station.url)
        page.fill("#user", USER)
        page.fill("#password", PASSWORD)
        page.click("#submit")
        page.wait_for_selector("#who:has-text('nurse-ana')")
        assert page.locator("#banners .banner").count() == 0
        daemon.stop()  # its goodbye: status offline
        page.wait_for_selector("#banners .banner[data-kind=daemon]", timeout=10_000)
        broker.stop()
        page.wait_for_selector("#banners .banner[data-kind=broker]", timeout=10_000)
        assert "LOST THE BROKER" in page.inner_text("#banners")
        page.close()
    finally:
        station.stop()
        broker.stop()

"""Analysis never stops silently: poison input, internal errors, stalls and a dead worker are all visible."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from pipeline.config import DaemonConfig
from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.process.serve import EXIT_ANALYSIS_FAILED, serve
from tests.conftest import T0, Collector
from tests.seam import MemorySink, MemorySource
from tests.wire import binary_v1

TOPICS = Topics("ecgmon")
NESTED = b'{"a":' * 1000 + b"1" + b"}" * 1000  # 6 KB: deeper than Python's recursion limit


def window(seq: int) -> bytes:
    adc = np.round(np.random.default_rng(seq).normal(0, 0.05, 360) * 200).astype(np.int16)
    return binary_v1(seq, T0 + seq, 360.0, "MLII", adc, 200.0)


def test_deeply_nested_json_is_rejected_and_analysis_goes_on(publisher: MqttClient,
                                                            start_daemon: Callable[..., Daemon],
                                                            collect: Callable[[str], Collector]) -> None:
    messages = collect("ecgmon/#")
    daemon = start_daemon()
    for seq in range(6):
        publisher.publish(TOPICS.ecg("x"), NESTED, qos=1)
        publisher.publish(TOPICS.ecg("bed"), window(seq), qos=1)
    beats = messages.wait_for(lambda d: len(d) == 6, TOPICS.beats("bed"))
    assert [d["seq"] for d in beats] == list(range(6))
    error = messages.wait_for(bool, TOPICS.errors("x"))[0]
    assert error["reason"] == "bad_json" and "nested" in error["detail"]
    assert daemon.metrics.registry.get_sample_value("ecgmon_messages_rejected_total", {"reason": "bad_json"}) == 6
    assert daemon.analysis_alive and daemon.stats()["analysis_alive"] is True


@pytest.fixture()
def memory_daemon() -> Iterator[Callable[..., tuple[Daemon, MemorySource, MemorySink]]]:
    made: list[Daemon] = []

    def make(sink: MemorySink, **overrides: object) -> tuple[Daemon, MemorySource, MemorySink]:
        config = DaemonConfig.model_validate({"metrics": {"port": 0}, **overrides})
        source = MemorySource()
        made.append(Daemon(config, source, sink))
        assert made[-1].start()
        return made[-1], source, sink

    yield make
    for d in made:
        d.stop()


def test_an_internal_error_rejects_only_the_windows_concerned(
        memory_daemon: Callable[..., tuple[Daemon, MemorySource, MemorySink]]) -> None:
    def on_beats(device: str) -> None:
        if device == "poison":
            raise ValueError("a bug in the output path")

    daemon, source, sink = memory_daemon(MemorySink(on_beats))
    for seq in range(5):
        source.send("poison", window(seq))
        source.send("good", window(seq))
    sink.wait_for("beats", lambda d: len([b for b in d if b["device"] == "good"]) == 5)
    rejected = sink.wait_for("rejected", bool)
    assert rejected[0]["device"] == "poison" and rejected[0]["reason"] == "internal_error"
    assert daemon.stats()["internal_errors"] == 5 and daemon.analysis_alive


def test_a_stalled_analysis_is_reported_and_its_recovery_too(
        memory_daemon: Callable[..., tuple[Daemon, MemorySource, MemorySink]]) -> None:
    release = threading.Event()
    def on_beats(device: str) -> None:
        release.wait(60)

    daemon, source, sink = memory_daemon(MemorySink(on_beats), watchdog_s=1.0)
    source.send("bed", window(0))
    stalled = sink.wait_for("status", lambda d: any(s["analysis_alive"] is False for s in d))
    assert stalled[-1]["state"] == "online"
    assert not daemon.analysis_alive and daemon.stats()["analysis_alive"] is False
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as response:
        assert "ecgmon_analysis_alive 0.0" in response.read().decode()
    release.set()
    sink.wait_for("status", lambda d: d[-1]["analysis_alive"] is True)
    assert daemon.analysis_alive


class WorkerKilled(BaseException):
    """Not an Exception: the daemon contains no such error, so the worker thread ends."""


def test_a_dead_worker_fails_the_process_and_says_offline() -> None:
    def on_beats(device: str) -> None:
        raise WorkerKilled

    config = DaemonConfig.model_validate({"metrics": {"port": None}})
    source, sink = MemorySource(), MemorySink(on_beats)
    daemon = Daemon(config, source, sink)
    def send_once_started() -> None:
        if source.started.wait(30):
            source.send("bed", window(0))

    sender = threading.Thread(target=send_once_started)
    sender.start()
    assert serve(config, daemon) == EXIT_ANALYSIS_FAILED  # serve() returns on its own: the daemon failed
    sender.join()
    assert daemon.failed.is_set() and not daemon.analysis_alive
    status = sink.wait_for("status", bool)
    assert [(d["state"], d["analysis_alive"]) for d in status] == [("online", True), ("online", False),
                                                                   ("offline", False)]

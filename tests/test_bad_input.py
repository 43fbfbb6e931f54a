"""Garbage and good windows mixed through the broker: every good one answered, every bad one rejected for its reason."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.codec import encode_binary, encode_json
from pipeline.daemon import Daemon
from pipeline.mqtt import MqttClient, Topics
from tests.conftest import Collector
from train.data import load_record

TOPICS = Topics("ecgmon")


def bad_payloads(x: np.ndarray) -> list[tuple[str, bytes]]:
    good = json.loads(encode_json(0, 10.0, 360.0, "MLII", x))
    def variant(**changes: object) -> bytes:
        return json.dumps({**good, **changes}).encode()
    binary = encode_binary(0, 10.0, 360.0, "MLII", np.zeros(360, np.int16), 200.0)
    return [
        ("bad_format", b"\x89PNG garbage"),
        ("bad_json", b"{\"seq\": 1,"),
        ("missing_field", json.dumps({k: v for k, v in good.items() if k != "t0"}).encode()),
        ("bad_field", variant(seq=1.5)),
        ("bad_field", variant(samples="abc")),
        ("non_finite", variant(samples=[1.0] * 359 + [float("nan")])),
        ("empty", variant(samples=[])),
        ("bad_length", variant(samples=[0.0] * 3700)),  # 10.3 s
        ("too_large", b"{" + b" " * 70_000 + b"}"),
        ("bad_fs", variant(fs=10)),
        ("bad_seq", variant(seq=-3)),
        ("bad_version", variant(v=9)),
        ("truncated", binary[:41]),  # half a sample
    ]


def test_mixed_garbage_and_good_windows(physionet: Path, publisher: MqttClient, start_daemon: Callable[..., Daemon],
                                        collect: Callable[[str], Collector]) -> None:
    daemon = start_daemon()
    beats, status = collect(TOPICS.beats()), collect(TOPICS.status)
    x = load_record(physionet / "mitdb", "100").signal_mv[: 360 * 10]
    bad = bad_payloads(x[:360])
    expected: Counter[str] = Counter()
    for seq in range(10):
        for d in range(3):
            publisher.publish(TOPICS.ecg(f"good-{d}"), encode_binary(
                seq, 50.0 + seq, 360.0, "MLII", np.round(x[seq * 360:(seq + 1) * 360] * 200).astype(np.int16), 200.0),
                qos=1)
        reason, payload = bad[seq % len(bad)]
        publisher.publish(TOPICS.ecg("evil"), payload, qos=1)
        expected[reason] += 1
    for reason, payload in bad[10:]:
        publisher.publish(TOPICS.ecg("evil"), payload, qos=1)
        expected[reason] += 1
    publisher.publish("ecgmon/ecg/bad$device", encode_json(0, 1.0, 360.0, "MLII", x[:360]), qos=1)
    expected["bad_device_id"] += 1

    docs = beats.wait_for(lambda d: len({(b["device"], b["seq"]) for b in d}) == 30)
    assert {(b["device"], b["seq"]) for b in docs} == {(f"good-{d}", s) for d in range(3) for s in range(10)}
    got = {reason: int(daemon.metrics.rejected.labels(reason)._value.get()) for reason in expected}
    assert got == dict(expected)
    assert daemon.stats()["rejected"] == sum(expected.values())
    assert status.docs()[-1]["state"] == "online" and daemon._worker is not None and daemon._worker.is_alive()


def test_sequence_numbers_wrap_without_a_gap(publisher: MqttClient, start_daemon: Callable[..., Daemon],
                                             collect: Callable[[str], Collector]) -> None:
    daemon = start_daemon()
    beats = collect(TOPICS.beats())
    adc = (np.random.default_rng(1).normal(0, 0.1, 360) * 200).astype(np.int16)
    for k, seq in enumerate([2**32 - 2, 2**32 - 1, 0, 1]):
        publisher.publish(TOPICS.ecg("wrap"), encode_binary(seq, 20.0 + k, 360.0, "MLII", adc, 200.0), qos=1)
    beats.wait_for(lambda d: len(d) == 4)
    assert daemon.stats().get("gaps", 0) == 0

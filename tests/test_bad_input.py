"""Garbage and good windows mixed through the broker: every good one answered, every bad one rejected for its reason."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.records import load_record
from tests.conftest import T0, Collector, wait_until
from tests.wire import binary_v1, json_v1

TOPICS = Topics("ecgmon")


def bad_payloads(x: np.ndarray) -> list[tuple[str, bytes]]:
    good = json.loads(json_v1(0, T0, 360.0, "MLII", x))
    def variant(**changes: object) -> bytes:
        return json.dumps({**good, **changes}).encode()
    binary = binary_v1(0, T0, 360.0, "MLII", np.zeros(360, np.int16), 200.0)
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
        ("bad_json", b'{"a":' * 1000 + b"1" + b"}" * 1000),  # deeper than Python's recursion limit
        ("bad_t0", variant(t0=0.5)),  # 1970
        ("bad_t0", variant(t0=4.2e9)),  # 2103
        ("bad_gain", variant(gain=-200)),
        ("out_of_range", variant(samples=[1e300] * 360)),
        ("out_of_range", variant(samples=[10**400] + [0.0] * 359)),
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
            publisher.publish(TOPICS.ecg(f"good-{d}"), binary_v1(
                seq, T0 + seq, 360.0, "MLII", np.round(x[seq * 360:(seq + 1) * 360] * 200).astype(np.int16), 200.0),
                qos=1)
        reason, payload = bad[seq % len(bad)]
        publisher.publish(TOPICS.ecg("evil"), payload, qos=1)
        expected[reason] += 1
    for reason, payload in bad[10:]:
        publisher.publish(TOPICS.ecg("evil"), payload, qos=1)
        expected[reason] += 1
    publisher.publish("ecgmon/ecg/bad$device", json_v1(0, T0, 360.0, "MLII", x[:360]), qos=1)
    expected["bad_device_id"] += 1

    docs = beats.wait_for(lambda d: len({(b["device"], b["seq"]) for b in d}) == 30)
    assert {(b["device"], b["seq"]) for b in docs} == {(f"good-{d}", s) for d in range(3) for s in range(10)}
    wait_until(lambda: daemon.stats().get("rejected", 0) >= sum(expected.values()))  # the last ones sent
    rejected = daemon.metrics.registry.get_sample_value
    assert {reason: rejected("ecgmon_messages_rejected_total", {"reason": reason}) for reason in expected} == \
        dict(expected)
    assert daemon.stats()["rejected"] == sum(expected.values())
    assert status.docs()[-1]["state"] == "online" and daemon.analysis_alive


def test_rejections_are_published_per_device_and_for_bad_device_ids(publisher: MqttClient,
                                                                    start_daemon: Callable[..., Daemon],
                                                                    collect: Callable[[str], Collector]) -> None:
    errors = collect("ecgmon/errors/#")  # also matches the bare ecgmon/errors
    start_daemon()
    for device in ("bed-1", "bed-2", "bed-3"):
        for _ in range(3):  # three bad messages each, at once: one message per device within 5 s
            publisher.publish(TOPICS.ecg(device), b"not a window", qos=1)
    publisher.publish("ecgmon/ecg/bad$device", b"{}", qos=1)
    docs = errors.wait_for(lambda d: len(d) == 4)
    assert sorted((d["device"], d["reason"]) for d in docs) == [
        ("bad$device", "bad_device_id"), ("bed-1", "bad_format"), ("bed-2", "bad_format"), ("bed-3", "bad_format")]
    assert {t for t, _ in errors.messages} == {"ecgmon/errors", *(TOPICS.errors(f"bed-{k}") for k in (1, 2, 3))}


def test_sequence_numbers_wrap_without_a_gap(publisher: MqttClient, start_daemon: Callable[..., Daemon],
                                             collect: Callable[[str], Collector]) -> None:
    daemon = start_daemon()
    beats = collect(TOPICS.beats())
    adc = (np.random.default_rng(1).normal(0, 0.1, 360) * 200).astype(np.int16)
    for k, seq in enumerate([2**32 - 2, 2**32 - 1, 0, 1]):
        publisher.publish(TOPICS.ecg("wrap"), binary_v1(seq, T0 + k, 360.0, "MLII", adc, 200.0), qos=1)
    beats.wait_for(lambda d: len(d) == 4)
    assert daemon.stats().get("gaps", 0) == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(10**400), 10**400) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20)
GOOD = {"v": 1, "seq": 0, "t0": T0, "fs": 360, "lead": "MLII", "gain": 200, "baseline": 0, "samples": [0] * 360}
fuzzed_payloads = st.one_of(
    st.binary(max_size=3000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 5000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),  # nesting, past the recursion limit
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.tuples(st.sampled_from(sorted(GOOD)), json_values).map(  # a valid window with one field replaced
        lambda kv: json.dumps({**GOOD, kv[0]: kv[1]}).encode()),
    st.binary(min_size=28, max_size=800).map(lambda rest: b"ECGW" + rest))


@pytest.fixture()
def good_stream(start_daemon: Callable[..., Daemon], collect: Callable[[str], Collector]) -> dict[str, Any]:
    """One daemon for all of a hypothesis test's examples, and a good device's next seq."""
    return {"daemon": start_daemon(), "beats": collect(TOPICS.beats("good")), "seq": 0}


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=fuzzed_payloads, device=st.sampled_from(["fuzz", "fuzz-2", "bad$id", "x" * 65]))
def test_fuzzed_payloads_never_stop_a_good_stream(payload: bytes, device: str, publisher: MqttClient,
                                                   good_stream: dict[str, Any]) -> None:
    """The whole daemon, not only the decoder: after each fuzzed message a good device's window is answered."""
    seq = good_stream["seq"]
    publisher.publish(TOPICS.ecg(device), payload, qos=1)
    publisher.publish(TOPICS.ecg("good"), json_v1(seq, T0 + seq, 360.0, "MLII", np.zeros(360), 200.0), qos=1)
    good_stream["beats"].wait_for(lambda d: len(d) == seq + 1, timeout=10)
    good_stream["seq"] = seq + 1
    assert good_stream["daemon"].analysis_alive

"""The daemon against a real mosquitto: streaming equals offline, schemas, gaps, duplicates, rejections."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.broker import LocalBroker
from pipeline.tools.records import load_record
from pipeline.tools.replay import ReplayPlan, load_signals, replay
from tests.conftest import T0, Collector, validate, wait_until
from tests.wire import binary_v1, json_v1
from train.ec57 import Ec57Stats, confusion
from train.evaluate import stream_records

TOPICS = Topics("ecgmon")
SECONDS = 600  # of each record replayed


@pytest.mark.parametrize(("spec", "encoding"), [("mitdb/200", "binary"), ("svdb/800", "json")])
def test_replay_through_broker_equals_evaluate(physionet: Path, broker: LocalBroker, publisher: MqttClient,
                                               start_daemon: Callable[..., Daemon],
                                               collect: Callable[[str], Collector], spec: str,
                                               encoding: str) -> None:
    """A record's first 10 minutes through mosquitto and the daemon give the beats of `ecgmon evaluate`."""
    daemon = start_daemon()
    beats = collect(TOPICS.beats())
    signals = load_signals([spec], physionet, ["MLII"])
    t0 = 1_700_000_000.0
    sent = replay(publisher, TOPICS, signals, ReplayPlan(speed=1e6, duration_s=SECONDS, encoding=encoding,
                                                                    t0=t0))
    docs = beats.wait_for(lambda d: len(d) == sent, timeout=120)
    for doc in docs[:50]:
        validate(doc, "Beats")
    online = [(b["time"] - t0, b["class"]) for d in sorted(docs, key=lambda d: d["seq"]) for b in d["beats"]]

    db, name = spec.split("/")
    whole = load_record(physionet / db, name, ["MLII"])
    n = int(SECONDS * whole.fs)
    keep = whole.beat_samples < n
    record = dataclasses.replace(whole, signals_mv=whole.signals_mv[:, :n], beat_samples=whole.beat_samples[keep],
                                 beat_classes=whole.beat_classes[keep])
    samples, classes = stream_records(daemon.model, [record], 1.0)[0]
    offline_s = samples / record.fs
    online_s = np.array([t for t, _ in online])
    assert len(online) == len(offline_s) > 500
    np.testing.assert_allclose(online_s, offline_s, atol=1.5 / record.fs)  # same beats, to the sample
    assert [c for _, c in online] == classes.tolist()
    ref_s, ref_class = record.beat_samples / record.fs, record.beat_classes
    a = Ec57Stats(confusion(ref_s, ref_class, online_s, np.array([c for _, c in online])))
    b = Ec57Stats(confusion(ref_s, ref_class, offline_s, classes))
    for key in ("qrs_se", "qrs_ppv", "V_f1", "N_f1"):
        assert a.summary()[key] == pytest.approx(b.summary()[key], abs=1e-3)


def window(seq: int, t0: float, x: np.ndarray, encoding: str = "json") -> bytes:
    if encoding == "json":
        return json_v1(seq, t0, 360.0, "MLII", x)
    return binary_v1(seq, t0, 360.0, "MLII", np.round(x * 200).astype(np.int16), 200.0)


def test_status_stats_gap_duplicate_and_rejections(physionet: Path, publisher: MqttClient,
                                                   start_daemon: Callable[..., Daemon],
                                                   collect: Callable[[str], Collector]) -> None:
    messages = collect("ecgmon/#")
    daemon = start_daemon(output={"stats_interval_s": 1.0})
    status = messages.wait_for(lambda d: any(s.get("state") == "online" for s in d), "status")
    validate(status[-1], "Status")
    x = load_record(physionet / "mitdb", "100").signal_mv[:360 * 12]
    t0 = T0
    for seq in range(6):
        publisher.publish(TOPICS.ecg("bed-1"), window(seq, t0 + seq, x[seq * 360:(seq + 1) * 360]), qos=1)
    publisher.publish(TOPICS.ecg("bed-1"), window(5, t0 + 5, x[5 * 360:6 * 360]), qos=1)  # duplicate
    publisher.publish(TOPICS.ecg("bed-1"), window(9, t0 + 9, x[9 * 360:10 * 360]), qos=1)  # gap
    publisher.publish(TOPICS.ecg("bed-1"), window(3, t0 + 3, x[3 * 360:4 * 360]), qos=1)  # late
    publisher.publish(TOPICS.ecg("bed-1"), b"\x00garbage", qos=1)
    publisher.publish(TOPICS.ecg("bed-2"), b'{"seq": 1}', qos=1)
    publisher.publish(TOPICS.ecg("bed-2"), window(0, t0, x[:360], "binary"), qos=1)

    beats = messages.wait_for(lambda d: {(b["device"], b["seq"]) for b in d} >= {("bed-1", 9), ("bed-2", 0)},
                              "beats")
    assert sorted(b["seq"] for b in beats if b["device"] == "bed-1") == [0, 1, 2, 3, 4, 5, 9]
    gap = messages.wait_for(lambda d: any(a["type"] == "data_gap" for a in d), "alarms")
    validate(gap[0], "Alarm")
    assert gap[0]["state"] == "raised" and gap[0]["evidence"]["expected_seq"] == 6
    errors = messages.wait_for(lambda d: {e["device"] for e in d} == {"bed-1", "bed-2"}, "errors")
    for error in errors:
        validate(error, "Rejection")
    # The device hears of its duplicate window; its late one and its garbage fall in its rate limit.
    assert [(e["device"], e["reason"]) for e in errors] == [("bed-1", "duplicate"), ("bed-2", "missing_field")]
    assert "seq 5 was already analysed (expected 6)" in errors[0]["detail"]
    stats = messages.wait_for(lambda d: any(s.get("rejected") == 2 for s in d), "stats")
    validate(stats[-1], "Stats")
    assert stats[-1]["dropped_duplicate"] == 1 and stats[-1]["dropped_late"] == 1 and stats[-1]["gaps"] == 1
    assert daemon.metrics.registry.get_sample_value("ecgmon_messages_rejected_total", {"reason": "missing_field"}) == 1
    daemon.stop()
    offline = messages.wait_for(lambda d: d[-1].get("state") == "offline", "status")
    assert offline[-1]["model_version"] == daemon.model_version


def test_eviction_keeps_the_signal_loss_open_until_data_returns(publisher: MqttClient, broker: LocalBroker,
                                                                start_daemon: Callable[..., Daemon],
                                                                collect: Callable[[str], Collector]) -> None:
    """Evicting a silent device's analysis state does not clear its alarm: the nurse still sees it lost."""
    alarms = collect(TOPICS.alarms())
    daemon = start_daemon(streams={"idle_evict_s": 2.0}, alarms={"signal_loss_s": 1.0})
    rng = np.random.default_rng(0)
    for device in ("a", "b", "c"):
        publisher.publish(TOPICS.ecg(device), window(0, T0, rng.normal(0, 0.1, 360)), qos=1)
    raised = alarms.wait_for(lambda d: len(d) == 3)
    assert {(a["type"], a["state"]) for a in raised} == {("signal_loss", "raised")}
    wait_until(lambda: daemon.stats().get("evicted") == 3)
    wait_until(lambda: daemon.stats()["active_streams"] == 0)
    stats = daemon.stats()
    assert stats["dormant_devices"] == 3
    assert daemon.metrics.registry.get_sample_value("ecgmon_active_alarms") == 3
    assert len(alarms.docs()) == 3  # nothing cleared
    reader = MqttClient(broker.host, broker.port, "reader")
    reader.connect()
    try:
        assert len(reader.read_retained("ecgmon/active/#", TOPICS.active_marker)) == 3  # still open for stations
    finally:
        reader.disconnect()
    publisher.publish(TOPICS.ecg("a"), window(7, T0 + 7, rng.normal(0, 0.1, 360)), qos=1)  # a's data returns
    cleared = alarms.wait_for(lambda d: len(d) == 4)[-1]
    assert (cleared["device"], cleared["type"], cleared["state"]) == ("a", "signal_loss", "cleared")
    assert cleared["alarm_id"] == next(a["alarm_id"] for a in raised if a["device"] == "a")
    assert daemon.stats()["dormant_devices"] == 2


def test_reconnects_and_resubscribes_after_broker_restart(physionet: Path, broker: LocalBroker,
                                                          start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    x = load_record(physionet / "mitdb", "100").signal_mv[:360 * 4]
    broker.stop()
    restarted = LocalBroker(port=broker.port).start()
    try:
        seen: list[bytes] = []
        watcher = MqttClient(restarted.host, restarted.port, "watcher")
        watcher.connect()
        watcher.subscribe(TOPICS.beats(), lambda t, p: seen.append(p))
        pub = MqttClient(restarted.host, restarted.port, "pub")
        pub.connect()
        deadline = time.monotonic() + 30
        seq = 0
        while not seen and time.monotonic() < deadline:  # the daemon comes back within its backoff
            pub.publish(TOPICS.ecg("bed"), window(seq, T0 + seq, x[(seq % 4) * 360:(seq % 4 + 1) * 360]), qos=1)
            seq += 1
            time.sleep(0.5)
        assert seen, "no results after the broker restarted"
        assert daemon.stats()["reconnects"] >= 1
        for c in (watcher, pub):
            c.disconnect()
    finally:
        restarted.stop()


def test_variable_window_lengths_give_the_same_beats(physionet: Path, publisher: MqttClient,
                                                     start_daemon: Callable[..., Daemon],
                                                     collect: Callable[[str], Collector]) -> None:
    """Windows of 0.25-10 s, changing from message to message, change nothing: streaming equals offline."""
    daemon = start_daemon()
    beats = collect(TOPICS.beats())
    record = load_record(physionet / "mitdb", "119")
    x = record.signal_mv[: 360 * 180]
    rng = np.random.default_rng(3)
    seq, start = 0, 0
    while start < len(x):
        n = min(int(rng.uniform(0.25, 10.0) * 360), len(x) - start)
        if n < 90:
            break
        publisher.publish(TOPICS.ecg("vary"), json_v1(seq, T0 + start / 360, 360.0, "MLII", x[start:start + n]),
                          qos=1)
        seq, start = seq + 1, start + n
    docs = beats.wait_for(lambda d: len(d) == seq)
    online = [(round(b["time"] - T0, 4), b["class"]) for d in sorted(docs, key=lambda d: d["seq"])
              for b in d["beats"]]
    part = dataclasses.replace(record.only([0]), signals_mv=x[None, :start])
    samples, classes = stream_records(daemon.model, [part], 1.0)[0]
    assert [c for _, c in online] == classes.tolist() and len(online) > 150
    np.testing.assert_allclose([t for t, _ in online], samples / 360.0, atol=1.5 / 360)


def test_beats_gathered_at_a_cadence_are_the_beats_of_every_window(physionet: Path, publisher: MqttClient,
                                                                    start_daemon: Callable[..., Daemon],
                                                                    collect: Callable[[str], Collector]) -> None:
    """output.beats_every_s: 5: one message per 5 s of signal, the same beats as one message per window."""
    x = load_record(physionet / "mitdb", "119").signal_mv[: 360 * 32]
    beats = collect(TOPICS.beats())
    per_window = start_daemon()
    for k in range(32):
        publisher.publish(TOPICS.ecg("each"), json_v1(k, T0 + k, 360.0, "MLII", x[k * 360:(k + 1) * 360]), qos=1)
    each = beats.wait_for(lambda d: len(d) == 32)
    per_window.stop()
    gathered = start_daemon(output={"beats_every_s": 5.0}, mqtt={"client_id": "gathering"})
    for k in range(32):
        publisher.publish(TOPICS.ecg("gathered"), json_v1(k, T0 + k, 360.0, "MLII", x[k * 360:(k + 1) * 360]),
                          qos=1)
    docs = beats.wait_for(lambda d: sum(b["device"] == "gathered" for b in d) == 6)  # 6 x 5 s; 2 s still held
    gathered.stop()  # ... and published at shutdown
    docs = [d for d in beats.wait_for(lambda d: sum(b["device"] == "gathered" for b in d) == 7)
            if d["device"] == "gathered"]
    assert [(d["t0"] - T0, d["t1"] - T0, d["seq"]) for d in docs] == [
        *((5.0 * i, 5.0 * i + 5, 5 * i + 4) for i in range(6)), (30.0, 32.0, 31)]
    assert [b for d in docs for b in d["beats"]] == [b for d in sorted(each, key=lambda d: d["seq"])
                                                    for b in d["beats"]]

"""Multi-lead windows through a real broker and the daemon: the beats equal offline evaluation for 1, 2 and 3
leads, a lead that stops or fails raises `lead_fault` while the beats go on, and malformed multi-lead windows are
rejected with their reason."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.io.codec import encode_binary, encode_json
from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.tools.records import EcgRecord, load_record
from tests.conftest import T0, Collector, validate
from train.evaluate import stream_records

TOPICS = Topics("ecgmon")
SECONDS = 90


def three_leads(record: EcgRecord) -> EcgRecord:
    """The record's two leads and a third derived from them (their difference, as lead III is II - I)."""
    derived = record.signals_mv[0] - record.signals_mv[1]
    return dataclasses.replace(record, signals_mv=np.vstack([record.signals_mv, derived]),
                               sig_names=(*record.sig_names, "D"), adc_gains=(*record.adc_gains, 200.0),
                               baselines=(*record.baselines, 0))


def send(publisher: MqttClient, device: str, record: EcgRecord, seconds: range, encoding: str,
         leads: list[int] | None = None) -> None:
    """1 s windows of the record's leads (indices `leads`, default all) as the device sends them."""
    part = record if leads is None else record.only(leads)
    gains, baselines = np.array(part.adc_gains)[:, None], np.array(part.baselines)[:, None]
    fs = round(part.fs)
    for k in seconds:
        x = part.signals_mv[:, k * fs:(k + 1) * fs]
        if encoding == "binary":
            payload = encode_binary(k, T0 + k, part.fs, part.sig_names, np.round(x * gains + baselines).astype(
                np.int16), part.adc_gains, part.baselines)
        else:
            payload = encode_json(k, T0 + k, part.fs, part.sig_names, x, [1.0] * len(x), [0.0] * len(x))
        publisher.publish(TOPICS.ecg(device), payload, qos=1)


@pytest.mark.parametrize(("n_leads", "encoding"), [(1, "json"), (2, "binary"), (2, "json"), (3, "binary")])
def test_leads_through_the_broker_equal_offline(physionet: Path, publisher: MqttClient,
                                                start_daemon: Callable[..., Daemon],
                                                collect: Callable[[str], Collector], n_leads: int,
                                                encoding: str) -> None:
    daemon = start_daemon()
    beats = collect(TOPICS.beats())
    whole = three_leads(load_record(physionet / "mitdb", "208"))
    record = dataclasses.replace(whole.only(list(range(n_leads))),
                                 signals_mv=whole.signals_mv[:n_leads, :360 * SECONDS])
    if encoding == "binary":  # what the daemon sees: the ADC values
        gains, baselines = np.array(record.adc_gains)[:, None], np.array(record.baselines)[:, None]
        adc = np.round(record.signals_mv * gains + baselines)
        record = dataclasses.replace(record, signals_mv=(adc - baselines) / gains)
    send(publisher, "bed", record, range(SECONDS), encoding)
    docs = beats.wait_for(lambda d: len(d) == SECONDS, timeout=60)
    validate(docs[0], "Beats")
    online = [(b["time"] - T0, b["class"]) for d in sorted(docs, key=lambda d: d["seq"]) for b in d["beats"]]
    samples, classes = stream_records(daemon.model, [record], 1.0)[0]
    assert len(online) == len(samples) > 100
    np.testing.assert_allclose([t for t, _ in online], samples / record.fs, atol=1.5 / record.fs)
    assert [c for _, c in online] == classes.tolist()


def test_a_lead_dropped_mid_stream_raises_lead_fault_and_the_beats_go_on(
        physionet: Path, publisher: MqttClient, start_daemon: Callable[..., Daemon],
        collect: Callable[[str], Collector]) -> None:
    """Both leads for 30 s, then the device sends only its first: `lead_fault` names the missing lead, no
    analysis restart (no data_gap), and every reference beat of the next minute is still found."""
    start_daemon()
    alarms, beats = collect(TOPICS.alarms()), collect(TOPICS.beats())
    record = load_record(physionet / "mitdb", "100")
    send(publisher, "bed", record, range(30), "binary")
    send(publisher, "bed", record, range(30, 90), "binary", leads=[0])
    docs = beats.wait_for(lambda d: len(d) == 90, timeout=60)
    raised = alarms.wait_for(lambda d: any(a["type"] == "lead_fault" for a in d))
    fault = next(a for a in raised if a["type"] == "lead_fault")
    validate(fault, "Alarm")
    assert fault["state"] == "raised" and fault["priority"] == "low" and fault["kind"] == "technical"
    assert fault["evidence"]["leads"] == {"V5": "missing"} and fault["evidence"]["good_leads"] == ["MLII"]
    assert 30 <= fault["time"] - T0 <= 31
    assert not any(a["type"] == "data_gap" for a in alarms.docs())
    found = np.array([b["time"] - T0 for d in docs for b in d["beats"]])
    ref = record.beat_samples / record.fs
    ref = ref[(ref > 31) & (ref < 89)]
    assert all(np.abs(found - t).min() <= 0.15 for t in ref)


def test_a_lead_going_flat_is_named_and_cleared_when_it_returns(
        physionet: Path, publisher: MqttClient, start_daemon: Callable[..., Daemon],
        collect: Callable[[str], Collector]) -> None:
    """The second lead's electrode comes off (flat) from 20 to 40 s: `lead_fault` raised naming it, cleared once
    it has been back for `alarms.lead_fault_clear_s`; no physiological alarm and no leads_off (the first lead monitors
    the patient)."""
    start_daemon()
    alarms, beats = collect(TOPICS.alarms()), collect(TOPICS.beats())
    record = load_record(physionet / "mitdb", "100")
    signals = record.signals_mv.copy()
    signals[1, 20 * 360:40 * 360] = 0.0
    send(publisher, "bed", dataclasses.replace(record, signals_mv=signals), range(60), "json")
    beats.wait_for(lambda d: len(d) == 60, timeout=60)
    docs = alarms.wait_for(lambda d: any(a["type"] == "lead_fault" and a["state"] == "cleared" for a in d))
    lead_fault = [(a["state"], round(a["time"] - T0)) for a in docs if a["type"] == "lead_fault"]
    assert lead_fault[0] == ("raised", 21) and lead_fault[-1] == ("cleared", 50)  # lead_fault_clear_s after 40 s
    assert next(a for a in docs if a["type"] == "lead_fault")["evidence"]["leads"] == {"V5": "flat"}
    assert {a["type"] for a in docs} == {"lead_fault"}


def test_malformed_multi_lead_windows_are_rejected_with_their_reason(
        publisher: MqttClient, start_daemon: Callable[..., Daemon], collect: Callable[[str], Collector]) -> None:
    """Each malformed window is rejected on the device's error topic with its reason; a good two-lead device
    sending between them is answered every time."""
    daemon = start_daemon()
    errors, beats = collect("ecgmon/errors/#"), collect(TOPICS.beats("good"))
    good = json.loads(encode_json(0, T0, 360.0, ["II", "V1"], np.zeros((2, 360)), [1.0, 1.0], [0.0, 0.0]))
    lead = good["leads"][0]
    bad = {
        "lead_lengths": {**good, "leads": [lead, {**lead, "lead": "V1", "samples": [0.0] * 359}]},
        "duplicate_lead": {**good, "leads": [lead, lead]},
        "lead_count": {**good, "leads": [{**lead, "lead": f"V{k}"} for k in range(13)]},
        "missing_field": {**good, "leads": [lead, {"lead": "V1"}]},
    }
    for k, (reason, doc) in enumerate(bad.items()):
        publisher.publish(TOPICS.ecg(f"bad-{reason}"), json.dumps(doc).encode(), qos=1)
        publisher.publish(TOPICS.ecg("good"), encode_json(k, T0 + k, 360.0, ["II", "V1"], np.zeros((2, 360)),
                                                          [1.0, 1.0], [0.0, 0.0]), qos=1)
    binary = encode_binary(0, T0, 360.0, ["II", "V1"], np.zeros((2, 360), np.int16), [200.0, 200.0], [0, 0])
    publisher.publish(TOPICS.ecg("bad-truncated"), binary[:40], qos=1)
    docs = errors.wait_for(lambda d: len(d) == len(bad) + 1)
    assert sorted((d["device"], d["reason"]) for d in docs) == sorted(
        [(f"bad-{r}", r) for r in bad] + [("bad-truncated", "truncated")])
    beats.wait_for(lambda d: len(d) == len(bad))
    assert daemon.stats()["rejected"] == len(bad) + 1 and daemon.analysis_alive

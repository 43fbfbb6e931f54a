"""Per-device state survives a daemon restart; a missing, corrupt or old state file is reported and ignored."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import DaemonConfig
from pipeline.io.mqtt import MqttClient, Topics
from pipeline.io.sources import Progress
from pipeline.process.daemon import Daemon
from pipeline.process.state import MAGIC, STATE_FORMAT, decode_state, encode_state
from pipeline.tools.records import load_record
from tests.conftest import T0, Collector
from tests.ecg_synth import beat_templates, synthesize
from tests.seam import MemorySink, MemorySource
from tests.wire import binary_v1
from train.evaluate import stream_records

TOPICS = Topics("ecgmon")


def send(publisher: MqttClient, x: np.ndarray, seqs: range) -> None:
    for seq in seqs:
        adc = np.round(x[seq * 360:(seq + 1) * 360] * 200 + 1024).astype(np.int16)
        publisher.publish(TOPICS.ecg("bed-9"), binary_v1(seq, T0 + seq, 360.0, "MLII", adc, 200.0, 1024), qos=1)


def test_restart_resumes_exactly_where_it_stopped(physionet: Path, tmp_path: Path, publisher: MqttClient,
                                                  start_daemon: Callable[..., Daemon],
                                                  collect: Callable[[str], Collector]) -> None:
    record = load_record(physionet / "mitdb", "119")
    x = record.signal_mv[: 360 * 120]
    beats = collect(TOPICS.beats())
    state = {"path": str(tmp_path / "state.bin")}
    first = start_daemon(state=state)
    send(publisher, x, range(60))
    beats.wait_for(lambda d: len(d) == 60)
    first.stop()
    assert (tmp_path / "state.bin").exists()
    second = start_daemon(state=state)
    assert second.stats()["active_streams"] == 1
    send(publisher, x, range(60, 120))
    docs = beats.wait_for(lambda d: len(d) == 120)
    online = [(round(b["time"] - T0, 4), b["class"]) for d in sorted(docs, key=lambda d: d["seq"])
              for b in d["beats"]]
    samples, classes = stream_records(second.model, [dataclasses.replace(record.only([0]), signals_mv=x[None])], 1.0)[0]
    assert [c for _, c in online] == classes.tolist() and len(online) > 100
    np.testing.assert_allclose([t for t, _ in online], samples / 360.0, atol=1.5 / 360)


@pytest.mark.parametrize("problem", ["corrupt", "old_model", "wrong_format", "bad_device"])
def test_bad_state_file_is_reported_and_ignored(tmp_path: Path, start_daemon: Callable[..., Daemon],
                                                caplog: pytest.LogCaptureFixture, problem: str) -> None:
    path = tmp_path / "state.bin"
    devices: dict[str, dict[str, Any]] = {"bed-1": {"streams": {"dsp": {}}}}
    if problem == "corrupt":
        path.write_bytes(MAGIC + b"\x0a\x00 not really MessagePack" + bytes(range(200, 256)))
    elif problem == "old_model":
        path.write_bytes(encode_state("someone-else", devices))
    elif problem == "wrong_format":
        path.write_bytes(b"ECGS\x63\x00" + encode_state("someone-else", devices)[6:])  # format 99
    else:
        from models import SHIPPED_MODEL
        from pipeline.analysis.model import BeatModel

        path.write_bytes(encode_state(BeatModel(SHIPPED_MODEL).info.version, devices))
    with caplog.at_level(logging.WARNING):
        daemon = start_daemon(state={"path": str(path)})
    assert daemon.stats()["active_streams"] == 0
    expected = {"corrupt": "corrupt", "old_model": "from model", "wrong_format": "format 99 is not",
                "bad_device": "malformed"}[problem]
    assert expected in caplog.text


def test_arrays_and_values_come_back_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    devices: dict[str, dict[str, Any]] = {"bed-1": {
        "f32": rng.standard_normal((2, 7)).astype(np.float32), "f64": np.array([np.nan, 1e-300]),
                         "i64": np.arange(5), "flags": np.array([True, False]), "scalar": np.float32(0.1),
                         "nested": [{"x": None, "s": "MLII", "n": 3}], "empty": np.zeros(0, dtype=np.float32)}}
    blob = encode_state("v1", devices)
    assert blob[:6] == MAGIC + bytes([STATE_FORMAT, 0])
    back = decode_state(blob, "v1", 60.0, "test")["bed-1"]
    for key in ("f32", "f64", "i64", "flags", "empty"):
        assert back[key].dtype == devices["bed-1"][key].dtype
        np.testing.assert_array_equal(back[key], devices["bed-1"][key])
    assert back["scalar"] == float(np.float32(0.1)) and back["nested"] == [{"x": None, "s": "MLII", "n": 3}]
    assert len(blob) < 300


def test_a_device_taken_over_replays_its_windows_without_publishing_them_again(physionet: Path) -> None:
    """The hand-off of a partitioned source, in memory: a daemon analyses a device (beats gathered every 3 s) through
    an asystole and out of it, checkpointed after its 15th window; a second one restores that checkpoint with the
    first one's progress mark after window 25 (its alarm raised, not yet cleared) and gets every window from the
    16th again. It publishes exactly what the first published after the mark: no alarm event again, no beat
    twice, none missing, and counts the windows it analysed again."""
    beat = beat_templates(physionet)["N"][0]
    x = np.round(synthesize({"N": [beat]}, [("N", 0.8)] * 25 + [("N", 7.0)] + [("N", 0.8)] * 15) * 200)
    windows = [binary_v1(k, T0 + k, 360.0, "MLII", x[k * 360:(k + 1) * 360].astype(np.int16), 200.0)
               for k in range(len(x) // 360)]
    config = DaemonConfig.model_validate({"metrics": {"port": None}, "output": {"beats_every_s": 3.0}})

    def progress_of(seq: int) -> Callable[[list[dict[str, Any]]], bool]:
        return lambda docs: any(d["bed"]["seq"] == seq for d in docs)

    first_sink, first_source = MemorySink(), MemorySource()
    first = Daemon(config, first_source, first_sink)
    assert first.start()
    try:
        for payload in windows[:15]:
            first_source.send("bed", payload)
        first_sink.wait_for("progress", progress_of(14))
        saved: list[bytes] = []
        checkpointed = threading.Event()

        def checkpoint() -> None:  # on the worker, as a partitioned source does
            saved.append(first.save_devices(["bed"], forget=False))
            checkpointed.set()

        first.call_soon(checkpoint)
        assert checkpointed.wait(30)
        for payload in windows[15:]:
            first_source.send("bed", payload)
        marks = first_sink.wait_for("progress", progress_of(len(windows) - 1))
    finally:
        first.stop()
    mark = Progress(**next(d["bed"] for d in marks if d["bed"]["seq"] == 25))
    before_mark = first_sink.messages[:next(i for i, (kind, doc) in enumerate(first_sink.messages)
                                           if kind == "progress" and doc["bed"]["seq"] == 25)]
    alarms = [doc for kind, doc in first_sink.messages if kind == "alarm"]
    assert [(a["type"], a["state"]) for a in alarms] == [("asystole", "raised"), ("asystole", "cleared")]
    assert any(doc is alarms[0] for _, doc in before_mark)  # raised before the mark, cleared after it

    second_sink, second_source = MemorySink(), MemorySource()
    second = Daemon(config, second_source, second_sink)
    assert second.start()
    try:
        restored = threading.Event()

        def restore() -> None:
            second.restore_devices(saved[0], "the first daemon", {"bed": mark})
            restored.set()

        second.call_soon(restore)
        assert restored.wait(30)
        for payload in windows[15:]:
            second_source.send("bed", payload)
        second_sink.wait_for("progress", progress_of(len(windows) - 1))
        assert second.stats()["replayed"] == 25 - 15 + 1
    finally:
        second.stop()

    def published(messages: list[tuple[str, dict[str, Any]]], kind: str) -> list[Any]:
        return [doc for k, doc in messages if k == kind]

    assert published(second_sink.messages, "alarm") == alarms[1:]  # the clearance only
    first_beats = [b for doc in published(first_sink.messages, "beats") for b in doc["beats"]]
    again = [b for doc in published(before_mark, "beats") for b in doc["beats"]]
    assert again + [b for doc in published(second_sink.messages, "beats") for b in doc["beats"]] == first_beats
    assert published(second_sink.messages, "beats") == [doc for doc in published(first_sink.messages, "beats")
                                                        if doc["t1"] > mark.beats_until]  # gathered the same way

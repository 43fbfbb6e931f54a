"""Per-device state survives a daemon restart; a missing, corrupt or old state file is reported and ignored."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.io.mqtt import MqttClient, Topics
from pipeline.process.daemon import Daemon
from pipeline.process.state import MAGIC, STATE_FORMAT, decode_state, encode_state
from pipeline.tools.records import load_record
from tests.conftest import T0, Collector
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

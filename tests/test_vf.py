"""The VF detector: its measures, streaming, its training command, and its alarm on real VF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import SHIPPED_MODEL
from pipeline.analysis.dsp import Preprocessor
from pipeline.analysis.model import BeatModel
from pipeline.analysis.recent import RecentSignal
from pipeline.analysis.streams import BeatStreams
from pipeline.cli import main
from pipeline.config import AlarmConfig
from pipeline.detectors.vf import VF_FEATURE_NAMES, vf_features
from pipeline.process.state import decode_state, encode_state
from pipeline.tools.records import load_record
from train.alarm_eval import run_alarms
from train.trainer import DataLeakError
from train.vf import train_vf

FS = 90.0


def feature(rows: np.ndarray, name: str) -> np.ndarray:
    return vf_features(rows.astype(np.float32), FS)[:, VF_FEATURE_NAMES.index(name)]


def test_a_sine_at_vf_rate_passes_nothing_through_the_vf_filter_and_is_not_peaked() -> None:
    t = np.arange(360) / FS
    sine = np.sin(2 * np.pi * 5.0 * t)[None]
    spikes = np.zeros((1, 360))
    spikes[0, ::72] = 1.0  # narrow "QRS" every 0.8 s
    assert feature(sine, "leakage")[0] < 0.05 < feature(spikes, "leakage")[0]
    assert feature(sine, "log_kurtosis")[0] < np.log(2.0) < feature(spikes, "log_kurtosis")[0]
    assert feature(sine, "vf_band")[0] > 0.9


def test_any_window_size_gives_the_same_features(physionet: Path) -> None:
    """The detector's features after each whole second are the same whether the signal came in 1 s or 0.2 s."""
    info = BeatModel(SHIPPED_MODEL).info
    record = load_record(physionet / "cudb", "cu01")
    fs = int(record.fs)
    signal = record.signal_mv[: 20 * fs]
    features = {}
    for step in (fs, fs // 5):
        pre = Preprocessor(info.filter, record.fs, info.fs, info.frame_size)
        recent = RecentSignal(1, info.fs)
        rows = []
        for a in range(0, len(signal), step):
            frames = pre(signal[a:a + step])
            if len(frames):
                recent.update(np.array([0]), frames[None])
            if (a + step) % fs == 0 and recent.ready(np.array([0]))[0]:
                rows.append(vf_features(recent.history[:1], recent.fs)[0])
        features[step] = np.array(rows)
    assert len(features[fs]) == 16  # 20 s, the first whole 4 s window after 4 s
    np.testing.assert_allclose(features[fs], features[fs // 5], rtol=1e-6)


def test_vf_found_survives_save_and_restore(physionet: Path) -> None:
    model = BeatModel(SHIPPED_MODEL)
    record = load_record(physionet / "cudb", "cu01")
    fs = int(record.fs)
    a, b = BeatStreams(model, 2), BeatStreams(model, 2)
    a.open("cu01", record.fs)
    for k in range(30):
        a.process([("cu01", record.sig_names, record.signals_mv[:, k * fs:(k + 1) * fs])])
    saved = decode_state(encode_state("m", {"cu01": a.save("cu01")}), "m", 60.0, "test")  # as the state file
    b.restore("cu01", saved["cu01"])
    for k in range(30, 300):
        window = record.signals_mv[:, k * fs:(k + 1) * fs]
        a.process([("cu01", record.sig_names, window)])
        b.process([("cu01", record.sig_names, window)])
        assert a.vf_found("cu01") == b.vf_found("cu01")


def test_shipped_detector_alarms_real_vf_and_not_normal_rhythm(physionet: Path) -> None:
    """cudb cu01 ends in VF (its "[" mark at 214 s, no "]"); MIT-BIH 100 is 30 min of sinus rhythm."""
    model = BeatModel(SHIPPED_MODEL)
    assert model.info.vf_detector is not None
    records = [load_record(physionet / "cudb", "cu01"), load_record(physionet / "mitdb", "100")]
    events = run_alarms(model, records, AlarmConfig(), window_s=1.0)
    vf_raised = [[e.time for e in ev if e.type == "ventricular_fibrillation" and e.state == "raised"] for ev in events]
    assert vf_raised[0] and 214.0 <= vf_raised[0][0] <= 214.0 + 30.0
    assert vf_raised[1] == []


def test_train_vf_writes_a_detector_the_daemon_loads(physionet: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    assert main(["train-vf", "--out", str(out), "--report-dir", str(tmp_path / "report"), "--physionet-dir",
                 str(physionet), "--folds", "2", "--records", "cudb/cu01", "cudb/cu02", "cudb/cu03"]) == 0
    report = json.loads((tmp_path / "report" / "vf-cv.json").read_text())
    detector = BeatModel(out).info.vf_detector
    assert detector is not None and detector.threshold == report["threshold"]
    assert detector.feature_names == VF_FEATURE_NAMES
    assert sum(len(f) for f in report["folds"]) == 3


def test_train_vf_refuses_ds2(physionet: Path, tmp_path: Path) -> None:
    with pytest.raises(DataLeakError):
        train_vf(SHIPPED_MODEL, tmp_path / "m.onnx", tmp_path, physionet, "MLII", AlarmConfig(), k=2,
                 specs=("cudb/cu01", "mitdb/100"))

"""The signal-quality detector: its training labels, its command, and the shipped detector on real noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import SHIPPED_MODEL
from pipeline.analysis.model import BeatModel
from pipeline.analysis.streams import BeatStreams
from pipeline.cli import main
from pipeline.config import AlarmConfig
from pipeline.detectors.quality import QUALITY_FEATURE_NAMES
from pipeline.tools.records import EcgRecord, load_record
from train.noise import add_noise, load_noise
from train.quality import error_times, train_quality
from train.trainer import DataLeakError


def test_beat_errors_are_the_unmatched_beats_of_either_side() -> None:
    reference = np.array([1.0, 2.0, 3.0])
    detected = np.array([1.1, 2.3, 4.0])  # 1.1 matches 1.0 (within 150 ms); 2.3 is 0.3 s from 2.0
    np.testing.assert_allclose(error_times(reference, detected), [2.0, 2.3, 3.0, 4.0])
    np.testing.assert_allclose(error_times(reference, np.array([])), reference)
    assert len(error_times(reference, reference + 0.15)) == 0


def unreadable_share(record: EcgRecord, seconds: int) -> float:
    """The share of 1 s windows (after the first 4 s) the shipped model's detector calls unreadable."""
    streams = BeatStreams(BeatModel(SHIPPED_MODEL), 1)
    streams.open("r", record.fs)
    fs = int(record.fs)
    verdicts = []
    for k in range(seconds):
        streams.process([("r", record.sig_names[:1], record.signals_mv[:1, k * fs:(k + 1) * fs])])
        if k >= 4:
            verdicts.append(streams.unreadable("r"))
    return float(np.mean(verdicts))


def test_shipped_detector_flags_heavy_noise_and_not_a_clean_record(physionet: Path) -> None:
    """MIT-BIH 100 (a DS2 record: never trained on) clean, and with nstdb `ma` (its evaluation half) at -6 dB."""
    assert BeatModel(SHIPPED_MODEL).info.quality_detector is not None
    clean = load_record(physionet / "mitdb", "100")
    noise, fs = load_noise(physionet, "ma", "eval")
    assert unreadable_share(clean, 300) <= 0.02
    assert unreadable_share(add_noise(clean, noise, fs, -6.0), 300) >= 0.5


def test_train_quality_writes_a_detector_the_daemon_loads(physionet: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    assert main(["train-quality", "--out", str(out), "--report-dir", str(tmp_path / "report"), "--physionet-dir",
                 str(physionet), "--folds", "2", "--records", "cudb/cu01", "cudb/cu02"]) == 0
    report = json.loads((tmp_path / "report" / "quality-cv.json").read_text())
    detector = BeatModel(out).info.quality_detector
    assert detector is not None and detector.threshold == report["threshold"]
    assert detector.feature_names == QUALITY_FEATURE_NAMES
    assert ".quality." in BeatModel(out).info.version
    assert 0 < report["unreadable_rows"] < report["rows"]


def test_train_quality_refuses_ds2(physionet: Path, tmp_path: Path) -> None:
    with pytest.raises(DataLeakError):
        train_quality(SHIPPED_MODEL, tmp_path / "m.onnx", tmp_path, physionet, "MLII", AlarmConfig(), k=2,
                      specs=("cudb/cu01", "mitdb/100"))

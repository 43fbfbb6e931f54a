"""Noise stress: recorded nstdb noise added at the SNR asked for, evaluation noise never the training noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import SHIPPED_MODEL
from pipeline.tools.records import load_record
from train.noise import add_noise, evaluate_noise, load_noise, qrs_amplitude_mv


@pytest.mark.parametrize("snr_db", [12.0, 0.0, -6.0])
def test_noise_is_added_at_the_snr_asked_for(physionet: Path, snr_db: float) -> None:
    clean = load_record(physionet / "mitdb", "100")
    noise, fs = load_noise(physionet, "em", "eval")
    noisy = add_noise(clean, noise, fs, snr_db)
    added = noisy.signal_mv - clean.signal_mv
    snr = 10 * np.log10((qrs_amplitude_mv(clean) ** 2 / 8) / np.mean(added**2))
    assert snr == pytest.approx(snr_db, abs=1e-6)
    assert np.array_equal(noisy.beat_samples, clean.beat_samples)


def test_training_and_evaluation_noise_do_not_overlap(physionet: Path) -> None:
    train, fs = load_noise(physionet, "ma", "train")
    evaluation, _ = load_noise(physionet, "ma", "eval")
    assert fs == 360.0 and abs(len(train) - len(evaluation)) <= 1
    whole = np.concatenate([train, evaluation])
    assert len(whole) == 650_000  # the record's 30 min 5 s, split once, nothing shared


def test_noise_report(physionet: Path, tmp_path: Path) -> None:
    report = evaluate_noise(SHIPPED_MODEL, ["mitdb/100"], physionet, "MLII", "em", [24.0, 0.0], tmp_path)
    assert json.loads((tmp_path / "noise-em.json").read_text()) == json.loads(json.dumps(report))
    high, low = report["levels"]
    assert high["all"]["qrs_ppv"] > low["all"]["qrs_ppv"]  # more noise, more false beats
    assert high["flagged_windows"] < low["flagged_windows"]  # ... and more of it flagged unreadable


def test_training_noise_is_the_training_half_through_the_shared_dsp(physionet: Path) -> None:
    from models.config import ModelConfig
    from pipeline.dsp import FilterSpec, Preprocessor
    from train.noise import framed_training_noise

    noise = framed_training_noise(physionet, ModelConfig(), FilterSpec())
    assert [n.name for n in noise] == ["bw", "em", "ma"]
    raw, fs = load_noise(physionet, "em", "train")
    np.testing.assert_array_equal(noise[1].frames, Preprocessor(FilterSpec(), fs, 360.0, 12)(raw))
    assert noise[1].power_mv2 == pytest.approx(np.var(raw))


def test_training_segments_get_noise_at_the_snr_drawn(physionet: Path) -> None:
    import dataclasses

    from models.config import ModelConfig
    from pipeline.dsp import FilterSpec
    from train.dataset import frame_record
    from train.noise import framed_training_noise
    from train.trainer import segment_batches

    whole = frame_record(load_record(physionet / "mitdb", "100"), ModelConfig(), FilterSpec(), 3)
    record = dataclasses.replace(whole, frames=whole.frames[:9000], labels=whole.labels[:9000])  # one segment
    noise = [n for n in framed_training_noise(physionet, ModelConfig(), FilterSpec()) if n.name == "ma"]
    (clean, labels), = segment_batches([record], 9000, 1, 0.0, np.random.default_rng(0))
    (quiet, _), = segment_batches([record], 9000, 1, 0.0, np.random.default_rng(0), noise, 0.0)
    (noisy, noisy_labels), = segment_batches([record], 9000, 1, 0.0, np.random.default_rng(0), noise, 1.0, (6.0, 6.0))
    assert np.array_equal(quiet.numpy(), clean.numpy()) and np.array_equal(noisy_labels.numpy(), labels.numpy())
    added = float(np.mean((noisy - clean).numpy() ** 2))
    expected = record.qrs_power_mv2 / (noise[0].power_mv2 * 10**0.6) * float(np.mean(noise[0].frames**2))
    assert expected / 3 < added < expected * 3  # 6 dB below the QRS power, as filtered

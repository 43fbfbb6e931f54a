"""Noise stress: recorded nstdb noise added at the SNR asked for, evaluation noise never the training noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import SHIPPED_MODEL
from pipeline.tools.records import load_record
from train.evaluate import evaluate
from train.noise import add_noise, evaluate_noise, load_noise, qrs_amplitude_mv, rescale_qrs


@pytest.mark.parametrize("snr_db", [12.0, 0.0, -6.0])
def test_noise_is_added_at_the_snr_asked_for(physionet: Path, snr_db: float) -> None:
    clean = load_record(physionet / "mitdb", "100")
    noise, fs = load_noise(physionet, "em", "eval")
    noisy = add_noise(clean, noise, fs, snr_db)
    added = noisy.signal_mv - clean.signal_mv
    snr = 10 * np.log10((qrs_amplitude_mv(clean) ** 2 / 8) / np.mean(added**2))
    assert snr == pytest.approx(snr_db, abs=1e-6)
    assert np.array_equal(noisy.beat_samples, clean.beat_samples)


def test_noise_on_one_lead_leaves_the_other_clean(physionet: Path) -> None:
    clean = load_record(physionet / "mitdb", "100")
    noise, fs = load_noise(physionet, "em", "eval")
    noisy = add_noise(clean, noise, fs, 0.0, leads=[1])
    np.testing.assert_array_equal(noisy.signals_mv[0], clean.signals_mv[0])
    added = noisy.signals_mv[1] - clean.signals_mv[1]
    assert np.mean(added**2) == pytest.approx(qrs_amplitude_mv(clean, 1) ** 2 / 8, rel=1e-6)  # 0 dB in lead 2
    both = add_noise(clean, noise, fs, 0.0)
    assert not np.allclose(both.signals_mv[0] - clean.signals_mv[0], added)  # each lead its own stretch of noise


def test_each_lead_is_rescaled_to_the_qrs_amplitude_asked_for(physionet: Path) -> None:
    record = load_record(physionet / "mitdb", "100")
    small = rescale_qrs(record, 0.15)
    for lead in range(2):
        assert qrs_amplitude_mv(small, lead) == pytest.approx(0.15, rel=1e-9)
        gain = small.signals_mv[lead] / np.where(record.signals_mv[lead] == 0, np.nan, record.signals_mv[lead])
        assert np.nanstd(gain) < 1e-9  # a gain, nothing else
    np.testing.assert_array_equal(small.beat_samples, record.beat_samples)


def test_evaluation_at_another_qrs_amplitude(physionet: Path, tmp_path: Path) -> None:
    native = evaluate(SHIPPED_MODEL, ["mitdb/100"], physionet, ["MLII"], tmp_path / "native")
    tiny = evaluate(SHIPPED_MODEL, ["mitdb/100"], physionet, ["MLII"], tmp_path / "tiny", qrs_mv=0.02)
    assert (native["qrs_mv"], tiny["qrs_mv"]) == (None, 0.02)
    assert tiny["gross"]["qrs_se"] < native["gross"]["qrs_se"]  # complexes of 20 µV are below what it can find


def test_training_and_evaluation_noise_do_not_overlap(physionet: Path) -> None:
    train, fs = load_noise(physionet, "ma", "train")
    evaluation, _ = load_noise(physionet, "ma", "eval")
    assert fs == 360.0 and abs(len(train) - len(evaluation)) <= 1
    whole = np.concatenate([train, evaluation])
    assert len(whole) == 650_000  # the record's 30 min 5 s, split once, nothing shared


def test_noise_report(physionet: Path, tmp_path: Path) -> None:
    report = evaluate_noise(SHIPPED_MODEL, ["mitdb/100"], physionet, ["MLII"], "em", [24.0, 0.0], tmp_path)
    assert json.loads((tmp_path / "noise-em.json").read_text()) == json.loads(json.dumps(report))
    high, low = report["levels"]
    assert high["all"]["qrs_ppv"] > low["all"]["qrs_ppv"]  # more noise, more false beats
    assert high["flagged_windows"] < low["flagged_windows"]  # ... and more of it flagged unreadable


def test_noise_on_the_second_lead_leaves_the_primary_to_decide(physionet: Path, tmp_path: Path) -> None:
    """MIT-BIH 100 with electrode motion at 0 dB on V5 only: the beats come from MLII, the clean primary lead, and the
    device is not flagged; with the noise on MLII instead, the device is flagged (unreadable) as a one-lead device
    with that noise is, rather than moving the beats to V5, which this model reads less well."""
    second = evaluate_noise(SHIPPED_MODEL, ["mitdb/100"], physionet, None, "em", [0.0], tmp_path / "2",
                            noisy_leads=[1])
    first = evaluate_noise(SHIPPED_MODEL, ["mitdb/100"], physionet, None, "em", [0.0], tmp_path / "1",
                           noisy_leads=[0])
    assert second["noisy_leads"] == [2] and first["noisy_leads"] == [1]
    (quiet,), (loud,) = second["levels"], first["levels"]
    assert quiet["all"]["qrs_ppv"] >= 0.99 and quiet["all"]["qrs_ppv"] > loud["all"]["qrs_ppv"]
    assert quiet["flagged_windows"] < 0.05 < 0.3 < loud["flagged_windows"]  # one lead alone at 0 dB: half flagged

def test_training_noise_is_the_training_half_through_the_shared_dsp(physionet: Path) -> None:
    from models.config import ModelConfig
    from pipeline.analysis.dsp import FilterSpec, Preprocessor
    from train.noise import framed_training_noise

    noise = framed_training_noise(physionet, ModelConfig(), FilterSpec())
    assert [n.name for n in noise] == ["bw", "em", "ma"]
    raw, fs = load_noise(physionet, "em", "train")
    np.testing.assert_array_equal(noise[1].frames, Preprocessor(FilterSpec(), fs, 360.0, 12)(raw))
    assert noise[1].power_mv2 == pytest.approx(np.var(raw))

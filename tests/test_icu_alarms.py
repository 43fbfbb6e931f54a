"""ICU alarms of the PhysioNet/CinC Challenge 2015 scored through the daemon's analysis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import SHIPPED_MODEL
from pipeline.config import AlarmConfig
from pipeline.tools.records import EcgRecord, load_record
from train.alarm_eval import evaluate_alarms
from train.alarm_score import Episode
from train.icu_alarms import IcuAlarm, challenge_score, cross_validate, load_icu_alarms, raised_at_end, score_icu
from train.noise import add_noise, load_noise

# True and false alarms of four types, and a false VF alarm.
RECORDS = ["a161l", "a103l", "b124s", "b183l", "t106s", "t116s", "v101l", "f121l"]
EMPTY = EcgRecord("x", np.zeros((1, 10)), 250.0, ("II",), np.array([], dtype=np.int64), np.array([], dtype=np.str_))


def verdict(alarm_type: str, true: bool, raised: bool) -> IcuAlarm:
    return IcuAlarm("x", EMPTY, alarm_type, true, raised, [], [])


class TestScore:
    def test_challenge_score_weighs_a_miss_five_times(self) -> None:
        assert challenge_score({"TP": 1, "FN": 1, "FP": 1, "TN": 1}) == pytest.approx(2 / 8)
        assert challenge_score({"TP": 0, "FN": 0, "FP": 0, "TN": 0}) is None

    def test_alarm_counts_when_active_at_the_end_or_more_severe(self) -> None:
        vf = [Episode(110.0, 120.0, "ventricular_fibrillation")]
        assert raised_at_end("ventricular_tachycardia", vf, 120.0)  # a more severe lethal alarm raises VT
        assert not raised_at_end("ventricular_fibrillation", [Episode(110.0, 120.0, "ventricular_tachycardia")],
                                 120.0)
        assert not raised_at_end("asystole", [Episode(20.0, 40.0, "asystole")], 120.0)  # long before the alarm
        assert raised_at_end("asystole", [Episode(20.0, 110.0, "asystole")], 120.0)  # still on in the last 16 s

    def test_per_type_counts_and_rates(self) -> None:
        results = [verdict("asystole", True, True), verdict("asystole", False, True),
                   verdict("asystole", False, False), verdict("extreme_bradycardia", True, False)]
        report = score_icu(results)
        assert report["by_type"]["asystole"] == {"TP": 1, "FN": 0, "FP": 1, "TN": 1, "TPR": 1.0, "TNR": 0.5,
                                                 "score": pytest.approx(2 / 3)}
        assert report["all"]["FN"] == 1 and report["all"]["score"] == pytest.approx(2 / 8)

    def test_cross_validation_picks_per_fold_on_the_other_folds(self) -> None:
        """A variant right on every record beats one that misses every true alarm, in every fold."""
        truth = [i % 3 == 0 for i in range(30)]
        right = [verdict("asystole", t, t) for t in truth]
        wrong = [verdict("asystole", t, False) for t in truth]
        cv = cross_validate({"right": right, "wrong": wrong}, folds=5, seeds=2)
        assert all(run["chosen"] == ["right"] * 5 for run in cv["runs"])
        assert cv["score_mean"] == 1.0 and cv["variants_on_all"]["wrong"]["TPR"] == 0.0


def test_alarms_file_lists_every_record(physionet: Path) -> None:
    alarms = load_icu_alarms(physionet / "challenge-2015")
    assert len(alarms) == 600 and sum(true for _, true in alarms.values()) == 239
    assert alarms["a103l"] == ("asystole", False) and alarms["b124s"] == ("extreme_bradycardia", True)


def test_evaluate_alarms_scores_challenge_records_with_strips(physionet: Path, tmp_path: Path) -> None:
    report = evaluate_alarms(SHIPPED_MODEL, [f"challenge-2015/{r}" for r in RECORDS], physionet, None,
                             AlarmConfig(), tmp_path, pictures=True)
    assert report["all"]["TP"] + report["all"]["FN"] + report["all"]["FP"] + report["all"]["TN"] == len(RECORDS)
    assert sum(s["TP"] + s["FN"] + s["FP"] + s["TN"] for s in report["by_type"].values()) == len(RECORDS)
    wrong = [r for r in report["per_record"] if r["outcome"] in ("FN", "FP")]
    assert len(list((tmp_path / "strips").glob("*.png"))) == len(wrong)
    assert json.loads((tmp_path / "alarms.json").read_text())["all"] == report["all"]


def test_challenge_records_are_not_mixed_with_annotated_ones(physionet: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on their own"):
        evaluate_alarms(SHIPPED_MODEL, ["challenge-2015/a103l", "mitdb/100"], physionet, None, AlarmConfig(),
                        tmp_path, pictures=False)


def test_noise_scales_to_detected_beats_on_records_without_reference_beats(physionet: Path) -> None:
    """Challenge records have no beat annotations: the noise is scaled to the QRS complexes the second detector
    finds, so the noisy signal is finite and the SNR holds."""
    record = load_record(physionet / "challenge-2015", "t106s")
    noise, noise_fs = load_noise(physionet, "em", "eval")
    noisy = add_noise(record, noise, noise_fs, 6.0)
    assert np.isfinite(noisy.signals_mv).all()
    added = noisy.signals_mv - record.signals_mv
    assert (np.abs(added).max(axis=1) > 0.01).all()  # every lead got noise

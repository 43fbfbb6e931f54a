"""The AF detector: RR irregularity features, the atrial_fibrillation alarm, and its training command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models import SHIPPED_MODEL
from pipeline.alarms.rules import AlarmEvent, DeviceAlarms, SignalCheck, af_probabilities
from pipeline.analysis.model import BeatModel
from pipeline.cli import main
from pipeline.config import AlarmConfig
from pipeline.detectors.af import AF_BEATS, AF_FEATURE_NAMES, AfDetectorInfo, af_feature_rows, af_features
from pipeline.tools.records import challenge_labels, load_records
from train.af import OTHER_THRESHOLDS, f1_scores
from train.alarm_eval import analyse_records

CLEAN = SignalCheck(flat=False, saturated=False, unreadable=False, peak_to_peak_mv=1.5)
RNG = np.random.default_rng(0)


def beat_times(rr_s: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(rr_s)])


def feature(times: np.ndarray, name: str, ectopic: np.ndarray | None = None) -> float:
    ectopic = np.zeros(len(times), bool) if ectopic is None else ectopic
    return float(af_features(times, ectopic, None)[AF_FEATURE_NAMES.index(name)])


def test_random_rr_is_irregular_sinus_and_bigeminy_are_not() -> None:
    sinus = beat_times(0.8 + 0.01 * RNG.standard_normal(AF_BEATS))
    af = beat_times(RNG.uniform(0.4, 1.0, AF_BEATS))
    bigeminy = beat_times(np.tile([0.5, 1.0], AF_BEATS // 2))
    assert feature(sinus, "median_drr") < 0.05 < 0.2 < feature(af, "median_drr")
    assert feature(bigeminy, "turning_points") == 1.0  # alternation: every RR is a peak or a trough
    assert 0.4 < feature(af, "turning_points") < 0.9
    assert feature(af, "entropy") > feature(sinus, "entropy")


def test_p_wave_interval_repeats_in_sinus_rhythm_not_in_af(physionet: Path) -> None:
    """The daemon's P-wave consistency at the end of 20 normal and 20 AF recordings of the Challenge 2017: the
    interval before each R peak repeats from beat to beat in sinus rhythm and not in AF."""
    labels = challenge_labels(physionet / "challenge-2017")
    names = [n for n in sorted(labels) if labels[n] == "N"][:20] + [n for n in sorted(labels) if labels[n] == "A"][:20]
    records = [r for _, r in load_records([f"challenge-2017/{n}" for n in names], physionet, ["MLII"])]
    last: dict[int, float | None] = {}
    for w in analyse_records(BeatModel(SHIPPED_MODEL), records, AlarmConfig(), 1.0):
        last[w.record] = w.p_wave
    consistency = np.array([np.nan if last[i] is None else last[i] for i in range(len(names))], dtype=np.float64)
    assert not np.isnan(consistency).any() and ((consistency >= -1.0) & (consistency <= 1.0)).all()
    assert np.median(consistency[20:]) + 0.15 < np.median(consistency[:20])


# A hand-made detector: AF when the median |dRR| / RR is high (standardised around 0.1).
DETECTOR = AfDetectorInfo(feature_names=AF_FEATURE_NAMES, feature_mean=(0.0,) * 2 + (0.1,) + (0.0,) * 5,
                          feature_std=(1.0,) * 2 + (0.05,) + (1.0,) * 5, coef=(0.0,) * 2 + (3.0,) + (0.0,) * 5,
                          intercept=0.0, threshold=0.5, training_data="test", cv_metrics={})


def step(alarms: DeviceAlarms, t: float, cls: str = "N") -> list[AlarmEvent]:
    """One window with one beat at `t` (s), judged by DETECTOR as the daemon does."""
    p_af = af_probabilities(DETECTOR, [alarms], [[(t, cls)]], [None])[0]
    return alarms.on_window(CLEAN, [(t, cls)], t + 0.3, t, p_af=p_af)


def test_features_of_many_rows_at_once_equal_those_of_each() -> None:
    times = np.stack([beat_times(RNG.uniform(0.4, 1.2, AF_BEATS)) for _ in range(50)])
    ectopic = RNG.random(times.shape) < 0.2
    p_wave = RNG.random(len(times)).tolist()
    rows = af_feature_rows(times, ectopic, p_wave)
    for k in range(len(times)):
        np.testing.assert_allclose(rows[k], af_features(times[k], ectopic[k], p_wave[k]), rtol=1e-12)


def test_alarm_raised_after_confirmation_with_configured_priority_and_cleared() -> None:
    config = AlarmConfig(af_priority="high")
    alarms = DeviceAlarms("dev", config, "test", 0.0, DETECTOR)
    times = beat_times(np.concatenate([0.8 + 0.01 * RNG.standard_normal(60), RNG.uniform(0.4, 1.0, 150),
                                       0.8 + 0.01 * RNG.standard_normal(120)]))
    onset, offset = times[60], times[210]
    events = []
    for t in times[1:]:
        events += step(alarms, float(t))
    af = [e for e in events if e.type == "atrial_fibrillation" and e.state in ("raised", "cleared")]
    assert [e.state for e in af] == ["raised", "cleared"]
    assert af[0].priority == "high" and 0.0 < af[0].evidence["p_af"] <= 1.0
    assert onset + config.af_confirm_s <= af[0].time <= onset + config.af_confirm_s + 30.0
    assert offset < af[1].time <= offset + config.af_clear_s + 30.0


def test_f1_scores_follow_the_challenge_definition() -> None:
    truth = ["N", "N", "A", "O", "~"]
    predicted = ["N", "A", "A", "N", "~"]
    f1 = f1_scores(truth, predicted)
    assert f1["N"] == 2 / (2 + 2) and f1["A"] == 2 / (2 + 1) and f1["O"] == 0.0 and f1["~"] == 1.0
    assert f1["challenge_score"] == (f1["N"] + f1["A"] + f1["O"]) / 3


def test_train_af_writes_a_detector_the_daemon_loads(physionet: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    assert main(["train-af", "--out", str(out), "--report-dir", str(tmp_path), "--physionet-dir", str(physionet),
                 "--folds", "2", "--challenge-limit", "80", "--records", "mitdb/201", "mitdb/203"]) == 0
    report = json.loads((tmp_path / "af-cv.json").read_text())
    detector = BeatModel(out).info.af_detector
    assert detector is not None and detector.threshold == report["threshold"]
    assert report["recordings"] == 80 and 0.0 <= report["thresholds"][str(report["threshold"])]["A"] <= 1.0
    # The learned "other rhythm" class changes which recordings are O or N, never which are A.
    assert set(report["learned_other"]) == {str(t) for t in OTHER_THRESHOLDS}
    assert {f1["A"] for f1 in report["learned_other"].values()} == {report["thresholds"][str(report["threshold"])]["A"]}


def test_atrial_fibrillation_supersedes_svt() -> None:
    """In AF every beat comes at a random time and the beat stage calls the early ones S: no SVT run alarm then."""
    alarms = DeviceAlarms("dev", AlarmConfig(), "test", 0.0, DETECTOR)
    t, events = 0.0, []
    for rr in RNG.uniform(0.4, 1.0, 150):
        t += float(rr)
        events += step(alarms, t)
    assert "atrial_fibrillation" in {e.type for e in events if e.state == "raised"}
    for _ in range(8):  # a run of fast "S" beats inside the AF episode
        t += 0.4
        events += step(alarms, t, "S")
    assert [e.state for e in events if e.type == "svt"] == []

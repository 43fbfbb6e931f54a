"""`ecgmon train-vf`: the VF detector's logistic regression, chosen by patient-wise cross-validation.

Data: the Creighton University Ventricular Tachyarrhythmia Database (cudb, VF marked by `[` `]`)
and MIT-BIH DS1 (record 207's ventricular flutter, and hours of other rhythms). Every record is
run through `pipeline.analysis.recent.RecentSignal` exactly as the daemon feeds it (the model's DSP, 1 s
windows); each window end gives one feature row. A row is VF when at least
`VF_LABEL_S` of its 4 s lie in a VF episode, not VF when none does; rows that straddle an
onset or offset, or lie in ventricular tachycardia (an alarm-worthy rhythm the VF alarm may
announce), are not learned from.

Cross-validation at the alarm level: records dealt into k folds (one patient each); for fold i
the regression fits the other folds, is written into a copy of the model, and fold i's records
run through the daemon's whole analysis (`train.alarm_eval`): VF episode sensitivity, time to
alarm and false VF alarms per hour, for each candidate threshold. The shipped threshold is the
lowest whose cross-validated false VF alarms stay at or below `max_false_per_hour`. DS2 is not
used here; `ecgmon evaluate-alarms` scores it afterwards.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.analysis.dsp import Preprocessor
from pipeline.analysis.model import BeatModel, ModelInfo
from pipeline.analysis.recent import RECENT_S, RecentSignal
from pipeline.config import AlarmConfig
from pipeline.detectors.vf import VF_FEATURE_NAMES, VfDetectorInfo, vf_features
from pipeline.tools.records import EcgRecord
from train.alarm_eval import RecordAlarms, collect_records, load_alarm_records, score
from train.alarm_score import Episode
from train.export import read_metadata
from train.logistic import attach_detector, fit_detector
from train.trainer import check_not_ds2

log = logging.getLogger(__name__)

VF_RECORDS = ("cudb/all", "mitdb/DS1")
VF_LABEL_S = 3.0  # seconds of a 4 s window inside VF that make it a VF row
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class VfRows:
    """Feature rows of one record: features (n, len(VF_FEATURE_NAMES)), VF label, learned from or not."""

    name: str
    features: NDArray[np.float64]
    is_vf: NDArray[np.bool_]
    used: NDArray[np.bool_]


def record_rows(name: str, record: EcgRecord, rhythm: list[Episode], info: ModelInfo) -> VfRows:
    """Run one record through the model's DSP and a RecentSignal in 1 s windows; label each window end."""
    pre = Preprocessor(info.filter, record.fs, info.fs, info.frame_size)
    recent = RecentSignal(1, info.fs)
    slot = np.array([0])
    rows, ends = [], []
    for k in range(record.window_count(1.0)):
        window = record.window(k, 1.0)
        frames = pre(window.samples_mv[0])
        if len(frames):
            recent.update(slot, frames[None])
        if recent.ready(slot)[0]:
            rows.append(vf_features(recent.history[slot], recent.fs)[0])
            ends.append(window.t0 + window.duration_s)
    end = np.asarray(ends)
    vf_s = np.zeros(len(end))
    vt = np.zeros(len(end), dtype=bool)
    for e in rhythm:
        inside = np.clip(np.minimum(end, e.end) - np.maximum(end - RECENT_S, e.start), 0.0, None)
        if e.label == "VF":
            vf_s += inside
        elif e.label == "VT":
            vt |= inside > 0
    is_vf = vf_s >= VF_LABEL_S
    used = (is_vf | (vf_s == 0)) & ~vt
    return VfRows(name, np.asarray(rows).reshape(-1, len(VF_FEATURE_NAMES)), is_vf, used)


def detector_info(rows: list[VfRows], threshold: float, training_data: str, cv_metrics: dict[str, Any]
                  ) -> VfDetectorInfo:
    features = np.vstack([r.features[r.used] for r in rows])
    is_vf = np.concatenate([r.is_vf[r.used] for r in rows])
    return fit_detector(VfDetectorInfo, VF_FEATURE_NAMES, features, is_vf, threshold, training_data, cv_metrics)


def cross_validate_vf(model_path: Path, named: list[tuple[str, EcgRecord]], rhythm_of: dict[str, list[Episode]],
                      rows: dict[str, VfRows], k: int, config: AlarmConfig) -> dict[str, Any]:
    """Alarm-level k-fold cross-validation for every threshold in THRESHOLDS."""
    names = sorted(rows)
    folds = [names[i::k] for i in range(k)]
    results: dict[float, list[RecordAlarms]] = {t: [] for t in THRESHOLDS}
    with tempfile.TemporaryDirectory() as folder:
        fold_model = Path(folder) / "fold.onnx"
        for i, held_out in enumerate(folds):
            train_rows = [rows[n] for n in names if n not in held_out]
            test = [(n, r) for n, r in named if n in held_out]
            for t in THRESHOLDS:
                fold_detector = detector_info(train_rows, t, "cross-validation fold", {})
                attach_detector(model_path, fold_model, "vf_detector", fold_detector)
                results[t] += collect_records(BeatModel(fold_model), test, rhythm_of, config, 1.0)
            log.info("VF fold %d of %d done", i + 1, k)
    report: dict[str, Any] = {"k": k, "folds": folds, "thresholds": {}}
    for t, found in results.items():
        scored = score(found)
        false_by_record = {row["record"]: row["ventricular_fibrillation"]["false"] for row in scored["per_record"]
                           if row.get("ventricular_fibrillation", {}).get("false")}
        report["thresholds"][str(t)] = {"vf": scored["by_type"]["ventricular_fibrillation"],
                                        "monitored_hours": scored["monitored_hours"],
                                        "false_vf_alarms_by_record": false_by_record}
    return report


def choose_threshold(report: dict[str, Any], max_false_per_hour: float) -> float:
    """The lowest threshold whose cross-validated false VF alarms per hour are at most `max_false_per_hour`."""
    for t in THRESHOLDS:
        if report["thresholds"][str(t)]["vf"]["false_per_hour"] <= max_false_per_hour:
            return t
    return THRESHOLDS[-1]


def train_vf(model_path: Path, out: Path, report_dir: Path, physionet_dir: Path, lead: str, config: AlarmConfig,
             k: int = 5, max_false_per_hour: float = 0.1, specs: tuple[str, ...] = VF_RECORDS) -> dict[str, Any]:
    """Cross-validate on `specs`, choose the threshold, fit on every record and attach the detector to `out`."""
    check_not_ds2(list(specs), "VF detector training")
    named, rhythm_of = load_alarm_records(list(specs), physionet_dir, [lead])
    info = read_metadata(model_path)
    rows = {name: record_rows(name, record, rhythm_of[name], info) for name, record in named}
    report = cross_validate_vf(model_path, named, rhythm_of, rows, k, config)
    threshold = choose_threshold(report, max_false_per_hour)
    chosen = report["thresholds"][str(threshold)]["vf"]
    report.update({"records": [n for n, _ in named], "features": VF_FEATURE_NAMES, "threshold": threshold,
                   "max_false_per_hour": max_false_per_hour})
    training_data = f"{', '.join(specs)}: {sum(len(r.features) for r in rows.values())} windows of 4 s"
    final = detector_info(list(rows.values()), threshold, training_data,
                          {key: chosen[key] for key in ("episode_se", "time_to_alarm_median_s",
                                                        "time_to_alarm_p95_s", "false_per_hour")})
    attach_detector(model_path, out, "vf_detector", final)
    report["coef"] = dict(zip(VF_FEATURE_NAMES, final.coef, strict=True))
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "vf-cv.json").write_text(json.dumps(report, indent=2))
    return report


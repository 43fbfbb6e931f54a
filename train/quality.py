"""`ecgmon train-quality`: the signal-quality detector's logistic regression, chosen by patient-wise CV.

What "unreadable" means here: noise that makes the beat stage wrong. Every training record runs
through the daemon's analysis (`analyse_records`, 1 s windows) clean and again with real recorded
noise added (the training halves of nstdb `em` and `ma`, at `SNRS_DB`; the evaluation halves and
the 118e*/119e* records are never used). Each window end gives one feature row of the recent
signal the daemon's detectors judge (`pipeline.detectors.quality.QUALITY_FEATURE_NAMES`). A row of a noisy
run is unreadable when its 4 s hold at least `MIN_EXTRA_ERRORS` more beat errors (reference beats
missed or beats invented, 150 ms matching) than the same 4 s of the clean run: errors the noise
made, not the record's own hard beats. Every other row (all clean rows, noisy rows the beat stage
still reads right) is readable.

Cross-validation: records dealt into k folds (one patient each, all its noise versions in its
fold); for fold i the regression fits the other folds and judges fold i's rows. Reported per
threshold: the share of unreadable rows flagged, the share of clean rows flagged (each one holds
back non-lethal alarms on a good signal), and the share of the noise-made beat errors that fall in
flagged windows (the false beats kept away from the alarm rules). The shipped threshold is the
lowest whose cross-validated clean rows flagged stay at or below `max_clean_flagged`. DS2 is not
used; `ecgmon evaluate-noise` and `ecgmon evaluate-alarms --noise` score it afterwards.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.analysis.model import BeatModel
from pipeline.analysis.recent import RECENT_S, RecentSignal, spectrum
from pipeline.config import AlarmConfig
from pipeline.detectors.quality import QUALITY_FEATURE_NAMES, QualityDetectorInfo, quality_extra_features
from pipeline.detectors.vf import vf_features
from pipeline.tools.records import load_records
from train.alarm_eval import analyse_records
from train.logistic import attach_detector, fit_detector, without_detector
from train.noise import add_noise, load_noise
from train.trainer import check_not_ds2

log = logging.getLogger(__name__)

QUALITY_RECORDS = ("mitdb/DS1",)
NOISES = ("em", "ma")
SNRS_DB = (12.0, 6.0, 0.0)
MATCH_S = 0.15  # a detected and a reference beat this close are the same beat (s)
MIN_EXTRA_ERRORS = 1
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
Condition = tuple[str, float] | None  # (nstdb noise record, SNR dB), or None: clean


@dataclass(frozen=True)
class RunRows:
    """One record under one condition: a feature row and the beat-error count of each window's last 4 s."""

    record: str
    features: NDArray[np.float64]
    errors: NDArray[np.int64]


def error_times(reference_s: NDArray[np.float64], detected_s: NDArray[np.float64]) -> NDArray[np.float64]:
    """Times (s) of reference beats with no detection within MATCH_S and of detections with no reference beat."""
    def unmatched(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
        if not len(b):
            return a
        at = np.clip(np.searchsorted(b, a), 1, len(b) - 1) if len(b) > 1 else np.zeros(len(a), dtype=np.int64)
        nearest = np.minimum(np.abs(a - b[at]), np.abs(a - b[np.maximum(at - 1, 0)]))
        missed: NDArray[np.float64] = a[nearest > MATCH_S]
        return missed

    return np.sort(np.concatenate([unmatched(reference_s, detected_s), unmatched(detected_s, reference_s)]))


def run_condition(model_path: Path, specs: tuple[str, ...], physionet_dir: Path, lead: str, config: AlarmConfig,
                  condition: Condition) -> list[RunRows]:
    """Every record of `specs` through the daemon's analysis under `condition`: rows of the windows whose recent
    signal is whole."""
    named = load_records(list(specs), physionet_dir, [lead])
    records = [r for _, r in named]
    if condition is not None:
        noise, noise_fs = load_noise(physionet_dir, condition[0], "train")
        records = [add_noise(r, noise, noise_fs, condition[1], offset_s=60.0 * k) for k, r in enumerate(records)]
    model = BeatModel(model_path)
    fs = RecentSignal(1, model.info.fs).fs
    recent: list[list[NDArray[np.float32]]] = [[] for _ in records]
    ends: list[list[float]] = [[] for _ in records]
    found: list[list[float]] = [[] for _ in records]
    for w in analyse_records(model, records, config, 1.0):
        found[w.record] += [t for t, _ in w.beats]
        if w.recent_mv is not None:
            recent[w.record].append(w.recent_mv)
            ends[w.record].append(w.window.t0 + w.window.duration_s)
    out = []
    for (name, record), x, end, beats in zip(named, recent, ends, found, strict=True):
        history = np.stack(x)
        spec = spectrum(history, fs)
        features = np.hstack([vf_features(history, fs, spec), quality_extra_features(history, fs, spec)])
        errors = error_times(record.beat_samples / record.fs, np.asarray(beats, dtype=np.float64))
        end_s = np.asarray(end)
        counts = np.searchsorted(errors, end_s) - np.searchsorted(errors, end_s - RECENT_S)
        out.append(RunRows(name, features, counts.astype(np.int64)))
    log.info("quality rows for %s done", "clean" if condition is None else f"{condition[0]} at {condition[1]:g} dB")
    return out


@dataclass(frozen=True)
class QualityRows:
    """Rows of one record over every condition: features, unreadable label, and noise-made errors per row."""

    record: str
    features: NDArray[np.float64]
    unreadable: NDArray[np.bool_]
    clean: NDArray[np.bool_]
    extra_errors: NDArray[np.int64]


def label_rows(runs: dict[Condition, list[RunRows]]) -> list[QualityRows]:
    """Per record: its clean rows (readable) and noisy rows (unreadable where the noise added beat errors)."""
    clean_runs = runs[None]
    out = []
    for i, clean in enumerate(clean_runs):
        parts = [(clean.features, np.zeros(len(clean.errors), dtype=np.int64), True)]
        for condition, rows in runs.items():
            if condition is not None:
                parts.append((rows[i].features, np.maximum(rows[i].errors - clean.errors, 0), False))
        extra = np.concatenate([e for _, e, _ in parts])
        out.append(QualityRows(clean.record, np.vstack([f for f, _, _ in parts]), extra >= MIN_EXTRA_ERRORS,
                               np.concatenate([np.full(len(e), c) for _, e, c in parts]), extra))
    return out


def detector_info(rows: list[QualityRows], threshold: float, training_data: str, cv_metrics: dict[str, Any]
                  ) -> QualityDetectorInfo:
    features = np.vstack([r.features for r in rows])
    unreadable = np.concatenate([r.unreadable for r in rows])
    return fit_detector(QualityDetectorInfo, QUALITY_FEATURE_NAMES, features, unreadable, threshold, training_data,
                        cv_metrics)


def cross_validate_quality(rows: list[QualityRows], k: int) -> dict[str, Any]:
    """Window-level k-fold cross-validation by record, for every threshold in THRESHOLDS."""
    folds = [rows[i::k] for i in range(k)]
    held_out_p = []
    for i, held_out in enumerate(folds):
        fitted = detector_info([r for j, f in enumerate(folds) if j != i for r in f], 0.5, "fold", {})
        held_out_p += [(r, fitted.probability(r.features)) for r in held_out]
    report: dict[str, Any] = {"k": k, "folds": [[r.record for r in f] for f in folds], "thresholds": {}}
    for t in THRESHOLDS:
        flagged = np.concatenate([p >= t for _, p in held_out_p])
        unreadable = np.concatenate([r.unreadable for r, _ in held_out_p])
        clean = np.concatenate([r.clean for r, _ in held_out_p])
        extra = np.concatenate([r.extra_errors for r, _ in held_out_p])
        report["thresholds"][str(t)] = {
            "unreadable_flagged": float(flagged[unreadable].mean()),
            "clean_flagged": float(flagged[clean].mean()),
            "noisy_readable_flagged": float(flagged[~clean & ~unreadable].mean()),
            "noise_errors_in_flagged_windows": float(extra[flagged].sum() / max(extra.sum(), 1)),
        }
    return report


def choose_threshold(report: dict[str, Any], max_clean_flagged: float) -> float:
    """The lowest threshold whose cross-validated share of clean rows flagged is at most `max_clean_flagged`."""
    for t in THRESHOLDS:
        if report["thresholds"][str(t)]["clean_flagged"] <= max_clean_flagged:
            return t
    return THRESHOLDS[-1]


def train_quality(model_path: Path, out: Path, report_dir: Path, physionet_dir: Path, lead: str, config: AlarmConfig,
                  k: int = 5, max_clean_flagged: float = 0.01, specs: tuple[str, ...] = QUALITY_RECORDS,
                  jobs: int = 2) -> dict[str, Any]:
    """Run every condition (in `jobs` processes), cross-validate, choose the threshold, fit on every record and
    attach the detector to `out`."""
    check_not_ds2(list(specs), "signal-quality training")
    conditions: list[Condition] = [None, *((n, s) for n in NOISES for s in SNRS_DB)]
    n = len(conditions)
    with (without_detector(model_path, "quality_detector") as base,
          ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool):
        results = pool.map(run_condition, [base] * n, [specs] * n, [physionet_dir] * n, [lead] * n, [config] * n,
                           conditions)
        runs = dict(zip(conditions, results, strict=True))
    rows = label_rows(runs)
    report = cross_validate_quality(rows, k)
    threshold = choose_threshold(report, max_clean_flagged)
    n_rows = sum(len(r.features) for r in rows)
    report.update({"records": [r.record for r in rows], "features": QUALITY_FEATURE_NAMES, "threshold": threshold,
                   "max_clean_flagged": max_clean_flagged, "noises": NOISES, "snrs_db": SNRS_DB,
                   "noise_part": "training half of each nstdb noise record", "rows": n_rows,
                   "unreadable_rows": int(sum(r.unreadable.sum() for r in rows))})
    training_data = (f"{', '.join(specs)} clean and with nstdb {'/'.join(NOISES)} (training halves) at "
                     f"{'/'.join(f'{s:g}' for s in SNRS_DB)} dB: {n_rows} windows of 4 s")
    final = detector_info(rows, threshold, training_data, report["thresholds"][str(threshold)])
    attach_detector(model_path, out, "quality_detector", final)
    report["coef"] = dict(zip(QUALITY_FEATURE_NAMES, final.coef, strict=True))
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "quality-cv.json").write_text(json.dumps(report, indent=2))
    return report


def format_quality_report(report: dict[str, Any]) -> str:
    lines = ["threshold | unreadable flagged % | clean flagged % | noisy-readable flagged % | noise errors caught %"]
    for t, s in report["thresholds"].items():
        lines.append(f"{t:>9} | {100 * s['unreadable_flagged']:20.1f} | {100 * s['clean_flagged']:15.2f} | "
                     f"{100 * s['noisy_readable_flagged']:24.1f} | {100 * s['noise_errors_in_flagged_windows']:.1f}")
    return "\n".join(lines)

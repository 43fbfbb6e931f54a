"""Patient-wise cross-validation: how a training recipe scores on patients it never saw, over several seeds.

The records of a config's training and validation sets (one patient each: MIT-BIH DS1, the SVDB) are
dealt into k folds. For fold i the model trains on the other folds but one, stops early on fold i + 1,
and is scored on fold i, after EC57, streamed through the daemon's code path. DS2 takes no part: it
scores the shipped model once and never chooses anything.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.model import BeatModel
from pipeline.tools.records import expand_all, load_records, resolve_records
from train.config import TrainConfig
from train.ec57 import Ec57Stats, confusion, empty_matrix
from train.evaluate import stream_records
from train.export import export_onnx
from train.trainer import check_split, train

log = logging.getLogger(__name__)

FIGURES = ("qrs_se", "qrs_ppv", "S_se", "S_ppv", "S_f1", "V_se", "V_ppv", "V_f1", "macro_f1")


def patient_folds(config: TrainConfig, k: int, seed: int) -> list[list[str]]:
    """The config's training and validation records ("db/record"), shuffled by `seed` and dealt into k folds."""
    pairs = expand_all(resolve_records(config.data.train_records + config.data.val_records),
                       config.data.physionet_dir)
    names = sorted({f"{db}/{name}" for db, name in pairs})
    if k < 3:
        raise ValueError(f"{k} folds: at least 3 are needed (one tests, one stops early, the rest train)")
    if len(names) < 3 * k:
        raise ValueError(f"{len(names)} records are too few for {k} folds (at least 3 per fold)")
    order = np.random.default_rng(seed).permutation(len(names))
    return [sorted(names[j] for j in order[i::k]) for i in range(k)]


def cross_validate(config: TrainConfig, k: int, seeds: list[int], out_dir: Path, jobs: int = 1) -> dict[str, Any]:
    """Train and score every fold for every seed (`jobs` at a time, in processes of their own); write cv.json
    to `out_dir` and return it. The folds are the same for every seed (dealt with the first); a seed changes
    the training."""
    check_split(config)
    folds = patient_folds(config, k, seeds[0])
    tasks = [(config, folds, i, seed, out_dir) for seed in seeds for i in range(k)]
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_log_like,
                                 initargs=(logging.getLogger().level,)) as pool:
            matrices = list(pool.map(run_fold, *zip(*tasks, strict=True)))
    else:
        matrices = [run_fold(*task) for task in tasks]
    runs: list[dict[str, Any]] = []
    for n, seed in enumerate(seeds):
        total = np.sum(matrices[n * k:(n + 1) * k], axis=0)
        runs.append({"seed": seed, "gross": {f: float(Ec57Stats(total).summary()[f]) for f in FIGURES},
                     "folds": [{f: float(Ec57Stats(m).summary()[f]) for f in FIGURES}
                               for m in matrices[n * k:(n + 1) * k]]})
    spread = {f: _mean_std([r["gross"][f] for r in runs]) for f in FIGURES}
    mean, std = {f: m for f, (m, _) in spread.items()}, {f: s for f, (_, s) in spread.items()}
    report = {"k": k, "seeds": seeds, "folds": folds, "runs": runs, "mean": mean, "std": std,
              "training": {"device": config.device, "config_hash": config.hash()},
              "rules": "EC57 gross over the held-out folds, 150 ms, first 5 min of each record not scored, "
                       "streamed in 1 s windows"}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cv.json").write_text(json.dumps(report, indent=2, allow_nan=True))
    return report


def run_fold(config: TrainConfig, folds: list[list[str]], i: int, seed: int, out_dir: Path) -> Any:
    """Train on every fold but i and i + 1 (early stopping), return the EC57 matrix of fold i."""
    k = len(folds)
    train_records = [r for j, fold in enumerate(folds) if j not in (i, (i + 1) % k) for r in fold]
    fold_config = config.model_copy(update={
        "name": f"{config.name}-cv{k}-fold{i}-seed{seed}", "out_dir": out_dir / "runs",
        "data": config.data.model_copy(update={"train_records": train_records, "val_records": folds[(i + 1) % k]}),
        "optim": config.optim.model_copy(update={"seed": seed})})
    run_dir = train(fold_config)
    model_path = run_dir / "model.onnx"
    export_onnx(run_dir / "best.pt", model_path)
    matrix = score(model_path, folds[i], config)
    log.info("seed %d fold %d (%s): %s", seed, i, ", ".join(folds[i]), _line(Ec57Stats(matrix).summary()))
    return matrix


def score(model_path: Path, records: list[str], config: TrainConfig) -> Any:
    """EC57 matrix of `model_path` on `records` (the config's `data.leads` of each), streamed in 1 s windows."""
    loaded = [r for _, r in load_records(records, config.data.physionet_dir, config.data.leads)]
    matrix = empty_matrix()
    for record, (det_samples, det_classes) in zip(loaded, stream_records(BeatModel(model_path), loaded, 1.0),
                                                  strict=True):
        matrix += confusion(record.beat_samples / record.fs, record.beat_classes, det_samples / record.fs,
                            det_classes)
    return matrix


def _log_like(level: int) -> None:
    """A fold's process logs at its parent's level (a spawned process starts with logging unconfigured)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation of the defined values (a figure is undefined, NaN, without its class)."""
    defined = [v for v in values if not np.isnan(v)]
    return (float(np.mean(defined)), float(np.std(defined))) if defined else (float("nan"), float("nan"))


def _line(summary: dict[str, Any]) -> str:
    return (f"QRS Se {100 * summary['qrs_se']:.2f} +P {100 * summary['qrs_ppv']:.2f}; S F1 {summary['S_f1']:.3f}; "
            f"V F1 {summary['V_f1']:.3f}")


def format_cv(report: dict[str, Any]) -> str:
    """Mean ± standard deviation over the seeds, for the terminal."""
    lines = [f"{report['k']}-fold patient-wise cross-validation, seeds {report['seeds']} ({report['rules']})"]
    lines += [f"{f:<9} {report['mean'][f]:.4f} ± {report['std'][f]:.4f}" for f in FIGURES]
    return "\n".join(lines)

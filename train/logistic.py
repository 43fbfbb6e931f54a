"""Fitting the detectors' logistic regressions (`pipeline.detectors.logistic.LogisticDetector`)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray

from pipeline.detectors.logistic import LogisticDetector
from train.export import read_metadata, versioned, write_metadata

L2 = 1e-2  # ridge penalty of the standardised weights
D = TypeVar("D", bound=LogisticDetector)
DetectorField = Literal["vf_detector", "af_detector", "quality_detector"]


def fit_logistic(features: NDArray[np.float64], positive: NDArray[np.bool_]
                 ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], float]:
    """Class-balanced, ridge-penalised logistic regression by Newton's method: mean, std, coef, intercept."""
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-9
    z = np.hstack([(features - mean) / std, np.ones((len(features), 1))])
    y = positive.astype(np.float64)
    weight = np.where(positive, 0.5 / max(y.mean(), 1e-9), 0.5 / max(1 - y.mean(), 1e-9))
    penalty = L2 * np.diag([1.0] * (z.shape[1] - 1) + [0.0])
    w = np.zeros(z.shape[1])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        step = np.linalg.solve((z * (weight * p * (1 - p))[:, None]).T @ z + penalty,
                               z.T @ (weight * (p - y)) + penalty @ w)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mean, std, w[:-1], float(w[-1])


def fit_detector(kind: type[D], feature_names: tuple[str, ...], features: NDArray[np.float64],
                 positive: NDArray[np.bool_], threshold: float, training_data: str, cv_metrics: dict[str, Any]) -> D:
    """A detector of class `kind` fitted to feature rows and their labels."""
    mean, std, coef, intercept = fit_logistic(features, positive)
    return kind(feature_names=feature_names, feature_mean=tuple(mean.tolist()), feature_std=tuple(std.tolist()),
                coef=tuple(coef.tolist()), intercept=intercept, threshold=threshold, training_data=training_data,
                cv_metrics=cv_metrics)


@contextmanager
def without_detector(model_path: Path, field: DetectorField) -> Iterator[Path]:
    """A temporary copy of `model_path` without its `field` detector, for the command that retrains it: a detector
    fitted to another feature set (an earlier ecgmon) stops the model from loading, not its retraining."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / model_path.name
        shutil.copy(model_path, copy)
        write_metadata(copy, read_metadata(copy).model_copy(update={field: None}))
        yield copy


def attach_detector(model_path: Path, out: Path, field: DetectorField, detector: LogisticDetector) -> None:
    """Copy `model_path` to `out` with `detector` as its `field` (weights and other metadata untouched); the
    version gains (or replaces) a suffix `.vf.<hash>` / `.af.<hash>` / `.quality.<hash>` of the detector."""
    if out != model_path:
        shutil.copy(model_path, out)
    info = read_metadata(out)
    digest = hashlib.sha256(detector.model_dump_json().encode()).hexdigest()[:8]
    version = versioned(info.version, field.split("_")[0], digest)
    write_metadata(out, info.model_copy(update={field: detector, "version": version}))

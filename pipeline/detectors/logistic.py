"""A logistic regression over named features, as the VF and AF detectors carry it in the model's metadata."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field


class LogisticDetector(BaseModel):
    """Standardised features, weights, intercept and decision threshold, with provenance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature_names: tuple[str, ...]
    feature_mean: tuple[float, ...]
    feature_std: tuple[float, ...]
    coef: tuple[float, ...] = Field(description="weights of the standardised features")
    intercept: float
    threshold: float = Field(gt=0, lt=1, description="probability at or above which the detector says yes")
    training_data: str
    cv_metrics: dict[str, Any] = Field(description="cross-validated scores of the command that trained it")

    @cached_property
    def _arrays(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Mean, std and weights as arrays, made once: `probability` runs per window or beat of every stream."""
        return np.asarray(self.feature_mean), np.asarray(self.feature_std), np.asarray(self.coef)

    def probability(self, features: NDArray[np.float64]) -> NDArray[np.float64]:
        """Probability of each feature row (n, len(feature_names))."""
        mean, std, coef = self._arrays
        p: NDArray[np.float64] = 1.0 / (1.0 + np.exp(-(((features - mean) / std) @ coef + self.intercept)))
        return p

    def matches(self, feature_names: tuple[str, ...]) -> bool:
        """Whether it takes exactly `feature_names`, with one mean, std and weight each."""
        sizes = {len(self.feature_mean), len(self.feature_std), len(self.coef)}
        return self.feature_names == feature_names and sizes == {len(feature_names)}

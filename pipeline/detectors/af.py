"""Atrial fibrillation (AF) from the beat sequence: how irregular the RR intervals are.

In AF the ventricles are driven at random: RR intervals vary from beat to beat without
pattern, while ectopy (bigeminy, isolated early beats) varies in patterns and sinus rhythm
hardly at all. Over the last `AF_BEATS` RR intervals of a stream's detected beats:

- `rr_cv`: standard deviation over mean of RR.
- `nrmssd`: root mean square of successive RR differences over mean RR.
- `median_drr`: median |ΔRR| over median RR (robust to a few ectopic beats).
- `turning_points`: the share of RR intervals that are a local maximum or minimum (2/3 for
  a random sequence, low for a trend, 1 for alternation such as bigeminy).
- `entropy`: Shannon entropy (bits) of ΔRR over 8 bins of ±0.5 times the median RR.
- `log_rr_s`: log mean RR (s).
- `ectopic_share`: the share of the beats the beat model called S or V.
- `p_wave_consistency`: atrial activity, how alike the intervals before the recent R peaks
  are (`pipeline.analysis.beat_context`): high where every beat has the same P wave, low in
  AF, where that interval holds fibrillatory waves; 0 where the model has no beat stage.

A logistic regression, trained by `ecgmon train-af` and carried in the model's metadata,
turns them into P(AF).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from pipeline.detectors.logistic import LogisticDetector

AF_BEATS = 32  # RR intervals judged
ENTROPY_EDGES = np.linspace(-0.5, 0.5, 9)
AF_FEATURE_NAMES = ("rr_cv", "nrmssd", "median_drr", "turning_points", "entropy", "log_rr_s", "ectopic_share",
                    "p_wave_consistency")


class AfDetectorInfo(LogisticDetector):
    """The AF detector (P(AF) of AF_FEATURE_NAMES), trained by `ecgmon train-af`."""


def af_features(times_s: NDArray[np.float64], ectopic: NDArray[np.bool_], p_wave: float | None
                ) -> NDArray[np.float64]:
    """AF_FEATURE_NAMES of the beats at `times_s` (s, ascending, 4 or more: the last AF_BEATS + 1 are used);
    `ectopic`: whether each beat was called S or V; `p_wave`: the stream's P-wave consistency (None: unknown)."""
    row: NDArray[np.float64] = af_feature_rows(times_s[None, -(AF_BEATS + 1):], ectopic[None, -(AF_BEATS + 1):],
                                               [p_wave])[0]
    return row


def af_feature_rows(times_s: NDArray[np.float64], ectopic: NDArray[np.bool_], p_wave: list[float | None]
                    ) -> NDArray[np.float64]:
    """AF_FEATURE_NAMES of each row of beats (n, m): times (s, ascending along a row, m ≥ 4), whether each
    beat was called S or V, and each row's P-wave consistency (None: unknown, taken as 0); all rows at once (the
    daemon judges every device of a batch together)."""
    rr = np.diff(times_s, axis=1)
    mean = np.maximum(rr.mean(axis=1), 1e-3)
    median = np.maximum(np.median(rr, axis=1), 1e-3)
    drr = np.diff(rr, axis=1)
    middle, before, after = rr[:, 1:-1], rr[:, :-2], rr[:, 2:]
    turning = ((middle > before) & (middle > after)) | ((middle < before) & (middle < after))
    # Histogram of ΔRR / median RR over 8 bins of [-0.5, 0.5] (values beyond clipped into the end bins), a
    # value on an edge in the bin above it, as numpy.histogram counts.
    scaled = np.clip(drr / median[:, None], -0.5, 0.5)
    bins = np.minimum(((scaled + 0.5) * 8).astype(np.int64), 7)
    bins -= scaled < ENTROPY_EDGES[bins]
    bins += (scaled >= ENTROPY_EDGES[bins + 1]) & (bins != 7)
    counts = np.bincount((bins + 8 * np.arange(len(rr))[:, None]).ravel(), minlength=8 * len(rr)
                         ).reshape(len(rr), 8).astype(np.float64)
    share = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(share > 0, share * np.log2(share), 0.0).sum(axis=1)
    features: NDArray[np.float64] = np.stack(
        [rr.std(axis=1) / mean, np.sqrt(np.mean(drr**2, axis=1)) / mean, np.median(np.abs(drr), axis=1) / median,
         turning.mean(axis=1), entropy, np.log(mean), ectopic[:, 1:].mean(axis=1),
         np.array([0.0 if p is None else p for p in p_wave])], axis=1)
    return features

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

A logistic regression, trained by `ecgmon train-af` and carried in the model's metadata,
turns them into P(AF). The P-wave's absence is not used yet.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from pipeline.logistic import LogisticDetector

AF_BEATS = 32  # RR intervals judged
AF_FEATURE_NAMES = ("rr_cv", "nrmssd", "median_drr", "turning_points", "entropy", "log_rr_s", "ectopic_share")


class AfDetectorInfo(LogisticDetector):
    """The AF detector (P(AF) of AF_FEATURE_NAMES), trained by `ecgmon train-af`."""


def af_features(times_s: NDArray[np.float64], ectopic: NDArray[np.bool_]) -> NDArray[np.float64]:
    """AF_FEATURE_NAMES of the beats at `times_s` (s, ascending, AF_BEATS + 1 of them or more: the last
    AF_BEATS + 1 are used); `ectopic`: whether each beat was called S or V."""
    times_s, ectopic = times_s[-(AF_BEATS + 1):], ectopic[-(AF_BEATS + 1):]
    rr = np.diff(times_s)
    mean, median = max(float(rr.mean()), 1e-3), max(float(np.median(rr)), 1e-3)
    drr = np.diff(rr)
    middle = rr[1:-1]
    turning = ((middle > rr[:-2]) & (middle > rr[2:])) | ((middle < rr[:-2]) & (middle < rr[2:]))
    counts, _ = np.histogram(np.clip(drr / median, -0.5, 0.5), bins=8, range=(-0.5, 0.5))
    share = counts[counts > 0] / counts.sum()
    return np.array([rr.std() / mean, np.sqrt(np.mean(drr**2)) / mean, np.median(np.abs(drr)) / median,
                     turning.mean(), -(share * np.log2(share)).sum(), np.log(mean), ectopic[1:].mean()])

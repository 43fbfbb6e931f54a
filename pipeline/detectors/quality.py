"""Signal quality: is the last 4 s readable, or would noise turn into beats?

Noise that hides QRS complexes (electrode motion, muscle, baseline wander) makes the beat stage
miss or invent beats, and every wrong beat can become a false alarm. This detector judges each
stream's `pipeline.analysis.recent.RecentSignal` (the last 4 s of the band-passed signal at 90 Hz) from the
VF detector's measures (`pipeline.detectors.vf.VF_FEATURE_NAMES`: kurtosis, spectral shape, amplitude) and
established signal-quality indices, combined by a logistic regression trained with
`ecgmon train-quality` and carried in the model's metadata. Its "unreadable" raises the
`poor_signal` alarm, which holds back the non-lethal physiological alarms.

Extra measures (shares of the power at 0.5-40 Hz):
- `qrs_band`: at 5-15 Hz, where QRS energy lies (pSQI, Li, Clifford & Behar 2008).
- `low_band`: at 0.5-3 Hz: baseline wander and electrode motion left by the high-pass.
- `high_band`: at 20-40 Hz: muscle artefact.

No measure that assumes a QRS in every second: pauses and slow rhythms are readable signal
(a per-second peak-height spread, tried first, flagged the sinus pauses of MIT-BIH 232).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from pipeline.analysis.recent import Spectrum, spectrum
from pipeline.detectors.logistic import LogisticDetector
from pipeline.detectors.vf import VF_FEATURE_NAMES

QUALITY_EXTRA_NAMES = ("qrs_band", "low_band", "high_band")
QUALITY_FEATURE_NAMES = VF_FEATURE_NAMES + QUALITY_EXTRA_NAMES


class QualityDetectorInfo(LogisticDetector):
    """The signal-quality detector (P(unreadable) of QUALITY_FEATURE_NAMES), trained by `ecgmon train-quality`."""


def quality_extra_features(x: NDArray[np.float32], fs: float, spec: Spectrum | None = None) -> NDArray[np.float64]:
    """QUALITY_EXTRA_NAMES of each row of `x` (n, samples): band-passed signal in mV at `fs` (Hz); `spec`: its
    spectrum, when the VF detector has it already."""
    spec = spec if spec is not None else spectrum(x, fs)
    power, freq = spec.power, spec.freq

    def share(low_hz: float, high_hz: float) -> NDArray[np.float64]:
        band: NDArray[np.float64] = power[:, (freq >= low_hz) & (freq <= high_hz)].sum(axis=1)
        return band

    total = np.maximum(share(0.5, 40.0), 1e-12)
    features: NDArray[np.float64] = np.stack([share(5.0, 15.0) / total, share(0.5, 3.0) / total,
                                              share(20.0, 40.0) / total], axis=1)
    return features

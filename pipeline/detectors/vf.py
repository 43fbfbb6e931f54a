"""Ventricular fibrillation and flutter (VF) from the signal itself, not from beats.

In VF there are no QRS complexes to find: the beat stage misses the waves, and rules on beats
report a slow or absent heart rate. This detector looks at each stream's
`pipeline.analysis.recent.RecentSignal` (the last 4 s of the band-passed signal at 90 Hz) and computes
established VF measures on it, combined by a logistic regression trained with `ecgmon train-vf`
and carried in the model's metadata:

- `leakage`: the VF filter of Kuo & Dillman (1978): a notch at the signal's mean frequency;
  a near-sinusoid (VF) passes little through it.
- `above_fifth`: the share of samples above 20 % of the window's largest |x|, after Arafat's
  threshold crossing sample count (2009): high for VF's waves, low for narrow QRS.
- `mean_abs`: mean |x| over the largest |x| (Anas et al. 2010).
- `vf_band`: the share of signal power at 2-7 Hz (of 0.5-30 Hz).
- `peak_concentration`: the share of power within 1 Hz of the spectral peak: VF is nearly periodic.
- `log_kurtosis`: log of the kurtosis: narrow QRS complexes make a normal ECG peaked (high), VF's
  waves do not.
- `log_amplitude_mv`: log of the window's standard deviation (mV): tells fine VF from a flat line.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from pipeline.analysis.recent import Spectrum, spectrum
from pipeline.detectors.logistic import LogisticDetector

VF_FEATURE_NAMES = ("leakage", "above_fifth", "mean_abs", "vf_band", "peak_concentration", "log_kurtosis",
                    "log_amplitude_mv")


class VfDetectorInfo(LogisticDetector):
    """The VF detector (P(VF) of VF_FEATURE_NAMES), trained by `ecgmon train-vf`."""


def vf_features(x: NDArray[np.float32], fs: float, spec: Spectrum | None = None) -> NDArray[np.float64]:
    """VF_FEATURE_NAMES of each row of `x` (n, samples): band-passed signal in mV at `fs` (Hz); `spec`: its
    spectrum (`pipeline.analysis.recent.spectrum`), when computed already."""
    x = x.astype(np.float64)
    n = x.shape[1]
    abs_x = np.abs(x)
    peak = np.maximum(abs_x.max(axis=1), 1e-6)
    # VF filter leakage: half the mean period N from the mean |x| / mean |dx| ratio, then |x_i + x_{i-N}|
    half_period = np.clip(np.floor(np.pi * abs_x.sum(axis=1) / np.maximum(np.abs(np.diff(x, axis=1)).sum(axis=1),
                                                                           1e-9) + 0.5), 1, n // 2).astype(np.int64)
    columns = np.arange(n)
    earlier = np.take_along_axis(x, np.maximum(columns[None, :] - half_period[:, None], 0), axis=1)
    paired = columns[None, :] >= half_period[:, None]
    leakage = (np.abs(x + earlier) * paired).sum(axis=1) / np.maximum(((abs_x + np.abs(earlier)) * paired).sum(axis=1),
                                                                       1e-9)
    above_fifth = (abs_x > 0.2 * peak[:, None]).mean(axis=1)
    mean_abs = abs_x.mean(axis=1) / peak
    spec = spec if spec is not None else spectrum(x, fs)
    power, freq = spec.power, spec.freq
    band = power[:, (freq >= 2.0) & (freq <= 7.0)].sum(axis=1)
    total = np.maximum(power[:, (freq >= 0.5) & (freq <= 30.0)].sum(axis=1), 1e-12)
    in_range = (freq >= 0.5) & (freq <= 30.0)
    peak_hz = freq[in_range][np.argmax(power[:, in_range], axis=1)]
    near_peak = (np.abs(freq[None, :] - peak_hz[:, None]) <= 1.0) & in_range[None, :]
    concentration = (power * near_peak).sum(axis=1) / total
    centred = x - x.mean(axis=1, keepdims=True)
    squared = centred * centred
    variance = np.maximum(squared.mean(axis=1), 1e-12)
    kurtosis = (squared * squared).mean(axis=1) / variance**2  # not centred**4: pow is 30x slower
    log_kurtosis = np.log(np.maximum(kurtosis, 1e-6))
    log_amplitude = np.log(np.maximum(np.sqrt(variance), 1e-4))
    return np.stack([leakage, above_fifth, mean_abs, band / total, concentration, log_kurtosis, log_amplitude], axis=1)

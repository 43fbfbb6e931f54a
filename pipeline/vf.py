"""Ventricular fibrillation and flutter (VF) from the signal itself, not from beats.

In VF there are no QRS complexes to find: the beat stage misses the waves, and rules on beats
report a slow or absent heart rate. This detector looks at the last `VF_WINDOW_S` of each
stream's band-passed signal (the DSP output the beat model sees, decimated to 90 Hz: VF
energy lies at 2-10 Hz) and computes established VF measures on it, combined by a logistic
regression trained with `ecgmon train-vf` and carried in the model's metadata:

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

State per stream: the last `VF_WINDOW_S` of decimated signal and how much has been seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.logistic import LogisticDetector

VF_WINDOW_S = 4.0  # analysis window (s)
DECIMATION = 4  # model rate 360 Hz -> 90 Hz
VF_FEATURE_NAMES = ("leakage", "above_fifth", "mean_abs", "vf_band", "peak_concentration", "log_kurtosis",
                    "log_amplitude_mv")


class VfDetectorInfo(LogisticDetector):
    """The VF detector (P(VF) of VF_FEATURE_NAMES), trained by `ecgmon train-vf`."""


def vf_features(x: NDArray[np.float32], fs: float) -> NDArray[np.float64]:
    """VF_FEATURE_NAMES of each row of `x` (n, samples): band-passed signal in mV at `fs` (Hz)."""
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
    power = np.abs(np.fft.rfft(x * np.hanning(n), axis=1)) ** 2
    freq = np.fft.rfftfreq(n, 1.0 / fs)
    band = power[:, (freq >= 2.0) & (freq <= 7.0)].sum(axis=1)
    total = np.maximum(power[:, (freq >= 0.5) & (freq <= 30.0)].sum(axis=1), 1e-12)
    in_range = (freq >= 0.5) & (freq <= 30.0)
    peak_hz = freq[in_range][np.argmax(power[:, in_range], axis=1)]
    near_peak = (np.abs(freq[None, :] - peak_hz[:, None]) <= 1.0) & in_range[None, :]
    concentration = (power * near_peak).sum(axis=1) / total
    centred = x - x.mean(axis=1, keepdims=True)
    variance = np.maximum((centred**2).mean(axis=1), 1e-12)
    kurtosis = (centred**4).mean(axis=1) / variance**2
    log_kurtosis = np.log(np.maximum(kurtosis, 1e-6))
    log_amplitude = np.log(np.maximum(np.sqrt(variance), 1e-4))
    return np.stack([leakage, above_fifth, mean_abs, band / total, concentration, log_kurtosis, log_amplitude], axis=1)


class VfDetector:
    """Per-slot signal history (arrays indexed by slot) and the VF probability of its last `VF_WINDOW_S`."""

    FIELDS = ("history", "samples_seen")

    def __init__(self, n_slots: int, model_fs: float, info: VfDetectorInfo | None) -> None:
        """`model_fs`: the rate of the frames fed in (Hz); `info`: the trained regression (None: features only)."""
        self.fs = model_fs / DECIMATION
        self.info = info
        self.history = np.zeros((n_slots, round(VF_WINDOW_S * self.fs)), dtype=np.float32)
        self.samples_seen = np.zeros(n_slots, dtype=np.int64)

    def reset(self, slots: NDArray[np.int64]) -> None:
        self.history[slots] = 0.0
        self.samples_seen[slots] = 0

    def grow(self, n_slots: int) -> None:
        extra = n_slots - len(self.samples_seen)
        self.history = np.concatenate([self.history, np.zeros((extra, self.history.shape[1]), dtype=np.float32)])
        self.samples_seen = np.concatenate([self.samples_seen, np.zeros(extra, dtype=np.int64)])

    def save_slot(self, slot: int) -> dict[str, Any]:
        return {"history": self.history[slot].tolist(), "samples_seen": int(self.samples_seen[slot])}

    def load_slot(self, slot: int, doc: dict[str, Any]) -> None:
        self.history[slot] = doc["history"]
        self.samples_seen[slot] = doc["samples_seen"]

    def update(self, slots: NDArray[np.int64], frames: NDArray[np.float32]) -> None:
        """Take in frames (n, n_frames, frame_size) of each of `slots`: a whole number of model samples, a
        multiple of DECIMATION when frame_size is."""
        new = frames.reshape(len(slots), -1)[:, ::DECIMATION]
        joined = np.concatenate([self.history[slots], new], axis=1)
        self.history[slots] = joined[:, joined.shape[1] - self.history.shape[1]:]
        self.samples_seen[slots] += new.shape[1]

    def features(self, slots: NDArray[np.int64]) -> NDArray[np.float64]:
        return vf_features(self.history[slots], self.fs)

    def found(self, slots: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Whether each slot's P(VF) is at or above the detector's threshold."""
        assert self.info is not None
        found: NDArray[np.bool_] = self.probability(slots) >= self.info.threshold
        return found

    def probability(self, slots: NDArray[np.int64]) -> NDArray[np.float64]:
        """P(VF) of each slot's last VF_WINDOW_S; 0 before a whole window has been seen or without a regression."""
        p = np.zeros(len(slots))
        ready = self.samples_seen[slots] >= self.history.shape[1]
        if self.info is not None and ready.any():
            p[ready] = self.info.probability(self.features(slots[ready]))
        return p

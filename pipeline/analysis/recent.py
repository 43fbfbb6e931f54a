"""The last seconds of each stream's band-passed signal, decimated: what the signal-level detectors judge.

The VF detector (`pipeline.detectors.vf`) and the signal-quality detector (`pipeline.detectors.quality`) look at
the same `RECENT_S` of the DSP output the beat model sees, decimated to 90 Hz (VF energy lies at 2-10 Hz, noise
that hides QRS complexes below 40 Hz). State per stream: that signal and how much has been seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

RECENT_S = 4.0  # judged window (s)
DECIMATION = 4  # model rate 360 Hz -> 90 Hz


class RecentSignal:
    """Per-slot signal history (arrays indexed by slot)."""

    FIELDS = ("history", "samples_seen")

    def __init__(self, n_slots: int, model_fs: float) -> None:
        """`model_fs`: the rate of the frames fed in (Hz)."""
        self.fs = model_fs / DECIMATION
        self.history = np.zeros((n_slots, round(RECENT_S * self.fs)), dtype=np.float32)
        self.samples_seen = np.zeros(n_slots, dtype=np.int64)

    def reset(self, slots: NDArray[np.int64]) -> None:
        self.history[slots] = 0.0
        self.samples_seen[slots] = 0

    def grow(self, n_slots: int) -> None:
        extra = n_slots - len(self.samples_seen)
        self.history = np.concatenate([self.history, np.zeros((extra, self.history.shape[1]), dtype=np.float32)])
        self.samples_seen = np.concatenate([self.samples_seen, np.zeros(extra, dtype=np.int64)])

    def save_slot(self, slot: int) -> dict[str, Any]:
        """The slot's state: numbers and arrays (pipeline/process/state.py)."""
        return {"history": self.history[slot].copy(), "samples_seen": int(self.samples_seen[slot])}

    def load_slot(self, slot: int, doc: dict[str, Any]) -> None:
        self.history[slot] = doc["history"]
        self.samples_seen[slot] = doc["samples_seen"]

    def update(self, slots: NDArray[np.int64], frames: NDArray[np.float32]) -> NDArray[np.float32]:
        """Take in frames (n, n_frames, frame_size) of each of `slots`: a whole number of model samples, a
        multiple of DECIMATION when frame_size is; returns the new samples at 90 Hz (n, samples)."""
        new = frames.reshape(len(slots), -1)[:, ::DECIMATION]
        joined = np.concatenate([self.history[slots], new], axis=1)
        self.history[slots] = joined[:, joined.shape[1] - self.history.shape[1]:]
        self.samples_seen[slots] += new.shape[1]
        return new

    def ready(self, slots: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Whether each slot has seen a whole RECENT_S."""
        ready: NDArray[np.bool_] = self.samples_seen[slots] >= self.history.shape[1]
        return ready


@dataclass(frozen=True)
class Spectrum:
    """Hann-windowed power spectrum of each row of a recent signal: freq (Hz), power (n, len(freq)) (mV²)."""

    freq: NDArray[np.float64]
    power: NDArray[np.float64]


def spectrum(x: NDArray[np.floating[Any]], fs: float) -> Spectrum:
    """The spectrum of each row of `x` (n, samples) in mV at `fs` (Hz): computed once, read by both detectors."""
    n = x.shape[1]
    transform = np.fft.rfft(x.astype(np.float64) * np.hanning(n), axis=1)
    freq = np.fft.rfftfreq(n, 1.0 / fs).astype(np.float64)
    power: NDArray[np.float64] = np.abs(transform) ** 2
    return Spectrum(freq, power)

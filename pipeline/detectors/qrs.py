"""A second QRS detector, of a different kind than the network: slope energy with automatic gain control.

The high-priority alarms take its evidence (`AlarmConfig.second_detector`): a pause the network sees while this
detector finds QRS complexes on a readable lead is a pause of the network, not of the heart; complexes it finds
that the network missed count in the rates; a readable lead with organized complexes and no VF makes VF seen on
another lead an artefact. It runs on each lead's band-passed signal at 90 Hz
(`pipeline.analysis.recent.RecentSignal`'s input), sample by sample with carried state, so streaming
equals offline:

- feature: the signal band-passed to the QRS band (`QRS_BAND_HZ`, as Pan & Tompkins 1985), its |slope| (mV/s)
  averaged over `SMOOTH_S`: QRS complexes are the steepest waves of an ECG, P and T waves lie below the band;
- gain control (after Pan & Tompkins 1985): a QRS is a rise of the feature above `GAIN_FRACTION` of the QRS
  level, the running mean of the feature's peaks in the last detected complexes (each new one weighs
  `LEVEL_WEIGHT`, `LEVEL_RISE_WEIGHT` when above the level; the level also decays with time constant
  `LEVEL_DECAY_S`), never below `FLOOR_MV_S`; so complexes of 0.1 mV count on a lead that only has those,
  while P and T waves, far flatter than the QRS complexes around them, do not, even in a pause;
- a refractory period of `REFRACTORY_S` after each detection.

State per lead slot: the band-pass state, the last band-passed sample, the last slopes being averaged, the
QRS level, the feature's peak in the complex being passed, whether it is above threshold, the samples seen and
the times of the last RATE_BEATS detections on that clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import signal

QRS_BAND_HZ = (5.0, 15.0)  # band-pass before the slope (Hz; second-order Butterworth)
SMOOTH_S = 0.08  # slope averaging (s)
GAIN_FRACTION = 0.5  # a QRS: the feature above this share of the QRS level ...
LEVEL_WEIGHT = 0.125  # ... the level a running mean of the last complexes' peaks ...
LEVEL_RISE_WEIGHT = 0.5  # ... that follows a larger complex faster (small waves do not pull it down to their size) ...
LEVEL_DECAY_S = 20.0  # ... decaying with this time constant (s) ...
FLOOR_MV_S = 1.5  # ... and never below this (mV/s of averaged slope: a 0.1 mV, 60 ms complex reaches ~2)
REFRACTORY_S = 0.25  # no second QRS within this (s)
RATE_BEATS = 40  # detections kept per lead (12 s at 200 bpm: windows up to RATE_WINDOW_S lose none) ...
RATE_WINDOW_S = 12.0  # ... those of the last this many seconds (s)
ORGANIZED_BPM = (30.0, 150.0)  # a lead whose rate lies here shows organized QRS complexes, not VF (bpm)


@dataclass(frozen=True)
class QrsEvidence:
    """What the second QRS detector says of a device, from its readable leads.

    Attributes:
        times_s: its QRS complexes of the last RATE_WINDOW_S on any readable lead (s, on the device's beat time
            line, ascending); empty: none found, or no lead readable.
        organized: whether a readable lead on which the VF detector finds no VF shows QRS complexes at a rate
            within ORGANIZED_BPM over the last RATE_WINDOW_S: VF seen on another lead is an artefact there.
    """

    times_s: tuple[float, ...]
    organized: bool

    def shifted(self, origin_s: float) -> QrsEvidence:
        """The same evidence on a time line that starts at `origin_s` (s)."""
        return QrsEvidence(tuple([origin_s + t for t in self.times_s]), self.organized)


class QrsDetectorBank:
    """Slope-energy QRS detection for many lead slots (arrays indexed by slot)."""


    def __init__(self, n_slots: int, fs: float) -> None:
        """`fs`: the rate of the signal fed in (Hz)."""
        self.fs = fs
        self.sos = signal.butter(2, QRS_BAND_HZ, btype="bandpass", fs=fs, output="sos")
        self.zi = np.zeros((len(self.sos), n_slots, 2), dtype=np.float64)
        self.width = max(1, round(SMOOTH_S * fs))
        self.decay = float(np.exp(-1.0 / (LEVEL_DECAY_S * fs)))  # per sample
        self.last_x = np.zeros(n_slots, dtype=np.float64)
        self.smooth = np.zeros((n_slots, self.width), dtype=np.float64)
        self.level = np.zeros(n_slots, dtype=np.float64)  # the QRS level at sample number level_at
        self.level_at = np.zeros(n_slots, dtype=np.int64)
        self.peak = np.zeros(n_slots, dtype=np.float64)  # the feature's peak in the complex being passed
        self.above = np.zeros(n_slots, dtype=bool)
        self.times_s = np.full((n_slots, RATE_BEATS), np.nan)  # oldest first (s, on the slot's clock)
        self.seen = np.zeros(n_slots, dtype=np.int64)  # the clock: samples seen

    def reset(self, slots: NDArray[np.int64], clock: int = 0) -> None:
        """Start the slots cold, their clocks at `clock` (samples: the frame clock of a device's other leads)."""
        self.zi[:, slots] = 0.0
        self.last_x[slots] = 0.0
        self.smooth[slots] = 0.0
        self.level[slots] = 0.0
        self.level_at[slots] = clock
        self.peak[slots] = 0.0
        self.above[slots] = False
        self.times_s[slots] = np.nan
        self.seen[slots] = clock

    def grow(self, n_slots: int) -> None:
        extra = n_slots - len(self.last_x)
        self.zi = np.concatenate([self.zi, np.zeros((len(self.sos), extra, 2))], axis=1)
        for name, fill in (("last_x", 0.0), ("smooth", 0.0), ("level", 0.0), ("level_at", 0), ("peak", 0.0),
                           ("above", False), ("times_s", np.nan), ("seen", 0)):
            array = getattr(self, name)
            setattr(self, name, np.concatenate([array, np.full((extra, *array.shape[1:]), fill, dtype=array.dtype)]))

    def save_slot(self, slot: int) -> dict[str, Any]:
        """The slot's state: numbers and arrays (pipeline/process/state.py)."""
        return {"zi": self.zi[:, slot].copy(), "last_x": float(self.last_x[slot]), "smooth": self.smooth[slot].copy(),
                "level": float(self.level[slot]), "level_at": int(self.level_at[slot]),
                "peak": float(self.peak[slot]), "above": bool(self.above[slot]), "times_s": self.times_s[slot].copy(),
                "seen": int(self.seen[slot])}

    def load_slot(self, slot: int, doc: dict[str, Any]) -> None:
        self.zi[:, slot] = np.asarray(doc["zi"], dtype=np.float64).reshape(len(self.sos), 2)
        self.last_x[slot] = float(doc["last_x"])
        self.smooth[slot] = np.asarray(doc["smooth"], dtype=np.float64).reshape(self.width)
        self.level[slot], self.level_at[slot] = float(doc["level"]), int(doc["level_at"])
        self.peak[slot] = float(doc["peak"])
        self.above[slot] = bool(doc["above"])
        self.times_s[slot] = np.asarray(doc["times_s"], dtype=np.float64).reshape(self.times_s.shape[1:])
        self.seen[slot] = int(doc["seen"])

    def update(self, slots: NDArray[np.int64], x: NDArray[np.float32]) -> None:
        """Take in the next samples `x` (n_slots, n) of each slot (band-passed mV at `fs`).

        Complex by complex rather than sample by sample: every slot's next complex (where the feature rises above
        its threshold and where it falls again) is found over the whole chunk at once. The level decays as `decay`
        to the power of the samples since it was last set (an integer), so chunks of any size give the same
        detections as one pass.
        """
        n = x.shape[1]
        if n == 0:
            return
        x64, self.zi[:, slots] = signal.sosfilt(self.sos, x.astype(np.float64), axis=1, zi=self.zi[:, slots])
        slope = np.abs(np.diff(np.concatenate([self.last_x[slots, None], x64], axis=1), axis=1)) * self.fs
        joined = np.concatenate([self.smooth[slots], slope], axis=1)
        csum = np.cumsum(np.concatenate([np.zeros((len(slots), 1)), joined], axis=1), axis=1)
        feature = (csum[:, self.width:] - csum[:, :-self.width])[:, 1:] / self.width  # (n_slots, n)
        level, level_at = self.level[slots], self.level_at[slots]
        peak, above, times = self.peak[slots], self.above[slots], self.times_s[slots]
        rows, columns = np.arange(len(slots)), np.arange(n)[None, :]
        sample = self.seen[slots, None] + columns + 1  # each column's sample number
        pos = np.zeros(len(slots), dtype=np.int64)  # each slot's next column to judge
        while (pos < n).any():
            # one step per slot: the rest of a complex already begun, else the next complex whole (the level only
            # changes when a complex ends, so one threshold row serves its start and its end)
            threshold = np.maximum(GAIN_FRACTION * level[:, None] * self.decay ** (sample - level_at[:, None]),
                                   FLOOR_MV_S)
            crossing = feature > threshold
            todo = columns >= pos[:, None]
            rising = todo & crossing & ~above[:, None]
            rose = rising.any(axis=1)
            start = np.where(above, pos, np.where(rose, rising.argmax(axis=1), n))
            falling = (columns >= (start + ~above)[:, None]) & ~crossing  # a complex begun falls from pos on
            falls = falling.any(axis=1) & (start < n)
            end = np.where(falls, falling.argmax(axis=1), n)
            t = sample[rows, np.minimum(start, n - 1)] / self.fs
            onset = rose & ~above & ~(t - times[:, -1] < REFRACTORY_S)  # NaN (no detection yet): not refractory
            if onset.any():
                times[onset] = np.concatenate([times[onset, 1:], t[onset, None]], axis=1)
            inside = (columns >= start[:, None]) & (columns < end[:, None])
            in_complex = onset | (above & (peak > 0))  # a refractory crossing is no complex
            peak = np.where(in_complex, np.maximum(peak, np.where(inside, feature, 0.0).max(axis=1)), peak)
            ended = falls & (peak > 0)
            at = np.minimum(end, n - 1)
            now = level * self.decay ** (sample[rows, at] - level_at)
            weight = np.where(peak > now, LEVEL_RISE_WEIGHT, LEVEL_WEIGHT)
            level = np.where(ended, np.where(now > 0, (1 - weight) * now + weight * peak, peak), level)
            level_at = np.where(ended, sample[rows, at], level_at)
            peak = np.where(ended, 0.0, peak)
            above = np.where(start < n, ~falls, above)
            pos = np.where(start < n, end + 1, n)
        self.level[slots], self.level_at[slots], self.peak[slots], self.above[slots] = level, level_at, peak, above
        self.times_s[slots], self.seen[slots] = times, self.seen[slots] + n
        self.last_x[slots] = x64[:, -1]
        self.smooth[slots] = joined[:, -self.width:]

    def recent_s(self, slots: NDArray[np.int64]) -> NDArray[np.float64]:
        """The slots' detections of the last RATE_WINDOW_S (s on their clocks), ascending, merged."""
        times = self.times_s[slots]
        recent: NDArray[np.float64] = np.sort(times[self.seen[slots, None] / self.fs - times <= RATE_WINDOW_S])
        return recent

    def rate_bpm(self, slots: NDArray[np.int64]) -> NDArray[np.float64]:
        """Each slot's rate over its detections of the last RATE_WINDOW_S (bpm; NaN with fewer than 3)."""
        times = self.times_s[slots]
        recent = self.seen[slots, None] / self.fs - times <= RATE_WINDOW_S  # NaN compares False
        count = recent.sum(axis=1)
        first = np.where(recent, times, np.inf).min(axis=1)
        span = times[:, -1] - first
        with np.errstate(invalid="ignore", divide="ignore"):
            rate: NDArray[np.float64] = np.where((count >= 3) & (span > 0), 60.0 * (count - 1) / span, np.nan)
        return rate

"""Causal context of each beat: its rhythm and its QRS shape against the stream's own running averages.

Shared by training and the daemon, like `dsp`: a beat's features depend only on the signal and the beats
before it, so windows of any size give exactly the features of one pass over a record. Supraventricular
beats are told from normal ones by prematurity against the patient's own rhythm with a normal QRS;
ventricular ones by a QRS unlike the patient's dominant beat. A frame network does not learn either well
across patients; these features hand them to the beat-sequence stage directly.

Features of a beat:
    rhythm (a beat's RR interval is the time from the stream's previous beat, s):
        rr_over_local, previous_rr_over_local: RR and the previous beat's RR over the local rhythm (median of
            the last `LOCAL_BEATS` RR intervals);
        rr_over_long: RR over the long-term rhythm (exponential average, `LONG_WEIGHT` per beat);
        log_rr_s, log_local_rr_s, local_over_long: the rates themselves;
        rr_irregularity: median |difference| of successive RR among the last `LOCAL_BEATS`, over the local
            rhythm (high in atrial fibrillation, where early beats are normal beats);
    QRS shape, from the filtered signal (mV, model rate) in `QRS_WINDOW_S` around the R peak:
        qrs_pp_over_running: peak-to-peak amplitude over the stream's running average (`SHAPE_WEIGHT` per beat);
        qrs_width_s: time the signal spends above half its peak deviation from the window's median;
        template_correlation: best Pearson correlation, within half a frame of shift, with the stream's running
            average beat (its dominant morphology, `SHAPE_WEIGHT` per beat);
    p_N .. p_Q: the frame stage's class probabilities summed over the beat, normalised to sum 1.

Atrial activity, for the AF detector rather than the beat stage (`p_wave_consistency`): the signal in `P_WINDOW_S`
before each R peak (where a P wave lies in sinus rhythm) is correlated with the stream's running average of it;
the running average of those correlations (`P_WEIGHT` per beat) is high where every beat has the same P wave and
low in atrial fibrillation, where that interval holds fibrillatory waves unlike from beat to beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.analysis.aami import AAMI_CLASSES

DEFAULT_RR_S = 0.8  # RR (s) assumed before a stream has beats of its own
RR_RANGE_S = (0.15, 3.0)  # RR intervals are clipped to this range (s)
LOCAL_BEATS = 8
LONG_WEIGHT = 0.02
QRS_WINDOW_S = (0.10, 0.15)  # signal kept before and after the R peak (s)
LOOKBACK_S = 1.5  # a beat whose window starts longer than this before it was picked gets no shape (s)
SHAPE_WEIGHT = 0.05
P_WINDOW_S = (0.30, 0.08)  # the P-wave interval: from this long before the R peak to this long before it (s)
P_WEIGHT = 0.1
FEATURE_NAMES = ("rr_over_local", "previous_rr_over_local", "rr_over_long", "log_rr_s", "local_over_long",
                 "log_local_rr_s", "rr_irregularity", "qrs_pp_over_running", "qrs_width_s", "template_correlation",
                 *(f"p_{c}" for c in AAMI_CLASSES))


@dataclass(frozen=True)
class SignalWindow:
    """Filtered signal of a batch of streams: each stream's lookback and its newest frames, flattened.

    Attributes:
        samples: (n_rows, n_samples) mV at the model rate.
        first_sample: (n_rows,) global sample index (since the stream started) of samples[:, 0]; negative
            indices are the zeros before a stream's start.
    """

    samples: NDArray[np.float32]
    first_sample: NDArray[np.int64]


class BeatContext:
    """Per-slot context (arrays indexed by slot): rhythm, the last `LOOKBACK_S` of signal, the running beat."""

    FIELDS = ("last_time_s", "recent_rr_s", "long_rr_s", "previous_rr_s", "lookback", "samples_seen",
              "template", "running_pp_mv", "has_template", "p_template", "p_consistency")

    def __init__(self, n_slots: int, fs: float, frame_size: int) -> None:
        """`fs`: model rate (Hz); `frame_size`: samples per frame at fs."""
        self.fs, self.frame_size = fs, frame_size
        self.before, self.after = (round(s * fs) for s in QRS_WINDOW_S)
        self.last_time_s = np.full(n_slots, np.nan)
        self.recent_rr_s = np.full((n_slots, LOCAL_BEATS), DEFAULT_RR_S)
        self.long_rr_s = np.full(n_slots, DEFAULT_RR_S)
        self.previous_rr_s = np.full(n_slots, DEFAULT_RR_S)
        self.lookback = np.zeros((n_slots, round(LOOKBACK_S * fs)), dtype=np.float32)
        self.samples_seen = np.zeros(n_slots, dtype=np.int64)
        self.template = np.zeros((n_slots, self.before + self.after), dtype=np.float32)
        self.running_pp_mv = np.zeros(n_slots, dtype=np.float32)
        self.has_template = np.zeros(n_slots, dtype=bool)
        self.p_from, self.p_to = (round(s * fs) for s in P_WINDOW_S)
        self.p_template = np.zeros((n_slots, self.p_from - self.p_to), dtype=np.float32)
        self.p_consistency = np.full(n_slots, np.nan)  # NaN: no beat yet

    def reset(self, slots: NDArray[np.int64]) -> None:
        """Forget these slots (a new or restarted stream)."""
        fresh = BeatContext(len(slots), self.fs, self.frame_size)
        for name in self.FIELDS:
            getattr(self, name)[slots] = getattr(fresh, name)

    def grow(self, n_slots: int) -> None:
        """Add fresh slots up to `n_slots`."""
        fresh = BeatContext(n_slots, self.fs, self.frame_size)
        for name in self.FIELDS:
            old = getattr(self, name)
            getattr(fresh, name)[: len(old)] = old
            setattr(self, name, getattr(fresh, name))

    def save_slot(self, slot: int) -> dict[str, Any]:
        """Numpy values (pipeline/process/state.py)."""
        return {name: getattr(self, name)[slot].copy() for name in self.FIELDS}

    def load_slot(self, slot: int, doc: dict[str, Any]) -> None:
        for name in self.FIELDS:
            getattr(self, name)[slot] = doc[name]

    def window(self, slots: NDArray[np.int64], frames: NDArray[np.float32]) -> SignalWindow:
        """Take in a window of frames (n_rows, n_frames, frame_size) of each of `slots`; return the signal its
        beats are cut from (lookback + window)."""
        samples = np.concatenate([self.lookback[slots], frames.reshape(len(slots), -1)], axis=1)
        first = self.samples_seen[slots] - self.lookback.shape[1]
        self.lookback[slots] = samples[:, samples.shape[1] - self.lookback.shape[1]:]
        self.samples_seen[slots] += frames.shape[1] * frames.shape[2]
        return SignalWindow(samples, first)

    def step(self, slots: NDArray[np.int64], time_s: NDArray[np.float64], end_frame: NDArray[np.int64],
             class_sum: NDArray[np.float32], signal: SignalWindow, rows: NDArray[np.int64]) -> NDArray[np.float32]:
        """Features (n, len(FEATURE_NAMES)) of the next beat of each of `slots` (distinct), and advance them.

        Args:
            slots: one slot per beat.
            time_s: each beat's R-peak time (s since its stream's first sample).
            end_frame: global frame at which each beat was picked (`PickedBeats.end_frame`).
            class_sum: (n, 5) the frame stage's N, S, V, F, Q probabilities summed over each beat.
            signal: from `window`; `rows` are the beats' rows in it.
        """
        self._atrial(slots, time_s, end_frame, signal, rows)
        return np.concatenate([self._rhythm(slots, time_s), self._shape(slots, time_s, end_frame, signal, rows),
                               class_sum / np.maximum(class_sum.sum(axis=1, keepdims=True), 1e-9)],
                              axis=1).astype(np.float32)

    def _cut(self, time_s: NDArray[np.float64], end_frame: NDArray[np.int64], signal: SignalWindow,
             rows: NDArray[np.int64], before: int, length: int) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """Each beat's `length` samples from `before` samples before its R peak (zeros where not available), and
        whether they were: judged against when the beat was picked, never the window's edges (chunking-invariant)."""
        start = np.round(time_s * self.fs).astype(np.int64) - before
        picked_at = end_frame * self.frame_size
        ok = (start >= picked_at - self.lookback.shape[1]) & (start + length <= picked_at)
        offset = np.where(ok, start - signal.first_sample[rows], 0)
        cut: NDArray[np.float32] = signal.samples[rows[:, None], offset[:, None] + np.arange(length)] * ok[:, None]
        return cut, ok

    def _atrial(self, slots: NDArray[np.int64], time_s: NDArray[np.float64], end_frame: NDArray[np.int64],
                signal: SignalWindow, rows: NDArray[np.int64]) -> None:
        """Correlate each beat's P-wave interval with the stream's running one; update both running averages."""
        p, ok = self._cut(time_s, end_frame, signal, rows, self.p_from, self.p_from - self.p_to)
        first = ok & np.isnan(self.p_consistency[slots])
        self.p_template[slots[first]] = p[first]
        r = best_correlation(p, self.p_template[slots], self.frame_size // 2)
        later = slots[ok & ~first]
        self.p_consistency[slots[first]] = 1.0
        self.p_consistency[later] += P_WEIGHT * (r[ok & ~first] - self.p_consistency[later])
        self.p_template[later] += SHAPE_WEIGHT * (p[ok & ~first] - self.p_template[later])

    def _rhythm(self, slots: NDArray[np.int64], time_s: NDArray[np.float64]) -> NDArray[np.float64]:
        last = self.last_time_s[slots]
        rr = np.clip(np.where(np.isnan(last), DEFAULT_RR_S, time_s - last), *RR_RANGE_S)
        recent = self.recent_rr_s[slots]
        local = np.median(recent, axis=1)
        irregularity = np.median(np.abs(np.diff(recent, axis=1)), axis=1) / local
        long = self.long_rr_s[slots]
        previous = self.previous_rr_s[slots]
        self.last_time_s[slots] = time_s
        self.recent_rr_s[slots] = np.concatenate([self.recent_rr_s[slots, 1:], rr[:, None]], axis=1)
        self.long_rr_s[slots] = (1 - LONG_WEIGHT) * long + LONG_WEIGHT * rr
        self.previous_rr_s[slots] = rr
        return np.stack([rr / local, previous / local, rr / long, np.log(rr), local / long, np.log(local),
                         irregularity], axis=1)

    def _shape(self, slots: NDArray[np.int64], time_s: NDArray[np.float64], end_frame: NDArray[np.int64],
               signal: SignalWindow, rows: NDArray[np.int64]) -> NDArray[np.float64]:
        beats, ok = self._cut(time_s, end_frame, signal, rows, self.before, self.before + self.after)
        pp = beats.max(axis=1) - beats.min(axis=1)
        deviation = np.abs(beats - np.median(beats, axis=1, keepdims=True))
        width_s = (deviation > 0.5 * deviation.max(axis=1, keepdims=True)).sum(axis=1) / self.fs * (pp > 0)
        first = ok & ~self.has_template[slots]
        self.template[slots[first]] = beats[first]
        self.running_pp_mv[slots[first]] = pp[first]
        self.has_template[slots[first]] = True
        template = self.template[slots]
        running_pp = self.running_pp_mv[slots]
        features = np.stack([np.where(ok, pp / np.maximum(running_pp, 1e-3), 0.0), width_s,
                             np.where(ok, best_correlation(beats, template, self.frame_size // 2), 0.0)], axis=1)
        update = slots[ok & ~first]
        self.template[update] += SHAPE_WEIGHT * (beats[ok & ~first] - self.template[update])
        self.running_pp_mv[update] += SHAPE_WEIGHT * (pp[ok & ~first] - self.running_pp_mv[update])
        return features


def best_correlation(beats: NDArray[np.float32], template: NDArray[np.float32], max_shift: int) -> NDArray[np.float64]:
    """Highest Pearson correlation of each row of `beats` with the same row of `template` over shifts of up to
    `max_shift` samples either way (the overlapping parts); 0 where either is flat."""
    n = beats.shape[1]
    best = np.full(len(beats), -1.0)
    beats64, template64 = beats.astype(np.float64), template.astype(np.float64)
    for shift in range(max_shift + 1):  # the shifts +shift and -shift together: their overlaps are as long
        a = np.stack([beats64[:, shift:], beats64[:, :n - shift]])
        b = np.stack([template64[:, :n - shift], template64[:, shift:]])
        a = a - a.sum(axis=2, keepdims=True) / (n - shift)  # the mean, without np.mean's Python overhead
        b = b - b.sum(axis=2, keepdims=True) / (n - shift)
        denominator = np.sqrt((a * a).sum(axis=2) * (b * b).sum(axis=2))
        r = np.where(denominator > 0, (a * b).sum(axis=2) / np.maximum(denominator, 1e-12), 0.0)
        best = np.maximum(best, r.max(axis=0))
    return best


def record_features(frames: NDArray[np.float32], time_s: NDArray[np.float64], end_frame: NDArray[np.int64],
                    class_sum: NDArray[np.float32], fs: float) -> NDArray[np.float32]:
    """Features of every beat of one stream in one pass: all its frames (n_frames, frame_size) as one window,
    then its beats (in time order) one by one."""
    context = BeatContext(1, fs, frames.shape[1])
    slot = np.zeros(1, dtype=np.int64)
    signal = context.window(slot, frames[None])
    rows = [context.step(slot, time_s[i:i + 1], end_frame[i:i + 1], class_sum[i:i + 1], signal, slot)
            for i in range(len(time_s))]
    return np.concatenate(rows) if rows else np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)


def rank_in_row(row: NDArray[np.int64]) -> NDArray[np.int64]:
    """Position of each beat among the beats of its row (`row` sorted): 0 for a row's first beat, then 1, ..."""
    if not len(row):
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], row[1:] != row[:-1])))
    first = np.repeat(starts, np.diff(np.append(starts, len(row))))
    return np.arange(len(row)) - first

"""Beat picking from per-frame class probabilities, carried across window edges.

A beat is a run of consecutive frames whose P(beat) = 1 - P(background) is at least the
threshold. It is emitted when the run ends: at the frame of highest P(beat), with the
class whose probability summed over the run, times that class's decision weight, is largest. A run that crosses a window
edge is carried to the next window, so window-by-window picking equals one pass.

Also the beat time line: the output frame that reports an R peak (`r_peak_output_frame`, how training labels
frames) and its inverse (`r_peak_time_s`, how beats get their times).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.config import ModelConfig


@dataclass(frozen=True)
class Decision:
    """Decision rule of a model (exported in its metadata).

    Attributes:
        beat_threshold: P(beat) that opens and keeps a run (0-1).
        decision_weights: weight of each non-background class when choosing a beat's class.
    """

    beat_threshold: float
    decision_weights: tuple[float, ...]

    def classify(self, class_sum: NDArray[np.float32]) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Class index (1-based) and confidence of beats with summed class probabilities (n_beats, n_classes-1)."""
        best = np.argmax(class_sum * np.asarray(self.decision_weights, dtype=np.float32), axis=1)
        chosen = class_sum[np.arange(len(best)), best]
        confidence = (chosen / np.maximum(class_sum.sum(axis=1), 1e-9)).astype(np.float32)
        return best.astype(np.int64) + 1, confidence


@dataclass(frozen=True)
class PickedBeats:
    """Beats picked from a batch of streams; arrays of equal length, one entry per beat.

    Attributes:
        row: row of the beat's stream in the batch.
        frame: global frame index (since the stream started) of the output frame with peak P(beat).
        end_frame: global frame index of the frame that ended the beat's run (when the beat was picked).
        class_index: index into the model's class names (1..n_classes-1; 0 is background).
        confidence: summed probability of the chosen class over summed P(beat) in the run (0-1).
        class_sum: (n_beats, n_classes-1) class probabilities summed over each beat's run.
    """

    row: NDArray[np.int64]
    frame: NDArray[np.int64]
    end_frame: NDArray[np.int64]
    class_index: NDArray[np.int64]
    confidence: NDArray[np.float32]
    class_sum: NDArray[np.float32]


class BeatPickerState:
    """Run-in-progress state of each stream slot (arrays indexed by slot)."""

    def __init__(self, n_slots: int, n_classes: int) -> None:
        self.in_run = np.zeros(n_slots, dtype=bool)
        self.peak_p = np.zeros(n_slots, dtype=np.float32)
        self.peak_frame = np.zeros(n_slots, dtype=np.int64)
        self.class_sum = np.zeros((n_slots, n_classes - 1), dtype=np.float32)
        self.frames_seen = np.zeros(n_slots, dtype=np.int64)

    def reset(self, slots: NDArray[np.int64]) -> None:
        """Forget the carry-over of these slots (a new or restarted stream)."""
        self.in_run[slots] = False
        self.frames_seen[slots] = 0

    FIELDS = ("in_run", "peak_p", "peak_frame", "class_sum", "frames_seen")

    def grow(self, n_slots: int) -> None:
        """Add slots (fresh, empty) up to `n_slots`."""
        for name in self.FIELDS:
            old = getattr(self, name)
            new = np.zeros((n_slots, *old.shape[1:]), dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def save_slot(self, slot: int) -> dict[str, Any]:
        """The slot's state: numpy values (pipeline/process/state.py)."""
        return {name: getattr(self, name)[slot].copy() for name in self.FIELDS}

    def load_slot(self, slot: int, doc: dict[str, Any]) -> None:
        for name in self.FIELDS:
            getattr(self, name)[slot] = doc[name]


def pick_beats(probs: NDArray[np.float32], state: BeatPickerState, slots: NDArray[np.int64],
               decision: Decision) -> PickedBeats:
    """Pick the beats that end in this window and update the slots' state in place.

    Args:
        probs: (n_rows, n_frames, n_classes) per-frame class probabilities, background first.
        state: per-slot carry-over, updated.
        slots: state slot of each row.
        decision: the model's beat threshold and decision weights.
    """
    n_frames = probs.shape[1]
    p_beat = 1.0 - probs[:, :, 0]
    above = p_beat >= decision.beat_threshold
    in_run = state.in_run[slots]
    peak_p = state.peak_p[slots]
    peak_frame = state.peak_frame[slots]
    class_sum = state.class_sum[slots]
    first_frame = state.frames_seen[slots]
    out: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]] = []
    for t in range(n_frames):
        ending = in_run & ~above[:, t]
        if ending.any():
            idx = np.flatnonzero(ending)
            out.append((idx, peak_frame[idx], first_frame[idx] + t, class_sum[idx]))
            in_run[idx] = False
        on = above[:, t]
        if on.any():
            idx = np.flatnonzero(on)
            starting = idx[~in_run[idx]]
            class_sum[starting] = 0.0
            peak_p[starting] = -1.0
            in_run[idx] = True
            class_sum[idx] += probs[idx, t, 1:]
            higher = idx[p_beat[idx, t] > peak_p[idx]]
            peak_p[higher] = p_beat[higher, t]
            peak_frame[higher] = first_frame[higher] + t
    state.in_run[slots] = in_run
    state.peak_p[slots] = peak_p
    state.peak_frame[slots] = peak_frame
    state.class_sum[slots] = class_sum
    state.frames_seen[slots] = first_frame + n_frames
    if out:
        row = np.concatenate([o[0] for o in out])
        frame = np.concatenate([o[1] for o in out])
        end_frame = np.concatenate([o[2] for o in out])
        sums = np.concatenate([o[3] for o in out])
    else:
        row = frame = end_frame = np.zeros(0, dtype=np.int64)
        sums = np.zeros((0, probs.shape[2] - 1), dtype=np.float32)
    order = np.lexsort((frame, row))
    class_index, confidence = decision.classify(sums[order])
    return PickedBeats(row[order], frame[order], end_frame[order], class_index, confidence, sums[order])


def r_peak_output_frame(time_s: NDArray[np.float64], config: ModelConfig) -> NDArray[np.int64]:
    """Global output frame that reports a beat whose R peak is at `time_s` (s since the stream's first sample).

    The R peak falls in frame floor(time_s / frame_s); the model reports it `output_delay_frames` later.
    """
    r_frame = np.floor(time_s * config.fs / config.frame_size).astype(np.int64)
    return r_frame + config.output_delay_frames


def r_peak_time_s(frame: NDArray[np.int64], config: ModelConfig) -> NDArray[np.float64]:
    """R-peak time (s since the stream's first sample) of beats output at global `frame`s: the inverse of
    `r_peak_output_frame`.

    The beat's R peak lies `output_delay_frames` earlier; its time is that frame's centre.
    """
    r_frame = frame - config.output_delay_frames
    return np.asarray((r_frame * config.frame_size + config.frame_size / 2) / config.fs, dtype=np.float64)


LEAD_FUSION = "mean of per-lead probabilities over usable leads"  # `fuse_leads`, named in a model's metadata


def lead_weights(usable: NDArray[np.bool_], primary: NDArray[np.int64] | int, fused: bool) -> NDArray[np.float32]:
    """Weight of each lead in `fuse_leads`, for the leads of many devices one after the other: every usable lead for
    a model trained on fused leads (metadata `lead_fusion`: LEAD_FUSION), else each device's primary lead (its
    index among all, `primary`) alone, the only way a model trained on one lead at a time has been shown to work."""
    if fused:
        return usable.astype(np.float32)
    weight = np.zeros(len(usable), dtype=np.float32)
    weight[primary] = 1.0
    return weight


def fuse_leads(probs: NDArray[np.float32], weight: NDArray[np.floating[Any]]) -> NDArray[np.float32]:
    """Per-frame class probabilities of a device from those of its leads: their mean, each lead weighted by
    `weight` (1 usable, 0 left out; all leads equally when no lead is usable).

    Args:
        probs: (n_leads, n_frames, n_classes) probabilities of each lead, from the same frames in time.
        weight: (n_leads,) weight of each lead.
    """
    if len(probs) == 1:  # one lead: its own (the weighted mean of one lead is itself)
        one: NDArray[np.float32] = probs[0]
        return one
    w = np.asarray(weight, dtype=np.float32)
    if not w.sum() > 0:
        w = np.ones_like(w)
    fused: NDArray[np.float32] = np.tensordot(w / w.sum(), probs, axes=1).astype(np.float32)
    return fused

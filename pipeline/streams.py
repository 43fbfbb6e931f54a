"""Many ECG streams through one beat model, window by window with carried state.

Each stream owns a slot: its DSP state (filter, resampler, framer), its recurrent state
and its beat-picking carry-over. Windows from many streams are batched into one model
run (one run per distinct frame count), state gathered from and scattered back to the
slots. `ecgmon evaluate` and the daemon both go through this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.beats import BeatPickerState, pick_beats, r_peak_time_s
from pipeline.dsp import PreprocessorBank
from pipeline.model import BeatModel


@dataclass(frozen=True)
class Beat:
    """One detected beat.

    Attributes:
        stream_id: the stream it belongs to.
        time_s: R-peak time (s) since the stream's first sample.
        class_name: AAMI class ("N", "S", "V", "F", "Q").
        confidence: the class's share of the beat probability (0-1).
    """

    stream_id: str
    time_s: float
    class_name: str
    confidence: float


class BeatStreams:
    """Per-stream state in slots, batched inference across streams."""

    def __init__(self, model: BeatModel, capacity: int = 64) -> None:
        self.model = model
        self.info = model.info
        self._slot_of: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._dsp = PreprocessorBank(self.info.filter, self.info.fs, self.info.frame_size, capacity)
        self._state = model.initial_state(capacity)
        self._picker = BeatPickerState(capacity, len(self.info.class_names))
        self._capacity = capacity

    def open(self, stream_id: str, fs: float) -> None:
        """Start (or restart from cold) `stream_id`, sampled at `fs` (Hz)."""
        if stream_id not in self._slot_of:
            if not self._free:
                self._grow()
            self._slot_of[stream_id] = self._free.pop()
        slot = self._slot_of[stream_id]
        self._dsp.open(slot, fs)
        for array in self._state:
            array[:, slot] = 0.0
        self._picker.reset(np.array([slot]))

    def save(self, stream_id: str) -> dict[str, Any]:
        """Everything `stream_id` carries (DSP, recurrent state, beat picking) as JSON-able values."""
        slot = self._slot_of[stream_id]
        return {"dsp": self._dsp.save_slot(slot), "recurrent": [a[:, slot].tolist() for a in self._state],
                "picker": self._picker.save_slot(slot)}

    def restore(self, stream_id: str, doc: dict[str, Any]) -> None:
        """Open `stream_id` with state saved by `save` (raises KeyError/ValueError on a malformed doc)."""
        self.open(stream_id, float(doc["dsp"]["fs"]))
        slot = self._slot_of[stream_id]
        self._dsp.load_slot(slot, doc["dsp"])
        for array, saved in zip(self._state, doc["recurrent"], strict=True):
            array[:, slot] = np.asarray(saved, dtype=np.float32).reshape(array[:, slot].shape)
        self._picker.load_slot(slot, doc["picker"])

    def analysed_until_s(self, stream_id: str) -> float:
        """Time (s since the stream's first sample) up to which every beat of `stream_id` has been returned.

        The model outputs a beat `output_delay_frames` after its R peak, and the picker returns it when
        its run of beat frames ends; a run still open holds back a beat at or after its current peak.
        """
        slot = self._slot_of[stream_id]
        p = self._picker
        frame = p.peak_frame[slot] if p.in_run[slot] else p.frames_seen[slot]
        return float(r_peak_time_s(np.array([frame]), self.info)[0])

    @property
    def capacity(self) -> int:
        """Slots allocated (they grow by doubling and are reused after `close`)."""
        return self._capacity

    def is_open(self, stream_id: str) -> bool:
        return stream_id in self._slot_of

    def close(self, stream_id: str) -> None:
        """Forget `stream_id` and free its slot."""
        self._free.append(self._slot_of.pop(stream_id))

    def process(self, windows: Sequence[tuple[str, NDArray[np.floating]]]) -> list[Beat]:
        """Run one window (samples in mV at the stream's fs) of each listed open stream.

        A stream appears at most once per call. Returns the beats completed by these windows.
        """
        ids = [stream_id for stream_id, _ in windows]
        frames_of = self._dsp([self._slot_of[i] for i in ids], [samples for _, samples in windows])
        by_length: dict[int, list[tuple[str, NDArray[np.float32]]]] = {}
        for stream_id, frames in zip(ids, frames_of, strict=True):
            if len(frames):
                by_length.setdefault(len(frames), []).append((stream_id, frames))
        beats: list[Beat] = []
        for group in by_length.values():
            beats.extend(self._run_group(group))
        return beats

    def _run_group(self, group: list[tuple[str, NDArray[np.float32]]]) -> list[Beat]:
        ids = [stream_id for stream_id, _ in group]
        slots = np.array([self._slot_of[stream_id] for stream_id in ids], dtype=np.int64)
        frames = np.stack([f for _, f in group])
        probs, new_state = self.model.run(frames, [array[:, slots] for array in self._state])
        for array, new in zip(self._state, new_state, strict=True):
            array[:, slots] = new
        picked = pick_beats(probs, self._picker, slots, self.info.decision)
        info = self.info
        time_s = r_peak_time_s(picked.frame, info)
        return [Beat(ids[row], float(t), info.class_names[c], float(conf))
                for row, t, c, conf in zip(picked.row, time_s, picked.class_index, picked.confidence, strict=True)
                if t >= 0]  # a "beat" before the first sample is a cold-start artefact

    def _grow(self) -> None:
        old = self._capacity
        self._capacity *= 2
        self._state = [np.concatenate([a, np.zeros_like(a)], axis=1) for a in self._state]
        self._picker.grow(self._capacity)
        self._dsp.grow(self._capacity)
        self._free.extend(range(self._capacity - 1, old - 1, -1))

"""Many ECG streams through one beat model, window by window with carried state.

Each stream owns a slot: its DSP state (filter, resampler, framer), its recurrent state, its
beat-picking carry-over, for a model with a beat stage its rhythm context and beat-stage
state, and its last seconds of signal with the VF and signal-quality detectors' verdicts on them. Windows from many
streams are batched into one model run (one run per distinct frame count), state gathered
from and scattered back to the slots; the beat stage then steps once per beat, the k-th
beats of all streams in one batch. `ecgmon evaluate` and the daemon both go through this
class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.aami import AAMI_CLASSES
from pipeline.beat_context import BeatContext, SignalWindow, rank_in_row
from pipeline.beats import BeatPickerState, PickedBeats, pick_beats, r_peak_time_s
from pipeline.config import FLAT_MV
from pipeline.dsp import PreprocessorBank
from pipeline.model import BeatModel
from pipeline.quality import quality_extra_features
from pipeline.recent import RecentSignal, spectrum
from pipeline.vf import vf_features


@dataclass(frozen=True)
class Beat:
    """One detected beat.

    Attributes:
        stream_id: the stream it belongs to.
        time_s: R-peak time (s) since the stream's first sample.
        class_name: AAMI class ("N", "S", "V", "F", "Q").
        confidence: probability of that class (0-1): the beat stage's, or the frame stage's share of the beat
            probability in a model without one.
    """

    stream_id: str
    time_s: float
    class_name: str
    confidence: float


class BeatStreams:
    """Per-stream state in slots, batched inference across streams."""

    def __init__(self, model: BeatModel, capacity: int = 64, flat_mv: float = FLAT_MV) -> None:
        """`flat_mv`: a window whose peak-to-peak is below this (mV) is a flat line (leads off, or a monitor
        switched on before its electrodes): the first window with signal after one restarts the slot cold."""
        self.model = model
        self.info = model.info
        self.flat_mv = flat_mv
        self._slot_of: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._dsp = PreprocessorBank(self.info.filter, self.info.fs, self.info.frame_size, capacity)
        self._state = model.initial_state(capacity)
        self._picker = BeatPickerState(capacity, len(self.info.class_names))
        # With a beat stage: each slot's beat context and beat-stage state.
        self._context = BeatContext(capacity, self.info.fs, self.info.frame_size) if model.beat_stage else None
        self._beat_state = model.beat_stage.initial_state(capacity) if model.beat_stage else None
        # Each slot's last seconds of signal, whether they look like VF and whether they are unreadable.
        self._recent = RecentSignal(capacity, self.info.fs)
        self._vf_found = np.zeros(capacity, dtype=bool)
        self._unreadable = np.zeros(capacity, dtype=bool)
        # Each slot's time line: its sampling rate (Hz), the signal seen since the stream started (s), where its
        # analysis last restarted after a flat line (s since the stream started), and whether its last window was flat.
        self._fs = np.zeros(capacity)
        self._seen_s = np.zeros(capacity)
        self._restart_s = np.zeros(capacity)
        self._flat = np.zeros(capacity, dtype=bool)
        self._capacity = capacity

    def open(self, stream_id: str, fs: float) -> None:
        """Start (or restart from cold) `stream_id`, sampled at `fs` (Hz)."""
        if stream_id not in self._slot_of:
            if not self._free:
                self._grow()
            self._slot_of[stream_id] = self._free.pop()
        slot = self._slot_of[stream_id]
        self._relearn(slot, fs)
        self._seen_s[slot] = self._restart_s[slot] = 0.0
        self._flat[slot] = False

    def _relearn(self, slot: int, fs: float) -> None:
        """Forget everything the slot learnt of its signal (filters, network, beats, rhythm and beat shape)."""
        self._fs[slot] = fs
        self._dsp.open(slot, fs)
        for array in self._state:
            array[:, slot] = 0.0
        self._picker.reset(np.array([slot]))
        if self._context is not None and self._beat_state is not None:
            self._context.reset(np.array([slot]))
            self._beat_state[:, slot] = 0.0
        self._recent.reset(np.array([slot]))
        self._vf_found[slot] = self._unreadable[slot] = False

    def save(self, stream_id: str) -> dict[str, Any]:
        """Everything `stream_id` carries (DSP, recurrent state, beat picking) as JSON-able values."""
        slot = self._slot_of[stream_id]
        doc = {"dsp": self._dsp.save_slot(slot), "recurrent": [a[:, slot].tolist() for a in self._state],
               "picker": self._picker.save_slot(slot)}
        if self._context is not None and self._beat_state is not None:
            doc["context"] = self._context.save_slot(slot)
            doc["beat_stage"] = self._beat_state[:, slot].tolist()
        doc["recent"] = {**self._recent.save_slot(slot), "vf_found": bool(self._vf_found[slot]),
                         "unreadable": bool(self._unreadable[slot])}
        doc["timeline"] = [float(self._seen_s[slot]), float(self._restart_s[slot]), bool(self._flat[slot])]
        return doc

    def restore(self, stream_id: str, doc: dict[str, Any]) -> None:
        """Open `stream_id` with state saved by `save` (raises KeyError/ValueError on a malformed doc)."""
        self.open(stream_id, float(doc["dsp"]["fs"]))
        slot = self._slot_of[stream_id]
        self._dsp.load_slot(slot, doc["dsp"])
        for array, saved in zip(self._state, doc["recurrent"], strict=True):
            array[:, slot] = np.asarray(saved, dtype=np.float32).reshape(array[:, slot].shape)
        self._picker.load_slot(slot, doc["picker"])
        if self._context is not None and self._beat_state is not None:
            self._context.load_slot(slot, doc["context"])
            self._beat_state[:, slot] = np.asarray(doc["beat_stage"], dtype=np.float32).reshape(
                self._beat_state[:, slot].shape)
        self._recent.load_slot(slot, doc["recent"])
        self._vf_found[slot] = bool(doc["recent"]["vf_found"])
        self._unreadable[slot] = bool(doc["recent"]["unreadable"])
        seen, restart, flat = doc["timeline"]
        self._seen_s[slot], self._restart_s[slot], self._flat[slot] = float(seen), float(restart), bool(flat)

    def analysed_until_s(self, stream_id: str) -> float:
        """Time (s since the stream's first sample) up to which every beat of `stream_id` has been returned.

        The model outputs a beat `output_delay_frames` after its R peak, and the picker returns it when
        its run of beat frames ends; a run still open holds back a beat at or after its current peak.
        """
        return self.analysed_until_many([stream_id])[0]

    def analysed_until_many(self, stream_ids: list[str]) -> list[float]:
        """`analysed_until_s` of each stream, computed together."""
        slots = np.array([self._slot_of[i] for i in stream_ids], dtype=np.int64)
        p = self._picker
        frames = np.where(p.in_run[slots], p.peak_frame[slots], p.frames_seen[slots])
        until: list[float] = (self._restart_s[slots] + r_peak_time_s(frames, self.info)).tolist()
        return until

    def vf_found(self, stream_id: str) -> bool:
        """Whether the last `pipeline.recent.RECENT_S` of `stream_id`, as of its latest window, look like
        ventricular fibrillation (always False for a model without a VF detector)."""
        return bool(self._vf_found[self._slot_of[stream_id]])

    def recent_signal(self, stream_id: str) -> NDArray[np.float32] | None:
        """The last `pipeline.recent.RECENT_S` of `stream_id` as the detectors judge it (mV at 90 Hz, a copy), or None
        before a whole one has been seen."""
        slot = self._slot_of[stream_id]
        return self._recent.history[slot].copy() if self._recent.ready(np.array([slot]))[0] else None

    def unreadable(self, stream_id: str) -> bool:
        """Whether the last `pipeline.recent.RECENT_S` of `stream_id`, as of its latest window, are too noisy for
        its beats to be trusted (always False for a model without a signal-quality detector)."""
        return bool(self._unreadable[self._slot_of[stream_id]])

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
        slots = [self._slot_of[i] for i in ids]
        self._follow_flat_lines(slots, [samples for _, samples in windows])
        frames_of = self._dsp(slots, [samples for _, samples in windows])
        by_length: dict[int, list[tuple[str, NDArray[np.float32]]]] = {}
        for stream_id, frames in zip(ids, frames_of, strict=True):
            if len(frames):
                by_length.setdefault(len(frames), []).append((stream_id, frames))
        beats: list[Beat] = []
        for group in by_length.values():
            beats.extend(self._run_group(group))
        return beats

    def _follow_flat_lines(self, slots: list[int], windows: list[NDArray[np.floating]]) -> None:
        """Advance each slot's time line by its window; a slot whose window brings signal after a flat line
        restarts cold from that window, so that its beat context learns the patient, not the flat line, before
        it calls beats ectopic (the same as a stream that starts there)."""
        for slot, samples in zip(slots, windows, strict=True):
            flat = len(samples) == 0 or float(samples.max() - samples.min()) < self.flat_mv
            if self._flat[slot] and not flat:
                self._relearn(slot, float(self._fs[slot]))
                self._restart_s[slot] = self._seen_s[slot]
            self._flat[slot] = flat
            self._seen_s[slot] += len(samples) / self._fs[slot]

    def _run_group(self, group: list[tuple[str, NDArray[np.float32]]]) -> list[Beat]:
        ids = [stream_id for stream_id, _ in group]
        slots = np.array([self._slot_of[stream_id] for stream_id in ids], dtype=np.int64)
        frames = np.stack([f for _, f in group])
        probs, new_state = self.model.run(frames, [array[:, slots] for array in self._state])
        for array, new in zip(self._state, new_state, strict=True):
            array[:, slots] = new
        self._judge_signal(slots, frames)
        picked = pick_beats(probs, self._picker, slots, self.info.decision)
        time_s = r_peak_time_s(picked.frame, self.info)
        real = time_s >= 0  # a "beat" before the first sample is a cold-start artefact
        row, time_s = picked.row[real], time_s[real]
        if self._context is None:
            names = np.array(self.info.class_names)[picked.class_index[real]]
            confidence = picked.confidence[real]
        else:
            signal = self._context.window(slots, frames)
            names, confidence = self._beat_stage(slots[row], row, time_s, picked, real, signal)
        time_s = time_s + self._restart_s[slots[row]]  # since the stream's first sample, not the slot's restart
        return [Beat(ids[r], float(t), str(c), float(p)) for r, t, c, p in zip(row, time_s, names, confidence,
                                                                              strict=True)]

    def _judge_signal(self, slots: NDArray[np.int64], frames: NDArray[np.float32]) -> None:
        """Take the frames into each slot's recent signal; the VF and signal-quality detectors judge it once a
        whole `RECENT_S` has been seen."""
        self._recent.update(slots, frames)
        vf, quality = self.info.vf_detector, self.info.quality_detector
        ready = slots[self._recent.ready(slots)]
        if (vf is None and quality is None) or not len(ready):
            return
        x = self._recent.history[ready]
        spec = spectrum(x, self._recent.fs)
        features = vf_features(x, self._recent.fs, spec)
        if vf is not None:
            self._vf_found[ready] = vf.probability(features) >= vf.threshold
        if quality is not None:
            features = np.hstack([features, quality_extra_features(x, self._recent.fs, spec)])
            self._unreadable[ready] = quality.probability(features) >= quality.threshold

    def _beat_stage(self, beat_slots: NDArray[np.int64], row: NDArray[np.int64], time_s: NDArray[np.float64],
                    picked: PickedBeats, real: NDArray[np.bool_], signal: SignalWindow
                    ) -> tuple[NDArray[np.str_], NDArray[np.float32]]:
        """AAMI class and probability of each beat from the beat stage, stepping the k-th beats of all streams
        together (beats sorted by row, then time)."""
        assert self.model.beat_stage is not None and self._context is not None and self._beat_state is not None
        class_sum, end_frame = picked.class_sum[real], picked.end_frame[real]
        probs = np.zeros((len(row), len(AAMI_CLASSES)), dtype=np.float32)
        rank = rank_in_row(row)
        for k in range(int(rank.max(initial=-1)) + 1):
            at = np.flatnonzero(rank == k)
            slots = beat_slots[at]
            features = self._context.step(slots, time_s[at], end_frame[at], class_sum[at], signal, row[at])
            probs[at], new_state = self.model.beat_stage.run(features, self._beat_state[:, slots])
            self._beat_state[:, slots] = new_state
        best = probs.argmax(axis=1)
        return np.array(AAMI_CLASSES)[best], probs[np.arange(len(best)), best]

    def _grow(self) -> None:
        old = self._capacity
        self._capacity *= 2
        self._state = [np.concatenate([a, np.zeros_like(a)], axis=1) for a in self._state]
        self._picker.grow(self._capacity)
        if self._context is not None and self._beat_state is not None:
            self._context.grow(self._capacity)
            self._beat_state = np.concatenate([self._beat_state, np.zeros_like(self._beat_state)], axis=1)
        self._dsp.grow(self._capacity)
        self._fs, self._seen_s, self._restart_s = (np.concatenate([a, np.zeros(old)])
                                                   for a in (self._fs, self._seen_s, self._restart_s))
        self._flat = np.concatenate([self._flat, np.zeros(old, dtype=bool)])
        self._vf_found = np.concatenate([self._vf_found, np.zeros(old, dtype=bool)])
        self._unreadable = np.concatenate([self._unreadable, np.zeros(old, dtype=bool)])
        self._recent.grow(self._capacity)
        self._free.extend(range(self._capacity - 1, old - 1, -1))

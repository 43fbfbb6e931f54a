"""Many ECG devices, each with 1 to 12 leads, through one beat model, window by window with carried state.

Every lead of every device owns a lead slot: its DSP state (filter, resampler, framer), its recurrent state, its last
seconds of signal with the VF and signal-quality detectors' verdicts on them. Every device owns a device slot: its
beat-picking carry-over and, for a model with a beat stage, its rhythm context and beat-stage state. The leads of all
devices are batched into one model run (one run per distinct frame count). A lead that is flat, unreadable or still
warming up is not usable. For a model trained on one lead at a time, a device's per-frame probabilities are those of
its primary lead, its first lead with signal (not flat, warmed up) in the order it sends them: noise on it is said by
`unreadable`, not hidden by moving to a lead the model reads less well; for a model trained on fused leads (metadata
`lead_fusion`), the mean over its usable leads (`pipeline.analysis.beats.lead_weights`, `fuse_leads`), the primary
being the first usable one. Its beats are picked from them.
The beat stage then steps once per beat, the k-th beats of all devices in one batch, its beat shape read from the
primary lead. `ecgmon evaluate` and the daemon both go through this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.analysis.aami import AAMI_CLASSES
from pipeline.analysis.beat_context import BeatContext, SignalWindow, rank_in_row
from pipeline.analysis.beats import (
    LEAD_FUSION,
    BeatPickerState,
    PickedBeats,
    fuse_leads,
    lead_weights,
    pick_beats,
    r_peak_time_s,
)
from pipeline.analysis.dsp import PreprocessorBank
from pipeline.analysis.model import BeatModel
from pipeline.analysis.recent import RecentSignal, spectrum
from pipeline.config import FLAT_MV
from pipeline.detectors.qrs import ORGANIZED_BPM, RATE_WINDOW_S, QrsDetectorBank, QrsEvidence
from pipeline.detectors.quality import quality_extra_features
from pipeline.detectors.rhythm import rhythm_features
from pipeline.detectors.vf import vf_features

CLEAN_P = 0.2  # the second QRS detector is heard on leads whose P(unreadable) from the quality detector is below this
LEAD_WARMUP_S = 5.0  # a lead joins the decision once its filter and network have seen this much of it (s)
# One device's window: (device id, lead names, samples (n_leads, n_samples) in mV at the device's fs).
DeviceWindow = tuple[str, Sequence[str], NDArray[np.floating[Any]]]


@dataclass(frozen=True)
class Beat:
    """One detected beat.

    Attributes:
        stream_id: the device it belongs to.
        time_s: R-peak time (s) since the device's first sample.
        class_name: AAMI class ("N", "S", "V", "F", "Q").
        confidence: probability of that class (0-1): the beat stage's, or the frame stage's share of the beat
            probability in a model without one.
    """

    stream_id: str
    time_s: float
    class_name: str
    confidence: float


class _Slots:
    """Keys to array slots; freed slots are reused, and the arrays double when all are taken."""

    def __init__(self, capacity: int) -> None:
        self.of: dict[Any, int] = {}
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))

    def take(self, key: Any) -> tuple[int, bool]:
        """The slot of `key`, taken if new, and whether the arrays must grow to `capacity` first."""
        if key in self.of:
            return self.of[key], False
        grew = not self._free
        if grew:
            self._free.extend(range(2 * self.capacity - 1, self.capacity - 1, -1))
            self.capacity *= 2
        self.of[key] = self._free.pop()
        return self.of[key], grew

    def release(self, key: Any) -> None:
        self._free.append(self.of.pop(key))


def _grown(array: NDArray[Any], capacity: int, axis: int = 0, fill: float = 0.0) -> NDArray[Any]:
    """`array` extended with `fill` along `axis` to `capacity` entries."""
    shape = list(array.shape)
    shape[axis] = capacity - shape[axis]
    return np.concatenate([array, np.full(shape, fill, dtype=array.dtype)], axis=axis)


class BeatStreams:
    """Per-device and per-lead state in slots, batched inference across every lead of every device."""

    def __init__(self, model: BeatModel, capacity: int = 64, flat_mv: float = FLAT_MV) -> None:
        """`capacity`: slots allocated at first (they grow by doubling). `flat_mv`: a lead whose window's
        peak-to-peak is below this (mV) is flat (off, or not yet on the patient): it is left out, and the first
        window with signal after one restarts that lead cold; a device whose every lead was flat restarts cold."""
        self.model = model
        self.info = model.info
        self.flat_mv = flat_mv
        self._fused = model.info.lead_fusion == LEAD_FUSION  # trained on fused leads: all usable leads decide
        # Device slots: beat picking, beat context and beat-stage state, the time line (the sampling rate (Hz),
        # the signal seen since the device started (s), where its analysis last restarted after a flat line (s since
        # it started), whether its last window was flat in every lead), its leads in order and its primary lead.
        self._devices = _Slots(capacity)
        self._picker = BeatPickerState(capacity, len(self.info.class_names))
        self._context = BeatContext(capacity, self.info.fs, self.info.frame_size) if model.beat_stage else None
        self._beat_state = model.beat_stage.initial_state(capacity) if model.beat_stage else None
        self._fs = np.zeros(capacity)
        self._seen_s = np.zeros(capacity)
        self._restart_s = np.zeros(capacity)
        self._flat = np.zeros(capacity, dtype=bool)
        self._leads: dict[str, list[str]] = {}
        self._primary: dict[str, str] = {}
        # Lead slots, keyed (device, lead): DSP and recurrent state, the last seconds of signal with the VF and
        # signal-quality verdicts on them, whether the lead's last window was flat, its signal seen since it
        # (re)started (s).
        self._lead_slots = _Slots(capacity)
        self._dsp = PreprocessorBank(self.info.filter, self.info.fs, self.info.frame_size, capacity)
        self._state = model.initial_state(capacity)
        self._recent = RecentSignal(capacity, self.info.fs)
        self._qrs = QrsDetectorBank(capacity, self._recent.fs)
        self._vf_found = np.zeros(capacity, dtype=bool)
        rhythm = model.rhythm_stage
        self._rhythm_state = rhythm.initial_state(capacity) if rhythm else None
        self._rhythm_p = np.full((capacity, len(rhythm.info.classes) if rhythm else 0), np.nan, dtype=np.float32)
        self._unreadable = np.zeros(capacity, dtype=bool)
        self._clean = np.zeros(capacity, dtype=bool)
        self._lead_flat = np.zeros(capacity, dtype=bool)
        self._lead_age_s = np.zeros(capacity)

    # --- devices and leads ------------------------------------------------------------------
    def open(self, stream_id: str, fs: float) -> None:
        """Start (or restart from cold) device `stream_id`, sampled at `fs` (Hz); its leads open with its first
        window."""
        if self.is_open(stream_id):
            self.close(stream_id)
        slot, grew = self._devices.take(stream_id)
        if grew:
            self._grow_devices()
        self._fs[slot] = fs
        self._reset_device(slot)
        self._seen_s[slot] = self._restart_s[slot] = 0.0
        self._flat[slot] = False
        self._leads[stream_id] = []

    def _reset_device(self, slot: int) -> None:
        """Forget the device's beats, rhythm and beat shape."""
        self._picker.reset(np.array([slot]))
        if self._context is not None and self._beat_state is not None:
            self._context.reset(np.array([slot]))
            self._beat_state[:, slot] = 0.0

    def _open_lead(self, stream_id: str, lead: str) -> int:
        """A lead slot for `lead` of the device, cold, on the framing phase of the device's other leads."""
        slot, grew = self._lead_slots.take((stream_id, lead))
        if grew:
            self._grow_leads()
        siblings = [self._lead_slots.of[(stream_id, name)] for name in self._leads[stream_id]]
        if siblings:
            self._dsp.follow(slot, siblings[0])
        else:
            self._dsp.open(slot, float(self._fs[self._devices.of[stream_id]]))
        self._reset_lead(slot, int(self._qrs.seen[siblings[0]]) if siblings else 0)
        self._leads[stream_id].append(lead)
        return slot

    def _reset_lead(self, slot: int, clock: int) -> None:
        """Forget what the lead slot learnt of its signal (network state, recent signal, verdicts); `clock`: the
        device's frame clock (samples at 90 Hz since its analysis last restarted)."""
        for array in self._state:
            array[:, slot] = 0.0
        self._recent.reset(np.array([slot]))
        self._qrs.reset(np.array([slot]), clock)
        self._vf_found[slot] = self._unreadable[slot] = self._lead_flat[slot] = self._clean[slot] = False
        self._lead_age_s[slot] = 0.0
        self._rhythm_p[slot] = np.nan
        if self._rhythm_state is not None:
            self._rhythm_state[:, slot] = 0.0

    def _set_leads(self, stream_id: str, leads: Sequence[str]) -> list[int]:
        """The lead slots of the device's window, in its order: leads no longer sent are forgotten, new ones open."""
        for gone in [name for name in self._leads[stream_id] if name not in leads]:
            self._lead_slots.release((stream_id, gone))
            self._leads[stream_id].remove(gone)
        slots = [self._lead_slots.of[(stream_id, name)] if name in self._leads[stream_id]
                 else self._open_lead(stream_id, name) for name in leads]
        self._leads[stream_id] = list(leads)
        return slots

    def close(self, stream_id: str) -> None:
        """Forget `stream_id` and free its slots."""
        for lead in self._leads.pop(stream_id):
            self._lead_slots.release((stream_id, lead))
        self._primary.pop(stream_id, None)
        self._devices.release(stream_id)

    def is_open(self, stream_id: str) -> bool:
        return stream_id in self._devices.of

    @property
    def capacity(self) -> int:
        """Device slots allocated (they grow by doubling and are reused after `close`)."""
        return self._devices.capacity

    # --- save and restore --------------------------------------------------------------------
    def save(self, stream_id: str) -> dict[str, Any]:
        """Everything `stream_id` carries (per lead: DSP, recurrent state, recent signal; per device: beat
        picking, beat context, time line) as numbers, strings and arrays (pipeline/process/state.py)."""
        slot = self._devices.of[stream_id]
        doc: dict[str, Any] = {"fs": float(self._fs[slot]), "picker": self._picker.save_slot(slot),
                               "timeline": [float(self._seen_s[slot]), float(self._restart_s[slot]),
                                            bool(self._flat[slot])],
                               "primary": self._primary.get(stream_id)}
        if self._context is not None and self._beat_state is not None:
            doc["context"] = self._context.save_slot(slot)
            doc["beat_stage"] = self._beat_state[:, slot].copy()
        doc["leads"] = []
        for lead in self._leads[stream_id]:
            s = self._lead_slots.of[(stream_id, lead)]
            doc["leads"].append({"lead": lead, "dsp": self._dsp.save_slot(s),
                                 "recurrent": [a[:, s].copy() for a in self._state],
                                 "recent": self._recent.save_slot(s), "qrs": self._qrs.save_slot(s),
                                 "vf_found": bool(self._vf_found[s]),
                                 "rhythm": None if self._rhythm_state is None or np.isnan(self._rhythm_p[s, 0])
                                 else [self._rhythm_p[s].copy(), self._rhythm_state[:, s].copy()],
                                 "unreadable": bool(self._unreadable[s]), "clean": bool(self._clean[s]),
                                 "flat": bool(self._lead_flat[s]),
                                 "age_s": float(self._lead_age_s[s])})
        return doc

    def restore(self, stream_id: str, doc: dict[str, Any]) -> None:
        """Open `stream_id` with state saved by `save` (raises KeyError/ValueError on a malformed doc)."""
        self.open(stream_id, float(doc["fs"]))
        slot = self._devices.of[stream_id]
        self._picker.load_slot(slot, doc["picker"])
        if self._context is not None and self._beat_state is not None:
            self._context.load_slot(slot, doc["context"])
            self._beat_state[:, slot] = np.asarray(doc["beat_stage"], dtype=np.float32).reshape(
                self._beat_state[:, slot].shape)
        seen, restart, flat = doc["timeline"]
        self._seen_s[slot], self._restart_s[slot], self._flat[slot] = float(seen), float(restart), bool(flat)
        if doc["primary"] is not None:
            self._primary[stream_id] = str(doc["primary"])
        for saved in doc["leads"]:
            s = self._open_lead(stream_id, str(saved["lead"]))
            self._dsp.load_slot(s, saved["dsp"])
            for array, state in zip(self._state, saved["recurrent"], strict=True):
                array[:, s] = np.asarray(state, dtype=np.float32).reshape(array[:, s].shape)
            self._recent.load_slot(s, saved["recent"])
            self._qrs.load_slot(s, saved["qrs"])
            self._vf_found[s], self._unreadable[s] = bool(saved["vf_found"]), bool(saved["unreadable"])
            if saved["rhythm"] is not None and self._rhythm_state is not None:
                p, state = saved["rhythm"]
                self._rhythm_p[s] = np.asarray(p, dtype=np.float32).reshape(self._rhythm_p[s].shape)
                self._rhythm_state[:, s] = np.asarray(state, dtype=np.float32).reshape(self._rhythm_state[:, s].shape)
            self._clean[s] = bool(saved["clean"])
            self._lead_flat[s], self._lead_age_s[s] = bool(saved["flat"]), float(saved["age_s"])

    # --- what the analysis says ---------------------------------------------------------------
    def analysed_until_s(self, stream_id: str) -> float:
        """Time (s since the device's first sample) up to which every beat of `stream_id` has been returned.

        The model outputs a beat `output_delay_frames` after its R peak, and the picker returns it when
        its run of beat frames ends; a run still open holds back a beat at or after its current peak.
        """
        return self.analysed_until_many([stream_id])[0]

    def analysed_until_many(self, stream_ids: list[str]) -> list[float]:
        """`analysed_until_s` of each device, computed together."""
        slots = np.array([self._devices.of[i] for i in stream_ids], dtype=np.int64)
        p = self._picker
        frames = np.where(p.in_run[slots], p.peak_frame[slots], p.frames_seen[slots])
        until: list[float] = (self._restart_s[slots] + r_peak_time_s(frames, self.info)).tolist()
        return until

    def _lead_array(self, stream_id: str) -> NDArray[np.int64]:
        return np.array([self._lead_slots.of[(stream_id, lead)] for lead in self._leads[stream_id]], dtype=np.int64)

    def _live(self, lead_slots: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Which leads have signal: not flat, warmed up."""
        live: NDArray[np.bool_] = ~self._lead_flat[lead_slots] & (self._lead_age_s[lead_slots] >= LEAD_WARMUP_S)
        return live

    def _usable(self, lead_slots: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Which leads have signal the signal-quality detector calls readable."""
        usable: NDArray[np.bool_] = self._live(lead_slots) & ~self._unreadable[lead_slots]
        return usable

    def vf_found(self, stream_id: str) -> bool:
        """Whether the last `pipeline.analysis.recent.RECENT_S` of `stream_id`, as of its latest window, look like
        ventricular fibrillation in any usable lead (in any lead with signal when none is usable); always False for a
        model without a VF detector."""
        return self.vf_found_many([stream_id])[0]

    def vf_found_many(self, stream_ids: list[str]) -> list[bool]:
        """`vf_found` of each device, computed together."""
        slots, _, owner = self._lead_arrays(stream_ids)
        usable = self._usable(slots)
        judged = np.where(self._count_per(owner[usable], len(stream_ids))[owner] > 0, usable, ~self._lead_flat[slots])
        found: list[bool] = (self._count_per(owner[judged & self._vf_found[slots]], len(stream_ids)) > 0).tolist()
        return found

    def rhythm(self, stream_id: str) -> dict[str, float] | None:
        """The rhythm stage's (`pipeline.detectors.rhythm`) probability of each rhythm class in `stream_id` as of
        its latest window, averaged over the usable leads it has judged (over every judged lead with signal when
        none is usable); None for a model without a rhythm stage, and before a lead has been judged."""
        return self.rhythm_many([stream_id])[0]

    def rhythm_many(self, stream_ids: list[str]) -> list[dict[str, float] | None]:
        """`rhythm` of each device, computed together."""
        stage = self.info.rhythm_stage
        if stage is None:
            return [None] * len(stream_ids)
        slots, rows, owner = self._lead_arrays(stream_ids)
        judged = ~np.isnan(self._rhythm_p[slots, 0])
        usable = judged & self._usable(slots)
        judged &= ~self._lead_flat[slots]
        use = np.where(self._count_per(owner[usable], len(rows))[owner] > 0, usable, judged)  # rows each device uses
        n_used = self._count_per(owner[use], len(rows))
        single = np.zeros(len(rows), dtype=np.int64)
        single[owner[use]] = np.flatnonzero(use)  # a device's one row where it has one
        out: list[dict[str, float] | None] = []
        for device_rows, n, row in zip(rows, n_used.tolist(), single.tolist(), strict=True):
            p = None if n == 0 else self._rhythm_p[slots[row]] if n == 1 else \
                self._rhythm_p[slots[device_rows][use[device_rows]]].mean(axis=0)
            out.append(None if p is None else dict(zip(stage.classes, p.tolist(), strict=True)))
        return out

    def p_wave_consistency(self, stream_id: str) -> float | None:
        """How alike the P-wave intervals before the recent beats of `stream_id` are, on its primary lead
        (`pipeline.analysis.beat_context`): about 1 where every beat has the same P wave; None for a model without a
        beat stage, and before a beat."""
        if self._context is None:
            return None
        value = float(self._context.p_consistency[self._devices.of[stream_id]])
        return None if np.isnan(value) else value

    def unreadable(self, stream_id: str) -> bool:
        """Whether the signal the beats of `stream_id` come from is too noisy for them to be trusted, as of its latest
        window: its primary lead (every lead with signal, for a model trained on fused leads). Always False for a
        model without a signal-quality detector."""
        return self.unreadable_many([stream_id])[0]

    def unreadable_many(self, stream_ids: list[str]) -> list[bool]:
        """`unreadable` of each device, computed together."""
        slots, _, owner = self._lead_arrays(stream_ids)
        considered = np.ones(len(slots), dtype=bool)
        if not self._fused:
            at = 0
            for stream_id in stream_ids:
                leads, primary = self._leads[stream_id], self._primary.get(stream_id)
                if primary in leads:
                    considered[at:at + len(leads)] = False
                    considered[at + leads.index(primary)] = True
                at += len(leads)
        with_signal = considered & ~self._lead_flat[slots]
        n_signal = self._count_per(owner[with_signal], len(stream_ids))
        n_unreadable = self._count_per(owner[with_signal & self._unreadable[slots]], len(stream_ids))
        unreadable: list[bool] = ((n_signal > 0) & (n_unreadable == n_signal)).tolist()
        return unreadable

    def unreadable_leads(self, stream_id: str) -> list[str]:
        """The leads of `stream_id` with signal that the signal-quality detector judges unreadable, but the primary
        lead of a model trained on one lead at a time (the beats still come from it: `unreadable` says so)."""
        primary = None if self._fused else self._primary.get(stream_id)
        return [lead for lead, s in zip(self._leads[stream_id], self._lead_array(stream_id), strict=True)
                if self._unreadable[s] and not self._lead_flat[s] and lead != primary]

    def qrs_evidence(self, stream_id: str) -> QrsEvidence:
        """What the second QRS detector (`pipeline.detectors.qrs`) says of `stream_id` from its usable leads that the
        signal-quality detector calls clean (P(unreadable) < CLEAN_P: noise it lets through as readable still
        makes the second detector find complexes in a pause)."""
        return self.qrs_evidence_many([stream_id])[0]

    def qrs_evidence_many(self, stream_ids: list[str]) -> list[QrsEvidence]:
        """`qrs_evidence` of each device, computed together."""
        slots, rows, owner = self._lead_arrays(stream_ids)
        heard = self._usable(slots) & self._clean[slots]
        rate = self._qrs.rate_bpm(slots)
        organized = heard & ~self._vf_found[slots] & (rate >= ORGANIZED_BPM[0]) & (rate <= ORGANIZED_BPM[1])
        times = self._qrs.times_s[slots]
        recent = heard[:, None] & (self._qrs.seen[slots, None] / self._qrs.fs - times <= RATE_WINDOW_S)
        restart = self._restart_s[[self._devices.of[i] for i in stream_ids]]
        found = (restart[owner, None] + times)[recent].tolist()  # row by row, each row's ascending
        ends = np.cumsum(self._count_per(owner[np.nonzero(recent)[0]], len(rows))).tolist()
        any_organized = (self._count_per(owner[organized], len(rows)) > 0).tolist()
        out, start = [], 0
        for device_rows, end, org in zip(rows, ends, any_organized, strict=True):
            device_found = found[start:end]  # one lead's are ascending already; several leads' are merged
            out.append(QrsEvidence(times_s=tuple(device_found if device_rows.stop - device_rows.start == 1
                                                 else sorted(device_found)), organized=org))
            start = end
        return out

    def _lead_arrays(self, stream_ids: list[str]) -> tuple[NDArray[np.int64], list[slice], NDArray[np.int64]]:
        """The lead slots of the devices one after the other, each device's rows among them, and the device (index
        in `stream_ids`) of each row."""
        leads = [self._leads[i] for i in stream_ids]
        slots = np.array([self._lead_slots.of[(i, lead)] for i, names in zip(stream_ids, leads, strict=True)
                          for lead in names], dtype=np.int64)
        counts = [len(names) for names in leads]
        return slots, self._rows_of(counts), np.repeat(np.arange(len(stream_ids)), counts)

    @staticmethod
    def _rows_of(counts: list[int]) -> list[slice]:
        """Each device's rows among the leads of several devices one after the other (`counts` leads each)."""
        ends = np.cumsum(counts).tolist()
        return [slice(end - n, end) for end, n in zip(ends, counts, strict=True)]

    @staticmethod
    def _count_per(owners: NDArray[np.int64], n: int) -> NDArray[np.int64]:
        """How many of `owners` name each of n devices."""
        counts: NDArray[np.int64] = np.bincount(owners, minlength=n)
        return counts

    def primary_lead(self, stream_id: str) -> str | None:
        """The lead the beat stage reads the beat shape from (None before the first window)."""
        return self._primary.get(stream_id)

    def recent_signal(self, stream_id: str) -> NDArray[np.float32] | None:
        """The last `pipeline.analysis.recent.RECENT_S` of the primary lead of `stream_id` as the detectors judge it
        (mV at 90 Hz, a copy), or None before a whole one has been seen."""
        lead = self._primary.get(stream_id)
        if lead is None:
            return None
        slot = self._lead_slots.of[(stream_id, lead)]
        return self._recent.history[slot].copy() if self._recent.ready(np.array([slot]))[0] else None

    # --- analysis ---------------------------------------------------------------------------
    def process(self, windows: Sequence[DeviceWindow]) -> list[Beat]:
        """Run one window (every lead's samples in mV at the device's fs) of each listed open device.

        A device appears at most once per call; its leads may differ from its last window's (a lead that is no
        longer sent is forgotten, a new one starts cold and joins the decision once warmed up). Returns the beats
        completed by these windows.
        """
        slots: list[list[int]] = []
        for stream_id, leads, samples in windows:
            slots.append(self._set_leads(stream_id, leads))
            self._follow_flat_lines(stream_id, slots[-1], samples)
        frames = self._dsp([s for lead_slots in slots for s in lead_slots], [x for _, _, w in windows for x in w])
        work: dict[int, list[tuple[str, NDArray[np.int64], NDArray[np.float32]]]] = {}
        at = 0
        for (stream_id, _, _), lead_slots in zip(windows, slots, strict=True):
            device_frames, at = frames[at:at + len(lead_slots)], at + len(lead_slots)
            n = {len(f) for f in device_frames}
            if n != {0}:
                assert len(n) == 1, "the leads of a device are framed in step"
                work.setdefault(n.pop(), []).append((stream_id, np.array(lead_slots), np.stack(device_frames)))
        beats: list[Beat] = []
        for group in work.values():
            beats.extend(self._run_group(group))
        return beats

    def _follow_flat_lines(self, stream_id: str, lead_slots: list[int], samples: NDArray[np.floating[Any]]) -> None:
        """Advance the time lines by the window. A lead whose window brings signal after a flat line restarts cold
        (it joins the decision once warmed up); a device whose every lead was flat restarts cold from that window,
        so that its beat context learns the patient, not the flat line, before it calls beats ectopic (the same as
        a device that starts there)."""
        device = self._devices.of[stream_id]
        n = samples.shape[1]
        flat = ([True] * len(samples) if n == 0 else
                ((samples.max(axis=1) - samples.min(axis=1)).astype(np.float64) < self.flat_mv).tolist())
        if self._flat[device] and not all(flat):
            for slot in lead_slots:
                self._dsp.open(slot, float(self._fs[device]))
                self._reset_lead(slot, 0)
            self._reset_device(device)
            self._restart_s[device] = self._seen_s[device]
        for slot, lead_flat in zip(lead_slots, flat, strict=True):
            if self._lead_flat[slot] and not lead_flat:
                self._dsp.follow(slot, slot)
                self._reset_lead(slot, int(self._qrs.seen[slot]))
            self._lead_flat[slot] = lead_flat
            self._lead_age_s[slot] += n / self._fs[device]
        self._flat[device] = all(flat)
        self._seen_s[device] += n / self._fs[device]

    def _run_group(self, group: list[tuple[str, NDArray[np.int64], NDArray[np.float32]]]) -> list[Beat]:
        """Devices whose windows gave the same number of frames: every lead through the model in one batch, then
        each device's leads fused and its beats picked."""
        ids = [stream_id for stream_id, _, _ in group]
        lead_slots = np.concatenate([s for _, s, _ in group])
        frames = np.concatenate([f for _, _, f in group])
        probs, new_state = self.model.run(frames, [array[:, lead_slots] for array in self._state])
        for array, new in zip(self._state, new_state, strict=True):
            array[:, lead_slots] = new
        self._judge_signal(lead_slots, frames)
        usable_rows = self._usable(lead_slots)
        live_rows = (usable_rows if self._fused else self._live(lead_slots)).tolist()
        rows = self._rows_of([len(slots) for _, slots, _ in group])
        primary_rows = np.array([r.start + self._leads[i].index(self._pick_primary(i, live_rows[r]))
                                 for i, r in zip(ids, rows, strict=True)], dtype=np.int64)
        weights = lead_weights(usable_rows, primary_rows, self._fused)
        fused = [fuse_leads(probs[r], weights[r]) for r in rows]
        primary_frames = frames[primary_rows]
        device_slots = np.array([self._devices.of[i] for i in ids], dtype=np.int64)
        picked = pick_beats(np.stack(fused), self._picker, device_slots, self.info.decision)
        time_s = r_peak_time_s(picked.frame, self.info)
        real = time_s >= 0  # a "beat" before the first sample is a cold-start artefact
        row, time_s = picked.row[real], time_s[real]
        if self._context is None:
            names = np.array(self.info.class_names)[picked.class_index[real]]
            confidence = picked.confidence[real]
        else:
            signal = self._context.window(device_slots, primary_frames)
            names, confidence = self._beat_stage(device_slots[row], row, time_s, picked, real, signal)
        time_s = time_s + self._restart_s[device_slots[row]]  # since the device's first sample, not its restart
        return [Beat(ids[r], float(t), str(c), float(p)) for r, t, c, p in zip(row, time_s, names, confidence,
                                                                              strict=True)]

    def _pick_primary(self, stream_id: str, usable: list[bool]) -> str:
        """The device's primary lead: its first `usable` lead in the order it sends them (back to the first as soon
        as that is usable again); with none, the last one while it is still sent, else the first."""
        leads = self._leads[stream_id]
        current = self._primary.get(stream_id)
        if True in usable or current not in leads:
            current = leads[usable.index(True)] if True in usable else leads[0]
            self._primary[stream_id] = current
        return current

    def _judge_signal(self, slots: NDArray[np.int64], frames: NDArray[np.float32]) -> None:
        """Take the frames into each lead's recent signal and the second QRS detector; the VF and signal-quality
        detectors judge the recent signal once a whole `RECENT_S` has been seen."""
        self._qrs.update(slots, self._recent.update(slots, frames))
        vf, quality, rhythm = self.info.vf_detector, self.info.quality_detector, self.model.rhythm_stage
        ready = slots[self._recent.ready(slots)]
        if (vf is None and quality is None and rhythm is None) or not len(ready):
            return
        x = self._recent.history[ready]
        spec = spectrum(x, self._recent.fs)
        features = vf_features(x, self._recent.fs, spec)
        if vf is not None:
            self._vf_found[ready] = vf.probability(features) >= vf.threshold
        if rhythm is not None and self._rhythm_state is not None:
            self._rhythm_p[ready], self._rhythm_state[:, ready] = rhythm.run(
                rhythm_features(features, spec, self._qrs.rate_bpm(ready)), self._rhythm_state[:, ready])
        if quality is not None:
            features = np.hstack([features, quality_extra_features(x, self._recent.fs, spec)])
            p = quality.probability(features)
            self._unreadable[ready] = p >= quality.threshold
            self._clean[ready] = p < CLEAN_P

    def _beat_stage(self, beat_slots: NDArray[np.int64], row: NDArray[np.int64], time_s: NDArray[np.float64],
                    picked: PickedBeats, real: NDArray[np.bool_], signal: SignalWindow
                    ) -> tuple[NDArray[np.str_], NDArray[np.float32]]:
        """AAMI class and probability of each beat from the beat stage, stepping the k-th beats of all devices
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

    # --- growth -----------------------------------------------------------------------------
    def _grow_devices(self) -> None:
        capacity = self._devices.capacity
        self._picker.grow(capacity)
        if self._context is not None and self._beat_state is not None:
            self._context.grow(capacity)
            self._beat_state = _grown(self._beat_state, capacity, axis=1)
        self._fs, self._seen_s, self._restart_s, self._flat = (
            _grown(a, capacity) for a in (self._fs, self._seen_s, self._restart_s, self._flat))

    def _grow_leads(self) -> None:
        capacity = self._lead_slots.capacity
        self._state = [_grown(a, capacity, axis=1) for a in self._state]
        self._dsp.grow(capacity)
        self._recent.grow(capacity)
        self._qrs.grow(capacity)
        self._vf_found, self._unreadable, self._lead_flat, self._lead_age_s, self._clean = (
            _grown(a, capacity) for a in (self._vf_found, self._unreadable, self._lead_flat, self._lead_age_s,
                                          self._clean))
        self._rhythm_p = _grown(self._rhythm_p, capacity, fill=np.nan)
        if self._rhythm_state is not None:
            self._rhythm_state = _grown(self._rhythm_state, capacity, axis=1)

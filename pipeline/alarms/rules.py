"""Alarm rules per device: physiological (from beats and the VF detector) and technical.

Every alarm has a stable id and a lifecycle raised -> updated -> cleared, and an IEC
60601-1-8 priority. Physiological alarms are held back (neither raised, updated nor cleared)
while a technical alarm makes the beats unreliable (every one but saturation: a clipped QRS
still times its beat), and that technical alarm says so; likewise during the model's warm-up
after a stream starts or restarts. `poor_signal` (noise the quality detector judges unreadable)
holds back only the non-lethal ones: VF and asystole stay armed through noise. Times are signal
times (s, Unix time of the ECG), so a replayed record gives the same alarms at any speed.
"""

from __future__ import annotations

import bisect
import itertools
import statistics
from array import array
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from pipeline.config import AlarmConfig
from pipeline.detectors.af import AF_BEATS, AfDetectorInfo, af_feature_rows
from pipeline.detectors.qrs import REFRACTORY_S, QrsEvidence
from pipeline.io.codec import Window

Priority = Literal["high", "medium", "low"]
PRIORITIES = ("high", "medium", "low")
State = Literal["raised", "updated", "cleared"]

# type -> (kind, priority, message)
ALARM_TYPES: dict[str, tuple[str, Priority, str]] = {
    "ventricular_fibrillation": ("physiological", "high", "Ventricular fibrillation / flutter"),
    "atrial_fibrillation": ("physiological", "medium", "Atrial fibrillation"),  # priority: AlarmConfig.af_priority
    "asystole": ("physiological", "high", "Asystole: no QRS detected"),
    "extreme_bradycardia": ("physiological", "high", "Extreme bradycardia"),
    "extreme_tachycardia": ("physiological", "high", "Extreme tachycardia"),
    "ventricular_tachycardia": ("physiological", "high", "Ventricular tachycardia"),
    "svt": ("physiological", "medium", "Supraventricular tachycardia run"),
    "ventricular_couplet": ("physiological", "low", "Ventricular couplet"),
    "ventricular_bigeminy": ("physiological", "low", "Ventricular bigeminy"),
    "ventricular_trigeminy": ("physiological", "low", "Ventricular trigeminy"),
    "pvc_burden": ("physiological", "medium", "Frequent PVCs"),
    "signal_loss": ("technical", "medium", "ECG signal lost"),
    "leads_off": ("technical", "medium", "Leads off / flat line"),
    "saturation": ("technical", "low", "Signal saturated"),
    "poor_signal": ("technical", "low", "Poor signal quality"),
    "lead_fault": ("technical", "low", "ECG lead fault: lead left out, the other leads monitor the patient"),
    "data_gap": ("technical", "low", "Gap in the ECG data; analysis restarted"),
    "windows_dropped": ("technical", "medium", "Monitor overloaded: ECG windows of this device were not analysed"),
}
# Technical alarms that leave physiological alarms running: a clipped QRS still gives its beat's time (but a
# signal pinned at a rail for AlarmConfig.saturation_unreadable_share of a window holds them back), and a faulty
# lead is left out while the others carry the decision.
KEEPS_PHYSIOLOGICAL = frozenset({"saturation", "lead_fault"})
# Technical alarms that hold back every physiological alarm but the lethal ones: in noise the VF detector still
# reads the signal and an absent QRS is still absent.
KEEPS_LETHAL = frozenset({"poor_signal"})
LETHAL = ("ventricular_fibrillation", "asystole")
QRS_MATCH_S = 0.25  # the second QRS detector's complex this close to a beat is that beat (s)
QRS_PAIR_S = 2.0  # missed complexes end a pause only in pairs this close (s): QRS activity, not one blip
QRS_KEEP_S = 30.0  # the second QRS detector's complexes kept per device (s)
RR_RESOLUTION_S = 1e-4  # beat times judged by the AF detector, relative to the first of its row (s)
HISTORY_BEATS = AF_BEATS + 1  # beats kept per device: the longest rule (AF, 33 beats)


@dataclass(frozen=True)
class AlarmEvent:
    """One alarm message: a state change or update of an alarm instance."""

    alarm_id: str
    device: str
    type: str
    state: State
    time: float
    evidence: dict[str, Any]
    priority: Priority
    acknowledged: dict[str, Any] | None = None  # by (staff login), at (s, Unix), silenced_until (s, Unix, or None)

    @property
    def kind(self) -> str:
        return ALARM_TYPES[self.type][0]

    @property
    def message(self) -> str:
        return ALARM_TYPES[self.type][2]


@dataclass
class _Active:
    alarm_id: str
    raised: float
    last_seen: float
    last_update: float
    evidence: dict[str, Any]
    acknowledged: dict[str, Any] | None = None  # `AlarmEvent.acknowledged`


INT16_RAILS = (-32768, 32767)  # the binary format's ADC limits
MAX_HALF_STEP_MV = 0.005  # windows in mV (gain 1) carry no ADC step: one rail value is then within 5 µV


def longest_run(mask: NDArray[np.bool_]) -> NDArray[np.int64]:
    """Length of the longest run of True in each row of `mask` (n, m)."""
    position = np.arange(1, mask.shape[1] + 1)
    last_false = np.maximum.accumulate(np.where(mask, 0, position[None, :]), axis=1)
    longest: NDArray[np.int64] = (position[None, :] - last_false).max(axis=1, initial=0)
    return longest


@dataclass
class SignalCheck:
    """Technical findings of one window (raw signal, mV): of the device, from every lead, and each faulty lead.

    A lead is faulty when it is flat, saturated or left out as unreadable by the signal-quality detector; the device
    is flat or saturated only when every lead with signal is (one good lead keeps the patient monitored), and
    unreadable when the signal its beats come from is (`BeatStreams.unreadable`).
    """

    flat: bool
    saturated: bool
    unreadable: bool  # the signal-quality detector's verdict on the last 4 s of the lead(s) the beats come from
    peak_to_peak_mv: float  # of the lead with the largest
    rail_share: float = 0.0  # share of the window's samples at a rail (0-1), of the least pinned lead with signal
    leads: tuple[str, ...] = ()
    lead_faults: dict[str, str] = field(default_factory=dict)  # lead -> "flat", "saturated" or "unreadable"

    @classmethod
    def batch(cls, windows: list[Window], unreadable: list[bool], unreadable_leads: list[list[str]],
              config: AlarmConfig) -> list[SignalCheck]:
        """Checks of many windows, every lead, computed together for leads of equal length and rate; `unreadable`:
        the signal-quality detector's verdict on the signal each device's beats come from (`BeatStreams.unreadable`),
        `unreadable_leads`: the leads of each window it leaves out as unreadable (`BeatStreams.unreadable_leads`)."""
        rows = [(i, j) for i, w in enumerate(windows) for j in range(len(w.leads))]
        flat, saturated, ptp, rail_share = _lead_checks(windows, rows, config)
        out, first = [], 0
        for i, w in enumerate(windows):
            at = range(first, first + len(w.leads))
            first += len(w.leads)
            faults = {}
            for k in at:
                lead = w.leads[rows[k][1]]
                fault = ("flat" if flat[k] else "saturated" if saturated[k] else
                         "unreadable" if lead in unreadable_leads[i] else None)
                if fault is not None:
                    faults[lead] = fault
            live = [k for k in at if not flat[k]]
            out.append(cls(flat=not live, saturated=bool(live) and all(saturated[k] for k in live),
                           unreadable=bool(live) and unreadable[i],
                           peak_to_peak_mv=max(ptp[k] for k in at),
                           rail_share=min((rail_share[k] for k in live), default=0.0), leads=w.leads,
                           lead_faults=faults))
        return out


def _lead_checks(windows: list[Window], rows: list[tuple[int, int]], config: AlarmConfig
                 ) -> tuple[list[bool], list[bool], list[float], list[float]]:
    """Whether each (window, lead) row is flat and saturated, its peak-to-peak (mV) and rail share (0-1).

    Saturation is the signal held at a rail, not a large amplitude: a run of `saturation_run_s` at
    the lead's maximum or minimum (within half an ADC step of the lead's own gain, at most
    MAX_HALF_STEP_MV) that lies at least `saturation_min_mv` from 0 mV, or a sample at the binary
    format's int16 limits.
    """
    flat, saturated = [False] * len(rows), [False] * len(rows)
    ptp_of, share_of = [0.0] * len(rows), [0.0] * len(rows)
    groups: dict[tuple[int, float], list[int]] = {}
    for k, (i, _) in enumerate(rows):
        groups.setdefault((windows[i].samples_mv.shape[1], windows[i].fs), []).append(k)
    for (_, fs), ks in groups.items():
        x = np.stack([windows[rows[k][0]].samples_mv[rows[k][1]] for k in ks])
        gain = np.array([windows[rows[k][0]].adc_gain[rows[k][1]] for k in ks])[:, None]
        baseline = np.array([windows[rows[k][0]].adc_baseline[rows[k][1]] for k in ks])[:, None]
        high, low = x.max(axis=1, keepdims=True), x.min(axis=1, keepdims=True)
        ptp = high[:, 0] - low[:, 0]
        half_step = np.minimum(0.5 / gain, MAX_HALF_STEP_MV)
        need = max(2, int(np.ceil(config.saturation_run_s * fs)))
        near_high, near_low = x >= high - half_step, x <= low + half_step
        at_high = np.abs(high[:, 0]) >= config.saturation_min_mv
        at_low = np.abs(low[:, 0]) >= config.saturation_min_mv
        at_high &= near_high.sum(axis=1) >= need  # too few samples near the maximum for a run: no rail
        at_low &= near_low.sum(axis=1) >= need
        at_high[at_high] = longest_run(near_high[at_high]) >= need
        at_low[at_low] = longest_run(near_low[at_low]) >= need
        # int16 limits: only a lead whose extremes reach them needs the per-sample test
        at_limits = np.zeros_like(x, dtype=bool)
        reach = ((np.rint(low[:, 0] * gain[:, 0] + baseline[:, 0]) <= INT16_RAILS[0])
                 | (np.rint(high[:, 0] * gain[:, 0] + baseline[:, 0]) >= INT16_RAILS[1]))
        if reach.any():
            adc = np.rint(x[reach] * gain[reach] + baseline[reach])
            at_limits[reach] = (adc <= INT16_RAILS[0]) | (adc >= INT16_RAILS[1])
        on_rail = (near_high & at_high[:, None]) | (near_low & at_low[:, None]) | at_limits
        found = zip((ptp < config.flat_mv).tolist(), (at_high | at_low | reach).tolist(), ptp.tolist(),
                    on_rail.mean(axis=1).tolist(), strict=True)
        for k, (is_flat, is_saturated, peak_to_peak, share) in zip(ks, found, strict=True):
            flat[k], saturated[k], ptp_of[k], share_of[k] = is_flat, is_saturated, peak_to_peak, share
    return flat, saturated, ptp_of, share_of


@dataclass
class DeviceAlarms:
    """Alarm state of one device."""

    device: str
    config: AlarmConfig
    model_version: str
    started: float  # signal time the stream (re)started (s)
    af: AfDetectorInfo | None = None  # the model's AF detector (None: no AF alarm)
    rhythm_thresholds: dict[str, float] = field(default_factory=dict)  # the model's rhythm stage: class -> threshold
    times: array[float] = field(default_factory=lambda: array("d"))  # the last HISTORY_BEATS beats (s)
    classes: str = ""  # their AAMI classes, one letter each
    v_times: array[float] = field(default_factory=lambda: array("d"))  # the V beats of the last minute (s)
    active: dict[str, _Active] = field(default_factory=dict)
    gap_since: float | None = None
    rate_from: float = 0.0  # rate rules use beats from here on: a pause that was an asystole is not a bradycardia (s)
    pinned: bool = False  # the last window sat at a rail for saturation_unreadable_share of it or more
    vf_since: float | None = None  # signal time from which the VF detector has said VF without a break (s)
    vf_last: float | None = None  # the last time it said VF (s)
    af_since: float | None = None  # likewise for the AF detector (s)
    af_last: float | None = None
    unreadable_last: float | None = None  # the last time the signal-quality detector said unreadable (s)
    lead_fault_last: float | None = None  # the last window with a faulty lead while another was good (s)
    known_leads: list[str] = field(default_factory=list)  # every lead the device has sent, in order of appearance
    qrs_times: list[float] = field(default_factory=list)  # the second QRS detector's recent complexes (s)
    organized: bool = False  # the second QRS detector sees organized QRS complexes on a readable lead without VF
    rhythm_vt_since: float | None = None  # signal time from which the rhythm stage has shown VT without a break (s)
    rhythm_vt_last: float | None = None  # the last time it showed VT (s)

    # --- save and restore ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"started": self.started, "gap_since": self.gap_since, "rate_from": self.rate_from,
                "vf_since": self.vf_since, "vf_last": self.vf_last, "af_since": self.af_since, "af_last": self.af_last,
                "unreadable_last": self.unreadable_last, "known_leads": self.known_leads,
                "lead_fault_last": self.lead_fault_last, "qrs_times": self.qrs_times,
                "organized": self.organized, "rhythm_vt": [self.rhythm_vt_since, self.rhythm_vt_last],
                "times": list(self.times),
                "classes": list(self.classes), "v_times": list(self.v_times),
                "active": {t: [a.alarm_id, a.raised, a.last_seen, a.last_update, a.evidence, a.acknowledged]
                           for t, a in self.active.items()}}

    @classmethod
    def from_dict(cls, device: str, config: AlarmConfig, model_version: str, af: AfDetectorInfo | None,
                  doc: dict[str, Any], rhythm_thresholds: dict[str, float] | None = None) -> DeviceAlarms:
        alarms = cls(device, config, model_version, float(doc["started"]), af, dict(rhythm_thresholds or {}))
        alarms.gap_since = doc["gap_since"]
        alarms.rate_from = float(doc["rate_from"])
        alarms.vf_since, alarms.vf_last = doc["vf_since"], doc["vf_last"]
        alarms.af_since, alarms.af_last = doc["af_since"], doc["af_last"]
        alarms.unreadable_last = doc["unreadable_last"]
        alarms.known_leads = list(doc["known_leads"])
        alarms.lead_fault_last = doc["lead_fault_last"]
        alarms.qrs_times, alarms.organized = list(doc["qrs_times"]), bool(doc["organized"])
        alarms.rhythm_vt_since, alarms.rhythm_vt_last = doc["rhythm_vt"]
        alarms.times.extend(doc["times"][-HISTORY_BEATS:])
        alarms.classes = "".join(doc["classes"])[-HISTORY_BEATS:]
        alarms.v_times.extend(doc["v_times"])
        alarms.active = {t: _Active(*a) for t, a in doc["active"].items() if t in ALARM_TYPES}
        return alarms

    # --- inputs -------------------------------------------------------------------------------
    def on_window(self, check: SignalCheck, beats: list[tuple[float, str]], now: float,
                  analysed_until: float, vf_found: bool = False, p_af: float | None = None,
                  qrs: QrsEvidence | None = None, rhythm: dict[str, float] | None = None) -> list[AlarmEvent]:
        """One analysed window ending at `now` (s, signal time): its technical check, the VF detector's verdict
        on the signal up to `now`, then the beats it completed (R-peak time s, AAMI class) and the AF
        detector's P(AF) of the last AF_BEATS RR intervals with them (`af_probabilities`; None: not judged),
        then asystole judged on the beat time line up to `analysed_until` (s), the latest time for which every
        beat has been emitted. `qrs`: the second QRS detector's evidence up to `now` (None: not run), which the
        alarms of `AlarmConfig.second_detector` take into account (`pipeline.detectors.qrs`); `rhythm`: the rhythm
        stage's probability of each rhythm class up to `now` (`BeatStreams.rhythm`; None: not run), which raises
        the alarms of `AlarmConfig.rhythm_stage` at the model's thresholds."""
        if qrs is not None:
            self._take_qrs(qrs, now)
        events = self._technical(check, now)
        vf = vf_found and not (self.organized and self._confirms("ventricular_fibrillation"))
        events += self._fibrillation(vf or self._rhythm_shows("VF", "ventricular_fibrillation", rhythm), now)
        events += self._beats(beats, now)
        events += self._rhythm_vt(self._rhythm_shows("VT", "ventricular_tachycardia", rhythm), now)
        if p_af is not None and len(self.times) > AF_BEATS and not self._held_back(lethal=False) \
                and now - self.started >= self.config.warmup_s:
            events += self._af_rule(now, p_af)
        return events + self._asystole(analysed_until)

    def af_row(self, beats: list[tuple[float, str]]) -> tuple[list[float], list[str]] | None:
        """The last AF_BEATS + 1 beat times (s) and classes once `beats` are added; None when `beats` is empty or
        there are fewer."""
        if not beats or len(self.times) + len(beats) <= AF_BEATS:
            return None
        return ([*self.times, *(t for t, _ in beats)][-(AF_BEATS + 1):],
                [*self.classes, *(c for _, c in beats)][-(AF_BEATS + 1):])

    def _fibrillation(self, vf_found: bool, now: float) -> list[AlarmEvent]:
        """VF raised once the detector has said VF for `vf_confirm_s`, cleared after `vf_clear_s` without it.
        It supersedes asystole and bradycardia: without QRS complexes, the beat rules see a slow or no rate."""
        if vf_found:
            self.vf_since = now if self.vf_since is None else self.vf_since
            self.vf_last = now
        else:
            self.vf_since = None
        if self._held_back(lethal=True) or now - self.started < self.config.warmup_s:
            return []
        c = self.config
        if "ventricular_fibrillation" in self.active:
            present = self.vf_last is not None and now - self.vf_last < c.vf_clear_s
        else:
            present = self.vf_since is not None and now - self.vf_since >= c.vf_confirm_s
        evidence = {"vf_since": self.vf_since} if present else {"seconds_without_vf": c.vf_clear_s}
        events = self._set("ventricular_fibrillation", present, now, evidence, update=False)
        if present:
            for superseded in ("asystole", "extreme_bradycardia"):
                events += self._set(superseded, False, now, {"superseded_by": "ventricular_fibrillation"})
        return events

    def _rhythm_vt(self, shown: bool, now: float) -> list[AlarmEvent]:
        """VT raised once the rhythm stage has shown VT for `rhythm_vt_confirm_s`; one it raised clears after
        `rhythm_vt_clear_s` without it, once the beats' own VT rule would not hold it (no V among the last beats).
        Nothing where `AlarmConfig.rhythm_stage` leaves VT to the beats alone."""
        if "ventricular_tachycardia" not in self.config.rhythm_stage:
            return []
        if shown:
            self.rhythm_vt_since = now if self.rhythm_vt_since is None else self.rhythm_vt_since
            self.rhythm_vt_last = now
        else:
            self.rhythm_vt_since = None
        if self._held_back(lethal=True) or now - self.started < self.config.warmup_s:
            return []
        c = self.config
        if self.rhythm_vt_since is not None and now - self.rhythm_vt_since >= c.rhythm_vt_confirm_s:
            return self._set("ventricular_tachycardia", True, now, {"rhythm_stage_since": self.rhythm_vt_since})
        if "ventricular_tachycardia" in self.active and not self._rhythm_holds_vt(now) \
                and "V" not in self.classes[-c.clear_after_beats:]:
            return self._set("ventricular_tachycardia", False, now, {})
        return []

    def _rhythm_holds_vt(self, now: float) -> bool:
        """Whether the rhythm stage showed VT within `rhythm_vt_clear_s` (the VT alarm stays while it did)."""
        return self.rhythm_vt_last is not None and now - self.rhythm_vt_last < self.config.rhythm_vt_clear_s

    def _rhythm_shows(self, rhythm_class: str, alarm_type: str, rhythm: dict[str, float] | None) -> bool:
        """Whether the rhythm stage shows `rhythm_class` at the model's threshold, and raises `alarm_type` besides
        its usual rule (`AlarmConfig.rhythm_stage`)."""
        threshold = self.rhythm_thresholds.get(rhythm_class)
        return (alarm_type in self.config.rhythm_stage and rhythm is not None and threshold is not None
                and rhythm.get(rhythm_class, 0.0) >= threshold)

    def _beats(self, beats: list[tuple[float, str]], now: float) -> list[AlarmEvent]:
        """The rules run after each beat, so a pattern that ends inside a window is not missed."""
        events: list[AlarmEvent] = []
        for t, cls in beats:
            events += self._asystole(t, ended=True)  # a pause seen whole only now, between two windows' checks
            self.times.append(t)
            if len(self.times) > HISTORY_BEATS:
                del self.times[0]
            self.classes = (self.classes + cls)[-HISTORY_BEATS:]
            if cls == "V":
                self.v_times.append(t)
            events += self._evaluate(t, new_beat=True)
        if not beats:
            events += self._evaluate(now, new_beat=False)
        return events

    def _evaluate(self, now: float, new_beat: bool) -> list[AlarmEvent]:
        while self.v_times and self.v_times[0] < now - 60.0:
            del self.v_times[0]
        if self._held_back(lethal=True) or now - self.started < self.config.warmup_s:
            return []
        events: list[AlarmEvent] = []
        if new_beat and "asystole" in self.active:
            events += self._set("asystole", False, now, {})
            self.rate_from = now
        if self._held_back(lethal=False):
            return events
        for rule in (self._rate_rules, self._run_rules, self._pattern_rules, self._burden_rule):
            events += rule(now, new_beat)
        return events

    def _technical(self, check: SignalCheck, now: float) -> list[AlarmEvent]:
        events: list[AlarmEvent] = []
        self.pinned = check.saturated and check.rail_share >= self.config.saturation_unreadable_share
        if check.unreadable and not check.flat:
            self.unreadable_last = now
        noisy = self.unreadable_last is not None and now - self.unreadable_last < self.config.poor_signal_clear_s
        for alarm_type, present in (("leads_off", check.flat), ("saturation", check.saturated),
                                     ("poor_signal", noisy)):
            if not present and alarm_type not in self.active:
                continue  # nothing to raise or clear
            detail = ({"peak_to_peak_mv": round(check.peak_to_peak_mv, 4)} if alarm_type == "leads_off" else
                      {"rail_share": round(check.rail_share, 2)} if alarm_type == "saturation" else
                      {"unreadable_now": check.unreadable})
            held = ("suspended except " + " and ".join(LETHAL) if alarm_type in KEEPS_LETHAL
                    else "suspended" if alarm_type not in KEEPS_PHYSIOLOGICAL or self.pinned else "active")
            events += self._set(alarm_type, present, now, {**detail, "physiological_alarms": held},
                                update=alarm_type != "poor_signal")
        events += self._lead_fault(check, now)
        cleared = {e.type for e in events if e.state == "cleared"}
        if cleared - KEEPS_PHYSIOLOGICAL - KEEPS_LETHAL:
            self._restart(now)
        elif cleared & KEEPS_LETHAL:
            self._forget_noise(now)
        if self.gap_since is not None and now - self.gap_since >= self.config.warmup_s:
            self.gap_since = None
            events += self._set("data_gap", False, now, {})
        return events

    def _lead_fault(self, check: SignalCheck, now: float) -> list[AlarmEvent]:
        """`lead_fault` while some lead is faulty or no longer sent (missing) and another is good: the faulty ones
        are left out of the decision; cleared `lead_fault_clear_s` after the last such window. When no lead is good
        the device's own technical alarms take over."""
        self.known_leads.extend(lead for lead in check.leads if lead not in self.known_leads)
        faults = {**{lead: "missing" for lead in self.known_leads if lead not in check.leads}, **check.lead_faults}
        good = [lead for lead in check.leads if lead not in check.lead_faults]
        if faults and good:
            self.lead_fault_last = now
        active = self.active.get("lead_fault")
        held = (active is not None and self.lead_fault_last is not None
                and now - self.lead_fault_last < self.config.lead_fault_clear_s)
        present = bool(good) and (bool(faults) or held)
        if not present and active is None:
            return []
        evidence: dict[str, Any] = {"leads": faults, "good_leads": good, "physiological_alarms": "active"}
        if held and not faults and active is not None:  # held after the last fault: its last evidence stands
            evidence = active.evidence
        return self._set("lead_fault", present, now, evidence)

    def _asystole(self, analysed_until: float, ended: bool = False) -> list[AlarmEvent]:
        """No QRS from the last beat up to `analysed_until` (s); `ended`: a beat there ends the pause.

        Raised at the moment the pause reached `asystole_s`, on the beat time line: before the beat that
        ends it, even when that beat comes out in the same window. Two complexes the second detector found on a
        clean lead after the last beat, QRS_PAIR_S or less apart, end the pause too: no lead may show QRS activity.
        """
        last = self.times[-1] if self.times else self.started
        if self._confirms("asystole"):
            missed = self._missed(last, analysed_until)
            paired = [b for a, b in itertools.pairwise(missed) if b - a <= QRS_PAIR_S]  # a rhythm, not a noise blip
            last = max([last, *paired])
        silent = analysed_until - last
        onset = last + self.config.asystole_s
        if (silent < self.config.asystole_s or self._held_back(lethal=True)
                or onset - self.started < self.config.warmup_s
                or (ended and "asystole" in self.active) or "ventricular_fibrillation" in self.active):
            return []
        evidence = {"seconds_without_qrs": round(silent, 2), **({"pause_ended": True} if ended else {})}
        return self._set("asystole", True, onset, evidence, update=False)

    def on_gap(self, now: float, detail: dict[str, Any]) -> list[AlarmEvent]:
        """The stream had a gap and restarts cold at `now`."""
        self._restart(now)
        self.gap_since = now  # one alarm for a run of gaps, not an update per gap (an overload makes thousands)
        return self._set("data_gap", True, now, {**detail, "physiological_alarms": "suspended"}, update=False)

    def on_silence(self, now: float, silent_s: float) -> list[AlarmEvent]:
        """No data has arrived for `silent_s` seconds (wall clock)."""
        lost = silent_s >= self.config.signal_loss_s
        events = self._set("signal_loss", lost, now, {"seconds_without_data": round(silent_s, 1),
                                                      "physiological_alarms": "suspended"}, update=False)
        if events and not lost:
            self._restart(now)
        return events

    def _forget_noise(self, now: float) -> None:
        """Forget the beats found in noise, but the last one (as class Q, for the asystole clock): the non-lethal
        rules start afresh, the lethal ones carry on."""
        last = self.times[-1] if self.times else None
        self._forget_history()
        self.af_since = self.af_last = None
        self.rate_from = now
        if last is not None:
            self.times.append(last)
            self.classes = "Q"

    def _forget_history(self) -> None:
        """Drop the beats kept (times, classes, V beats)."""
        del self.times[:], self.v_times[:]
        self.classes = ""

    def _restart(self, now: float) -> None:
        """Forget the beats: after a technical problem the rhythm context is unreliable (warm-up again)."""
        self._forget_history()
        self.vf_since = self.vf_last = self.af_since = self.af_last = self.rhythm_vt_since = self.rhythm_vt_last = None
        self.started = now

    def on_overload(self, now: float, dropped: int) -> list[AlarmEvent]:
        """`dropped` windows of this device were discarded unanalysed in the last interval (0: none).

        Cleared only after `overload_hold_s` without drops, so that a daemon at its limit does not chatter."""
        evidence = {"windows_dropped": dropped, "physiological_alarms": "suspended"}
        if dropped:
            return self._set("windows_dropped", True, now, evidence, update=False)
        active = self.active.get("windows_dropped")
        if active is not None and now - active.last_seen >= self.config.overload_hold_s:
            return self._set("windows_dropped", False, now, evidence)
        return []

    def alarm_ids(self) -> set[str]:
        return {a.alarm_id for a in self.active.values()}

    def open_events(self) -> list[AlarmEvent]:
        """The last message (raised or updated) of each open alarm, again."""
        return [self._event(t, "raised" if a.last_update == a.raised else "updated", a.last_update, a.evidence)
                for t, a in self.active.items()]

    def acknowledge(self, alarm_id: str, by: str, at: float, silence_s: float | None) -> list[AlarmEvent]:
        """Staff login `by` acknowledged the open alarm `alarm_id` at `at` (s, Unix), and silenced it for `silence_s`
        (s; None: not silenced): its `updated` event carries that, and so do its later events. [] when no open alarm
        of this device has that id (cleared meanwhile). An alarm that escalates is a new alarm: it sounds."""
        for alarm_type, active in self.active.items():
            if active.alarm_id == alarm_id:
                active.acknowledged = {"by": by, "at": at,
                                       "silenced_until": None if silence_s is None else at + silence_s}
                active.last_update = active.last_seen
                return [self._event(alarm_type, "updated", active.last_seen, active.evidence)]
        return []

    def keep_acknowledgement(self, alarm_id: str, acknowledged: dict[str, Any]) -> None:
        """Hold the acknowledgement subscribers saw on the open alarm `alarm_id`, if its restored state has none."""
        for active in self.active.values():
            if active.alarm_id == alarm_id and active.acknowledged is None:
                active.acknowledged = acknowledged

    def keep_only(self, open_alarm_ids: set[str]) -> None:
        """Forget active alarms whose ids are not in `open_alarm_ids`: their subscribers saw them cleared."""
        self.active = {t: a for t, a in self.active.items() if a.alarm_id in open_alarm_ids}

    def adopt(self, alarm_id: str, alarm_type: str, raised: float, last: float, evidence: dict[str, Any],
              acknowledged: dict[str, Any] | None = None) -> None:
        """Hold an alarm that subscribers see open, raised at `raised` with its last message at `last` (s), whose
        state was lost: it stays open until the rules judge it again on the device's data."""
        evidence = {k: v for k, v in evidence.items() if k not in ("raised_at", "model_version")}
        self.active[alarm_type] = _Active(alarm_id, raised, last, last, evidence, acknowledged)
        if alarm_type == "data_gap":
            self.gap_since = last

    def resume(self, now: float) -> None:
        """The device's data returns at `now` (s) after its analysis state was dropped: the open alarms stay, and
        are judged again once the analysis has warmed up."""
        self._restart(now)
        self.rate_from = now
        if "data_gap" in self.active:
            self.gap_since = now

    def forget_beats(self) -> None:
        """Drop the beat history (the device's analysis state is being dropped; its open alarms stay)."""
        self._restart(self.started)

    # --- rules --------------------------------------------------------------------------------
    def _hr_bpm(self, n_beats: int) -> float | None:
        if len(self.times) < n_beats:
            return None
        span = self.times[-1] - self.times[-n_beats]
        return 60.0 * (n_beats - 1) / span if span > 0 else None

    def _confirms(self, alarm_type: str) -> bool:
        """Whether `alarm_type` takes the second QRS detector's evidence into account (`second_detector`)."""
        return alarm_type in self.config.second_detector

    def _take_qrs(self, qrs: QrsEvidence, now: float) -> None:
        """Keep the second QRS detector's complexes of the last QRS_KEEP_S (s), one per complex: a detection within
        REFRACTORY_S of the last one kept is the same complex seen on another lead."""
        kept = self.qrs_times[bisect.bisect_left(self.qrs_times, now - QRS_KEEP_S):]  # ascending
        times = qrs.times_s  # ascending: those within REFRACTORY_S of the last kept are skipped at once
        for t in times[bisect.bisect_right(times, kept[-1] + REFRACTORY_S) if kept else 0:]:
            if not kept or t > kept[-1] + REFRACTORY_S:
                kept.append(t)
        self.qrs_times = kept
        self.organized = qrs.organized

    def _missed(self, start: float, end: float) -> list[float]:
        """The second QRS detector's complexes in (start, end] (s) that match no beat (QRS_MATCH_S): complexes on
        a readable lead the network did not call beats. (Plain Python: a handful of numbers per beat.)"""
        q = self.qrs_times[bisect.bisect_right(self.qrs_times, start):bisect.bisect_right(self.qrs_times, end)]
        beats, n = self.times, len(self.times)
        if not q or not n:
            return q
        missed = []
        for t in q:
            at = min(max(bisect.bisect_left(beats, t), 1), n - 1) if n > 1 else 0
            if min(abs(beats[at] - t), abs(beats[max(at - 1, 0)] - t)) > QRS_MATCH_S:
                missed.append(t)
        return missed

    def _hr_with_missed_bpm(self, n_beats: int) -> float:
        """The rate over the last `n_beats` beats with the complexes the network missed among them (bpm; 0 when
        there are fewer beats)."""
        if len(self.times) < n_beats:
            return 0.0
        start, end = self.times[-n_beats], self.times[-1]
        return 60.0 * (n_beats - 1 + len(self._missed(start, end))) / (end - start) if end > start else 0.0

    def _median_rr_bpm(self, n_beats: int) -> float | None:
        """60 / the median RR of the last `n_beats` beats (bpm): one missed beat does not halve it."""
        if len(self.times) < n_beats:
            return None
        last = list(itertools.islice(self.times, len(self.times) - n_beats, None))
        rr = statistics.median(b - a for a, b in itertools.pairwise(last))
        return 60.0 / rr if rr > 0 else None

    def _rate_rules(self, now: float, new_beats: bool) -> list[AlarmEvent]:
        """Extreme bradycardia raised when both the rate and 60 / the median RR over `brady_beats` beats are below
        `brady_bpm` (one beat the model missed does not make a slow rate), cleared once the rate has stayed at or
        above `brady_clear_bpm` for `brady_hold_s` (hysteresis in rate and time), and not raised while the complexes
        the second QRS detector found on a readable lead and the network missed make the rate `brady_bpm` or more;
        extreme tachycardia from the rate, with those complexes counted (the network misses beats in fast
        rhythms)."""
        if not new_beats:
            return []
        c = self.config
        events: list[AlarmEvent] = []
        if "ventricular_fibrillation" not in self.active:
            hr, median_hr = self._hr_bpm(c.brady_beats), self._median_rr_bpm(c.brady_beats)
            if hr is not None and median_hr is not None and self.times[-c.brady_beats] >= self.rate_from:
                active = self.active.get("extreme_bradycardia")
                if self._confirms("extreme_bradycardia"):
                    median_hr = max(median_hr, self._hr_with_missed_bpm(c.brady_beats))
                present = hr < c.brady_clear_bpm if active else max(hr, median_hr) < c.brady_bpm
                if active is None or present or now - active.last_seen >= c.brady_hold_s:
                    events += self._set("extreme_bradycardia", present, now, self._evidence(c.brady_beats, hr))
        hr = self._hr_bpm(c.tachy_beats)
        if hr is not None and self._confirms("extreme_tachycardia"):
            hr = max(hr, self._hr_with_missed_bpm(c.tachy_beats))
        if hr is not None and self.times[-c.tachy_beats] >= self.rate_from:
            present = hr > c.tachy_bpm
            if present or "extreme_tachycardia" in self.active:
                events += self._set("extreme_tachycardia", present, now, self._evidence(c.tachy_beats, hr))
        return events

    def _run_rules(self, now: float, new_beats: bool) -> list[AlarmEvent]:
        if not new_beats:
            return []
        c = self.config
        events: list[AlarmEvent] = []
        classes = self.classes
        for alarm_type, cls, n, bpm in (("ventricular_tachycardia", "V", c.vt_beats, c.vt_bpm),
                                        ("svt", "S", c.svt_beats, c.svt_bpm)):
            if alarm_type == "svt" and "atrial_fibrillation" in self.active:  # early beats in AF are not SVT runs
                events += self._set("svt", False, now, {"superseded_by": "atrial_fibrillation"})
                continue
            hr = self._hr_bpm(n)
            if hr is not None and alarm_type == "ventricular_tachycardia" and self._confirms(alarm_type):
                hr = max(hr, self._hr_with_missed_bpm(n))
            run = len(classes) >= n and all(k == cls for k in classes[-n:]) and hr is not None and hr > bpm
            recent = classes[-c.clear_after_beats:]
            if run:
                events += self._set(alarm_type, True, now, self._evidence(n, hr))
            elif alarm_type in self.active and cls not in recent and not (
                    alarm_type == "ventricular_tachycardia" and self._rhythm_holds_vt(now)):
                events += self._set(alarm_type, False, now, {})
        return events

    def _pattern_rules(self, now: float, new_beats: bool) -> list[AlarmEvent]:
        c = self.config
        tail = min(len(self.classes), max(3, 2 * c.bigeminy_cycles, 3 * c.trigeminy_cycles) + 1)
        classes = "".join(k if k in "NV" else "x" for k in (self.classes[-i] for i in range(tail, 0, -1)))
        found = {"ventricular_couplet": new_beats and classes.endswith("VV") and not classes.endswith("VVV"),
                 "ventricular_bigeminy": new_beats and classes.endswith("NV" * c.bigeminy_cycles),
                 "ventricular_trigeminy": new_beats and classes.endswith("NNV" * c.trigeminy_cycles)}
        events: list[AlarmEvent] = []
        for alarm_type, seen in found.items():
            if seen:
                events += self._set(alarm_type, True, now, self._evidence(min(len(self.classes), 6), self._hr_bpm(6)))
            elif alarm_type in self.active and now - self.active[alarm_type].last_seen >= c.event_hold_s:
                events += self._set(alarm_type, False, now, {})
        return events

    def _burden_rule(self, now: float, new_beats: bool) -> list[AlarmEvent]:
        """Raised above `pvc_per_min`, cleared at or below `pvc_clear_per_min` (hysteresis against chatter)."""
        per_min = len(self.v_times)
        if not new_beats or (now - self.started < 60.0 and per_min <= self.config.pvc_per_min):
            return []
        c = self.config
        present = per_min > c.pvc_per_min or ("pvc_burden" in self.active and per_min > c.pvc_clear_per_min)
        return self._set("pvc_burden", present, now, {"v_beats_last_minute": per_min}, update=False)

    def _af_rule(self, now: float, p_af: float) -> list[AlarmEvent]:
        """AF raised once the detector has said AF in every window with beats for `af_confirm_s`, cleared after
        `af_clear_s` without it; `p_af`: its P(AF) of the last AF_BEATS RR intervals."""
        if self.af is None:
            return []
        c = self.config
        if p_af >= self.af.threshold:
            self.af_since = now if self.af_since is None else self.af_since
            self.af_last = now
        else:
            self.af_since = None
        if "atrial_fibrillation" in self.active:
            present = self.af_last is not None and now - self.af_last < c.af_clear_s
        else:
            present = self.af_since is not None and now - self.af_since >= c.af_confirm_s
        if not present and "atrial_fibrillation" not in self.active:
            return []  # nothing to raise or clear
        evidence = {"p_af": round(p_af, 2), **self._evidence(AF_BEATS + 1, self._hr_bpm(AF_BEATS + 1))}
        return self._set("atrial_fibrillation", present, now, evidence)

    # --- lifecycle ----------------------------------------------------------------------------
    def _held_back(self, lethal: bool) -> bool:
        """A technical alarm that holds back the physiological alarms (`lethal`: VF and asystole) is active
        (saturation only while the signal is pinned at a rail; poor_signal only the non-lethal ones)."""
        return any(ALARM_TYPES[t][0] == "technical" and (t not in KEEPS_PHYSIOLOGICAL or self.pinned)
                   and not (lethal and t in KEEPS_LETHAL) for t in self.active)

    def _evidence(self, n_beats: int, hr: float | None) -> dict[str, Any]:
        times, classes = list(self.times)[-n_beats:], list(self.classes)[-n_beats:]
        return {"heart_rate_bpm": None if hr is None else round(hr, 1),
                "beat_counts": {k: classes.count(k) for k in sorted(set(classes))},
                "span": [times[0], times[-1]] if times else None}

    def _set(self, alarm_type: str, present: bool, now: float, evidence: dict[str, Any],
             update: bool = True) -> list[AlarmEvent]:
        """Raise, update or clear `alarm_type` so that it is active iff `present`."""
        active = self.active.get(alarm_type)
        if present and active is None:
            alarm_id = f"{self.device}/{alarm_type}/{round(now * 1000)}"
            self.active[alarm_type] = _Active(alarm_id, now, now, now, evidence)
            return [self._event(alarm_type, "raised", now, evidence)]
        if present and active is not None:
            active.last_seen = now
            if update and evidence != active.evidence and now - active.last_update >= self.config.update_interval_s:
                active.evidence, active.last_update = evidence, now
                return [self._event(alarm_type, "updated", now, evidence)]
            return []
        if not present and active is not None:
            event = self._event(alarm_type, "cleared", max(now, active.raised), evidence)
            del self.active[alarm_type]
            return [event]
        return []

    def _event(self, alarm_type: str, state: State, now: float, evidence: dict[str, Any]) -> AlarmEvent:
        active = self.active[alarm_type]
        priority = self.config.af_priority if alarm_type == "atrial_fibrillation" else ALARM_TYPES[alarm_type][1]
        return AlarmEvent(active.alarm_id, self.device, alarm_type, state, now,
                          {**evidence, "raised_at": active.raised, "model_version": self.model_version}, priority,
                          active.acknowledged)


def af_probabilities(detector: AfDetectorInfo | None, devices: list[DeviceAlarms],
                     beats: list[list[tuple[float, str]]], p_wave: list[float | None]) -> list[float | None]:
    """P(AF) of each device's last AF_BEATS RR intervals with its window's `beats` added and its P-wave
    consistency (`BeatStreams.p_wave_consistency`), all devices in one computation (None where
    `DeviceAlarms.af_row` is None or there is no detector)."""
    out: list[float | None] = [None] * len(devices)
    if detector is None:
        return out
    rows = [(i, row) for i, (d, b) in enumerate(zip(devices, beats, strict=True)) if (row := d.af_row(b)) is not None]
    if rows:
        # Times relative to each row's first beat, rounded to RR_RESOLUTION_S (s): the daemon's beat times are Unix
        # times (near 1.8e9 s, float steps of 2.4e-7 s), offline ones start at 0, and P(AF) must not differ between
        # the two in its last bits.
        absolute = np.array([r[0] for _, r in rows])
        times = np.round((absolute - absolute[:, :1]) / RR_RESOLUTION_S) * RR_RESOLUTION_S
        classes = np.array([r[1] for _, r in rows])
        features = af_feature_rows(times, (classes == "S") | (classes == "V"), [p_wave[i] for i, _ in rows])
        for (i, _), p in zip(rows, detector.probability(features), strict=True):
            out[i] = float(p)
    return out

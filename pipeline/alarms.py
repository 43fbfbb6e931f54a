"""Alarm rules per device: physiological (from beats) and technical (from the signal and its arrival).

Every alarm has a stable id and a lifecycle raised -> updated -> cleared, and an IEC
60601-1-8 priority. Physiological alarms are held back (neither raised, updated nor
cleared) while a technical alarm makes the beats unreliable, and that technical alarm says
so; likewise during the model's warm-up after a stream starts or restarts. Times are
signal times (s, Unix time of the ECG), so a replayed record gives the same alarms at any
speed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from pipeline.config import AlarmConfig

Priority = Literal["high", "medium", "low"]
State = Literal["raised", "updated", "cleared"]

# type -> (kind, priority, message)
ALARM_TYPES: dict[str, tuple[str, Priority, str]] = {
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
    "data_gap": ("technical", "low", "Gap in the ECG data; analysis restarted"),
    "windows_dropped": ("technical", "medium", "Monitor overloaded: ECG windows of this device were not analysed"),
}
HISTORY_BEATS = 24  # beats kept per device: the longest rule (tachycardia, 17 beats) plus margin


@dataclass(frozen=True)
class AlarmEvent:
    """One alarm message: a state change or update of an alarm instance."""

    alarm_id: str
    device: str
    type: str
    state: State
    time: float
    evidence: dict[str, Any]

    @property
    def kind(self) -> str:
        return ALARM_TYPES[self.type][0]

    @property
    def priority(self) -> Priority:
        return ALARM_TYPES[self.type][1]

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


@dataclass
class SignalCheck:
    """Technical findings of one window (raw signal, mV)."""

    flat: bool
    saturated: bool
    noisy: bool
    peak_to_peak_mv: float
    noise_mv: float

    @classmethod
    def batch(cls, windows: list[NDArray[np.float64]], config: AlarmConfig) -> list[SignalCheck]:
        """Checks of many windows, computed together for windows of equal length."""
        out: list[SignalCheck | None] = [None] * len(windows)
        by_length: dict[int, list[int]] = {}
        for i, w in enumerate(windows):
            by_length.setdefault(len(w), []).append(i)
        for n, rows in by_length.items():
            x = np.stack([windows[i] for i in rows])
            ptp = np.ptp(x, axis=1)
            peak = np.abs(x).max(axis=1)
            noise = np.median(np.abs(np.diff(x, 2, axis=1)), axis=1) if n > 2 else np.zeros(len(rows))
            for k, i in enumerate(rows):
                out[i] = cls(flat=bool(ptp[k] < config.flat_mv), saturated=bool(peak[k] >= config.saturation_mv),
                             noisy=bool(noise[k] > config.noise_mv), peak_to_peak_mv=float(ptp[k]),
                             noise_mv=float(noise[k]))
        return [c for c in out if c is not None]


@dataclass
class DeviceAlarms:
    """Alarm state of one device."""

    device: str
    config: AlarmConfig
    model_version: str
    started: float  # signal time the stream (re)started (s)
    times: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_BEATS))
    classes: deque[str] = field(default_factory=lambda: deque(maxlen=HISTORY_BEATS))
    v_times: deque[float] = field(default_factory=deque)
    active: dict[str, _Active] = field(default_factory=dict)
    gap_since: float | None = None
    rate_from: float = 0.0  # rate rules use beats from here on: a pause that was an asystole is not a bradycardia (s)

    # --- save and restore ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"started": self.started, "gap_since": self.gap_since, "rate_from": self.rate_from,
                "times": list(self.times),
                "classes": list(self.classes), "v_times": list(self.v_times),
                "active": {t: [a.alarm_id, a.raised, a.last_seen, a.last_update, a.evidence]
                           for t, a in self.active.items()}}

    @classmethod
    def from_dict(cls, device: str, config: AlarmConfig, model_version: str, doc: dict[str, Any]) -> DeviceAlarms:
        alarms = cls(device, config, model_version, float(doc["started"]))
        alarms.gap_since = doc["gap_since"]
        alarms.rate_from = float(doc["rate_from"])
        alarms.times.extend(doc["times"])
        alarms.classes.extend(doc["classes"])
        alarms.v_times.extend(doc["v_times"])
        alarms.active = {t: _Active(*a) for t, a in doc["active"].items() if t in ALARM_TYPES}
        return alarms

    # --- inputs -------------------------------------------------------------------------------
    def on_window(self, check: SignalCheck, beats: list[tuple[float, str]], now: float,
                  analysed_until: float) -> list[AlarmEvent]:
        """One analysed window ending at `now` (s, signal time): its technical check, then the beats it
        completed (R-peak time s, AAMI class), then asystole judged on the beat time line up to
        `analysed_until` (s), the latest time for which every beat has been emitted."""
        events = self._technical(check, now)
        events += self._beats(beats, now)
        return events + self._asystole(analysed_until)

    def _beats(self, beats: list[tuple[float, str]], now: float) -> list[AlarmEvent]:
        """The rules run after each beat, so a pattern that ends inside a window is not missed."""
        events: list[AlarmEvent] = []
        for t, cls in beats:
            events += self._asystole(t, ended=True)  # a pause seen whole only now, between two windows' checks
            self.times.append(t)
            self.classes.append(cls)
            if cls == "V":
                self.v_times.append(t)
            events += self._evaluate(t, new_beat=True)
        if not beats:
            events += self._evaluate(now, new_beat=False)
        return events

    def _evaluate(self, now: float, new_beat: bool) -> list[AlarmEvent]:
        while self.v_times and self.v_times[0] < now - 60.0:
            self.v_times.popleft()
        if self._technical_active() or now - self.started < self.config.warmup_s:
            return []
        events: list[AlarmEvent] = []
        if new_beat and "asystole" in self.active:
            events += self._set("asystole", False, now, {})
            self.rate_from = now
        for rule in (self._rate_rules, self._run_rules, self._pattern_rules, self._burden_rule):
            events += rule(now, new_beat)
        return events

    def _technical(self, check: SignalCheck, now: float) -> list[AlarmEvent]:
        events: list[AlarmEvent] = []
        for alarm_type, present, detail in (
                ("leads_off", check.flat, {"peak_to_peak_mv": round(check.peak_to_peak_mv, 4)}),
                ("saturation", check.saturated, {}),
                ("poor_signal", check.noisy and not check.flat, {"noise_mv": round(check.noise_mv, 4)})):
            events += self._set(alarm_type, present, now, {**detail, "physiological_alarms": "suspended"})
        if any(e.state == "cleared" for e in events):
            self._restart(now)
        if self.gap_since is not None and now - self.gap_since >= self.config.warmup_s:
            self.gap_since = None
            events += self._set("data_gap", False, now, {})
        return events

    def _asystole(self, analysed_until: float, ended: bool = False) -> list[AlarmEvent]:
        """No QRS from the last beat up to `analysed_until` (s); `ended`: a beat there ends the pause.

        Raised at the moment the pause reached `asystole_s`, on the beat time line: before the beat that
        ends it, even when that beat comes out in the same window.
        """
        last = self.times[-1] if self.times else self.started
        silent = analysed_until - last
        onset = last + self.config.asystole_s
        if (silent < self.config.asystole_s or self._technical_active() or onset - self.started < self.config.warmup_s
                or (ended and "asystole" in self.active)):
            return []
        evidence = {"seconds_without_qrs": round(silent, 2), **({"pause_ended": True} if ended else {})}
        return self._set("asystole", True, onset, evidence, update=False)

    def on_gap(self, now: float, detail: dict[str, Any]) -> list[AlarmEvent]:
        """The stream had a gap and restarts cold at `now`."""
        self._restart(now)
        self.gap_since = now
        return self._set("data_gap", True, now, {**detail, "physiological_alarms": "suspended"})

    def on_silence(self, now: float, silent_s: float) -> list[AlarmEvent]:
        """No data has arrived for `silent_s` seconds (wall clock)."""
        lost = silent_s >= self.config.signal_loss_s
        events = self._set("signal_loss", lost, now, {"seconds_without_data": round(silent_s, 1),
                                                      "physiological_alarms": "suspended"}, update=False)
        if events and not lost:
            self._restart(now)
        return events

    def _restart(self, now: float) -> None:
        """Forget the beats: after a technical problem the rhythm context is unreliable (warm-up again)."""
        self.times.clear()
        self.classes.clear()
        self.v_times.clear()
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

    def keep_only(self, open_alarm_ids: set[str]) -> None:
        """Forget active alarms whose ids are not in `open_alarm_ids`: their subscribers saw them cleared."""
        self.active = {t: a for t, a in self.active.items() if a.alarm_id in open_alarm_ids}

    def clear_all(self, now: float, reason: str) -> list[AlarmEvent]:
        """Clear every active alarm (the device's state is being dropped)."""
        events = [self._event(t, "cleared", now, {"reason": reason}) for t in self.active]
        self.active.clear()
        return events

    # --- rules --------------------------------------------------------------------------------
    def _hr_bpm(self, n_beats: int) -> float | None:
        if len(self.times) < n_beats:
            return None
        span = self.times[-1] - self.times[-n_beats]
        return 60.0 * (n_beats - 1) / span if span > 0 else None

    def _rate_rules(self, now: float, new_beats: bool) -> list[AlarmEvent]:
        if not new_beats:
            return []
        c = self.config
        events: list[AlarmEvent] = []
        for alarm_type, n, bpm, below in (("extreme_bradycardia", c.brady_beats, c.brady_bpm, True),
                                          ("extreme_tachycardia", c.tachy_beats, c.tachy_bpm, False)):
            hr = self._hr_bpm(n)
            if hr is not None and self.times[-n] >= self.rate_from:
                events += self._set(alarm_type, hr < bpm if below else hr > bpm, now, self._evidence(n, hr))
        return events

    def _run_rules(self, now: float, new_beats: bool) -> list[AlarmEvent]:
        if not new_beats:
            return []
        c = self.config
        events: list[AlarmEvent] = []
        for alarm_type, cls, n, bpm in (("ventricular_tachycardia", "V", c.vt_beats, c.vt_bpm),
                                        ("svt", "S", c.svt_beats, c.svt_bpm)):
            classes = list(self.classes)
            hr = self._hr_bpm(n)
            run = len(classes) >= n and all(k == cls for k in classes[-n:]) and hr is not None and hr > bpm
            recent = classes[-c.clear_after_beats:]
            if run:
                events += self._set(alarm_type, True, now, self._evidence(n, hr))
            elif alarm_type in self.active and cls not in recent:
                events += self._set(alarm_type, False, now, {})
        return events

    def _pattern_rules(self, now: float, new_beats: bool) -> list[AlarmEvent]:
        c = self.config
        classes = "".join(k if k in "NV" else "x" for k in self.classes)
        found = {"ventricular_couplet": new_beats and classes.endswith("VV") and not classes.endswith("VVV"),
                 "ventricular_bigeminy": new_beats and classes.endswith("NV" * c.bigeminy_cycles),
                 "ventricular_trigeminy": new_beats and classes.endswith("NNV" * c.trigeminy_cycles)}
        events: list[AlarmEvent] = []
        for alarm_type, seen in found.items():
            if seen:
                events += self._set(alarm_type, True, now, self._evidence(min(len(classes), 6), self._hr_bpm(6)))
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

    # --- lifecycle ----------------------------------------------------------------------------
    def _technical_active(self) -> bool:
        return any(ALARM_TYPES[t][0] == "technical" for t in self.active)

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
        return AlarmEvent(active.alarm_id, self.device, alarm_type, state, now,
                          {**evidence, "raised_at": active.raised, "model_version": self.model_version})

"""Alarm scoring: the alarm counterpart of EC57's beat-by-beat scoring.

Reference events are intervals of one record (s from its first sample): rhythm episodes from
the annotations' aux notes (`(VFL`, `(VT`, `(AFIB`, `(N`, ...) and cudb's `[` `]` VF marks,
and beat-derived events found by running the daemon's own alarm rules over the reference
beats. Alarm episodes are the daemon's alarms from raised to cleared. Per alarm type:

- episode sensitivity: a reference event counts as alarmed when an alarm of the type is active
  at some time in [start, end + tolerance]; time to alarm is from the event's start to the
  first such alarm (0 when it was already active);
- positive predictivity: an alarm episode is true when it overlaps [start - tolerance,
  end + tolerance] of a reference event it may announce (`JUSTIFIED_BY`); the others are false
  alarms, counted per hour of monitoring and per hour of annotated normal rhythm;
- duration sensitivity and positive predictivity (AF): overlap of alarm time and reference
  time against each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.alarms.rules import ALARM_TYPES

TOLERANCE_S = 5.0  # slack between an alarm and its reference event (s): beats and rules settle within a few beats

# Rhythm label of each aux note PhysioNet's databases use for these rhythms (MIT-BIH, cudb, the Malignant
# Ventricular Ectopy Database's "(VFIB", "(ASYS", "(NSR"...); every other note keeps its text without "(".
RHYTHM_OF_NOTE = {"(VFL": "VF", "(VF": "VF", "(VFIB": "VF", "(VT": "VT", "(ASYS": "asystole", "(AFIB": "AF",
                  "(AF": "AF", "(AFL": "AFL", "(N": "N", "(NSR": "N", "(SVTA": "SVTA", "(NOISE": "NOISE"}
VF_START, VF_END = "[", "]"  # MIT-BIH/cudb symbols that open and close ventricular flutter/fibrillation

# Reference event labels that make an alarm of each type true. Beat-derived events carry the alarm
# type's own name; rhythm episodes their rhythm label.
JUSTIFIED_BY: dict[str, frozenset[str]] = {
    # no beats in VF: a slow or absent rate there is a late or mistyped alarm of a real lethal event, not a false one
    "asystole": frozenset({"asystole", "VF"}),  # "asystole": beat-derived events and "(ASYS" episodes
    "extreme_bradycardia": frozenset({"extreme_bradycardia", "VF"}),
    "extreme_tachycardia": frozenset({"extreme_tachycardia", "VT", "VF"}),
    # a VF alarm during a run of VT is a lethal-rhythm alarm of the wrong subtype, not a false alarm
    "ventricular_fibrillation": frozenset({"VF", "VT", "ventricular_tachycardia"}),
    "ventricular_tachycardia": frozenset({"ventricular_tachycardia", "VT", "VF"}),
    "atrial_fibrillation": frozenset({"AF", "AFL"}),
}
# Physiological alarm types scored, with their priority: the daemon's, and the rhythm alarms the reference
# has episodes for, scored even while the daemon cannot raise them (sensitivity 0 then).
SCORED_PRIORITY = {"ventricular_fibrillation": "high", "atrial_fibrillation": "medium",
                   **{t: p for t, (kind, p, _) in ALARM_TYPES.items() if kind == "physiological"}}
MIN_EVENT_S = {"ventricular_fibrillation": 5.0}  # shortest reference episode scored for sensitivity (s)
# Rhythm episodes shorter than this are not scored for sensitivity (s): MIT-BIH marks runs of three V beats "(VT"
# while the VT alarm needs five; the beat-derived events score the short runs where beats are annotated.
EPISODE_MIN_S = {"VT": 4.0}
# Reference labels scored for sensitivity, per alarm type (else its own name: beat-derived events); events of these
# labels that overlap are one event.
SCORED_EVENT: dict[str, frozenset[str]] = {"ventricular_fibrillation": frozenset({"VF"}),
                                           "atrial_fibrillation": frozenset({"AF"}),
                                           "ventricular_tachycardia": frozenset({"ventricular_tachycardia", "VT"})}


@dataclass(frozen=True)
class Episode:
    """An interval of one record: a reference event or an alarm (s from the record's first sample)."""

    start: float
    end: float
    label: str

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    def overlaps(self, other: Episode, slack_s: float = 0.0) -> bool:
        return self.start <= other.end + slack_s and other.start <= self.end + slack_s


def rhythm_episodes(times_s: Sequence[float], symbols: Sequence[str], aux_notes: Sequence[str],
                    duration_s: float) -> list[Episode]:
    """Rhythm episodes of a record from its annotations (times s, WFDB symbols, aux notes).

    A `+` annotation starts the rhythm named by its aux note; `[` starts VF until `]`, after which
    the rhythm is unknown ("?") until the next `+`. The last episode runs to `duration_s`.
    """
    changes: list[tuple[float, str]] = []
    for t, symbol, note in zip(times_s, symbols, aux_notes, strict=True):
        note = note.strip("\x00").strip()
        if symbol == "+" and note.startswith("("):
            changes.append((float(t), RHYTHM_OF_NOTE.get(note, note.lstrip("("))))
        elif symbol == VF_START:
            changes.append((float(t), "VF"))
        elif symbol == VF_END:
            changes.append((float(t), "?"))
    episodes = []
    ends = [t for t, _ in changes[1:]] + [duration_s] if changes else []
    for (t, label), t_next in zip(changes, ends, strict=True):
        if t_next > t:
            episodes.append(Episode(t, t_next, label))
    return merge_adjacent(episodes)


def merge_adjacent(episodes: Iterable[Episode]) -> list[Episode]:
    """Join consecutive episodes of the same label that touch (sorted by start)."""
    out: list[Episode] = []
    for e in sorted(episodes, key=lambda e: e.start):
        if out and out[-1].label == e.label and e.start <= out[-1].end:
            out[-1] = Episode(out[-1].start, max(out[-1].end, e.end), e.label)
        else:
            out.append(e)
    return out


def alarm_episodes(events: Iterable[tuple[str, str, str, float]], end_s: float) -> list[Episode]:
    """Alarm episodes from (alarm id, type, state, time s) events; one still open ends at `end_s`."""
    raised: dict[str, tuple[str, float]] = {}
    out: list[Episode] = []
    for alarm_id, alarm_type, state, t in events:
        if state == "raised":
            raised[alarm_id] = (alarm_type, t)
        elif state == "cleared" and alarm_id in raised:
            alarm_type, start = raised.pop(alarm_id)
            out.append(Episode(start, max(t, start), alarm_type))
    out += [Episode(start, max(end_s, start), alarm_type) for alarm_type, start in raised.values()]
    return sorted(out, key=lambda e: e.start)


def _overlap_s(a: Sequence[Episode], b: Sequence[Episode]) -> float:
    return sum(max(0.0, min(x.end, y.end) - max(x.start, y.start)) for x in a for y in b)


@dataclass
class TypeScore:
    """Scores of one alarm type over one or more records."""

    alarm_type: str
    events: int = 0
    events_alarmed: int = 0
    alarms: int = 0
    alarms_true: int = 0
    false_in_normal_rhythm: int = 0
    delays_s: list[float] = field(default_factory=list)
    missed: list[Episode] = field(default_factory=list)  # reference events not alarmed
    false: list[Episode] = field(default_factory=list)  # alarm episodes no reference event justifies
    reference_s: float = 0.0
    alarm_s: float = 0.0
    overlap_s: float = 0.0  # alarm time inside scored reference events (s)
    justified_s: float = 0.0  # alarm time inside any event that justifies the alarm (s)

    def add(self, other: TypeScore) -> None:
        self.events += other.events
        self.events_alarmed += other.events_alarmed
        self.alarms += other.alarms
        self.alarms_true += other.alarms_true
        self.false_in_normal_rhythm += other.false_in_normal_rhythm
        self.delays_s += other.delays_s
        self.missed += other.missed
        self.false += other.false
        self.reference_s += other.reference_s
        self.alarm_s += other.alarm_s
        self.overlap_s += other.overlap_s
        self.justified_s += other.justified_s

    def summary(self, monitored_h: float, normal_h: float) -> dict[str, Any]:
        delays = np.asarray(self.delays_s, dtype=np.float64)
        false = self.alarms - self.alarms_true
        return {
            "events": self.events, "events_alarmed": self.events_alarmed,
            "episode_se": self.events_alarmed / self.events if self.events else None,
            "alarms": self.alarms, "alarms_true": self.alarms_true,
            "episode_ppv": self.alarms_true / self.alarms if self.alarms else None,
            "false_alarms": false,
            "false_per_hour": false / monitored_h if monitored_h else None,
            "false_in_normal_rhythm": self.false_in_normal_rhythm,
            "false_per_hour_normal_rhythm": self.false_in_normal_rhythm / normal_h if normal_h else None,
            "time_to_alarm_median_s": float(np.median(delays)) if len(delays) else None,
            "time_to_alarm_p95_s": float(np.percentile(delays, 95)) if len(delays) else None,
            "duration_se": self.overlap_s / self.reference_s if self.reference_s else None,
            "duration_ppv": self.justified_s / self.alarm_s if self.alarm_s else None,
        }


def score_type(alarm_type: str, alarms: Sequence[Episode], references: Sequence[Episode],
               rhythm: Sequence[Episode], min_event_s: float = 0.0,
               tolerance_s: float = TOLERANCE_S) -> TypeScore:
    """Score the alarms of `alarm_type` on one record.

    Args:
        alarm_type: e.g. "ventricular_fibrillation".
        alarms: the record's alarm episodes (any type; those of `alarm_type` are used).
        references: the record's reference events: rhythm episodes and beat-derived events.
        rhythm: the record's rhythm episodes (for the false alarms during normal rhythm, label "N").
        min_event_s: reference events shorter than this (s) are not counted for sensitivity.
        tolerance_s: slack between alarm and event (s).
    """
    own = [a for a in alarms if a.label == alarm_type]
    scored_labels = SCORED_EVENT.get(alarm_type, frozenset({alarm_type}))
    justified = JUSTIFIED_BY.get(alarm_type, frozenset({alarm_type}))
    label = "/".join(sorted(scored_labels))  # overlapping events of the scored labels are one
    scored = merge_adjacent(Episode(r.start, r.end, label) for r in references
                            if r.label in scored_labels and r.duration_s >= EPISODE_MIN_S.get(r.label, 0.0))
    events = [r for r in scored if r.duration_s >= min_event_s]
    allowed = [r for r in references if r.label in justified]
    normal = [r for r in rhythm if r.label == "N"]
    score = TypeScore(alarm_type, events=len(events))
    for event in events:
        hits = [a for a in own if a.start <= event.end + tolerance_s and a.end >= event.start]
        if hits:
            score.events_alarmed += 1
            score.delays_s.append(max(0.0, min(a.start for a in hits) - event.start))
        else:
            score.missed.append(event)
    score.alarms = len(own)
    for alarm in own:
        if any(alarm.overlaps(r, tolerance_s) for r in allowed):
            score.alarms_true += 1
            continue
        score.false.append(alarm)
        if any(r.start <= alarm.start < r.end for r in normal):
            score.false_in_normal_rhythm += 1
    score.reference_s = sum(r.duration_s for r in scored)
    score.alarm_s = sum(a.duration_s for a in own)
    score.overlap_s = _overlap_s(own, scored)
    score.justified_s = _overlap_s(own, merge_adjacent(Episode(r.start, r.end, "") for r in allowed))
    return score

"""`ecgmon evaluate-alarms`: records run offline through the daemon's analysis, alarms scored.

Each record is a live device: 1 s windows (configurable) through `BeatStreams` (DSP, both model
stages, beat picking), `SignalCheck.batch` and `DeviceAlarms.on_window`, the calls and order of
the daemon's `_analyse` (a test holds the two equal through a real broker). Signal time starts
at 0 at each record's first sample. The reference: rhythm episodes from the annotations, and
the alarm rules themselves run over the reference beats (same definitions, same config).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.alarms.rules import ALARM_TYPES, AlarmEvent, DeviceAlarms, SignalCheck, af_probabilities
from pipeline.analysis.model import BeatModel, rhythm_thresholds
from pipeline.analysis.streams import BeatStreams
from pipeline.config import AlarmConfig
from pipeline.detectors.qrs import QrsEvidence
from pipeline.io.codec import Window
from pipeline.tools.records import EcgRecord, load_records, load_rhythm
from train.alarm_score import (
    MIN_EVENT_S,
    SCORED_PRIORITY,
    TOLERANCE_S,
    Episode,
    TypeScore,
    alarm_episodes,
    merge_adjacent,
    rhythm_episodes,
    score_type,
)

log = logging.getLogger(__name__)

LETHAL_RHYTHMS = ("VF",)
SUSTAINED_VF_S = 10.0  # VF episodes this long must be alarmed within this long of onset (s)
RULES = (f"alarm episodes from raised to cleared; a reference event is alarmed when an alarm of the type is active "
         f"between its start and {TOLERANCE_S:.0f} s after its end; an alarm is true when it overlaps, within "
         f"{TOLERANCE_S:.0f} s, a reference event that justifies it; VF events shorter than "
         f"{MIN_EVENT_S['ventricular_fibrillation']:.0f} s not scored for sensitivity; beat-derived reference events "
         "(asystole, rates, VT, couplets, ...) from the daemon's alarm rules run over the reference beats")


@dataclass(frozen=True)
class RecordAlarms:
    """One record's alarms and reference (times s from its first sample)."""

    name: str
    record: EcgRecord
    duration_s: float
    alarms: list[Episode]
    rhythm: list[Episode]
    references: list[Episode]


@dataclass(frozen=True)
class AnalysedWindow:
    """One record's window after the daemon's analysis: its beats (R-peak time s, AAMI class), signal check,
    the time up to which every beat has been emitted (s), the VF detector's verdict, the recent signal the
    detectors judged (`BeatStreams.recent_signal`), the second QRS detector's evidence, the rhythm stage's
    verdict and the P-wave consistency (`BeatStreams.p_wave_consistency`)."""

    record: int
    window: Window
    beats: list[tuple[float, str]]
    check: SignalCheck
    analysed_until_s: float
    vf_found: bool
    recent_mv: NDArray[np.float32] | None
    qrs: QrsEvidence
    rhythm: dict[str, float] | None
    p_wave: float | None


def analyse_records(model: BeatModel, records: list[EcgRecord], config: AlarmConfig, window_s: float
                    ) -> Iterator[AnalysedWindow]:
    """Every record streamed as one device through the daemon's analysis (`BeatStreams.process`, then
    `SignalCheck.batch` with the signal-quality verdicts), all records batched, window by window."""
    streams = BeatStreams(model, capacity=len(records), flat_mv=config.flat_mv)
    for r in records:
        streams.open(r.name, r.fs)
    for k in range(max(r.window_count(window_s) for r in records)):
        live = [i for i, r in enumerate(records) if k < r.window_count(window_s)]
        windows = [records[i].window(k, window_s) for i in live]
        beats_of: dict[str, list[tuple[float, str]]] = {records[i].name: [] for i in live}
        for beat in streams.process([(records[i].name, w.leads, w.samples_mv)
                                     for i, w in zip(live, windows, strict=True)]):
            beats_of[beat.stream_id].append((beat.time_s, beat.class_name))
        unreadable = [streams.unreadable(records[i].name) for i in live]
        unreadable_leads = [streams.unreadable_leads(records[i].name) for i in live]
        for i, window, check in zip(live, windows, SignalCheck.batch(windows, unreadable, unreadable_leads, config),
                                    strict=True):
            name = records[i].name
            yield AnalysedWindow(i, window, beats_of[name], check, streams.analysed_until_s(name),
                                 streams.vf_found(name), streams.recent_signal(name), streams.qrs_evidence(name),
                                 streams.rhythm(name), streams.p_wave_consistency(name))


def run_alarms(model: BeatModel, records: list[EcgRecord], config: AlarmConfig, window_s: float
               ) -> list[list[AlarmEvent]]:
    """Alarm events of each record streamed as one device through the daemon's analysis."""
    return run_devices(model, records, config, window_s)[0]


def run_devices(model: BeatModel, records: list[EcgRecord], config: AlarmConfig, window_s: float
                ) -> tuple[list[list[AlarmEvent]], list[list[tuple[float, str]]]]:
    """Alarm events and beats (R-peak time s, AAMI class) of each record streamed as one device through the
    daemon's analysis."""
    events, beats = run_variants(model, records, [config], window_s)
    return events[0], beats


def run_variants(model: BeatModel, records: list[EcgRecord], configs: list[AlarmConfig], window_s: float,
                 thresholds: list[dict[str, float]] | None = None
                 ) -> tuple[list[list[list[AlarmEvent]]], list[list[tuple[float, str]]]]:
    """`run_devices` with the alarm rules of several configs over one analysis (the first config's `flat_mv` and
    signal checks): events per config per record, and the beats. `thresholds`: the rhythm stage's thresholds of
    each config (default: the model's)."""
    thresholds = thresholds or [rhythm_thresholds(model)] * len(configs)
    alarms = [[DeviceAlarms(r.name, c, model.info.version, 0.0, model.info.af_detector, t) for r in records]
              for c, t in zip(configs, thresholds, strict=True)]
    events: list[list[list[AlarmEvent]]] = [[[] for _ in records] for _ in configs]
    beats: list[list[tuple[float, str]]] = [[] for _ in records]
    for w in analyse_records(model, records, configs[0], window_s):
        for variant, devices in zip(events, alarms, strict=True):
            device = devices[w.record]
            p_af = af_probabilities(model.info.af_detector, [device], [w.beats], [w.p_wave])[0]
            variant[w.record] += device.on_window(w.check, w.beats, w.window.t0 + w.window.duration_s,
                                                  w.analysed_until_s, w.vf_found, p_af, w.qrs, w.rhythm)
        beats[w.record] += w.beats
    return events, beats


def reference_events(record: EcgRecord, config: AlarmConfig, rhythm: list[Episode],
                     window_s: float) -> list[Episode]:
    """Beat-derived reference events: the alarm rules over the reference beats, outside lethal rhythms.

    Inside VF no beats are annotated, so the rules would find asystole there: those events are dropped
    (the VF episode is the reference).
    """
    clean = SignalCheck(flat=False, saturated=False, unreadable=False, peak_to_peak_mv=1.0)
    rules = DeviceAlarms(record.name, config, "reference", 0.0)
    times = record.beat_samples / record.fs
    found: list[AlarmEvent] = []
    for k in range(record.window_count(window_s)):
        a, b = k * window_s, min((k + 1) * window_s, len(record.signal_mv) / record.fs)
        inside = (times >= a) & (times < b)
        beats = list(zip(times[inside].tolist(), record.beat_classes[inside].tolist(), strict=True))
        found += rules.on_window(clean, beats, b, b)
    duration_s = len(record.signal_mv) / record.fs
    lethal = [e for e in rhythm if e.label in LETHAL_RHYTHMS]
    derived = alarm_episodes(((e.alarm_id, e.type, e.state, e.time) for e in found), duration_s)
    return [e for e in derived if not any(v.start <= e.start <= v.end for v in lethal)]


def load_alarm_records(specs: list[str], physionet_dir: Path, leads: list[str] | None
                       ) -> tuple[list[tuple[str, EcgRecord]], dict[str, list[Episode]]]:
    """("db/record", record) for every record named by `specs`, and each one's rhythm episodes."""
    named = load_records(specs, physionet_dir, leads)
    rhythm_of = {}
    for name, record in named:
        db, _, record_name = name.rpartition("/")
        times, symbols, notes = load_rhythm(physionet_dir / db, record_name, record.fs)
        rhythm_of[name] = rhythm_episodes(times.tolist(), symbols, notes, len(record.signal_mv) / record.fs)
    return named, rhythm_of


def collect_records(model: BeatModel, named: list[tuple[str, EcgRecord]], rhythm_of: dict[str, list[Episode]],
                    config: AlarmConfig, window_s: float) -> list[RecordAlarms]:
    """Each record's alarms from the daemon's analysis, beside its reference."""
    return collect_variants(model, named, rhythm_of, [config], window_s)[0]


def collect_variants(model: BeatModel, named: list[tuple[str, EcgRecord]], rhythm_of: dict[str, list[Episode]],
                     configs: list[AlarmConfig], window_s: float, thresholds: list[dict[str, float]] | None = None
                     ) -> list[list[RecordAlarms]]:
    """`collect_records` under the alarm rules of several configs over one analysis (`run_variants`); the
    reference events follow the first config."""
    events_of, _ = run_variants(model, [r for _, r in named], configs, window_s, thresholds)
    references = {name: merge_adjacent([*rhythm_of[name], *reference_events(record, configs[0], rhythm_of[name],
                                                                           window_s)]) for name, record in named}
    out = []
    for variant in events_of:
        results = []
        for (name, record), events in zip(named, variant, strict=True):
            duration_s = len(record.signal_mv) / record.fs
            alarms = alarm_episodes(((e.alarm_id, e.type, e.state, e.time) for e in events), duration_s)
            results.append(RecordAlarms(name, record, duration_s, alarms, rhythm_of[name], references[name]))
        out.append(results)
    return out


def score(results: list[RecordAlarms]) -> dict[str, Any]:
    """Per alarm type: gross scores over all records, and per record."""
    monitored_h = sum(r.duration_s for r in results) / 3600
    normal_h = sum(e.duration_s for r in results for e in r.rhythm if e.label == "N") / 3600
    physiological = list(SCORED_PRIORITY)
    gross: dict[str, TypeScore] = {t: TypeScore(t) for t in physiological}
    per_record = []
    for r in results:
        row: dict[str, Any] = {"record": r.name, "hours": r.duration_s / 3600,
                               "normal_rhythm_hours": sum(e.duration_s for e in r.rhythm if e.label == "N") / 3600}
        for t in physiological:
            s = score_type(t, r.alarms, r.references, r.rhythm, MIN_EVENT_S.get(t, 0.0))
            gross[t].add(s)
            if s.events or s.alarms:
                row[t] = {"events": s.events, "alarmed": s.events_alarmed, "alarms": s.alarms,
                          "false": s.alarms - s.alarms_true}
        row["technical_alarms"] = {t: sum(1 for a in r.alarms if a.label == t)
                                   for t, (kind, _, _) in ALARM_TYPES.items() if kind == "technical"}
        per_record.append(row)
    high = [t for t, priority in SCORED_PRIORITY.items() if priority == "high"]
    false_high_normal = sum(gross[t].false_in_normal_rhythm for t in high)
    false_normal = sum(gross[t].false_in_normal_rhythm for t in physiological)
    return {
        "rules": RULES, "monitored_hours": monitored_h, "normal_rhythm_hours": normal_h,
        "false_high_priority_per_hour_normal_rhythm": false_high_normal / normal_h if normal_h else None,
        "false_physiological_per_hour_normal_rhythm": false_normal / normal_h if normal_h else None,
        "false_high_priority_per_hour": sum(gross[t].alarms - gross[t].alarms_true for t in high) / monitored_h,
        "by_type": {t: gross[t].summary(monitored_h, normal_h) for t in physiological},
        "sustained_vf": sustained_vf(results),
        "per_record": per_record,
    }


def sustained_vf(results: list[RecordAlarms]) -> dict[str, Any]:
    """VF/flutter episodes of SUSTAINED_VF_S or more, and how many were alarmed as VF within SUSTAINED_VF_S of
    their onset (the IEC 60601-2-27 alarm delay for VF)."""
    episodes = alarmed = 0
    for r in results:
        for e in merge_adjacent(x for x in r.references if x.label == "VF"):
            if e.duration_s >= SUSTAINED_VF_S:
                episodes += 1
                alarmed += any(a.label == "ventricular_fibrillation" and a.start <= e.start + SUSTAINED_VF_S
                               and a.end >= e.start for a in r.alarms)
    return {"min_duration_s": SUSTAINED_VF_S, "within_s": SUSTAINED_VF_S, "episodes": episodes,
            "alarmed_within": alarmed}


def evaluate_alarms(model_path: Path, specs: list[str], physionet_dir: Path, leads: list[str] | None,
                    config: AlarmConfig, out_dir: Path, window_s: float = 1.0, pictures: bool = True,
                    noise: tuple[str, float] | None = None, folds: int = 0,
                    qrs_mv: float | None = None) -> dict[str, Any]:
    """Score the daemon's alarms on `specs`, each lead rescaled to a median QRS peak-to-peak of `qrs_mv` (mV) when
    given, then with `noise` (nstdb record, SNR dB: its evaluation half, added as `ecgmon evaluate-noise` adds it)
    when given; write alarms.json (and timelines and strips) to `out_dir`.
    Challenge 2015 records are scored as ICU alarms (`train.icu_alarms`), with `folds`-fold cross-validation of the
    second QRS detector's use when `folds` is not 0."""
    model = BeatModel(model_path)
    named, rhythm_of = load_alarm_records(specs, physionet_dir, leads)
    if qrs_mv is not None:
        from train.noise import rescale_qrs

        named = [(name, rescale_qrs(r, qrs_mv)) for name, r in named]
    if noise is not None:
        from train.noise import add_noise, load_noise

        samples, noise_fs = load_noise(physionet_dir, noise[0], "eval")
        named = [(name, add_noise(r, samples, noise_fs, noise[1], offset_s=60.0 * k))
                 for k, (name, r) in enumerate(named)]
    from train.icu_alarms import evaluate_icu, is_icu_database

    icu = {is_icu_database(physionet_dir / name.rpartition("/")[0]) for name, _ in named}
    if icu == {True}:
        report = {"model": str(model_path), "model_version": model.info.version, "leads": leads,
                  "window_s": window_s, "noise": _noise_doc(noise), "qrs_mv": qrs_mv,
                  **evaluate_icu(model, named, physionet_dir, config, window_s, out_dir, pictures, folds)}
        (out_dir / "alarms.json").write_text(json.dumps(report, indent=2))
        return report
    if icu == {True, False}:
        raise ValueError("Challenge 2015 records (ICU alarms) are scored on their own: evaluate them apart")
    if folds:
        raise ValueError("cross-validation (folds) is for Challenge 2015 records only")
    results = collect_records(model, named, rhythm_of, config, window_s)
    report = {"model": str(model_path), "model_version": model.info.version, "records": [r.name for r in results],
              "leads": leads, "window_s": window_s,
              "noise": _noise_doc(noise), "qrs_mv": qrs_mv,
              **score(results)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "alarms.json").write_text(json.dumps(report, indent=2))
    if pictures:
        from train.alarm_plots import plot_strips, plot_timelines  # matplotlib only here
        plot_timelines(results, out_dir / "timelines")
        plot_strips(results, out_dir / "strips")
    return report


def _noise_doc(noise: tuple[str, float] | None) -> dict[str, Any] | None:
    return None if noise is None else {"record": f"nstdb/{noise[0]}", "part": "evaluation half", "snr_db": noise[1]}


def format_alarm_report(report: dict[str, Any]) -> str:
    """A table for the terminal: one line per alarm type with events or alarms."""
    if "all" in report:  # Challenge 2015 ICU alarms
        from train.icu_alarms import format_icu_report

        return format_icu_report(report)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    def sec(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    lines = [f"{len(report['records'])} records, {report['monitored_hours']:.2f} h monitored, "
             f"{report['normal_rhythm_hours']:.2f} h of annotated normal rhythm",
             f"{'alarm':<24} {'events':>6} {'Se %':>6} {'alarms':>6} {'+P %':>6} {'FA/h':>6} {'FA/h N':>6} "
             f"{'t50 s':>6} {'t95 s':>6} {'dSe %':>6} {'d+P %':>6}"]
    for t, s in report["by_type"].items():
        if not (s["events"] or s["alarms"]):
            continue
        lines.append(f"{t:<24} {s['events']:>6} {pct(s['episode_se']):>6} {s['alarms']:>6} {pct(s['episode_ppv']):>6} "
                     f"{sec(s['false_per_hour']):>6} {sec(s['false_per_hour_normal_rhythm']):>6} "
                     f"{sec(s['time_to_alarm_median_s']):>6} {sec(s['time_to_alarm_p95_s']):>6} "
                     f"{pct(s['duration_se']):>6} {pct(s['duration_ppv']):>6}")
    vf = report.get("sustained_vf")
    if vf and vf["episodes"]:
        lines.append(f"VF episodes of {vf['min_duration_s']:.0f} s or more alarmed as VF within "
                     f"{vf['within_s']:.0f} s: {vf['alarmed_within']} / {vf['episodes']}")
    lines.append(f"false high-priority alarms per hour of normal rhythm: "
                 f"{sec(report['false_high_priority_per_hour_normal_rhythm'])}; all physiological: "
                 f"{sec(report['false_physiological_per_hour_normal_rhythm'])}")
    return "\n".join(lines)

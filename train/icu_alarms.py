"""ICU alarm scoring after the PhysioNet/CinC Challenge 2015 ("Reducing false arrhythmia alarms in the ICU").

Each Challenge record ends at the moment a bedside monitor raised one of five life-threatening alarms,
labelled true or false by experts (`ALARMS`). The record runs through the daemon's analysis as one
device (every ECG lead, `alarm_eval.run_alarms`); the daemon *raises* the record's alarm when an alarm of
that type, or of a more severe lethal type (`COUNTS_AS`), is active at some time in the record's last
`DECISION_S` seconds (the event that triggered the monitor starts in its last 10 s). A true alarm raised
is a TP, missed an FN; a false alarm raised is an FP, held back a TN. Challenge score =
(TP + TN) / (TP + TN + FP + 5 FN): a missed true alarm costs five false ones.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.model import BeatModel
from pipeline.config import AlarmConfig
from pipeline.tools.records import EcgRecord
from train.alarm_eval import run_variants
from train.alarm_score import Episode, alarm_episodes

log = logging.getLogger(__name__)

ALARMS_FILE = "ALARMS"  # one "record,Challenge alarm type,1|0" line per record
DECISION_S = 16.0  # the daemon's alarm counts when active in the record's last DECISION_S seconds (s)
FN_WEIGHT = 5  # a missed true alarm costs this many false ones (the Challenge score)

# The Challenge's alarm types as the daemon names them.
DAEMON_TYPE = {"Asystole": "asystole", "Bradycardia": "extreme_bradycardia", "Tachycardia": "extreme_tachycardia",
               "Ventricular_Tachycardia": "ventricular_tachycardia",
               "Ventricular_Flutter_Fib": "ventricular_fibrillation"}
# Daemon alarms that raise each Challenge alarm: its own type, or a more severe lethal one.
COUNTS_AS: dict[str, frozenset[str]] = {
    "asystole": frozenset({"asystole", "ventricular_fibrillation"}),
    "extreme_bradycardia": frozenset({"extreme_bradycardia", "asystole", "ventricular_fibrillation"}),
    "extreme_tachycardia": frozenset({"extreme_tachycardia", "ventricular_tachycardia", "ventricular_fibrillation"}),
    "ventricular_tachycardia": frozenset({"ventricular_tachycardia", "ventricular_fibrillation"}),
    "ventricular_fibrillation": frozenset({"ventricular_fibrillation"}),
}
# The choices of AlarmConfig.second_detector that `cross_validate` picks from.
SECOND_DETECTOR_VARIANTS: dict[str, tuple[str, ...]] = {
    "none": (),
    "all": ("asystole", "extreme_bradycardia", "extreme_tachycardia", "ventricular_tachycardia",
            "ventricular_fibrillation"),
    "all but extreme_bradycardia": ("asystole", "extreme_tachycardia", "ventricular_tachycardia",
                                    "ventricular_fibrillation"),
    "rates and VF": ("extreme_tachycardia", "ventricular_tachycardia", "ventricular_fibrillation"),
    "rates only": ("extreme_tachycardia", "ventricular_tachycardia"),
    "vetoes only": ("asystole", "extreme_bradycardia", "ventricular_fibrillation"),
}
RULES = (f"the daemon raises a record's alarm when an alarm of its type or of a more severe lethal type is active "
         f"in the record's last {DECISION_S:.0f} s; score = (TP + TN) / (TP + TN + FP + {FN_WEIGHT} FN)")


def is_icu_database(db_dir: Path) -> bool:
    """Whether the folder is a Challenge 2015 set (it has an `ALARMS` file)."""
    return (db_dir / ALARMS_FILE).exists()


def load_icu_alarms(db_dir: Path) -> dict[str, tuple[str, bool]]:
    """Record -> (daemon alarm type, whether the monitor's alarm was true) from the folder's `ALARMS` file."""
    alarms = {}
    for line in (db_dir / ALARMS_FILE).read_text().split():
        record, challenge_type, truth = line.split(",")
        if challenge_type not in DAEMON_TYPE or truth not in ("0", "1"):
            raise ValueError(f"{db_dir / ALARMS_FILE}: cannot read {line!r}")
        alarms[record] = (DAEMON_TYPE[challenge_type], truth == "1")
    return alarms


@dataclass(frozen=True)
class IcuAlarm:
    """One Challenge record's alarm and the daemon's verdict on it.

    Attributes:
        name: "challenge-2015/<record>".
        record: the ECG as analysed.
        alarm_type: the monitor's alarm, as the daemon names it.
        true: the experts' verdict on the monitor's alarm.
        raised: whether the daemon raised it (`COUNTS_AS`) in the record's last DECISION_S seconds.
        alarms: the daemon's alarm episodes on the record (s from its first sample).
        beats: the daemon's beats (R-peak time s, AAMI class).
    """

    name: str
    record: EcgRecord
    alarm_type: str
    true: bool
    raised: bool
    alarms: list[Episode]
    beats: list[tuple[float, str]]

    @property
    def outcome(self) -> str:
        """TP, FN, FP or TN."""
        return ("TP" if self.raised else "FN") if self.true else ("FP" if self.raised else "TN")


def raised_at_end(alarm_type: str, alarms: list[Episode], duration_s: float) -> bool:
    """Whether an alarm that counts as `alarm_type` is active in the last DECISION_S seconds of `duration_s`."""
    return any(a.label in COUNTS_AS[alarm_type] and a.end >= duration_s - DECISION_S for a in alarms)


def challenge_score(counts: dict[str, int]) -> float | None:
    """The Challenge 2015 score of TP/FN/FP/TN counts; None without records."""
    denominator = counts["TP"] + counts["TN"] + counts["FP"] + FN_WEIGHT * counts["FN"]
    return (counts["TP"] + counts["TN"]) / denominator if denominator else None


def score_icu(results: list[IcuAlarm]) -> dict[str, Any]:
    """Per alarm type and over all: TP, FN, FP, TN, TPR, TNR and the Challenge score."""
    def summary(rows: list[IcuAlarm]) -> dict[str, Any]:
        counts = {k: sum(1 for r in rows if r.outcome == k) for k in ("TP", "FN", "FP", "TN")}
        positives, negatives = counts["TP"] + counts["FN"], counts["FP"] + counts["TN"]
        return {**counts, "TPR": counts["TP"] / positives if positives else None,
                "TNR": counts["TN"] / negatives if negatives else None, "score": challenge_score(counts)}

    types = [t for t in COUNTS_AS if any(r.alarm_type == t for r in results)]
    return {"rules": RULES, "all": summary(results),
            "by_type": {t: summary([r for r in results if r.alarm_type == t]) for t in types},
            "per_record": [{"record": r.name, "alarm": r.alarm_type, "true": r.true, "outcome": r.outcome,
                            "daemon_alarms": [{"type": a.label, "start_s": round(a.start, 2), "end_s": round(a.end, 2)}
                                              for a in r.alarms if a.label in COUNTS_AS]}
                           for r in results]}


def format_icu_report(report: dict[str, Any]) -> str:
    """A table for the terminal: one line per alarm type and one for all."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    lines = [f"{'alarm':<26} {'TP':>4} {'FN':>4} {'FP':>4} {'TN':>4} {'TPR %':>6} {'TNR %':>6} {'score':>6}"]
    for name, s in [*report["by_type"].items(), ("all", report["all"])]:
        score = "-" if s["score"] is None else f"{s['score']:.3f}"
        lines.append(f"{name:<26} {s['TP']:>4} {s['FN']:>4} {s['FP']:>4} {s['TN']:>4} {pct(s['TPR']):>6} "
                     f"{pct(s['TNR']):>6} {score:>6}")
    cv = report.get("cross_validation")
    if cv:
        lines.append(f"{cv['folds']}-fold cross-validation by record, {cv['seeds']} seeds: score "
                     f"{cv['score_mean']:.3f} ± {cv['score_sd']:.3f} (TPR {pct(cv['tpr_mean'])} %, TNR "
                     f"{pct(cv['tnr_mean'])} %); on all records per variant: " + ", ".join(
                         f"{v} {s['score']:.3f}" for v, s in cv["variants_on_all"].items()))
    return "\n".join(lines)


def collect_icu(model: BeatModel, named: list[tuple[str, EcgRecord]], alarm_of: dict[str, tuple[str, bool]],
                configs: list[AlarmConfig], window_s: float, thresholds: list[dict[str, float]] | None = None
                ) -> list[list[IcuAlarm]]:
    """Each Challenge record through the daemon's analysis as one device, with the daemon's verdict on its alarm
    (`alarm_of`: "db/record" -> (alarm type, true)) under the alarm rules of each config (and the rhythm stage's
    `thresholds` of each, default the model's: `run_variants`)."""
    events_of, beats_of = run_variants(model, [r for _, r in named], configs, window_s, thresholds)
    out = []
    for variant in events_of:
        results = []
        for (name, record), events, beats in zip(named, variant, beats_of, strict=True):
            duration_s = record.signals_mv.shape[1] / record.fs
            alarms = alarm_episodes(((e.alarm_id, e.type, e.state, e.time) for e in events), duration_s)
            alarm_type, true = alarm_of[name]
            results.append(IcuAlarm(name, record, alarm_type, true, raised_at_end(alarm_type, alarms, duration_s),
                                    alarms, beats))
        out.append(results)
    return out


def cross_validate(variants: dict[str, list[IcuAlarm]], folds: int, seeds: int) -> dict[str, Any]:
    """Choose among rule variants (name -> every record's verdict under it) by k-fold cross-validation by record:
    for each fold, the variant with the best Challenge score on the other folds judges the held-out records;
    repeated for `seeds` random deals of the records into folds."""
    names = list(variants)
    n = len(variants[names[0]])
    runs = []
    for seed in range(seeds):
        fold_of = np.random.default_rng(seed).permutation(n) % folds
        held_out: list[IcuAlarm] = []
        chosen = []
        for k in range(folds):
            train = [[r for r, f in zip(variants[v], fold_of, strict=True) if f != k] for v in names]
            best = max(range(len(names)), key=lambda i: score_icu(train[i])["all"]["score"] or 0.0)
            chosen.append(names[best])
            held_out += [r for r, f in zip(variants[names[best]], fold_of, strict=True) if f == k]
        runs.append({"seed": seed, "chosen": chosen, **{k: v for k, v in score_icu(held_out).items()
                                                        if k in ("all", "by_type")}})
    scores = np.array([r["all"]["score"] for r in runs])
    return {"folds": folds, "seeds": seeds, "score_mean": float(scores.mean()), "score_sd": float(scores.std()),
            "tpr_mean": float(np.mean([r["all"]["TPR"] for r in runs])),
            "tnr_mean": float(np.mean([r["all"]["TNR"] for r in runs])), "runs": runs,
            "variants_on_all": {v: score_icu(variants[v])["all"] for v in names}}


def icu_alarms_of(named: list[tuple[str, EcgRecord]], physionet_dir: Path) -> dict[str, tuple[str, bool]]:
    """"db/record" -> (alarm type, true) of each named Challenge record, from its database's `ALARMS`."""
    labels: dict[str, dict[str, tuple[str, bool]]] = {}
    out = {}
    for name, _ in named:
        db, _, record = name.rpartition("/")
        if db not in labels:
            labels[db] = load_icu_alarms(physionet_dir / db)
        out[name] = labels[db][record]
    return out


def evaluate_icu(model: BeatModel, named: list[tuple[str, EcgRecord]], physionet_dir: Path, config: AlarmConfig,
                 window_s: float, out_dir: Path, pictures: bool, folds: int = 0, seeds: int = 5) -> dict[str, Any]:
    """Score the daemon on Challenge records under `config`; strips of every miss and false alarm in
    `out_dir`/strips. With `folds`, also cross-validate the choice of `AlarmConfig.second_detector` among
    SECOND_DETECTOR_VARIANTS (`cross_validate`)."""
    alarm_of = icu_alarms_of(named, physionet_dir)
    configs = [config]
    if folds:
        configs += [config.model_copy(update={"second_detector": list(v)}) for v in SECOND_DETECTOR_VARIANTS.values()]
    collected = collect_icu(model, named, alarm_of, configs, window_s)
    results = collected[0]
    report: dict[str, Any] = {"records": [r.name for r in results], **score_icu(results)}
    if folds:
        report["cross_validation"] = {
            "what": "AlarmConfig.second_detector chosen per fold among the variants by the Challenge score",
            "variants": {k: list(v) for k, v in SECOND_DETECTOR_VARIANTS.items()},
            **cross_validate(dict(zip(SECOND_DETECTOR_VARIANTS, collected[1:], strict=True)), folds, seeds)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "alarms.json").write_text(json.dumps(report, indent=2))
    if pictures:
        from train.alarm_plots import plot_icu_strips  # matplotlib only here
        plot_icu_strips([r for r in results if r.outcome in ("FN", "FP")], out_dir / "strips")
    return report

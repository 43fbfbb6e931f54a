"""`ecgmon train-af`: the AF detector's logistic regression, and the PhysioNet/CinC Challenge 2017 score.

Data: the Challenge 2017 training set (single-lead 9-61 s recordings labelled N, A, O, ~) and
MIT-BIH DS1 (its `(AFIB` / `(AFL` rhythm episodes). Every recording runs through the daemon's
beat analysis (`BeatStreams`, 1 s windows); a row is the `pipeline.detectors.af` features of the last 33
detected beats and the P-wave consistency as of the last: one per Challenge recording (its end), and one
every 10 beats for MIT-BIH (labelled AF when the beat lies in an AF episode). `~` recordings are not
learned from.

Cross-validation: the recordings dealt into k folds (one patient each as far as the sets say);
the regression fits the other folds and classifies the held-out recordings as the daemon
would: `~` when the signal check calls at least half of the windows unreadable or fewer than 8
beats are found, `A` when P(AF) is at or above the threshold, then `O` by one of two rules: the
rate rule (the rhythm is outside 50-100 bpm or more than 10 % of beats are S or V), or a learned
"other rhythm" class (a second logistic regression on the same features, O against N, fitted in
the same folds, O when P(O) reaches its threshold); else `N`. The Challenge score is the mean F1 of
N, A and O over recordings. The shipped AF threshold maximises the cross-validated A F1. The daemon
raises no alarm for "other rhythm": the learned O class is scored here, not shipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.analysis.model import BeatModel
from pipeline.config import AlarmConfig
from pipeline.detectors.af import AF_BEATS, AF_FEATURE_NAMES, AfDetectorInfo, af_features
from pipeline.tools.records import EcgRecord, challenge_labels, load_records
from train.alarm_eval import analyse_records, load_alarm_records
from train.alarm_score import Episode
from train.logistic import attach_detector, fit_detector, without_detector
from train.trainer import check_not_ds2

log = logging.getLogger(__name__)

CHALLENGE = "challenge-2017"
MIN_BEATS = 8  # fewer detected beats in a recording: too noisy to classify
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
OTHER_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
AF_RHYTHMS = ("AF", "AFL")
RULES = (f"{{k}}-fold cross-validation over the Challenge 2017 recordings (MIT-BIH DS1 rows train only); a held-out "
         f"recording is ~ when half its windows are unreadable or fewer than {MIN_BEATS} beats are found, A when "
         f"P(AF) of its last {AF_BEATS} RR intervals and P-wave consistency reaches the threshold, O when its rate is "
         "outside 50-100 bpm or more than 10 % of its beats are S or V (`thresholds`) or when P(O) of a second "
         "regression, O against N, reaches its threshold (`learned_other`), else N; score: mean F1 of N, A, O over "
         "recordings")


@dataclass(frozen=True)
class Beats:
    """One recording's detected beats, the P-wave consistency as of each (None: unknown), and the share of its
    windows the signal check calls unreadable."""

    times_s: NDArray[np.float64]
    ectopic: NDArray[np.bool_]
    p_wave: list[float | None]
    unreadable: float


def detect_beats(model: BeatModel, records: list[EcgRecord], config: AlarmConfig, window_s: float = 1.0
                 ) -> list[Beats]:
    """Each record's beats and unreadable share from the daemon's analysis (`analyse_records`)."""
    found: list[list[tuple[float, str, float | None]]] = [[] for _ in records]
    bad = [0] * len(records)
    for w in analyse_records(model, records, config, window_s):
        found[w.record] += [(t, c, w.p_wave) for t, c in w.beats]
        bad[w.record] += w.check.flat or w.check.unreadable or w.check.saturated
    return [Beats(np.array([t for t, _, _ in beats]), np.array([c in "SV" for _, c, _ in beats]),
                  [p for _, _, p in beats], unreadable / max(r.window_count(window_s), 1))
            for r, beats, unreadable in zip(records, found, bad, strict=True)]


def challenge_label(beats: Beats, p_af: float, threshold: float, p_other: float | None = None,
                    other_threshold: float = 0.5) -> str:
    """The Challenge class the product's outputs give a recording (rules in the module docstring); `p_other`:
    P(O) of the learned "other rhythm" class (None: the rate rule decides O)."""
    if beats.unreadable >= 0.5 or len(beats.times_s) < MIN_BEATS:
        return "~"
    if p_af >= threshold:
        return "A"
    if p_other is not None:
        return "O" if p_other >= other_threshold else "N"
    rate_bpm = 60.0 / float(np.median(np.diff(beats.times_s)))
    return "O" if not 50.0 <= rate_bpm <= 100.0 or beats.ectopic.mean() > 0.1 else "N"


def f1_scores(truth: list[str], predicted: list[str]) -> dict[str, float]:
    """Challenge 2017 F1 per class over recordings, and their mean over N, A, O."""
    out = {}
    for c in ("N", "A", "O", "~"):
        tp = sum(t == c and p == c for t, p in zip(truth, predicted, strict=True))
        wrong = sum((t == c) != (p == c) for t, p in zip(truth, predicted, strict=True))
        out[c] = 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0
    out["challenge_score"] = (out["N"] + out["A"] + out["O"]) / 3
    return out


def mitdb_rows(beats: Beats, rhythm: list[Episode]) -> tuple[NDArray[np.float64], NDArray[np.bool_],
                                                             NDArray[np.bool_]]:
    """Every 10th beat's features of a MIT-BIH record, AF label, and whether the row is unambiguous."""
    rows, is_af, used = [], [], []
    for i in range(AF_BEATS + 1, len(beats.times_s), 10):
        t, start = beats.times_s[i], beats.times_s[i - AF_BEATS]
        rows.append(af_features(beats.times_s[:i + 1], beats.ectopic[:i + 1], beats.p_wave[i]))
        labels = {e.label for e in rhythm if e.start < t and e.end > start}
        is_af.append(bool(labels) and labels <= set(AF_RHYTHMS))
        used.append(is_af[-1] or not labels & set(AF_RHYTHMS))
    return np.array(rows).reshape(-1, len(AF_FEATURE_NAMES)), np.array(is_af, bool), np.array(used, bool)


def train_af(model_path: Path, out: Path, report_dir: Path, physionet_dir: Path, lead: str, config: AlarmConfig,
             k: int = 5, challenge_limit: int | None = None, seed: int = 0,
             mitdb_specs: tuple[str, ...] = ("mitdb/DS1",)) -> dict[str, Any]:
    """Cross-validate on the Challenge set and `mitdb_specs` (MIT-BIH records with rhythm annotations; DS2 is
    refused), choose the threshold, fit on all, attach to `out`."""
    check_not_ds2(list(mitdb_specs), "train-af's MIT-BIH records")
    labels = challenge_labels(physionet_dir / CHALLENGE)
    names = sorted(labels)[:challenge_limit]
    challenge = load_records([f"{CHALLENGE}/{n}" for n in names], physionet_dir, [lead])
    mitdb, rhythm_of = load_alarm_records(list(mitdb_specs), physionet_dir, [lead])
    log.info("detecting beats in %d Challenge recordings and %d MIT-BIH records", len(challenge), len(mitdb))
    with without_detector(model_path, "af_detector") as base:
        beats = detect_beats(BeatModel(base), [r for _, r in challenge + mitdb], config)
    c_beats, m_beats = beats[:len(challenge)], beats[len(challenge):]
    truth = [labels[n] for n in names]
    c_rows = np.array([af_features(b.times_s, b.ectopic, b.p_wave[-1]) if len(b.times_s) >= 4
                       else np.zeros(len(AF_FEATURE_NAMES)) for b in c_beats])
    m_rows = [mitdb_rows(b, rhythm_of[n]) for b, (n, _) in zip(m_beats, mitdb, strict=True)]
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(len(names)) % k
    m_fold = np.arange(len(mitdb)) % k
    p_af, p_other = np.zeros(len(names)), np.zeros(len(names))
    for i in range(k):
        train_c = (fold_of != i) & np.isin(truth, ["N", "A", "O"])
        x = np.vstack([c_rows[train_c]] + [m_rows[j][0][m_rows[j][2]] for j in range(len(mitdb)) if m_fold[j] != i])
        y = np.concatenate([np.array(truth)[train_c] == "A"]
                           + [m_rows[j][1][m_rows[j][2]] for j in range(len(mitdb)) if m_fold[j] != i])
        info = fit_detector(AfDetectorInfo, AF_FEATURE_NAMES, x, y, 0.5, "fold", {})
        p_af[fold_of == i] = info.probability(c_rows[fold_of == i])
        train_o = (fold_of != i) & np.isin(truth, ["N", "O"])
        other = fit_detector(AfDetectorInfo, AF_FEATURE_NAMES, c_rows[train_o], np.array(truth)[train_o] == "O", 0.5,
                             "fold", {})
        p_other[fold_of == i] = other.probability(c_rows[fold_of == i])
    by_threshold = {}
    for t in THRESHOLDS:
        predicted = [challenge_label(b, p, t) for b, p in zip(c_beats, p_af, strict=True)]
        by_threshold[str(t)] = f1_scores(truth, predicted)
    threshold = max(THRESHOLDS, key=lambda t: by_threshold[str(t)]["A"])
    learned_other = {str(t): f1_scores(truth, [challenge_label(b, p, threshold, o, t)
                                               for b, p, o in zip(c_beats, p_af, p_other, strict=True)])
                     for t in OTHER_THRESHOLDS}
    x_all = np.vstack([c_rows[np.isin(truth, ["N", "A", "O"])]] + [r[0][r[2]] for r in m_rows])
    y_all = np.concatenate([np.array(truth)[np.isin(truth, ["N", "A", "O"])] == "A"] + [r[1][r[2]] for r in m_rows])
    chosen = by_threshold[str(threshold)]
    final = fit_detector(AfDetectorInfo, AF_FEATURE_NAMES, x_all, y_all, threshold,
                         f"{len(names)} Challenge 2017 recordings and MIT-BIH DS1 ({len(x_all)} rows of {AF_BEATS} "
                         "RR intervals)", {"challenge_2017_cv": chosen})
    attach_detector(model_path, out, "af_detector", final)
    report = {"k": k, "seed": seed, "recordings": len(names), "threshold": threshold, "thresholds": by_threshold,
              "learned_other": learned_other, "rules": RULES.format(k=k),
              "coef": dict(zip(AF_FEATURE_NAMES, final.coef, strict=True))}
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "af-cv.json").write_text(json.dumps(report, indent=2))
    return report

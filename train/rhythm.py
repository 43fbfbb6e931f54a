"""`ecgmon train-rhythm`: the rhythm stage, a small recurrent network over each lead's windows, cross-validated.

Data (never DS2): cudb (VF and VT episodes), MIT-BIH DS1 (its VFL/VT episodes; every other rhythm is
"normal"), the Challenge 2015 ICU alarms (weak labels: the last WEAK_LABEL_S of a true VF, VT or asystole alarm
are that rhythm, those of a false one are "not that rhythm"; the rest of the record is unlabelled but steps the
network), and nstdb's electrode-motion and muscle-artefact records (training halves) as "noise". Every lead of
every record runs through the model's DSP, `pipeline.analysis.recent.RecentSignal` and the second QRS detector in
1 s windows exactly as the daemon feeds them; each window end gives one row of `pipeline.detectors.rhythm`
features. A window is labelled with a rhythm when at least LABEL_S of its 4 s lie in it, "normal" when none
does, and not learned from otherwise.

Augmentation: each training segment's amplitude is scaled by a factor drawn log-uniformly from AMPLITUDE_RANGE
(every feature but `log_amplitude_mv` is scale-free), so small complexes and fine VF look like any others.

Cross-validation by record (k folds, several seeds): each fold's network learns from the other folds and labels
its own; `train.icu_alarms` then scores the alarms it drives.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from models.network import StageNet
from pipeline.analysis.dsp import Preprocessor
from pipeline.analysis.model import ModelInfo
from pipeline.analysis.recent import RecentSignal, spectrum
from pipeline.config import AlarmConfig, RhythmStageAlarm
from pipeline.detectors.qrs import QrsDetectorBank
from pipeline.detectors.rhythm import RHYTHM_CLASSES, RHYTHM_FEATURE_NAMES, rhythm_features
from pipeline.detectors.vf import vf_features
from pipeline.tools.records import EcgRecord, load_records
from train.alarm_eval import RecordAlarms, collect_variants, load_alarm_records, score
from train.alarm_score import Episode
from train.config import RhythmTrainConfig
from train.export import attach_stage, read_metadata
from train.icu_alarms import IcuAlarm, collect_icu, icu_alarms_of, is_icu_database, score_icu
from train.noise import load_noise
from train.trainer import check_not_ds2

log = logging.getLogger(__name__)

RHYTHM_RECORDS = ("cudb/all", "mitdb/DS1", "challenge-2015/all")
NOISE_RECORDS = ("em", "ma")
NOISE_PIECE_S = 300.0  # each noise record is cut into pieces this long, dealt to folds like records (s)
LABEL_S = 3.0  # seconds of a 4 s window in a rhythm that label it with that rhythm
WEAK_LABEL_S = 5.0  # the last seconds of a Challenge 2015 record labelled by its alarm (s)
IGNORE = -1  # a window not learned from; -(2 + c): a window known not to be class c
AMPLITUDE_RANGE = (0.25, 2.0)
CLASS = {name: i for i, name in enumerate(RHYTHM_CLASSES)}
# The Challenge 2015 alarm types (as the daemon names them) whose truth labels a rhythm.
WEAK_CLASS = {"ventricular_fibrillation": CLASS["VF"], "ventricular_tachycardia": CLASS["VT"],
              "asystole": CLASS["asystole"]}
AMPLITUDE_COLUMN = RHYTHM_FEATURE_NAMES.index("log_amplitude_mv")


@dataclass(frozen=True)
class RhythmSequence:
    """One lead of one record, window by window: window ends (s), features, labels (a class index, IGNORE, or
    -(2 + c))."""

    record: str
    lead: str
    end_s: NDArray[np.float64]
    features: NDArray[np.float32]
    labels: NDArray[np.int64]


def lead_rows(record: EcgRecord, lead: int, info: ModelInfo, window_s: float = 1.0
              ) -> tuple[NDArray[np.float64], NDArray[np.float32]]:
    """Window ends (s) and rhythm features of one lead as the daemon computes them (1 s windows)."""
    pre = Preprocessor(info.filter, record.fs, info.fs, info.frame_size)
    recent = RecentSignal(1, info.fs)
    qrs = QrsDetectorBank(1, recent.fs)
    slot = np.array([0])
    ends, rows = [], []
    for k in range(record.window_count(window_s)):
        window = record.window(k, window_s)
        frames = pre(window.samples_mv[lead])
        if not len(frames):
            continue
        qrs.update(slot, recent.update(slot, frames[None]))
        if recent.ready(slot)[0]:
            x = recent.history[slot]
            spec = spectrum(x, recent.fs)
            rows.append(rhythm_features(vf_features(x, recent.fs, spec), spec, qrs.rate_bpm(slot))[0])
            ends.append(window.t0 + window.duration_s)
    return np.asarray(ends), np.asarray(rows, dtype=np.float32).reshape(-1, len(RHYTHM_FEATURE_NAMES))


def episode_labels(end_s: NDArray[np.float64], rhythm: list[Episode], recent_s: float = 4.0) -> NDArray[np.int64]:
    """Each window's class from annotated rhythm episodes (the module docstring's rule)."""
    inside = {c: np.zeros(len(end_s)) for c in ("VF", "VT", "asystole")}
    for e in rhythm:
        if e.label in inside:
            inside[e.label] += np.clip(np.minimum(end_s, e.end) - np.maximum(end_s - recent_s, e.start), 0.0, None)
    labels = np.full(len(end_s), IGNORE, dtype=np.int64)
    labels[sum(inside.values()) == 0] = CLASS["normal"]
    for c in ("asystole", "VT", "VF"):  # the most severe wins
        labels[inside[c] >= LABEL_S] = CLASS[c]
    return labels


def weak_labels(end_s: NDArray[np.float64], duration_s: float, alarm: tuple[str, bool]) -> NDArray[np.int64]:
    """A Challenge 2015 record's labels: its last WEAK_LABEL_S by its alarm's truth, the rest unlabelled."""
    labels = np.full(len(end_s), IGNORE, dtype=np.int64)
    kind, true = alarm
    if kind in WEAK_CLASS:
        labels[end_s > duration_s - WEAK_LABEL_S] = WEAK_CLASS[kind] if true else -(2 + WEAK_CLASS[kind])
    return labels


def record_sequences(name: str, record: EcgRecord, info: ModelInfo, rhythm: list[Episode] | None,
                     alarm: tuple[str, bool] | None) -> list[RhythmSequence]:
    """Every lead of a record as a sequence, labelled from its rhythm episodes or its ICU alarm."""
    out = []
    for i, lead in enumerate(record.sig_names):
        end_s, features = lead_rows(record, i, info)
        duration_s = record.signals_mv.shape[1] / record.fs
        labels = weak_labels(end_s, duration_s, alarm) if alarm is not None else episode_labels(end_s, rhythm or [])
        out.append(RhythmSequence(name, lead, end_s, features, labels))
    return out


def noise_sequences(physionet_dir: Path, info: ModelInfo) -> list[RhythmSequence]:
    """nstdb's em and ma noise records (training halves), in NOISE_PIECE_S pieces, all "noise"."""
    out = []
    for noise_name in NOISE_RECORDS:
        x, fs = load_noise(physionet_dir, noise_name, "train")
        piece = int(NOISE_PIECE_S * fs)
        for k in range(len(x) // piece):
            record = EcgRecord(f"{noise_name}{k}", x[None, k * piece:(k + 1) * piece], fs, ("noise",),
                               np.zeros(0, np.int64), np.zeros(0, np.str_))
            end_s, features = lead_rows(record, 0, info)
            out.append(RhythmSequence(f"nstdb/{noise_name}{k}", "noise", end_s, features,
                                      np.full(len(end_s), CLASS["noise"], dtype=np.int64)))
    return out


def train_rhythm_stage(sequences: list[RhythmSequence], config: RhythmTrainConfig, seed: int) -> StageNet:
    """Fit a rhythm stage to `sequences` (class-weighted cross-entropy on labelled windows, -log(1 - p) on windows
    known not to be a class; amplitude augmentation; AdamW, cosine)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = StageNet(config.model)
    net.standardise_on(torch.from_numpy(np.concatenate([s.features for s in sequences])))
    features, labels = _segments(sequences, config.segment_windows)
    counts = np.bincount(labels[labels >= 0].numpy(), minlength=len(RHYTHM_CLASSES)).astype(np.float64)
    weights = torch.tensor(np.minimum(config.loss_weight_max,
                                      (counts.max() / np.maximum(counts, 1.0)) ** config.loss_weight_power),
                           dtype=torch.float32)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-3)
    low, high = np.log(AMPLITUDE_RANGE[0]), np.log(AMPLITUDE_RANGE[1])
    for epoch in range(config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))
        net.train()
        for idx in _batches(rng.permutation(len(features)), config.batch_segments):
            x = features[idx].clone()
            x[:, :, AMPLITUDE_COLUMN] += torch.from_numpy(rng.uniform(low, high, (len(idx), 1)).astype(np.float32))
            logits, _ = net(x, net.initial_state(len(idx)))
            loss = stage_loss(logits, labels[idx], weights)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
    return net.eval()


def stage_loss(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Weighted cross-entropy over labelled steps, plus -log(1 - p_c) over steps known not to be class c."""
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    positive, negative = labels >= 0, labels <= -2
    loss = logits.new_zeros(())
    if positive.any():
        loss = loss + nn.functional.cross_entropy(logits[positive], labels[positive], weight=weights)
    if negative.any():
        p = torch.softmax(logits[negative], dim=-1).gather(1, (-labels[negative] - 2)[:, None])[:, 0]
        loss = loss - torch.log1p(-p.clamp(max=1 - 1e-6)).mean()
    return loss


def _segments(sequences: list[RhythmSequence], length: int) -> tuple[Tensor, Tensor]:
    """Windows of `length` steps, half overlapping (a shorter sequence is one segment, padded and unlabelled)."""
    features, labels = [], []
    for s in sequences:
        n = len(s.labels)
        for start in range(0, max(n - length, 0) + 1, length // 2):
            f = np.zeros((length, s.features.shape[1]), np.float32)
            y = np.full(length, IGNORE, np.int64)
            part = slice(start, min(start + length, n))
            f[:part.stop - start], y[:part.stop - start] = s.features[part], s.labels[part]
            features.append(f)
            labels.append(y)
    return torch.from_numpy(np.stack(features)), torch.from_numpy(np.stack(labels))


def _batches(order: NDArray[np.int64], size: int) -> Iterator[Tensor]:
    for start in range(0, len(order), size):
        yield torch.from_numpy(order[start:start + size])


@torch.no_grad()
def rhythm_probabilities(net: StageNet, sequence: RhythmSequence) -> NDArray[np.float32]:
    """The rhythm stage's class probabilities at every window of a sequence (windows, classes), one pass."""
    logits, _ = net(torch.from_numpy(sequence.features)[None], net.initial_state(1))
    probs: NDArray[np.float32] = torch.softmax(logits[0], -1).numpy()
    return probs


# The choices of AlarmConfig.rhythm_stage and of the thresholds that `cross_validate_rhythm` picks from.
RHYTHM_VARIANTS: dict[str, tuple[RhythmStageAlarm, ...]] = {
    "VT": ("ventricular_tachycardia",), "VF": ("ventricular_fibrillation",),
    "VT and VF": ("ventricular_tachycardia", "ventricular_fibrillation")}
THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8)
MAX_ADDED_FALSE_PER_HOUR = 0.5  # false VT and VF alarms per monitored hour on cudb and DS1 a variant may add
VENTRICULAR = ("ventricular_tachycardia", "ventricular_fibrillation")


@dataclass(frozen=True)
class Variant:
    """One way to use the rhythm stage: the alarms it raises and its thresholds ("off": none)."""

    name: str
    alarms: tuple[RhythmStageAlarm, ...]
    thresholds: dict[str, float]


def variants() -> list[Variant]:
    """"off", then every RHYTHM_VARIANTS choice at every threshold (the same for VT and VF)."""
    return [Variant("off", (), {}), *(Variant(f"{name} at {t:g}", alarms, {"VT": t, "VF": t})
                                      for name, alarms in RHYTHM_VARIANTS.items() for t in THRESHOLDS)]


def fold_of(records: list[str], k: int, seed: int) -> dict[str, int]:
    """Records dealt at random into k folds."""
    return dict(zip(records, (np.random.default_rng(seed).permutation(len(records)) % k).tolist(), strict=True))


@dataclass
class Outcomes:
    """Each variant's verdicts on held-out records: the Challenge 2015 alarms, and the annotated records' alarms."""

    icu: dict[str, list[IcuAlarm]]
    annotated: dict[str, list[RecordAlarms]]

    def false_ventricular_per_hour(self, name: str) -> float:
        """False VT and VF alarms per monitored hour of the annotated records under variant `name`."""
        scored = score(self.annotated[name])
        return sum(scored["by_type"][t]["false_per_hour"] or 0.0 for t in VENTRICULAR)

    def challenge_score(self, name: str) -> float:
        return float(score_icu(self.icu[name])["all"]["score"] or 0.0)


def held_out_outcomes(model_path: Path, sequences: list[RhythmSequence], icu: list[tuple[str, EcgRecord]],
                      alarm_of: dict[str, tuple[str, bool]], annotated: list[tuple[str, EcgRecord]],
                      rhythm_of: dict[str, list[Episode]], config: AlarmConfig, stage: RhythmTrainConfig, k: int,
                      seed: int, window_s: float = 1.0) -> Outcomes:
    """k-fold cross-validation by record: fold i's rhythm stage learns from the other folds' windows, is attached
    to a copy of the model, and fold i's records run through the daemon's analysis under every variant."""
    fold = fold_of(sorted({s.record for s in sequences}), k, seed)
    chosen = variants()
    configs = [config.model_copy(update={"rhythm_stage": list(v.alarms)}) for v in chosen]
    thresholds = [v.thresholds for v in chosen]
    out = Outcomes({v.name: [] for v in chosen}, {v.name: [] for v in chosen})
    with tempfile.TemporaryDirectory() as folder:
        for i in range(k):
            net = train_rhythm_stage([s for s in sequences if fold[s.record] != i], stage, seed)
            model = attach_stage(model_path, Path(folder) / "fold.onnx", net, "rhythm_stage",
                                 {"training_data": "cross-validation fold", "cv_metrics": {}, "thresholds": {}})
            held_icu = [(n, r) for n, r in icu if fold[n] == i]
            for v, results in zip(chosen, collect_icu(model, held_icu, alarm_of, configs, window_s, thresholds),
                                  strict=True):
                out.icu[v.name] += results
            held = [(n, r) for n, r in annotated if fold[n] == i]
            for v, records in zip(chosen, collect_variants(model, held, rhythm_of, configs, window_s, thresholds),
                                  strict=True):
                out.annotated[v.name] += records
            log.info("rhythm stage: fold %d of %d done", i + 1, k)
    return out


def choose(outcomes: Outcomes, names: list[str]) -> str:
    """The variant with the best Challenge 2015 score among those that add at most MAX_ADDED_FALSE_PER_HOUR false
    VT and VF alarms per hour on the annotated records to what "off" raises."""
    budget = outcomes.false_ventricular_per_hour("off") + MAX_ADDED_FALSE_PER_HOUR
    allowed = [n for n in names if n == "off" or outcomes.false_ventricular_per_hour(n) <= budget]
    return max(allowed, key=outcomes.challenge_score)


def nested_choice(outcomes: Outcomes, k: int, seed: int) -> dict[str, Any]:
    """The choice judged on records it was not made on: for each of k folds of the held-out verdicts, `choose` on
    the other folds, and score the chosen variant on this one."""
    names = list(outcomes.icu)
    records = sorted({r.name for r in outcomes.icu["off"]} | {r.name for r in outcomes.annotated["off"]})
    fold = fold_of(records, k, seed + 1)
    picked, held_icu, held_annotated = [], [], []
    for i in range(k):
        train = Outcomes({n: [r for r in outcomes.icu[n] if fold[r.name] != i] for n in names},
                         {n: [r for r in outcomes.annotated[n] if fold[r.name] != i] for n in names})
        best = choose(train, names)
        picked.append(best)
        held_icu += [r for r in outcomes.icu[best] if fold[r.name] == i]
        held_annotated += [r for r in outcomes.annotated[best] if fold[r.name] == i]
    held = Outcomes({"chosen": held_icu}, {"chosen": held_annotated})
    return {"chosen": picked, "challenge_2015": score_icu(held_icu)["all"],
            "false_ventricular_per_hour": held.false_ventricular_per_hour("chosen"),
            "sustained_vf": score(held_annotated)["sustained_vf"]}


def train_rhythm(model_path: Path, out: Path, report_dir: Path, physionet_dir: Path, config: AlarmConfig,
                 stage: RhythmTrainConfig, k: int = 5, seeds: int = 2, specs: tuple[str, ...] = RHYTHM_RECORDS
                 ) -> dict[str, Any]:
    """Cross-validate the rhythm stage and its use at the alarm level, choose the variant, train on every record
    and attach it with the chosen thresholds to `out`; the report goes to `report_dir`/rhythm-cv.json. The
    chosen `alarms.rhythm_stage` is reported, for the daemon's configuration."""
    check_not_ds2(list(specs), "rhythm stage training")
    info = read_metadata(model_path)
    icu_specs = [s for s in specs if is_icu_database(physionet_dir / s.split("/")[0])]
    icu = load_records(icu_specs, physionet_dir, None)
    alarm_of = icu_alarms_of(icu, physionet_dir)
    annotated, rhythm_of = load_alarm_records([s for s in specs if s not in icu_specs], physionet_dir, None)
    log.info("rhythm features of %d ICU and %d annotated records", len(icu), len(annotated))
    sequences = [q for n, r in icu for q in record_sequences(n, r, info, None, alarm_of[n])]
    sequences += [q for n, r in annotated for q in record_sequences(n, r, info, rhythm_of[n], None)]
    sequences += noise_sequences(physionet_dir, info)
    report: dict[str, Any] = {"records": specs, "k": k, "seeds": list(range(seeds)),
                              "rules": RULES.format(budget=MAX_ADDED_FALSE_PER_HOUR),
                              "max_added_false_per_hour": MAX_ADDED_FALSE_PER_HOUR, "runs": []}
    pooled: Outcomes | None = None
    for seed in range(seeds):
        outcomes = held_out_outcomes(model_path, sequences, icu, alarm_of, annotated, rhythm_of, config, stage, k,
                                     seed)
        report["runs"].append({"seed": seed, "nested": nested_choice(outcomes, k, seed), "variants": {
            n: {"challenge_2015": score_icu(outcomes.icu[n])["all"],
                "false_ventricular_per_hour": outcomes.false_ventricular_per_hour(n),
                "sustained_vf": score(outcomes.annotated[n])["sustained_vf"]} for n in outcomes.icu}})
        pooled = outcomes if pooled is None else Outcomes(
            {n: pooled.icu[n] + outcomes.icu[n] for n in outcomes.icu},
            {n: pooled.annotated[n] + outcomes.annotated[n] for n in outcomes.icu})
    assert pooled is not None
    best = choose(pooled, list(pooled.icu))
    variant = next(v for v in variants() if v.name == best)
    report["chosen"] = {"variant": best, "alarms.rhythm_stage": list(variant.alarms), "thresholds": variant.thresholds}
    net = train_rhythm_stage(sequences, stage, seed=0)
    cv_metrics = {"challenge_2015_nested": [r["nested"]["challenge_2015"]["score"] for r in report["runs"]],
                  "variant": best}
    attach_stage(model_path, out, net, "rhythm_stage",
                 {"training_data": f"{', '.join(specs)} and nstdb em/ma noise: {sum(len(s.labels) for s in sequences)} "
                                   "lead-windows of 4 s", "cv_metrics": cv_metrics,
                  "thresholds": variant.thresholds or {"VT": THRESHOLDS[-1], "VF": THRESHOLDS[-1]}})
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "rhythm-cv.json").write_text(json.dumps(report, indent=2))
    return report


RULES = ("k-fold cross-validation by record (Challenge 2015, cudb, MIT-BIH DS1 and nstdb noise pieces), several "
         "seeds: each fold's rhythm stage learns from the other folds and its records run through the daemon's "
         "analysis under every variant (which of VT and VF the stage raises, at which threshold); a variant is "
         "chosen by the Challenge 2015 score among those adding at most {budget} false VT and VF alarms per "
         "monitored hour on cudb and DS1; `nested` judges that choice on records it was not made on")


def format_rhythm_report(report: dict[str, Any]) -> str:
    """Per variant (pooled over seeds): the Challenge 2015 score and the false ventricular alarms per hour; then the
    nested cross-validation of the choice and the choice on every record."""
    lines = [f"{'variant':<16} {'Challenge 2015 (seed 0)':>24} {'false VT+VF / h (cudb, DS1)':>28}"]
    for name, v in report["runs"][0]["variants"].items():
        lines.append(f"{name:<16} {v['challenge_2015']['score']:>24.3f} {v['false_ventricular_per_hour']:>28.2f}")
    for run in report["runs"]:
        nested = run["nested"]
        lines.append(f"seed {run['seed']}, nested: Challenge 2015 {nested['challenge_2015']['score']:.3f} (TPR "
                     f"{nested['challenge_2015']['TPR']:.3f}), false VT+VF {nested['false_ventricular_per_hour']:.2f}"
                     f"/h, chosen per fold: {', '.join(nested['chosen'])}")
    lines.append(f"chosen on every record: {report['chosen']['variant']} (alarms.rhythm_stage: "
                 f"{report['chosen']['alarms.rhythm_stage']})")
    return "\n".join(lines)

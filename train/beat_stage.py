"""The beat-sequence stage: trained on out-of-fold beats, cross-validated together with the frame stage, and
attached to a model file.

The frame stage is sure of itself on the patients it trained on; a beat stage trained on those outputs
would learn to trust it blindly. So the beat stage learns from out-of-fold beats: each record of the
cross-validation (DS1 and the SVDB part, never DS2) is run through the fold models of `ecgmon
cross-validate` that did not train on it, once per seed. Cross-validating both stages reuses the same
folds: the beat stage of fold i learns from the other folds' out-of-fold beats and is scored on fold i's
beats from fold i's frame model, patients neither stage saw.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from models.network import StageNet
from pipeline.analysis.aami import AAMI_CLASSES
from pipeline.analysis.beat_context import record_features
from pipeline.analysis.beats import LEAD_FUSION, BeatPickerState, fuse_leads, lead_weights, pick_beats, r_peak_time_s
from pipeline.analysis.dsp import Preprocessor
from pipeline.analysis.model import (
    BeatModel,
)
from pipeline.tools.records import EcgRecord, load_records
from train.config import BeatStageTrainConfig
from train.ec57 import Ec57Stats, confusion, empty_matrix, match_beats
from train.evaluate import evaluate
from train.export import attach_stage, write_metadata
from train.trainer import check_not_ds2

log = logging.getLogger(__name__)

NO_REFERENCE = -1  # label of a detected beat that matches no reference beat (not learned from)


@dataclass(frozen=True)
class BeatSequence:
    """The beats one frame model found in one record, with what the beat stage learns from.

    Attributes:
        record: "db/record".
        fold, seed: the cross-validation fold holding the record, and the seed of the frame model that ran.
        time_s: R-peak times of the detected beats (s since the record's start).
        features: (n_beats, n_features) `pipeline.analysis.beat_context` features.
        labels: index in AAMI_CLASSES of each beat's matched reference beat, or NO_REFERENCE.
        frame_classes: the frame stage's own AAMI class of each beat.
        ref_s, ref_classes: the reference beats (s, AAMI class).
    """

    record: str
    fold: int
    seed: int
    time_s: NDArray[np.float64]
    features: NDArray[np.float32]
    labels: NDArray[np.int64]
    frame_classes: NDArray[np.str_]
    ref_s: NDArray[np.float64]
    ref_classes: NDArray[np.str_]


def beat_sequence(model: BeatModel, name: str, record: EcgRecord, fold: int, seed: int) -> BeatSequence:
    """Run the frame stage of `model` over every lead of a whole record in one pass, fuse the leads as the daemon
    does with every lead usable (`pipeline.analysis.beats.lead_weights`: all of them for a model trained on fused
    leads, else the first) and describe the beats picked from them; the beats' shape features come from the first
    lead."""
    info = model.info
    frames = np.stack([Preprocessor(info.filter, record.fs, info.fs, info.frame_size)(x) for x in record.signals_mv])
    probs, _ = model.run(frames, model.initial_state(len(frames)))
    weights = lead_weights(np.ones(len(frames), dtype=bool), 0, info.lead_fusion == LEAD_FUSION)
    fused = fuse_leads(probs, weights)[None]
    picked = pick_beats(fused, BeatPickerState(1, len(info.class_names)), np.zeros(1, dtype=np.int64),
                        info.decision)
    time_s = r_peak_time_s(picked.frame, info)
    real = time_s >= 0  # as BeatStreams: a "beat" before the first sample is a cold-start artefact
    time_s, end_frame, class_sum = time_s[real], picked.end_frame[real], picked.class_sum[real]
    ref_s = record.beat_samples / record.fs
    match = match_beats(ref_s, time_s)
    labels = np.full(len(time_s), NO_REFERENCE, dtype=np.int64)
    labels[match[match >= 0]] = [AAMI_CLASSES.index(c) for c in record.beat_classes[match >= 0]]
    frame_classes = np.array(info.class_names)[picked.class_index[real]]
    return BeatSequence(name, fold, seed, time_s, record_features(frames[0], time_s, end_frame, class_sum, info.fs),
                        labels, frame_classes, ref_s, record.beat_classes)


def fold_model(cv_dir: Path, k: int, fold: int, seed: int) -> Path:
    """The ONNX file of one fold model written by `ecgmon cross-validate --out cv_dir`."""
    found = sorted((cv_dir / "runs").glob(f"*-cv{k}-fold{fold}-seed{seed}/model.onnx"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one fold model for fold {fold}, seed {seed} under {cv_dir / 'runs'}, "
                                f"found {len(found)}; run `ecgmon cross-validate --out {cv_dir}` first")
    return found[0]


def out_of_fold_sequences(cv_dir: Path, physionet_dir: Path, leads: list[str] | None
                          ) -> tuple[list[BeatSequence], dict[str, Any]]:
    """Every cross-validation record (its `leads`; None: every ECG lead) through each seed's fold model that did not
    train on it; and cv.json."""
    cv = json.loads((cv_dir / "cv.json").read_text())
    check_not_ds2([name for fold in cv["folds"] for name in fold], f"the folds of {cv_dir / 'cv.json'}")
    sequences = []
    for fold, names in enumerate(cv["folds"]):
        records = load_records(names, physionet_dir, leads)
        for seed in cv["seeds"]:
            model = BeatModel(fold_model(cv_dir, cv["k"], fold, seed))
            sequences += [beat_sequence(model, name, record, fold, seed) for name, record in records]
        log.info("out-of-fold beats of fold %d: %s", fold, ", ".join(names))
    return sequences, cv


def train_beat_stage(sequences: list[BeatSequence], config: BeatStageTrainConfig, seed: int) -> StageNet:
    """Fit a beat stage to the labelled beats of `sequences` (class-weighted cross-entropy, AdamW, cosine)."""
    torch.manual_seed(seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(seed)
    net = StageNet(config.model)
    net.standardise_on(torch.from_numpy(np.concatenate([s.features for s in sequences])))
    features, labels = _segments(sequences, config.sequence_beats)
    counts = np.bincount(labels[labels >= 0], minlength=len(AAMI_CLASSES))
    weights = np.minimum(config.loss_weight_max, (counts[0] / np.maximum(counts, 1)) ** config.loss_weight_power)
    weights[0] = 1.0
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32), ignore_index=NO_REFERENCE)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for epoch in range(config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))
        net.train()
        order = rng.permutation(len(features))
        for start in range(0, len(order), config.batch_sequences):
            batch = torch.from_numpy(order[start:start + config.batch_sequences])
            logits, _ = net(features[batch], net.initial_state(len(batch)))
            loss = loss_fn(logits.reshape(-1, len(AAMI_CLASSES)), labels[batch].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
            optimizer.step()
    return net.eval()


def _segments(sequences: list[BeatSequence], length: int) -> tuple[Tensor, Tensor]:
    """Windows of `length` beats, half overlapping, from every sequence long enough."""
    features, labels = [], []
    for s in sequences:
        for start in range(0, len(s.labels) - length + 1, length // 2):
            features.append(s.features[start:start + length])
            labels.append(s.labels[start:start + length])
    if not features:
        raise ValueError(f"no record has {length} detected beats to learn from")
    return torch.from_numpy(np.stack(features)), torch.from_numpy(np.stack(labels))


@torch.no_grad()
def classify(net: StageNet, sequence: BeatSequence) -> NDArray[np.str_]:
    """The beat stage's AAMI class of every beat of a sequence, one pass."""
    if not len(sequence.features):
        return np.zeros(0, dtype=np.str_)
    logits, _ = net(torch.from_numpy(sequence.features)[None], net.initial_state(1))
    classes: NDArray[np.str_] = np.array(AAMI_CLASSES)[logits[0].argmax(-1).numpy()]
    return classes


def _matrix(sequences: list[BeatSequence], classes: list[NDArray[np.str_]]) -> NDArray[np.int64]:
    matrix = empty_matrix()
    for s, det_classes in zip(sequences, classes, strict=True):
        matrix += confusion(s.ref_s, s.ref_classes, s.time_s, det_classes)
    return matrix


def cross_validate_beat_stage(sequences: list[BeatSequence], config: BeatStageTrainConfig, seeds: list[int]
                              ) -> dict[str, Any]:
    """Gross EC57 statistics of the frame stage alone and of both stages, per seed, over held-out folds."""
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        frame_matrix, both_matrix = empty_matrix(), empty_matrix()
        for fold in sorted({s.fold for s in sequences}):
            held_out = [s for s in sequences if s.fold == fold and s.seed == seed]
            net = train_beat_stage([s for s in sequences if s.fold != fold], config, seed)
            frame_matrix += _matrix(held_out, [s.frame_classes for s in held_out])
            both_matrix += _matrix(held_out, [classify(net, s) for s in held_out])
        stats = {"frame_stage": Ec57Stats(frame_matrix).summary(), "both_stages": Ec57Stats(both_matrix).summary()}
        log.info("seed %d: S F1 %.3f -> %.3f, V F1 %.3f -> %.3f", seed, stats["frame_stage"]["S_f1"],
                 stats["both_stages"]["S_f1"], stats["frame_stage"]["V_f1"], stats["both_stages"]["V_f1"])
        per_seed.append({"seed": seed, **stats})
    summary = {stage: {key: _mean_std([r[stage][key] for r in per_seed])
                       for key in ("qrs_se", "qrs_ppv", "S_se", "S_ppv", "S_f1", "V_se", "V_ppv", "V_f1")}
               for stage in ("frame_stage", "both_stages")}
    return {"seeds": seeds, "runs": per_seed, "mean_std": summary}


def _mean_std(values: list[float]) -> list[float]:
    defined = [v for v in values if not math.isnan(v)]
    return [float(np.mean(defined)), float(np.std(defined))] if defined else [math.nan, math.nan]


def attach_beat_stage(model_path: Path, out: Path, net: StageNet, training_data: str,
                      cv_metrics: dict[str, Any]) -> BeatModel:
    """Copy the frame model at `model_path` to `out` with `net` as its beat stage (frame weights untouched; its DS2
    figures dropped until `build_beat_stage` scores both stages)."""
    return attach_stage(model_path, out, net, "beat_stage",
                        {"training_data": training_data, "cv_metrics": cv_metrics}, {"ds2_metrics": {}})


def build_beat_stage(cv_dir: Path, model_path: Path, out: Path, report_dir: Path, physionet_dir: Path,
                     leads: list[str] | None, config: BeatStageTrainConfig, cv_only: bool = False) -> dict[str, Any]:
    """Cross-validate the beat stage; unless `cv_only`, train it on every out-of-fold beat, attach it to
    `model_path` as `out`, score the result on DS2 once and embed those figures. Reports go to `report_dir`.
    `leads`: those read from each record (None: every ECG lead)."""
    sequences, cv = out_of_fold_sequences(cv_dir, physionet_dir, leads)
    report = cross_validate_beat_stage(sequences, config, cv["seeds"])
    report.update({"k": cv["k"], "folds": cv["folds"], "config": config.model_dump(mode="json"),
                   "rules": cv["rules"], "frame_models": f"{cv_dir}/runs (`ecgmon cross-validate`)"})
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "cv.json").write_text(json.dumps(report, indent=2, allow_nan=True))
    if cv_only:
        return report
    net = train_beat_stage(sequences, config, seed=report["seeds"][0])
    training_data = (f"out-of-fold beats of {', '.join(sorted({s.record for s in sequences}))} from the "
                     f"{cv['k']}-fold models of seeds {cv['seeds']}")
    model = attach_beat_stage(model_path, out, net, training_data, report["mean_std"]["both_stages"])
    ds2 = evaluate(out, ["mitdb/DS2"], physionet_dir, leads, report_dir / "ds2")
    write_metadata(out, model.info.model_copy(update={"ds2_metrics": {k: v for k, v in ds2["gross"].items()
                                                                      if k != "matrix"}}))
    report["ds2"] = ds2["gross"]
    return report


def format_beat_stage(report: dict[str, Any]) -> str:
    """Cross-validation lines for the terminal."""
    lines = []
    for stage in ("frame_stage", "both_stages"):
        m = report["mean_std"][stage]
        lines.append(f"{stage:<12} unseen patients ({len(report['seeds'])} seeds): "
                     + ", ".join(f"{key} {mean:.3f}±{std:.3f}" for key, (mean, std) in m.items()))
    g = report.get("ds2")
    if g is not None:
        lines.append(f"DS2 (scored once): QRS Se {g['qrs_se']:.4f} +P {g['qrs_ppv']:.4f}, S F1 {g['S_f1']:.3f}, "
                     f"V F1 {g['V_f1']:.3f}")
    return "\n".join(lines)

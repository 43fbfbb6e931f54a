"""Training loop: stateful truncated BPTT over record segments, early stopping on DS1 validation records.

Each epoch cuts every training record into segments (random start offset), runs
`batch_streams` segments side by side, chunk by chunk, carrying the recurrent state
(detached) from one chunk to the next. Checkpoints carry the full config, so a model can be
rebuilt from the checkpoint alone, and a run can resume from its last checkpoint.

The network reads one lead (frames in, per-frame class probabilities out, the same weights
for every lead); the daemon runs each lead of a device through it and fuses the leads'
probabilities frame by frame (`pipeline.analysis.beats.fuse_leads`). Training does the same: every
lead of a segment is a row of the batch, augmented alone (amplitude, noise, left out), and
the loss is taken on the mean of the kept leads' probabilities.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn
from tqdm import tqdm

from models.config import ModelConfig
from models.network import BeatNet, count_parameters
from pipeline.analysis.aami import AAMI_CLASSES, BACKGROUND, DS2, MODEL_CLASSES
from pipeline.analysis.beats import BeatPickerState, Decision, PickedBeats, fuse_leads, pick_beats, r_peak_time_s
from pipeline.tools.records import resolve_records
from train.config import OptimConfig, TrainConfig
from train.dataset import FramedRecord, load_framed
from train.ec57 import Ec57Stats, confusion, empty_matrix, match_beats
from train.noise import FramedNoise, framed_training_noise

log = logging.getLogger(__name__)


class DataLeakError(ValueError):
    """A DS2 (test) record was named for training or validation."""


def check_split(config: TrainConfig) -> None:
    """DS2 never trains, validates or tunes anything, however it is named ("mitdb/all", "MITDB/100", ...)."""
    for role, specs in (("train", config.data.train_records), ("val", config.data.val_records)):
        check_not_ds2(specs, f"data.{role}_records")


def check_not_ds2(specs: list[str], role: str) -> None:
    """Raise DataLeakError if record specs name any MIT-BIH DS2 record."""
    leaked = [f"{db}/{name}" for db, name in resolve_records(specs) if db == "mitdb" and (name in DS2 or name == "all")]
    if leaked:
        raise DataLeakError(f"{role} includes MIT-BIH DS2 ({', '.join(leaked)}): DS2 is test-only")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loss_weights(records: list[FramedRecord], power: float, cap: float) -> Tensor:
    """Cross-entropy weight of each of MODEL_CLASSES: min(cap, (n_N / n_c) ** power) for class c, counted in
    labelled frames; background and N weigh 1."""
    counts = dict(zip(MODEL_CLASSES, np.bincount(np.concatenate([r.labels for r in records]),
                                                  minlength=len(MODEL_CLASSES)), strict=True))
    weights = {c: 1.0 if c in (BACKGROUND, "N") else min(cap, (counts["N"] / max(counts[c], 1)) ** power)
               for c in MODEL_CLASSES}
    return torch.tensor([weights[c] for c in MODEL_CLASSES], dtype=torch.float32)


def neutral_decision(beat_threshold: float) -> Decision:
    """The decision rule with every decision weight 1 (before tuning)."""
    return Decision(beat_threshold, (1.0,) * len(AAMI_CLASSES))


Batch = tuple[Tensor, Tensor, Tensor]  # frames (segments, leads, frames, frame_size) mV, labels, lead mask


def segment_plan(records: list[FramedRecord], segment: int, batch: int, rng: np.random.Generator
                 ) -> list[NDArray[np.int64]]:
    """One epoch's segments of `segment` frames, each record cut from a random offset, shuffled and dealt into
    batches of about `batch`: one (n, 2) array (record index, first frame) per batch."""
    starts = []
    for i, record in enumerate(records):
        n_frames = record.frames.shape[1]
        first = int(rng.integers(0, segment)) if n_frames > 2 * segment else 0
        starts += [(i, s) for s in range(first, n_frames - segment + 1, segment)]
    plan = np.array(starts, dtype=np.int64).reshape(-1, 2)[rng.permutation(len(starts))]
    return np.array_split(plan, max(1, len(plan) // batch))


def lead_gain(qrs_mv: float, optim: OptimConfig, rng: np.random.Generator) -> float:
    """Gain of one lead of a segment: in `amplitude_scale_fraction` of the draws the one that puts its median QRS
    peak-to-peak (`qrs_mv`, mV) at a log-uniform amplitude in `qrs_mv_range`, else 1 ± `amplitude_jitter`."""
    if rng.random() < optim.amplitude_scale_fraction and qrs_mv > 0:
        low, high = np.log(optim.qrs_mv_range)
        return float(np.exp(rng.uniform(low, high)) / qrs_mv)
    return 1.0 + rng.uniform(-optim.amplitude_jitter, optim.amplitude_jitter)


def kept_leads(n_leads: int, dropout: float, rng: np.random.Generator) -> NDArray[np.bool_]:
    """Which leads of a segment stay in it: each is left out with probability `dropout`, but one random lead
    stays when all would go (so each of n leads is left out with probability dropout - dropout**n / n)."""
    keep = rng.random(n_leads) >= dropout
    if not keep.any():
        keep[rng.integers(n_leads)] = True
    return keep


def augmented_segment(record: FramedRecord, start: int, segment: int, optim: OptimConfig,
                      rng: np.random.Generator, noise: list[FramedNoise] | None
                      ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Frames (n_leads, segment, frame_size) of a record from frame `start`, each lead with its own gain
    (`lead_gain`) and, in `noise_fraction` of the leads, a random stretch of a random noise record at a random
    SNR (dB) of its own; and the leads kept (`kept_leads`, multi-lead records only)."""
    x = record.frames[:, start:start + segment].copy()
    for lead in range(len(x)):
        gain = lead_gain(float(record.qrs_mv[lead]), optim, rng)
        x[lead] *= gain
        if noise and rng.random() < optim.noise_fraction:
            n = noise[int(rng.integers(len(noise)))]
            at = int(rng.integers(0, len(n.frames) - segment + 1))
            snr = rng.uniform(*optim.noise_snr_db)
            x[lead] += np.sqrt(record.qrs_power_mv2[lead] * gain**2 / (n.power_mv2 * 10 ** (snr / 10))) * n.frames[
                at:at + segment]
    keep = kept_leads(len(x), optim.lead_dropout, rng) if len(x) > 1 else np.ones(1, dtype=bool)
    return x, keep


def segment_batches(records: list[FramedRecord], plan: list[NDArray[np.int64]], segment: int, optim: OptimConfig,
                    rng: np.random.Generator, noise: list[FramedNoise] | None = None) -> Iterator[Batch]:
    """The batches of `plan` (`segment_plan`), each made when it is reached: frames (segments, leads, segment,
    frame_size) mV (`augmented_segment`; records with fewer leads than the batch's most padded with zeros),
    labels (segments, segment) and the lead mask (segments, leads), 1 where a lead is kept."""
    for rows in plan:
        parts = [augmented_segment(records[i], s, segment, optim, rng, noise) for i, s in rows]
        n_leads = max(len(x) for x, _ in parts)
        frames = np.zeros((len(parts), n_leads, *parts[0][0].shape[1:]), dtype=np.float32)
        mask = np.zeros((len(parts), n_leads), dtype=np.float32)
        for row, (x, keep) in enumerate(parts):
            frames[row, :len(x)], mask[row, :len(x)] = x, keep
        labels = np.stack([records[i].labels[s:s + segment] for i, s in rows])
        yield torch.from_numpy(frames), torch.from_numpy(labels), torch.from_numpy(mask)


def fuse_rows(probs: Tensor, segment_of_row: Tensor, n_segments: int) -> Tensor:
    """Per-segment mean (segments, frames, classes) of the probabilities of its rows (rows, frames, classes): the
    rule of `pipeline.analysis.beats.fuse_leads` with weight 1 for each lead run and 0 for those left out."""
    total = probs.new_zeros((n_segments, *probs.shape[1:])).index_add(0, segment_of_row, probs)
    count = torch.bincount(segment_of_row, minlength=n_segments).clamp(min=1).to(probs.dtype)
    return total / count[:, None, None]


@torch.no_grad()
def predict_probs(model: BeatNet, records: list[FramedRecord]) -> list[NDArray[np.float32]]:
    """Per-frame class probabilities (n_frames, classes) of whole records, one pass each: every lead run alone,
    then fused with weight 1 each (`pipeline.analysis.beats.fuse_leads`), as the daemon fuses usable leads."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for record in records:
        n_leads = len(record.frames)
        logits, *_ = model(torch.from_numpy(record.frames).to(device), *model.initial_state(n_leads))
        out.append(fuse_leads(torch.softmax(logits, -1).cpu().numpy(), np.ones(n_leads)))
    return out


def pick_records(model: BeatNet, records: list[FramedRecord], decision: Decision) -> list[PickedBeats]:
    """Beats picked from one pass of `model` over each record, its leads fused."""
    return [pick_beats(probs[None], BeatPickerState(1, len(MODEL_CLASSES)), np.array([0]), decision)
            for probs in predict_probs(model, records)]


def score_picked(config: ModelConfig, records: list[FramedRecord], picked: list[PickedBeats],
                 decisions: list[Decision]) -> list[Ec57Stats]:
    """Gross EC57 statistics of picked beats against the labels, the classes re-decided by each decision."""
    matrices = [empty_matrix() for _ in decisions]
    for record, beats in zip(records, picked, strict=True):
        det_s = r_peak_time_s(beats.frame, config)
        ref_frame, ref_class = reference_beats(record)
        ref_s = r_peak_time_s(ref_frame, config)
        match = match_beats(ref_s, det_s)
        for matrix, decision in zip(matrices, decisions, strict=True):
            det_class = np.array(MODEL_CLASSES, dtype=np.str_)[decision.classify(beats.class_sum)[0]]
            matrix += confusion(ref_s, ref_class, det_s, det_class, match=match)
    return [Ec57Stats(m) for m in matrices]


def tune_decision_weights(model: BeatNet, records: list[FramedRecord], beat_threshold: float) -> Decision:
    """Decision weights for S and V (the others 1) that maximise S F1 + V F1 on the (DS1) validation records."""
    picked = pick_records(model, records, neutral_decision(beat_threshold))
    grid = (0.5, 0.7, 1.0, 1.4, 2.0)  # narrow: four validation records overfit easily
    decisions = [Decision(beat_threshold, tuple({"S": w_s, "V": w_v}.get(c, 1.0) for c in AAMI_CLASSES))
                 for w_s in grid for w_v in grid]
    stats = score_picked(model.config, records, picked, decisions)
    scores = [s.f1("S") + s.f1("V") for s in stats]
    return decisions[int(np.argmax(scores))]


def reference_beats(record: FramedRecord) -> tuple[np.ndarray, np.ndarray]:
    """Centre output frame and class of each labelled beat (labels are runs of one class)."""
    labels = record.labels
    edges = np.flatnonzero(np.diff(np.concatenate(([0], labels, [0]))) != 0)
    starts, ends = edges[:-1], edges[1:]
    keep = labels[starts] > 0
    centre = (starts[keep] + ends[keep] - 1) // 2
    return centre, np.array([MODEL_CLASSES[c] for c in labels[centre]], dtype=np.str_)


def validation_score(stats: Ec57Stats) -> float:
    """Mean of QRS F1, S F1 and V F1: what early stopping maximises."""
    qrs_f1 = 2 * stats.qrs_se * stats.qrs_ppv / max(stats.qrs_se + stats.qrs_ppv, 1e-9)
    return float(np.nanmean([qrs_f1, stats.f1("S"), stats.f1("V")]))


def save_checkpoint(path: Path, model: BeatNet, optimizer: torch.optim.Optimizer, config: TrainConfig,
                    epoch: int, history: list[dict[str, Any]], best_score: float,
                    raw_model: BeatNet | None = None) -> None:
    """Save the weights to ship (`model`, the running average), the raw weights and optimiser to resume
    from, progress and the full config."""
    torch.save({"config": config.model_dump(mode="json"), "model": model.state_dict(),
                "raw_model": (raw_model or model).state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "history": history, "best_score": best_score, "decision_weights": None}, path)


@torch.no_grad()
def update_average(average: BeatNet, model: BeatNet, decay: float, step: int) -> None:
    """average <- d * average + (1 - d) * model; d warms up to `decay` so early steps do not linger."""
    d = min(decay, (1 + step) / (10 + step))
    for avg, param in zip(average.parameters(), model.parameters(), strict=True):
        avg.lerp_(param, 1.0 - d)


def load_model(checkpoint: Path) -> tuple[BeatNet, TrainConfig, dict[str, Any]]:
    """Rebuild the network from a checkpoint alone."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    config = TrainConfig.model_validate(ckpt["config"])
    model = BeatNet(config.model)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, config, ckpt


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train per `config`; returns the run folder holding best.pt, last.pt and history.json."""
    check_split(config)
    set_seed(config.optim.seed)
    torch.set_num_threads(config.optim.threads)
    run_dir = config.out_dir / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
    mc, oc, data = config.model, config.optim, config.data

    def load(specs: list[str]) -> list[FramedRecord]:
        return load_framed(specs, data.physionet_dir, data.leads, mc, config.filter, oc.label_width_frames)

    train_records, val_records = load(data.train_records), load(data.val_records)
    noise = framed_training_noise(data.physionet_dir, mc, config.filter) if oc.noise_fraction > 0 else None
    log.info("training on %d records (%d leads), validating on %d (%d leads)", len(train_records),
             sum(len(r.leads) for r in train_records), len(val_records), sum(len(r.leads) for r in val_records))
    device = torch.device(config.device)
    model = BeatNet(mc).to(device)
    ema = BeatNet(mc).to(device)  # exponential moving average of the weights: what is validated and shipped
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=oc.lr, weight_decay=oc.weight_decay)
    # class-weighted NLL of the fused leads' log probabilities
    loss_fn = nn.NLLLoss(weight=loss_weights(train_records, oc.loss_weight_power, oc.loss_weight_max).to(device),
                         reduction="none")
    history: list[dict[str, Any]] = []
    start_epoch, best_score, best_epoch = 0, -math.inf, 0
    if resume and (run_dir / "last.pt").exists():
        _, _, ckpt = load_model(run_dir / "last.pt")
        model.load_state_dict(ckpt["raw_model"])
        ema.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, history, best_score = ckpt["epoch"] + 1, ckpt["history"], ckpt["best_score"]
        best_epoch = max(history, key=lambda h: h["val_score"])["epoch"]
        log.info("resumed %s at epoch %d", run_dir, start_epoch)
    log.info("model: %s, %d parameters", mc.cell, count_parameters(model))

    frames_per_s = mc.fs / mc.frame_size
    segment, chunk, warmup = (round(s * frames_per_s) for s in (oc.segment_s, oc.chunk_s, oc.warmup_s))
    total_epochs = oc.epochs
    steps = 0  # optimiser steps in this process (the average's warm-up restarts on resume)
    started = time.monotonic()
    for epoch in range(start_epoch, total_epochs):
        rng = np.random.default_rng(oc.seed + epoch)
        plan = segment_plan(train_records, segment, oc.batch_streams, rng)
        lr = oc.lr * 0.5 * (1 + math.cos(math.pi * epoch / total_epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        losses, grad_norms = [], []
        bar = tqdm(segment_batches(train_records, plan, segment, oc, rng, noise), total=len(plan),
                   desc=f"epoch {epoch + 1}/{total_epochs}", unit="batch", leave=False)
        for frames_cpu, labels_cpu, kept_cpu in bar:
            n_segments, n_leads = kept_cpu.shape
            rows = kept_cpu.reshape(-1).nonzero().squeeze(1)  # the kept leads, each a row of the network's batch
            frames = frames_cpu.reshape(n_segments * n_leads, *frames_cpu.shape[2:])[rows].to(device)
            segment_of_row, labels = (rows // n_leads).to(device), labels_cpu.to(device)
            state = model.initial_state(len(rows))
            for t0 in range(0, frames.shape[1], chunk):
                logits, *state_list = model(frames[:, t0:t0 + chunk], *state)
                state = tuple(s.detach() for s in state_list)
                fused = fuse_rows(torch.softmax(logits, -1), segment_of_row, n_segments)
                per_frame = loss_fn(torch.log(fused + 1e-7).reshape(-1, fused.shape[-1]),
                                    labels[:, t0:t0 + chunk].reshape(-1))
                scored = (torch.arange(t0, t0 + fused.shape[1], device=device) >= warmup).float().repeat(n_segments)
                loss = (per_frame * scored).sum() / scored.sum().clamp(min=1)
                optimizer.zero_grad()
                loss.backward()
                max_norm = oc.grad_clip if oc.grad_clip is not None else math.inf
                grad_norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
                optimizer.step()
                update_average(ema, model, oc.ema_decay, steps)
                steps += 1
                losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", grad=f"{grad_norms[-1]:.2f}")
        decision = neutral_decision(config.decision.beat_threshold)
        stats = score_picked(mc, val_records, pick_records(ema, val_records, decision), [decision])[0]
        score = validation_score(stats)
        entry = {"epoch": epoch, "lr": lr, "train_loss": float(np.mean(losses)),
                 "grad_norm_median": float(np.median(grad_norms)), "grad_norm_max": float(np.max(grad_norms)),
                 "clipped_fraction": float(np.mean(np.array(grad_norms) > (oc.grad_clip or math.inf))),
                 "val_score": score, "val": {k: v for k, v in stats.summary().items() if k != "matrix"},
                 "elapsed_s": time.monotonic() - started}
        history.append(entry)
        log.info("epoch %d: loss %.4f, grad norm median %.2f, val QRS Se %.4f +P %.4f, S F1 %.3f, V F1 %.3f, "
                 "score %.4f", epoch + 1, entry["train_loss"], entry["grad_norm_median"], stats.qrs_se,
                 stats.qrs_ppv, stats.f1("S"), stats.f1("V"), score)
        if score > best_score:
            best_score, best_epoch = score, epoch
            save_checkpoint(run_dir / "best.pt", ema, optimizer, config, epoch, history, best_score, model)
        save_checkpoint(run_dir / "last.pt", ema, optimizer, config, epoch, history, best_score, model)
        (run_dir / "history.json").write_text(json.dumps(history, indent=2))
        if oc.patience is not None and epoch - best_epoch >= oc.patience:
            log.info("early stop: no better validation score for %d epochs", oc.patience)
            break
        if oc.max_minutes is not None and time.monotonic() - started > oc.max_minutes * 60:
            log.info("stopping after %.1f min (max_minutes)", (time.monotonic() - started) / 60)
            break
    best_model, _, best_ckpt = load_model(run_dir / "best.pt")
    tuned = tune_decision_weights(best_model, val_records, config.decision.beat_threshold)
    log.info("decision weights tuned on the validation records: %s", tuned.decision_weights)
    best_ckpt["decision_weights"] = tuned.decision_weights
    torch.save(best_ckpt, run_dir / "best.pt")
    return run_dir

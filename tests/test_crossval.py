"""Patient-wise cross-validation: folds of whole patients, never DS2; a tiny recipe run end to end, on every lead."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.analysis.beats import LEAD_FUSION, fuse_leads
from pipeline.analysis.model import BeatModel
from train.config import TrainConfig
from train.crossval import patient_folds
from train.dataset import load_framed
from train.trainer import DataLeakError, load_model, predict_probs


def config(physionet: Path, **data: object) -> TrainConfig:
    return TrainConfig.model_validate({"data": {"physionet_dir": physionet, **data}})


def test_folds_hold_whole_patients_once(physionet: Path) -> None:
    c = config(physionet, train_records=["mitdb/DS1", "svdb/all"], val_records=[])
    folds = patient_folds(c, 5, seed=0)
    every = [r for fold in folds for r in fold]
    assert len(every) == len(set(every)) == 22 + 39  # each record (patient) in exactly one fold
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert not any(r.startswith("mitdb/") and r.split("/")[1] in ("100", "232") for r in every)
    assert patient_folds(c, 5, seed=0) == folds and patient_folds(c, 5, seed=1) != folds


def test_ds2_never_enters_a_fold(physionet: Path, tmp_path: Path) -> None:
    from train.crossval import cross_validate

    with pytest.raises(DataLeakError):
        cross_validate(config(physionet, train_records=["mitdb/DS1", "mitdb/232"]), 5, [0], tmp_path)


def test_a_tiny_recipe_is_cross_validated_end_to_end(tiny_cv: Path) -> None:
    report = json.loads((tiny_cv / "cv.json").read_text())
    assert report["k"] == 3 and [r["seed"] for r in report["runs"]] == [0] and len(report["folds"]) == 3
    assert 0.0 <= report["mean"]["qrs_se"] <= 1.0 and report["std"]["qrs_se"] == 0.0
    assert len(report["runs"][0]["folds"]) == 3  # trained in three processes at once


def test_fold_models_train_on_every_lead_and_validate_on_them_fused(tiny_cv: Path, physionet: Path) -> None:
    """A fold's tiny training run read both leads of its MIT-BIH records; its checkpoint's validation fuses the
    leads as the daemon does, and the exported per-lead graph, run lead by lead and fused, gives the same."""
    run, = (tiny_cv / "runs").glob("*-cv3-fold0-seed0")
    net, config, ckpt = load_model(run / "best.pt")
    assert config.data.leads is None and ckpt["decision_weights"] is not None
    history = json.loads((run / "history.json").read_text())
    assert all(np.isfinite(h["val_score"]) and 0.0 <= h["val"]["qrs_se"] <= 1.0 for h in history)
    whole, = load_framed(config.data.val_records[:1], physionet, None, config.model, config.filter, 3)
    record = dataclasses.replace(whole, frames=whole.frames[:, :1800], labels=whole.labels[:1800])  # 60 s
    assert len(record.leads) == 2
    fused, = predict_probs(net, [record])
    with torch.no_grad():
        logits, *_ = net(torch.from_numpy(record.frames), *net.initial_state(2))
    per_lead = torch.softmax(logits, -1).numpy()
    np.testing.assert_allclose(fused, fuse_leads(per_lead, np.ones(2)), atol=1e-6)
    assert np.abs(per_lead[0] - per_lead[1]).max() > 1e-3  # the leads differ, so the fusion is not trivial
    model = BeatModel(run / "model.onnx")
    probs, _ = model.run(record.frames, model.initial_state(2))  # leads as batch rows, as the daemon runs them
    np.testing.assert_allclose(fuse_leads(probs, np.ones(2)), fused, atol=1e-4)
    assert model.info.lead_fusion == LEAD_FUSION and "every ECG lead" in model.info.training_data
    alone, = predict_probs(net, [dataclasses.replace(record, leads=record.leads[:1], frames=record.frames[:1])])
    np.testing.assert_allclose(alone, per_lead[0], atol=1e-6)  # one lead works alone

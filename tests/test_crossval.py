"""Patient-wise cross-validation: folds of whole patients, never DS2; a tiny recipe run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.config import TrainConfig
from train.crossval import patient_folds
from train.trainer import DataLeakError


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

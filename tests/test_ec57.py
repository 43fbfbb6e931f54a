"""EC57 scoring, checked against wfdb-python's annotation comparison (the reference tool)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from wfdb import processing

from pipeline.tools.records import load_record
from train.ec57 import BEATS, COLS, MISSED, NO_REFERENCE, ROWS, Ec57Stats, confusion, empty_matrix


@pytest.mark.parametrize("name", ["100", "208", "232"])
def test_qrs_matching_agrees_with_wfdb(physionet: Path, name: str) -> None:
    record = load_record(physionet / "mitdb", name)
    rng = np.random.default_rng(7)
    ref = record.beat_samples
    keep = rng.random(len(ref)) > 0.03
    det = ref[keep] + rng.integers(-40, 41, keep.sum())  # up to 111 ms off
    extra = rng.integers(0, len(record.signal_mv), len(ref) // 50)
    det = np.sort(np.concatenate([det, extra]))
    reference = processing.compare_annotations(ref, det, int(0.150 * record.fs))
    det_class = np.full(len(det), "N")
    matrix = confusion(ref / record.fs, record.beat_classes, det / record.fs, det_class, skip_s=0.0)
    assert matrix[BEATS, BEATS].sum() == reference.tp
    assert matrix[BEATS, COLS.index(MISSED)].sum() == reference.fn
    assert matrix[ROWS.index(NO_REFERENCE), BEATS].sum() == reference.fp


def test_learning_period_is_not_scored() -> None:
    ref = np.array([10.0, 200.0, 301.0, 302.0])
    det = np.array([10.0, 150.0, 301.05])
    matrix = confusion(ref, np.array(["N", "V", "N", "S"]), det, np.array(["N", "N", "N"]))
    assert matrix.sum() == 2  # 301 matched N, 302 missed S; nothing before 300 s
    assert matrix[ROWS.index("N"), COLS.index("N")] == 1 and matrix[ROWS.index("S"), COLS.index(MISSED)] == 1


def test_class_statistics() -> None:
    m = empty_matrix()
    counts = {("N", "N"): 90, ("V", "V"): 8, ("V", "N"): 2, ("N", "V"): 1, ("F", "V"): 5, (NO_REFERENCE, "V"): 1,
              ("S", "S"): 4}
    for (ref, det), n in counts.items():
        m[ROWS.index(ref), COLS.index(det)] = n
    stats = Ec57Stats(m)
    assert stats.se("V") == pytest.approx(0.8)
    assert stats.ppv("V") == pytest.approx(8 / 10)  # F labelled V is not counted against V
    assert stats.f1("V") == pytest.approx(0.8)
    assert stats.qrs_se == pytest.approx(1.0)
    assert stats.qrs_ppv == pytest.approx(110 / 111)

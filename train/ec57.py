"""Beat-by-beat scoring after ANSI/AAMI EC57.

A detected beat matches a reference beat within 150 ms; beats in the first 5 minutes
(the learning period) are not scored. Each record yields a matrix whose rows are the
reference (the AAMI classes N, S, V, F, Q, then X = no reference beat) and whose columns
are the detection (N, S, V, F, Q, then O = missed): `ROWS` x `COLS`. Gross statistics sum
the matrices over records before dividing.

Class rules: Se_c = TP / (reference c beats, missed ones included); +P_c = TP / (detections
labelled c, false detections included). As EC57 allows, F beats labelled V do not count
against V +P, and Q reference beats labelled S or V do not count against S or V +P.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.analysis.aami import AAMI_CLASSES

MATCH_WINDOW_S = 0.150
LEARNING_PERIOD_S = 300.0
NO_REFERENCE = "X"  # row of detections that match no reference beat (false detections)
MISSED = "O"  # column of reference beats that match no detection
ROWS = (*AAMI_CLASSES, NO_REFERENCE)
COLS = (*AAMI_CLASSES, MISSED)
BEATS = slice(0, len(AAMI_CLASSES))  # the rows and columns that are beats


def empty_matrix() -> NDArray[np.int64]:
    """An all-zero `ROWS` x `COLS` matrix (counts)."""
    return np.zeros((len(ROWS), len(COLS)), dtype=np.int64)


def match_beats(ref_s: NDArray[np.floating[Any]], det_s: NDArray[np.floating[Any]],
                window_s: float = MATCH_WINDOW_S) -> NDArray[np.int64]:
    """For each reference beat (times in s, sorted), the index of its matched detection or -1.

    Greedy in time order: each reference beat takes the nearest unmatched detection within
    `window_s`, preferring one that is not closer to the next reference beat.
    """
    match = np.full(len(ref_s), -1, dtype=np.int64)
    used = np.zeros(len(det_s), dtype=bool)
    j = 0
    for i, t in enumerate(ref_s):
        while j < len(det_s) and det_s[j] < t - window_s:
            j += 1
        best, best_dist = -1, window_s
        k = j
        while k < len(det_s) and det_s[k] <= t + window_s:
            dist = abs(det_s[k] - t)
            closer_to_next = i + 1 < len(ref_s) and abs(ref_s[i + 1] - det_s[k]) < dist
            if not used[k] and dist <= best_dist and not closer_to_next:
                best, best_dist = k, dist
            k += 1
        if best >= 0:
            match[i] = best
            used[best] = True
    return match


def confusion(ref_s: NDArray[np.floating[Any]], ref_class: NDArray[np.str_],
              det_s: NDArray[np.floating[Any]], det_class: NDArray[np.str_],
              skip_s: float = LEARNING_PERIOD_S, match: NDArray[np.int64] | None = None) -> NDArray[np.int64]:
    """The EC57 matrix of one record (`ROWS` reference N S V F Q X, `COLS` detection N S V F Q O).

    `match` (from `match_beats`) can be passed when the same beats are scored under several labellings.
    """
    matrix = empty_matrix()
    if match is None:
        match = match_beats(ref_s, det_s)
    matched = np.zeros(len(det_s), dtype=bool)
    matched[match[match >= 0]] = True
    for i, t in enumerate(ref_s):
        if t < skip_s:
            continue
        col = COLS.index(det_class[match[i]] if match[i] >= 0 else MISSED)
        matrix[ROWS.index(ref_class[i]), col] += 1
    for k in np.flatnonzero(~matched):
        if det_s[k] >= skip_s:
            matrix[ROWS.index(NO_REFERENCE), COLS.index(det_class[k])] += 1
    return matrix


@dataclass(frozen=True)
class Ec57Stats:
    """Gross statistics (fractions 0-1) from a summed matrix."""

    matrix: NDArray[np.int64]

    def _ratio(self, num: float, den: float) -> float:
        return float(num / den) if den else float("nan")

    @property
    def qrs_se(self) -> float:
        m = self.matrix
        return self._ratio(m[BEATS, BEATS].sum(), m[BEATS, :].sum())

    @property
    def qrs_ppv(self) -> float:
        m = self.matrix
        return self._ratio(m[BEATS, BEATS].sum(), m[:, BEATS].sum())

    def se(self, cls: str) -> float:
        row = self.matrix[ROWS.index(cls)]
        return self._ratio(row[COLS.index(cls)], row.sum())

    def ppv(self, cls: str) -> float:
        column = self.matrix[:, COLS.index(cls)].copy()
        true_positives = column[ROWS.index(cls)]
        if cls == "V":
            column[ROWS.index("F")] = 0
        if cls in ("S", "V"):
            column[ROWS.index("Q")] = 0
        return self._ratio(true_positives, column.sum())

    def f1(self, cls: str) -> float:
        se, ppv = self.se(cls), self.ppv(cls)
        return 2 * se * ppv / (se + ppv) if se + ppv > 0 else 0.0

    @property
    def macro_f1(self) -> float:
        """Mean F1 over the classes that have reference beats."""
        present = [c for c in AAMI_CLASSES if self.matrix[ROWS.index(c), :].sum() > 0]
        return float(np.mean([self.f1(c) for c in present])) if present else float("nan")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"qrs_se": self.qrs_se, "qrs_ppv": self.qrs_ppv, "macro_f1": self.macro_f1}
        for cls in AAMI_CLASSES:
            out[f"{cls}_se"], out[f"{cls}_ppv"], out[f"{cls}_f1"] = self.se(cls), self.ppv(cls), self.f1(cls)
        out["matrix"] = {"rows": list(ROWS), "cols": list(COLS), "counts": self.matrix.tolist()}
        return out

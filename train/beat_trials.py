"""Trials of per-beat features the beat stage does not have, cross-validated on the same out-of-fold beats as the
shipped stage (`ecgmon beat-stage-trials`), so a feature is only built into `pipeline.analysis.beat_context` once it
helps on patients neither stage saw.

The trial features are computed offline from a sequence's beat times, with the definitions the daemon would use:
    long_irregularity, long_rr_cv: median |ΔRR| over median RR, and the standard deviation over the mean, of the
        last `LONG_BEATS` RR intervals before the beat (atrial fibrillation, where early beats are not S beats,
        against the 8 beats of `rr_irregularity`);
    next_rr_over_local: the RR interval after the beat over the local rhythm, capped at `NEXT_RR_CAP_S` (s): the
        compensatory pause after an early beat. The daemon could only have it by holding each beat back until
        the next one (up to `NEXT_RR_CAP_S`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.analysis.beat_context import DEFAULT_RR_S, FEATURE_NAMES, LOCAL_BEATS, RR_RANGE_S
from train.beat_stage import BeatSequence, cross_validate_beat_stage, out_of_fold_sequences
from train.config import BeatStageTrainConfig

log = logging.getLogger(__name__)

LONG_BEATS = 32
NEXT_RR_CAP_S = 2.0


def _rr_before(time_s: NDArray[np.float64], n: int) -> NDArray[np.float64]:
    """(beats, n): the n RR intervals (s) before each beat's own, DEFAULT_RR_S before the stream had them."""
    rr = np.clip(np.diff(time_s, prepend=time_s[0] - DEFAULT_RR_S), *RR_RANGE_S)
    padded = np.concatenate([np.full(n, DEFAULT_RR_S), rr])
    windows: NDArray[np.float64] = np.lib.stride_tricks.sliding_window_view(padded, n)[:len(rr)]
    return windows


def long_irregularity(s: BeatSequence) -> NDArray[np.float64]:
    r = _rr_before(s.time_s, LONG_BEATS)
    return np.stack([np.median(np.abs(np.diff(r, axis=1)), axis=1) / np.median(r, axis=1),
                     r.std(axis=1) / r.mean(axis=1)], axis=1)


def next_rr(s: BeatSequence) -> NDArray[np.float64]:
    local = np.median(_rr_before(s.time_s, LOCAL_BEATS), axis=1)
    after = np.append(np.diff(s.time_s), NEXT_RR_CAP_S)
    ratio: NDArray[np.float64] = np.minimum(after, NEXT_RR_CAP_S) / local
    return ratio[:, None]


Trial = list[tuple[tuple[str, ...], Callable[[BeatSequence], NDArray[np.float64]]]]
TRIALS: dict[str, Trial] = {
    "shipped features": [],
    "+ long irregularity": [(("long_irregularity", "long_rr_cv"), long_irregularity)],
    "+ next RR": [(("next_rr_over_local",), next_rr)],
    "+ both": [(("long_irregularity", "long_rr_cv"), long_irregularity), (("next_rr_over_local",), next_rr)],
}


_sequences: list[BeatSequence] = []  # the out-of-fold beats, for the trial processes (forked: shared, not copied)


def _run_trial(name: str, config: BeatStageTrainConfig, seeds: list[int]) -> dict[str, Any]:
    extra = TRIALS[name]
    names = FEATURE_NAMES + tuple(n for names, _ in extra for n in names)
    trial_config = config.model_copy(update={"model": config.model.model_copy(update={"feature_names": names})})
    trial = [dataclasses.replace(s, features=np.hstack([s.features, *(f(s).astype(np.float32) for _, f in extra)]))
             for s in _sequences]
    figures: dict[str, Any] = cross_validate_beat_stage(trial, trial_config, seeds)["mean_std"]["both_stages"]
    log.info("%s: %s", name, figures)
    return figures


def run_trials(cv_dir: Path, physionet_dir: Path, leads: list[str] | None, config: BeatStageTrainConfig, out: Path,
               jobs: int = 1) -> dict[str, Any]:
    """Cross-validate the beat stage with each trial's features added, `jobs` trials at a time (processes); write
    and return the mean ± sd figures. `leads`: those read from each record (None: every ECG lead)."""
    global _sequences
    _sequences, cv = out_of_fold_sequences(cv_dir, physionet_dir, leads)
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        figures = pool.starmap(_run_trial, [(name, config, cv["seeds"]) for name in TRIALS])
    report = {"k": cv["k"], "seeds": cv["seeds"], "folds": cv["folds"], "rules": cv["rules"],
              "config": config.model_dump(mode="json"), "trials": dict(zip(TRIALS, figures, strict=True))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def format_trials(report: dict[str, Any]) -> str:
    lines = [f"beat-stage feature trials, {report['k']}-fold patient-wise CV, seeds {report['seeds']} (mean ± sd):"]
    for name, m in report["trials"].items():
        lines.append(f"  {name:<20} S F1 {m['S_f1'][0]:.3f} ± {m['S_f1'][1]:.3f}   V F1 {m['V_f1'][0]:.3f} ± "
                     f"{m['V_f1'][1]:.3f}")
    return "\n".join(lines)

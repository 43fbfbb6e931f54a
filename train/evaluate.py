"""Evaluate an exported ONNX model the way the daemon runs it, and score it after EC57.

Every record is fed as a live stream, window by window with carried state, through
`pipeline.analysis.streams.BeatStreams` (the daemon's code path), all records batched together.
Writes per-record WFDB annotation files (for PhysioNet's `bxb`), a JSON report and plots.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import wfdb
from numpy.typing import NDArray

from pipeline.analysis.aami import AAMI_CLASSES
from pipeline.analysis.model import BeatModel
from pipeline.analysis.streams import BeatStreams
from pipeline.tools.records import EcgRecord, load_records
from train.ec57 import LEARNING_PERIOD_S, MATCH_WINDOW_S, Ec57Stats, confusion, empty_matrix

log = logging.getLogger(__name__)

# MIT-BIH symbol written for each AAMI class in the output annotations.
SYMBOL_OF_CLASS = {"N": "N", "S": "A", "V": "V", "F": "F", "Q": "Q"}
RULES = (f"ANSI/AAMI EC57 beat-by-beat: {MATCH_WINDOW_S * 1000:.0f} ms match window, first "
         f"{LEARNING_PERIOD_S / 60:.0f} min of each record not scored, gross statistics; AAMI classes from "
         "MIT-BIH symbols N={N,L,R,e,j} S={A,a,J,S} V={V,E} F={F} Q={/,f,Q} (de Chazal 2004); "
         "F labelled V not counted against V +P, Q labelled S or V not counted against S or V +P")


@dataclass(frozen=True)
class RecordResult:
    name: str
    det_samples: NDArray[np.int64]
    det_classes: NDArray[np.str_]
    matrix: NDArray[np.int64]


def stream_records(model: BeatModel, records: list[EcgRecord], window_s: float
                   ) -> list[tuple[NDArray[np.int64], NDArray[np.str_]]]:
    """Detected beats (samples at each record's fs, AAMI class) of records streamed in `window_s` windows."""
    streams = BeatStreams(model, capacity=len(records))
    for record in records:
        streams.open(record.name, record.fs)
    found: dict[str, list[tuple[float, str]]] = {r.name: [] for r in records}
    for k in range(max(r.window_count(window_s) for r in records)):
        windows = [(r.name, r.sig_names, r.window(k, window_s).samples_mv) for r in records
                   if k < r.window_count(window_s)]
        for beat in streams.process(windows):
            found[beat.stream_id].append((beat.time_s, beat.class_name))
    out = []
    for r in records:
        times = np.array([t for t, _ in found[r.name]])
        samples = np.clip(np.round(times * r.fs).astype(np.int64), 0, r.signals_mv.shape[1] - 1)
        out.append((samples, np.array([c for _, c in found[r.name]], dtype=np.str_)))
    return out


def write_annotations(result: RecordResult, fs: float, out_dir: Path, annotator: str) -> None:
    """Write the detections as WFDB annotations `<record>.<annotator>` in `out_dir`."""
    if not len(result.det_samples):
        log.warning("record %s: no beats detected, no annotation file written", result.name)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    wfdb.wrann(result.name, annotator, sample=result.det_samples,
               symbol=[SYMBOL_OF_CLASS[c] for c in result.det_classes], fs=fs, write_dir=str(out_dir))


def evaluate(model_path: Path, specs: list[str], physionet_dir: Path, leads: list[str] | None, out_dir: Path,
             annotator: str = "ecgm", window_s: float = 1.0, history: Path | None = None,
             qrs_mv: float | None = None) -> dict[str, Any]:
    """Score `model_path` on the records named by `specs` (`leads`: as `load_records`, None: every ECG lead), each
    lead rescaled to a median QRS peak-to-peak of `qrs_mv` (mV) when given; write annotations, report.json and
    plots."""
    from train.noise import rescale_qrs

    named = load_records(specs, physionet_dir, leads)
    records = [record if qrs_mv is None else rescale_qrs(record, qrs_mv) for _, record in named]
    model = BeatModel(model_path)
    started = time.perf_counter()
    detections = stream_records(model, records, window_s)
    elapsed = time.perf_counter() - started
    results, total = [], empty_matrix()
    for record, (det_samples, det_classes) in zip(records, detections, strict=True):
        matrix = confusion(record.beat_samples / record.fs, record.beat_classes, det_samples / record.fs,
                           det_classes)
        result = RecordResult(record.name, det_samples, det_classes, matrix)
        write_annotations(result, record.fs, out_dir / "annotations", annotator)
        results.append(result)
        total += matrix
    gross = Ec57Stats(total)
    report: dict[str, Any] = {
        "model": str(model_path), "model_version": model.info.version, "records": [name for name, _ in named],
        "leads": leads or "every ECG lead", "qrs_mv": qrs_mv, "window_s": window_s, "rules": RULES,
        "annotator": annotator,
        "streaming_seconds": elapsed, "ecg_hours": sum(r.signals_mv.shape[1] / r.fs for r in records) / 3600,
        "gross": gross.summary(),
        "per_record": [{"record": r.name, **{k: v for k, v in Ec57Stats(r.matrix).summary().items()
                                             if k != "matrix"}, "matrix": r.matrix.tolist()} for r in results],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=True))
    from train.plots import plot_confusion, plot_per_record, plot_training_curves  # matplotlib only here
    plot_confusion(total, out_dir / "confusion.png")
    plot_per_record(report["per_record"], out_dir / "per_record.png")
    if history is not None:
        plot_training_curves(json.loads(history.read_text()), out_dir / "training_curves.png")
    log.info("scored %d records in %.1f s: QRS Se %.4f +P %.4f; S F1 %.3f; V F1 %.3f", len(records), elapsed,
             gross.qrs_se, gross.qrs_ppv, gross.f1("S"), gross.f1("V"))
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    g = report["gross"]
    lines = [f"{len(report['records'])} records, {report['ecg_hours']:.1f} h of ECG streamed in "
             f"{report['streaming_seconds']:.1f} s ({report['rules']})",
             f"QRS  Se {100 * g['qrs_se']:.2f} %  +P {100 * g['qrs_ppv']:.2f} %"]
    lines += [f"{c:<4} Se {100 * g[f'{c}_se']:.1f} %  +P {100 * g[f'{c}_ppv']:.1f} %  F1 {g[f'{c}_f1']:.3f}"
              for c in AAMI_CLASSES]
    lines.append(f"macro F1 {g['macro_f1']:.3f}")
    return "\n".join(lines)

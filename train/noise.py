"""Noise stress after the MIT-BIH Noise Stress Test: real recorded noise added to clean records at a chosen SNR.

The noise comes from nstdb's noise records (`bw` baseline wander, `em` electrode motion, `ma` muscle
artefact; 360 Hz, channel 0). Each is split in time: the first half (`TRAIN_PART`) may augment training,
the second half (`EVAL_PART`) only evaluates, so no evaluation noise is ever trained on. The test records
118e*/119e* are never used for training either.

`rescale_qrs` sets each lead's QRS amplitude instead (`--qrs-mv` of `ecgmon evaluate` and `evaluate-alarms`).

SNR as the Noise Stress Test defines it: S = (QRS peak-to-peak amplitude)² / 8, the amplitude being the
median over the record's reference beats; N = the mean square of the added noise; SNR = 10 log10(S / N) dB.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from models.config import ModelConfig
from pipeline.analysis.dsp import FilterSpec, Preprocessor
from pipeline.analysis.model import BeatModel
from pipeline.config import AlarmConfig
from pipeline.detectors.qrs import QrsDetectorBank
from pipeline.tools.records import EcgRecord, ensure_records, load_records
from train.ec57 import Ec57Stats, confusion, empty_matrix

log = logging.getLogger(__name__)

NOISE_RECORDS = ("bw", "em", "ma")
TRAIN_PART = (0.0, 0.5)  # fraction of each noise record that training may use
EVAL_PART = (0.5, 1.0)  # ... and that only evaluation uses
QRS_HALF_WIDTH_S = 0.06  # around each reference R peak, for its peak-to-peak amplitude (s)
DETECTION_LAG_S = 0.05  # the second QRS detector's detection after the R peak, median on MIT-BIH DS1 (s)


def load_noise(physionet_dir: Path, name: str, part: Literal["train", "eval"]) -> tuple[NDArray[np.float64], float]:
    """Channel 0 of nstdb noise record `name` (mV) restricted to its training or evaluation part, and its fs (Hz)."""
    if name not in NOISE_RECORDS:
        raise ValueError(f"noise {name!r} is not one of {NOISE_RECORDS}")
    db_dir = physionet_dir / "nstdb"
    ensure_records(db_dir, [name], "nstdb")
    import wfdb  # only here: the noise records have no beat annotations for load_record

    rec = wfdb.rdrecord(str(db_dir / name), channels=[0], physical=True)
    signal = np.nan_to_num(rec.p_signal[:, 0].astype(np.float64))
    a, b = TRAIN_PART if part == "train" else EVAL_PART
    return signal[round(a * len(signal)):round(b * len(signal))], float(rec.fs)


@dataclass(frozen=True)
class FramedNoise:
    """The training half of a noise record as the network sees it.

    Attributes:
        name: "bw", "em" or "ma".
        frames: (n_frames, frame_size) the noise through the shared DSP at the model rate (mV).
        power_mv2: mean square of the raw noise, its mean removed (mV²): the N of the SNR.
    """

    name: str
    frames: NDArray[np.float32]
    power_mv2: float


def framed_training_noise(physionet_dir: Path, config: ModelConfig, spec: FilterSpec) -> list[FramedNoise]:
    """Every noise record's training half, filtered and framed like the ECG (the DSP is linear, so the
    frames of ECG plus noise are the frames of each added up, but for the filter's first samples)."""
    out = []
    for name in NOISE_RECORDS:
        noise, fs = load_noise(physionet_dir, name, "train")
        frames = Preprocessor(spec, fs, config.fs, config.frame_size)(noise)
        out.append(FramedNoise(name, frames, float(np.mean((noise - noise.mean()) ** 2))))
    return out


def qrs_amplitude_mv(record: EcgRecord, lead: int = 0) -> float:
    """Median peak-to-peak amplitude (mV) of the record's reference QRS complexes in lead `lead` (index), or of the
    complexes the second QRS detector finds there in a record without reference beats (`detected_qrs`)."""
    half = round(QRS_HALF_WIDTH_S * record.fs)
    x = record.signals_mv[lead]
    centres = record.beat_samples if len(record.beat_samples) else detected_qrs(x, record.fs)
    amplitudes = [np.ptp(x[max(0, s - half):s + half + 1]) for s in centres]
    if not amplitudes:
        raise ValueError(f"record {record.name}: no QRS complexes in lead {record.sig_names[lead]} to scale noise to")
    return float(np.median(amplitudes))


def rescale_qrs(record: EcgRecord, qrs_mv: float) -> EcgRecord:
    """`record` with each lead scaled so that its median QRS peak-to-peak (`qrs_amplitude_mv`) is `qrs_mv` (mV): the
    small or large complexes of other patients and electrode placements, on annotated records."""
    gains = np.array([qrs_mv / qrs_amplitude_mv(record, lead) for lead in range(len(record.sig_names))])
    return dataclasses.replace(record, signals_mv=record.signals_mv * gains[:, None])


def detected_qrs(x: NDArray[np.float64], fs: float) -> NDArray[np.int64]:
    """QRS centres (samples) in `x` (mV at `fs` Hz) by the daemon's second QRS detector (`pipeline.detectors.qrs`)
    on the shared DSP's band-pass; its detections come DETECTION_LAG_S after the R peak."""
    bank = QrsDetectorBank(1, fs)
    filtered = Preprocessor(FilterSpec(), fs, fs, 1)(x).ravel()  # the shared band-pass, at the record's own rate
    found: set[float] = set()
    step = round(fs)
    for k in range(0, len(x), step):  # 1 s at a time, as the daemon feeds it
        bank.update(np.array([0]), filtered[None, k:k + step])
        found.update(bank.recent_s(np.array([0])).tolist())
    return np.array([round((t - DETECTION_LAG_S) * fs) for t in sorted(found) if t >= DETECTION_LAG_S],
                    dtype=np.int64)


NOISE_LEAD_OFFSET_S = 37.0  # each further noisy lead gets the noise from this much later (s): leads pick up their own


def add_noise(record: EcgRecord, noise: NDArray[np.float64], noise_fs: float, snr_db: float,
              offset_s: float = 0.0, leads: list[int] | None = None) -> EcgRecord:
    """`record` with `noise` (mV at `noise_fs` Hz, from `offset_s` on, repeated as needed) added at `snr_db` to
    each lead of `leads` (indices; None: every lead), at that lead's own QRS amplitude."""
    n = record.signals_mv.shape[1]
    signals = record.signals_mv.copy()
    for k, lead in enumerate(range(len(signals)) if leads is None else leads):
        start = offset_s + k * NOISE_LEAD_OFFSET_S
        t = (start + np.arange(n) / record.fs) * noise_fs % len(noise)  # noise sample of each record sample
        resampled = np.interp(t, np.arange(len(noise)), noise)
        resampled -= resampled.mean()
        signal_power = qrs_amplitude_mv(record, lead) ** 2 / 8
        signals[lead] += np.sqrt(signal_power / (np.mean(resampled**2) * 10 ** (snr_db / 10))) * resampled
    return dataclasses.replace(record, signals_mv=signals)


def evaluate_noise(model_path: Path, specs: list[str], physionet_dir: Path, leads: list[str] | None,
                   noise_name: str, snrs_db: list[float], out_dir: Path, window_s: float = 1.0,
                   noisy_leads: list[int] | None = None) -> dict[str, Any]:
    """Score `model_path` on the records (`leads`: as `load_records`) with evaluation noise added at each SNR to
    the leads `noisy_leads` (0-based indices; None: every lead); write noise-<name>.json to `out_dir`.

    Per SNR: EC57 gross statistics over everything, the share of windows the daemon's signal check
    flags as unreadable (flat, saturated, or judged unreadable by the model's signal-quality detector
    as of the window's end), and the statistics over the readable windows only (beats and detections
    in flagged windows left out), which is what reaches the non-lethal beat-based alarms.
    """
    from train.alarm_eval import analyse_records  # the daemon's code path

    records = [record for _, record in load_records(specs, physionet_dir, leads)]
    noise, noise_fs = load_noise(physionet_dir, noise_name, "eval")
    model = BeatModel(model_path)
    config = AlarmConfig()
    levels = []
    for snr in snrs_db:
        noisy = [add_noise(r, noise, noise_fs, snr, offset_s=60.0 * k,
                           leads=None if noisy_leads is None else [i for i in noisy_leads if i < len(r.sig_names)])
                 for k, r in enumerate(records)]
        found: list[list[tuple[float, str]]] = [[] for _ in noisy]
        flags: list[list[bool]] = [[] for _ in noisy]
        for w in analyse_records(model, noisy, config, window_s):
            found[w.record] += w.beats
            flags[w.record].append(w.check.flat or w.check.saturated or w.check.unreadable)
        everything, readable = empty_matrix(), empty_matrix()
        flagged_windows = total_windows = 0
        for record, beats, flagged_list in zip(noisy, found, flags, strict=True):
            ref_s = record.beat_samples / record.fs
            det_s = np.array([t for t, _ in beats])
            det_classes = np.array([c for _, c in beats], dtype=np.str_)
            everything += confusion(ref_s, record.beat_classes, det_s, det_classes)
            flagged = np.array(flagged_list, dtype=bool)
            flagged_windows, total_windows = flagged_windows + int(flagged.sum()), total_windows + len(flagged)
            keep_ref = ~_in_flagged(ref_s, flagged, window_s)
            keep_det = ~_in_flagged(det_s, flagged, window_s)
            readable += confusion(ref_s[keep_ref], record.beat_classes[keep_ref], det_s[keep_det],
                                  det_classes[keep_det])
        level: dict[str, Any] = {"snr_db": snr, "flagged_windows": flagged_windows / total_windows,
                                 "all": Ec57Stats(everything).summary(),
                                 "readable": Ec57Stats(readable).summary()}
        log.info("%s at %g dB: QRS +P %.4f Se %.4f; %.1f %% of windows flagged; readable +P %.4f", noise_name, snr,
                 level["all"]["qrs_ppv"], level["all"]["qrs_se"], 100 * level["flagged_windows"],
                 level["readable"]["qrs_ppv"])
        levels.append(level)
    report: dict[str, Any] = {
        "model": str(model_path), "model_version": model.info.version, "records": specs, "leads": leads,
        "noisy_leads": "every lead" if noisy_leads is None else [i + 1 for i in noisy_leads], "noise": noise_name,
        "noise_part": f"second half of nstdb/{noise_name} (never used for training)",
        "snr_definition": "S = (median reference QRS peak-to-peak amplitude)^2 / 8, N = mean square of the added "
                          "noise", "window_s": window_s, "levels": levels}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"noise-{noise_name}.json").write_text(json.dumps(report, indent=2, allow_nan=True))
    return report


def _in_flagged(times_s: NDArray[np.floating[Any]], flagged: NDArray[np.bool_], window_s: float) -> NDArray[np.bool_]:
    index = np.minimum((times_s / window_s).astype(np.int64), len(flagged) - 1)
    return flagged[index] if len(flagged) else np.zeros(len(times_s), dtype=bool)


def format_noise(report: dict[str, Any]) -> str:
    """The noise report as a small table for the terminal."""
    lines = [f"{report['noise']} noise on {', '.join(report['records'])}, leads {report['noisy_leads']} "
             f"({report['noise_part']})",
             "SNR dB | QRS Se % | QRS +P % | V F1 | S F1 | windows flagged % | readable QRS +P %"]
    for lv in report["levels"]:
        a, r = lv["all"], lv["readable"]
        lines.append(f"{lv['snr_db']:>6g} | {100 * a['qrs_se']:8.2f} | {100 * a['qrs_ppv']:8.2f} | "
                     f"{a['V_f1']:.3f} | {a['S_f1']:.3f} | {100 * lv['flagged_windows']:17.1f} | "
                     f"{100 * r['qrs_ppv']:.2f}")
    return "\n".join(lines)


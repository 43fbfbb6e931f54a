"""Training examples: records filtered by the shared DSP lead by lead, framed, with per-frame beat labels."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from models.config import ModelConfig
from pipeline.analysis.aami import MODEL_CLASSES
from pipeline.analysis.beats import r_peak_output_frame
from pipeline.analysis.dsp import FilterSpec, Preprocessor
from pipeline.tools.records import EcgRecord, load_records
from train.noise import qrs_amplitude_mv


@dataclass(frozen=True)
class FramedRecord:
    """A record as the network sees it: each lead a stream of its own, one set of labels for all.

    Attributes:
        name: "db/record".
        leads: each lead's name, e.g. ("MLII", "V1").
        frames: (n_leads, n_frames, frame_size) filtered ECG at the model rate, mV, each lead filtered alone.
        labels: (n_frames,) class index per output frame (0 = background), already delayed.
        qrs_power_mv2: (n_leads,) (median reference QRS peak-to-peak)² / 8 of each lead (mV²): the S of a noise SNR.
    """

    name: str
    leads: tuple[str, ...]
    frames: NDArray[np.float32]
    labels: NDArray[np.int64]
    qrs_power_mv2: NDArray[np.float64]

    @property
    def qrs_mv(self) -> NDArray[np.float64]:
        """(n_leads,) median reference QRS peak-to-peak amplitude of each lead (mV)."""
        return np.sqrt(8 * self.qrs_power_mv2)


def frame_labels(record: EcgRecord, config: ModelConfig, n_frames: int, width: int) -> NDArray[np.int64]:
    """Per-frame labels: `width` frames centred on each beat's frame, shifted by the output delay."""
    labels = np.zeros(n_frames, dtype=np.int64)
    out_frame = r_peak_output_frame(record.beat_samples / record.fs, config)
    class_index = np.array([MODEL_CLASSES.index(c) for c in record.beat_classes], dtype=np.int64)
    for offset in range(-(width // 2), width - width // 2):
        f = out_frame + offset
        ok = (f >= 0) & (f < n_frames)
        labels[f[ok]] = class_index[ok]
    return labels


def frame_record(record: EcgRecord, config: ModelConfig, spec: FilterSpec, label_width: int) -> FramedRecord:
    """Filter, resample and frame every lead of one record with the daemon's DSP (a filter per lead, as the
    daemon runs it), and label its frames."""
    frames = np.stack([Preprocessor(spec, record.fs, config.fs, config.frame_size)(x) for x in record.signals_mv])
    power = np.array([qrs_amplitude_mv(record.only([i])) ** 2 / 8 for i in range(len(record.sig_names))])
    return FramedRecord(record.name, record.sig_names, frames,
                        frame_labels(record, config, frames.shape[1], label_width), power)


def load_framed(specs: list[str], physionet_dir: Path, leads: list[str] | None, config: ModelConfig,
                spec: FilterSpec, label_width: int) -> list[FramedRecord]:
    """Read (downloading when missing) and frame every record named by `specs`, with the `leads` of each
    (`pipeline.tools.records.pick_leads`: None for every ECG lead)."""
    return [dataclasses.replace(frame_record(record, config, spec, label_width), name=name)
            for name, record in load_records(specs, physionet_dir, leads)]

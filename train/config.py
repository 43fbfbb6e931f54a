"""Training configuration: strict (unknown keys and bad values are errors naming the key)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from models.config import BeatStageConfig, ModelConfig, RhythmStageConfig
from pipeline.analysis.dsp import FilterSpec
from pipeline.config import ConfigError, Strict, validate_config
from pipeline.tools import DEFAULT_PHYSIONET_DIR

__all__ = ["ConfigError", "TrainConfig", "load_train_config"]


class DataConfig(Strict):
    """Which records train, validate and test the model."""

    physionet_dir: Path = DEFAULT_PHYSIONET_DIR
    leads: list[str] | None = Field(None, min_length=1, description="leads read from each record, names "
                                    "('MLII') or 1-based signal numbers ('2'), those a record has, else its first "
                                    "ECG lead; null: every ECG lead (MIT-BIH and svdb: 2)")
    train_records: list[str] = Field(default_factory=lambda: ["mitdb/DS1"],
                                     description="'db/record', or 'mitdb/DS1' and 'svdb/all' for whole sets")
    val_records: list[str] = Field(default_factory=lambda: ["106", "118", "201", "223"],
                                   description="MIT-BIH DS1 records held out for early stopping")
    test_records: list[str] = Field(default_factory=lambda: ["mitdb/DS2"])


class OptimConfig(Strict):
    """Truncated BPTT and optimiser settings. Times in seconds of ECG."""

    epochs: int = Field(20, ge=1)
    batch_streams: int = Field(32, ge=1, description="parallel record segments per batch")
    segment_s: float = Field(180.0, gt=0, description="length of one stream segment (s)")
    chunk_s: float = Field(10.0, gt=0, description="truncated BPTT length (s)")
    warmup_s: float = Field(2.0, ge=0, description="loss ignored at the start of each segment (s)")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    ema_decay: float = Field(0.99, ge=0, lt=1, description="per-step decay of the weight average that ships")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null disables")
    loss_weight_power: float = Field(0.5, ge=0, description="loss weight of class c = (n_N / n_c) ** power")
    loss_weight_max: float = Field(10.0, ge=1, description="cap on a class's loss weight")
    label_width_frames: int = Field(3, ge=1, description="frames labelled per beat, centred")
    amplitude_jitter: float = Field(0.2, ge=0, description="random gain 1 +- this per lead of a segment, where "
                                    "its amplitude is not rescaled")
    amplitude_scale_fraction: float = Field(0.5, ge=0, le=1, description="share of leads rescaled so that their "
                                            "median QRS peak-to-peak lands in qrs_mv_range")
    qrs_mv_range: tuple[float, float] = Field((0.1, 5.0), description="range of that rescaled QRS peak-to-peak "
                                              "(mV), log-uniform")
    noise_fraction: float = Field(0.0, ge=0, le=1, description="share of leads with recorded noise added (the "
                                  "training half of nstdb bw/em/ma), drawn for each lead of a segment alone")
    noise_snr_db: tuple[float, float] = Field((0.0, 24.0), description="SNR range of that noise (dB), uniform")
    lead_dropout: float = Field(0.3, ge=0, lt=1, description="chance that a lead of a multi-lead segment is left "
                                "out of it (one lead is always kept)")
    threads: int = Field(2, ge=1)
    seed: int = 0
    patience: int | None = Field(6, ge=1, description="stop after this many epochs without a better val score")
    max_minutes: float | None = Field(None, gt=0, description="stop after this wall time (min)")

    @field_validator("qrs_mv_range")
    @classmethod
    def _qrs_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"QRS amplitudes {list(value)}: need 0 < low <= high (mV)")
        return value


class DecisionConfig(Strict):
    """Beat picking on the per-frame outputs; exported as model metadata."""

    beat_threshold: float = Field(0.5, gt=0, lt=1, description="P(beat) that opens a beat")


class TrainConfig(Strict):
    name: str = "ecgmon-lstm"
    model: ModelConfig = ModelConfig()
    filter: FilterSpec = FilterSpec()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    decision: DecisionConfig = DecisionConfig()
    out_dir: Path = Path("runs")
    device: Literal["cpu", "cuda"] = "cpu"

    def hash(self) -> str:
        """Short stable hash of the whole config (hex)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class BeatStageTrainConfig(Strict):
    """Training of the beat-sequence stage on out-of-fold frame-stage beats (`ecgmon train-beat-stage`)."""

    model: BeatStageConfig = BeatStageConfig()
    epochs: int = Field(15, ge=1)
    sequence_beats: int = Field(256, ge=8, description="beats per training sequence (state starts at zero)")
    batch_sequences: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, description="peak learning rate, cosine decay")
    weight_decay: float = Field(1e-3, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    loss_weight_power: float = Field(0.5, ge=0, description="loss weight of class c = (n_N / n_c) ** power")
    loss_weight_max: float = Field(10.0, ge=1)
    threads: int = Field(2, ge=1)


class RhythmTrainConfig(Strict):
    """Training of the rhythm stage on each lead's windows (`ecgmon train-rhythm`)."""

    model: RhythmStageConfig = RhythmStageConfig()
    epochs: int = Field(20, ge=1)
    segment_windows: int = Field(120, ge=8, description="windows per training segment (state starts at zero)")
    batch_segments: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, description="peak learning rate, cosine decay")
    loss_weight_power: float = Field(1.0, ge=0, description="loss weight of class c = (n_max / n_c) ** power")
    loss_weight_max: float = Field(50.0, ge=1)


def load_train_config(path: Path, overrides: dict[str, object] | None = None) -> TrainConfig:
    """Load and validate a YAML training config; `overrides` maps dotted keys to values."""
    raw = apply_overrides(yaml.safe_load(path.read_text()) or {}, overrides or {})
    return validate_config(TrainConfig, raw, str(path))


def apply_overrides(raw: dict[str, Any], overrides: dict[str, object]) -> dict[str, Any]:
    """Set each dotted key of `overrides` ("optim.epochs": 2) in the nested `raw`, in place; returns `raw`."""
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw

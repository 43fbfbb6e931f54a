"""The networks' configurations (no torch): saved in every checkpoint and, as part of ModelInfo, in every ONNX
file, so a network can be rebuilt from either."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.analysis.aami import AAMI_CLASSES, MODEL_CLASSES
from pipeline.analysis.beat_context import FEATURE_NAMES
from pipeline.detectors.rhythm import RHYTHM_CLASSES, RHYTHM_FEATURE_NAMES


class ModelConfig(BaseModel):
    """Everything needed to rebuild the network, the model rate and its frame timing included."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    fs: float = Field(360.0, gt=0, description="model sampling rate (Hz)")
    frame_size: int = Field(12, ge=1, description="samples per frame at fs")
    encoder_dim: int = Field(32, ge=1, description="width of the frame encoder")
    hidden_size: int = Field(64, ge=1)
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    output_delay_frames: int = Field(8, ge=0, description="frames between an R peak and its output")

    @property
    def num_classes(self) -> int:
        return len(MODEL_CLASSES)

    @property
    def frame_s(self) -> float:
        """Duration of one frame (s)."""
        return self.frame_size / self.fs

    @property
    def output_delay_s(self) -> float:
        """Time (s) from a beat's R peak to the output frame that reports it."""
        return self.output_delay_frames * self.frame_size / self.fs


class StageConfig(BaseModel):
    """A sequence stage: a dense layer and a GRU stepping once per event (a beat, a window) over named features,
    giving each step's class probabilities."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature_names: tuple[str, ...] = Field(description="inputs of each step, in order")
    classes: tuple[str, ...] = Field(description="outputs of each step, in order")
    hidden_size: int = Field(32, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


class BeatStageConfig(StageConfig):
    """The beat-sequence network: steps once per detected beat over `pipeline.analysis.beat_context` features,
    re-deciding each beat's AAMI class with the stream's rhythm in view."""

    feature_names: tuple[str, ...] = Field(FEATURE_NAMES, description="per-beat inputs, in order")
    classes: tuple[str, ...] = Field(AAMI_CLASSES, description="AAMI classes, in order")


class RhythmStageConfig(StageConfig):
    """The rhythm network: steps once per window of each lead over `pipeline.detectors.rhythm` features, saying
    which rhythm the lead shows."""

    feature_names: tuple[str, ...] = Field(RHYTHM_FEATURE_NAMES, description="per-window inputs, in order")
    classes: tuple[str, ...] = Field(RHYTHM_CLASSES, description="rhythm classes, in order")
    hidden_size: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

"""The exported beat model in ONNX Runtime: metadata, state layout and batched steps.

The ONNX file is the single source of truth: the daemon takes the model rate, frame size,
output delay, filter, class names and decision rule from its metadata, never from
constants of its own. A model may carry sequence stages (`models.network.StageNet`), each a small ONNX graph
of its own stored in the same file's metadata (base64), so one file still holds the whole model: the beat
stage (`BEAT_STAGE_KEY`), which re-decides each beat's class from its rhythm context, and the rhythm stage
(`RHYTHM_STAGE_KEY`), which says each lead's rhythm window by window (`pipeline.detectors.rhythm`).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.config import BeatStageConfig, ModelConfig, RhythmStageConfig, StageConfig
from pipeline.analysis.beat_context import FEATURE_NAMES
from pipeline.analysis.beats import Decision
from pipeline.analysis.dsp import FilterSpec
from pipeline.detectors.af import AF_FEATURE_NAMES, AfDetectorInfo
from pipeline.detectors.quality import QUALITY_FEATURE_NAMES, QualityDetectorInfo
from pipeline.detectors.rhythm import RHYTHM_FEATURE_NAMES
from pipeline.detectors.vf import VF_FEATURE_NAMES, VfDetectorInfo

FRAMES_INPUT = "frames"
PROBS_OUTPUT = "probs"
STATE_OUT_SUFFIX = "_out"
FEATURES_INPUT = "features"
STAGE_STATE_INPUT = "h"
BEAT_STAGE_KEY = "beat_stage_onnx"
RHYTHM_STAGE_KEY = "rhythm_stage_onnx"
# Parts a model may lack.
OPTIONAL_PARTS = frozenset({"beat_stage", "rhythm_stage", "vf_detector", "af_detector", "quality_detector",
                            "lead_fusion"})
# What onnxruntime raises for a file it cannot load (its exception classes derive from Exception directly).
ORT_LOAD_ERRORS = (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail, ort_errors.NoSuchFile,
                   ort_errors.InvalidArgument, ort_errors.NotImplemented, ort_errors.RuntimeException)


class ModelError(RuntimeError):
    """The model file is missing, unreadable or not an ecgmon beat model."""


class Provenance(BaseModel):
    """Where a sequence stage comes from."""

    version: str = Field(description="hash of the stage's weights")
    training_data: str
    cv_metrics: dict[str, Any] = Field(description="what its cross-validation measured")


class BeatStageInfo(BeatStageConfig, Provenance):
    """The beat-sequence stage's network config and provenance."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RhythmStageInfo(RhythmStageConfig, Provenance):
    """The rhythm stage's network config, provenance, and the probability of each alarm rhythm at or above which
    a lead shows it (`pipeline.detectors.rhythm`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    thresholds: dict[str, float] = Field(description="rhythm class -> probability at or above which a lead shows it")


class ModelInfo(ModelConfig):
    """What the daemon needs to know about a model, read from the ONNX metadata: the network's config (model
    rate, frame size, output delay and the rest, enough to rebuild the network) and how to run it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: str
    class_names: tuple[str, ...]
    beat_threshold: float = Field(gt=0, lt=1)
    decision_weights: tuple[float, ...] = Field(description="decision weight of each non-background class")
    filter: FilterSpec
    config_hash: str = Field(description="hash of the training config (TrainConfig.hash)")
    training_data: str
    ds2_metrics: dict[str, Any] = Field(description="gross EC57 statistics on DS2 (fractions 0-1); {} if not scored")
    af_detector: AfDetectorInfo | None = Field(None, description="atrial fibrillation from the beat sequence "
                                               "(`pipeline.detectors.af`), null when the model has none")
    vf_detector: VfDetectorInfo | None = Field(None, description="ventricular fibrillation from the signal "
                                               "(`pipeline.detectors.vf`), null when the model has none")
    quality_detector: QualityDetectorInfo | None = Field(None, description="unreadable signal "
                                                         "(`pipeline.detectors.quality`), null when the model has none")
    beat_stage: BeatStageInfo | None = Field(None, description="the beat-sequence stage, null when the frame stage "
                                             "decides the classes alone")
    rhythm_stage: RhythmStageInfo | None = Field(None, description="the rhythm stage, null when the model has none")
    lead_fusion: str | None = Field(None, description="the rule the network was trained to have a device's leads "
                                    "fused by (`pipeline.analysis.beats.LEAD_FUSION`), null when it was trained on one "
                                    "lead at a time")

    @property
    def decision(self) -> Decision:
        return Decision(self.beat_threshold, self.decision_weights)

    def to_metadata(self) -> dict[str, str]:
        """ONNX metadata_props: each field JSON-encoded under its own key."""
        return {key: json.dumps(value) for key, value in self.model_dump(mode="json").items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> ModelInfo:
        """Parse metadata_props written by `to_metadata`; every field must be there, no default stands in, but
        for the optional parts a model may lack (OPTIONAL_PARTS: then None)."""
        missing = sorted(set(cls.model_fields) - OPTIONAL_PARTS - props.keys())
        if missing:
            raise ModelError(f"model metadata is incomplete or invalid: no {', '.join(missing)}")
        try:
            return cls.model_validate({key: json.loads(value) for key, value in props.items()
                                       if key in cls.model_fields})
        except (ValidationError, json.JSONDecodeError) as err:
            raise ModelError(f"model metadata is incomplete or invalid: {err}") from err


def open_session(model: str | bytes, options: ort.SessionOptions, what: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except ORT_LOAD_ERRORS as err:
        raise ModelError(f"cannot load {what}: {err}") from err


class SequenceStage:
    """A sequence stage in ONNX Runtime: one step per beat or window, batched across streams."""

    def __init__(self, props: dict[str, str], key: str, info: StageConfig, computed: tuple[str, ...], command: str,
                 options: ort.SessionOptions, path: Path) -> None:
        """`key`: where `props` (the file's metadata) holds its graph; `computed`: the features this version of
        ecgmon computes for it; `command`: the one that trains it."""
        if key not in props:
            raise ModelError(f"{path}: metadata describes a stage but holds no {key}")
        try:
            model = base64.b64decode(props[key], validate=True)
        except (binascii.Error, ValueError) as err:
            raise ModelError(f"{path}: {key} is not base64: {err}") from err
        self._session = open_session(model, options, f"the stage {key} of {path}")
        self.info = info
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        if set(inputs) != {FEATURES_INPUT, STAGE_STATE_INPUT} or inputs[FEATURES_INPUT][-1] != len(info.feature_names):
            raise ModelError(f"{path}: {key} inputs {inputs} do not match its metadata")
        if info.feature_names != computed:
            raise ModelError(f"{path}: {key} takes the features {info.feature_names}, but this version of ecgmon "
                             f"computes {computed}; retrain it with `ecgmon {command}`")

    def initial_state(self, n_streams: int) -> NDArray[np.float32]:
        """Zero state (1, n_streams, hidden_size)."""
        return np.zeros((1, n_streams, self.info.hidden_size), dtype=np.float32)

    def run(self, features: NDArray[np.float32], state: NDArray[np.float32]
            ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """One step per stream: features (streams, n_features) -> class probabilities (streams, classes), state."""
        probs, new_state = self._session.run(None, {FEATURES_INPUT: features[:, None], STAGE_STATE_INPUT: state})
        return probs[:, 0], new_state


class BeatModel:
    """ONNX Runtime sessions of the beat model (the frame stage, and the beat and rhythm stages when it has them),
    run on batches of streams."""

    def __init__(self, path: Path, intra_op_threads: int = 1, inter_op_threads: int = 1) -> None:
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        self._session = open_session(str(path), options, f"model {path}")
        props = dict(self._session.get_modelmeta().custom_metadata_map)
        self.info = ModelInfo.from_metadata(props)
        self.beat_stage = None if self.info.beat_stage is None else SequenceStage(
            props, BEAT_STAGE_KEY, self.info.beat_stage, FEATURE_NAMES, "train-beat-stage", options, path)
        self.rhythm_stage = None if self.info.rhythm_stage is None else SequenceStage(
            props, RHYTHM_STAGE_KEY, self.info.rhythm_stage, RHYTHM_FEATURE_NAMES, "train-rhythm", options, path)
        for name, detector, features in (("VF", self.info.vf_detector, VF_FEATURE_NAMES),
                                         ("AF", self.info.af_detector, AF_FEATURE_NAMES),
                                         ("quality", self.info.quality_detector, QUALITY_FEATURE_NAMES)):
            if detector is not None and not detector.matches(features):
                raise ModelError(f"{path}: the {name} detector takes the features {detector.feature_names}, but this "
                                 f"version of ecgmon computes {features}; retrain it with `ecgmon train-"
                                 f"{name.lower()}`")
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        if FRAMES_INPUT not in inputs or outputs[0] != PROBS_OUTPUT:
            raise ModelError(f"{path}: expected input {FRAMES_INPUT!r} and first output {PROBS_OUTPUT!r}")
        self.state_names = tuple(name for name in inputs if name != FRAMES_INPUT)
        if not self.state_names:
            raise ModelError(f"{path}: no recurrent state inputs; the daemon needs a stateful model")
        if inputs[FRAMES_INPUT].shape[-1] != self.info.frame_size:
            raise ModelError(f"{path}: frames of {inputs[FRAMES_INPUT].shape[-1]} samples, metadata says "
                             f"{self.info.frame_size}")
        if outputs[1:] != [name + STATE_OUT_SUFFIX for name in self.state_names]:
            raise ModelError(f"{path}: state outputs {outputs[1:]} do not match state inputs {self.state_names}")
        self.state_shapes = tuple(self._state_shape(inputs[name].shape, path) for name in self.state_names)

    @staticmethod
    def _state_shape(shape: list[Any], path: Path) -> tuple[int, int]:
        layers, _batch, hidden = shape
        if not isinstance(layers, int) or not isinstance(hidden, int):
            raise ModelError(f"{path}: state shape {shape} must be (layers, batch, hidden)")
        return layers, hidden

    def initial_state(self, n_streams: int) -> list[NDArray[np.float32]]:
        """Zero state for `n_streams` streams, one array (layers, n_streams, hidden) per state tensor."""
        return [np.zeros((layers, n_streams, hidden), dtype=np.float32) for layers, hidden in self.state_shapes]

    def run(self, frames: NDArray[np.float32], state: list[NDArray[np.float32]]
            ) -> tuple[NDArray[np.float32], list[NDArray[np.float32]]]:
        """One batched step: frames (streams, time, frame_size) in mV -> probs (streams, time, classes)."""
        feeds = {FRAMES_INPUT: frames, **dict(zip(self.state_names, state, strict=True))}
        probs, *new_state = self._session.run(None, feeds)
        return probs, new_state


def rhythm_thresholds(model: BeatModel) -> dict[str, float]:
    """The rhythm stage's thresholds (rhythm class -> probability), empty for a model without one."""
    stage = model.info.rhythm_stage
    return dict(stage.thresholds) if stage is not None else {}

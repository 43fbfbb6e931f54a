"""The exported beat model in ONNX Runtime: metadata, state layout and batched steps.

The ONNX file is the single source of truth: the daemon takes the model rate, frame size,
output delay, filter, class names and decision rule from its metadata, never from
constants of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from pydantic import ConfigDict, Field, ValidationError

from models.config import ModelConfig
from pipeline.beats import Decision
from pipeline.dsp import FilterSpec

FRAMES_INPUT = "frames"
PROBS_OUTPUT = "probs"
STATE_OUT_SUFFIX = "_out"
# What onnxruntime raises for a file it cannot load (its exception classes derive from Exception directly).
ORT_LOAD_ERRORS = (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail, ort_errors.NoSuchFile,
                   ort_errors.InvalidArgument, ort_errors.NotImplemented, ort_errors.RuntimeException)


class ModelError(RuntimeError):
    """The model file is missing, unreadable or not an ecgmon beat model."""


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

    @property
    def decision(self) -> Decision:
        return Decision(self.beat_threshold, self.decision_weights)

    def to_metadata(self) -> dict[str, str]:
        """ONNX metadata_props: each field JSON-encoded under its own key."""
        return {key: json.dumps(value) for key, value in self.model_dump(mode="json").items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> ModelInfo:
        """Parse metadata_props written by `to_metadata`; every field must be there (no defaults filled in)."""
        missing = sorted(cls.model_fields.keys() - props.keys())
        if missing:
            raise ModelError(f"model metadata is incomplete or invalid: no {', '.join(missing)}")
        try:
            return cls.model_validate({key: json.loads(value) for key, value in props.items()})
        except (ValidationError, json.JSONDecodeError) as err:
            raise ModelError(f"model metadata is incomplete or invalid: {err}") from err


class BeatModel:
    """One ONNX Runtime session of the beat model, run on batches of streams."""

    def __init__(self, path: Path, intra_op_threads: int = 1, inter_op_threads: int = 1) -> None:
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except ORT_LOAD_ERRORS as err:
            raise ModelError(f"cannot load model {path}: {err}") from err
        self.info = ModelInfo.from_metadata(dict(self._session.get_modelmeta().custom_metadata_map))
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

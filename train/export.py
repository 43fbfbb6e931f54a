"""Export a checkpoint to ONNX with explicit recurrent-state inputs/outputs and daemon metadata."""

from __future__ import annotations

import json
import logging
import warnings
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from models.network import BeatNet
from pipeline.aami import MODEL_CLASSES
from pipeline.beats import Decision
from pipeline.model import FRAMES_INPUT, PROBS_OUTPUT, STATE_OUT_SUFFIX, ModelInfo
from train.trainer import load_model

log = logging.getLogger(__name__)

OPSET = 17


class StreamingBeatNet(nn.Module):
    """The network as the daemon runs it: probabilities instead of logits, state in and out."""

    def __init__(self, net: BeatNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, frames: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, *new_state = self.net(frames, *state)
        return (torch.softmax(logits, dim=-1), *new_state)


def model_info(net: BeatNet, config_hash: str, training_data: str, decision: Decision,
               filter_dict: dict[str, Any], ds2_metrics: dict[str, Any]) -> ModelInfo:
    mc = net.config
    return ModelInfo(version=f"{package_version('ecgmon')}+{mc.cell}.{config_hash}", fs=mc.fs,
                     frame_size=mc.frame_size, output_delay_frames=mc.output_delay_frames,
                     class_names=MODEL_CLASSES, beat_threshold=decision.beat_threshold,
                     class_weights=decision.class_weights, filter=filter_dict,
                     config_hash=config_hash, training_data=training_data, ds2_metrics=ds2_metrics)


def export_onnx(checkpoint: Path, out: Path, ds2_metrics: dict[str, Any] | None = None) -> ModelInfo:
    """Write `checkpoint` as ONNX (opset 17) to `out`; `ds2_metrics` is embedded when given."""
    net, config, ckpt = load_model(checkpoint)
    decision = Decision(config.decision.beat_threshold,
                        tuple(ckpt.get("class_weights") or (1.0,) * (len(MODEL_CLASSES) - 1)))
    wrapper = StreamingBeatNet(net).eval()
    frames = torch.zeros(2, 5, config.model.frame_size)
    state = net.initial_state(2)
    state_in = list(net.state_names)
    state_out = [name + STATE_OUT_SUFFIX for name in state_in]
    dynamic_axes: dict[str, dict[int, str]] = {FRAMES_INPUT: {0: "batch", 1: "time"},
                                               PROBS_OUTPUT: {0: "batch", 1: "time"}}
    dynamic_axes.update({name: {1: "batch"} for name in state_in + state_out})
    out.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter gives ONNX's own LSTM/GRU/RNN ops with fully dynamic batch and time axes
    # (torch.export pins the time axis of the output here); it warns that it is deprecated, and that a
    # batch size other than 1 needs care, which the tests cover (batched vs single-stream runs agree).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        torch.onnx.export(wrapper, (frames, *state), str(out), input_names=[FRAMES_INPUT, *state_in],
                          output_names=[PROBS_OUTPUT, *state_out], dynamic_axes=dynamic_axes,
                          opset_version=OPSET, dynamo=False)
    training_data = (f"train: {', '.join(config.data.train_records)}; val (early stopping): "
                     f"{', '.join(config.data.val_records)}; lead {config.data.lead}")
    info = model_info(net, config.hash(), training_data, decision,
                      config.filter.spec().to_dict(), ds2_metrics or {})
    proto = onnx.load(str(out))
    metadata = {**info.to_metadata(), "model_config": json.dumps(config.model.model_dump(mode="json"))}
    onnx.helper.set_model_props(proto, metadata)
    proto.producer_name = "ecgmon"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    log.info("exported %s (%d bytes), version %s", out, out.stat().st_size, info.version)
    return info

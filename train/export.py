"""Export a checkpoint to ONNX with explicit recurrent-state inputs/outputs and daemon metadata (ModelInfo).

The graph reads one lead (frames in, probabilities out); a device's leads are separate batch rows, fused
afterwards by `pipeline.analysis.beats.fuse_leads`, the rule training used (metadata `lead_fusion`)."""

from __future__ import annotations

import logging
import warnings
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from models.network import BeatNet
from pipeline.analysis.aami import MODEL_CLASSES
from pipeline.analysis.beats import LEAD_FUSION, Decision
from pipeline.analysis.model import BEAT_STAGE_KEY, FRAMES_INPUT, PROBS_OUTPUT, STATE_OUT_SUFFIX, ModelInfo
from train.config import TrainConfig
from train.trainer import load_model, neutral_decision

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


def export_recurrent(module: nn.Module, args: tuple[Tensor, ...], out: Path, input_names: list[str],
                     output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    """torch.onnx.export with the TorchScript exporter, which gives ONNX's own LSTM/GRU/RNN ops with fully
    dynamic batch and time axes (torch.export pins the time axis of the output here). It warns that it is
    deprecated, and that a batch size other than 1 needs care, which the tests cover (batched vs
    single-stream runs agree)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        torch.onnx.export(module, args, str(out), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False)


def model_info(config: TrainConfig, decision: Decision, ds2_metrics: dict[str, Any]) -> ModelInfo:
    """The metadata of a model trained per `config`: its network config, filter, decision rule and provenance."""
    config_hash = config.hash()
    leads = "every ECG lead" if config.data.leads is None else ", ".join(config.data.leads)
    training_data = (f"train: {', '.join(config.data.train_records)}; val (early stopping): "
                     f"{', '.join(config.data.val_records)}; leads: {leads}, fused as the {LEAD_FUSION}")
    version = f"{package_version('ecgmon')}+{config.model.cell}.{config_hash}"
    return ModelInfo(**config.model.model_dump(), version=version, class_names=MODEL_CLASSES,
                     beat_threshold=decision.beat_threshold, decision_weights=decision.decision_weights,
                     filter=config.filter, config_hash=config_hash, training_data=training_data,
                     ds2_metrics=ds2_metrics, lead_fusion=LEAD_FUSION)


def versioned(version: str, part: str, digest: str) -> str:
    """`version` with its `.<part>.<digest>` suffix set (replaced where it has one, appended where not)."""
    head, found, tail = version.partition(f".{part}.")
    rest = tail.partition(".")[2] if found else ""
    return f"{head}.{part}.{digest}" + (f".{rest}" if rest else "")


def read_metadata(path: Path) -> ModelInfo:
    """The ModelInfo of the ONNX file at `path`, read without opening its graphs (its beat stage may be stale)."""
    return ModelInfo.from_metadata({p.key: p.value for p in onnx.load(str(path)).metadata_props})


def write_metadata(path: Path, info: ModelInfo, beat_stage_onnx: str | None = None) -> None:
    """Replace the metadata_props of the ONNX file at `path` with `info`; the graph and weights are untouched.

    A beat stage's graph (base64 ONNX) is `beat_stage_onnx` when given, else the one the file already holds.
    """
    proto = onnx.load(str(path))
    props = info.to_metadata()
    if info.beat_stage is not None:
        props[BEAT_STAGE_KEY] = beat_stage_onnx or {p.key: p.value for p in proto.metadata_props}[BEAT_STAGE_KEY]
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = "ecgmon"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_onnx(checkpoint: Path, out: Path, ds2_metrics: dict[str, Any] | None = None) -> ModelInfo:
    """Write `checkpoint` as ONNX (opset 17) to `out`; `ds2_metrics` is embedded when given."""
    net, config, ckpt = load_model(checkpoint)
    weights = ckpt["decision_weights"]  # None until tuned at the end of training
    decision = (neutral_decision(config.decision.beat_threshold) if weights is None
                else Decision(config.decision.beat_threshold, tuple(weights)))
    wrapper = StreamingBeatNet(net).eval()
    frames = torch.zeros(2, 5, config.model.frame_size)
    state = net.initial_state(2)
    state_in = list(net.state_names)
    state_out = [name + STATE_OUT_SUFFIX for name in state_in]
    dynamic_axes: dict[str, dict[int, str]] = {FRAMES_INPUT: {0: "batch", 1: "time"},
                                               PROBS_OUTPUT: {0: "batch", 1: "time"}}
    dynamic_axes.update({name: {1: "batch"} for name in state_in + state_out})
    out.parent.mkdir(parents=True, exist_ok=True)
    export_recurrent(wrapper, (frames, *state), out, [FRAMES_INPUT, *state_in], [PROBS_OUTPUT, *state_out],
                     dynamic_axes)
    info = model_info(config, decision, ds2_metrics or {})
    write_metadata(out, info)
    log.info("exported %s (%d bytes), version %s", out, out.stat().st_size, info.version)
    return info

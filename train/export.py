"""Export a checkpoint to ONNX with explicit recurrent-state inputs/outputs and daemon metadata (ModelInfo).

The graph reads one lead (frames in, probabilities out); a device's leads are separate batch rows, fused
afterwards by `pipeline.analysis.beats.fuse_leads`, the rule training used (metadata `lead_fusion`)."""

from __future__ import annotations

import base64
import hashlib
import logging
import shutil
import tempfile
import warnings
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from models.network import BeatNet, StageNet
from pipeline.analysis.aami import MODEL_CLASSES
from pipeline.analysis.beats import LEAD_FUSION, Decision
from pipeline.analysis.model import (
    BEAT_STAGE_KEY,
    FEATURES_INPUT,
    FRAMES_INPUT,
    PROBS_OUTPUT,
    RHYTHM_STAGE_KEY,
    STAGE_STATE_INPUT,
    STATE_OUT_SUFFIX,
    BeatModel,
    BeatStageInfo,
    ModelInfo,
    RhythmStageInfo,
)
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


def write_metadata(path: Path, info: ModelInfo, stages: dict[str, str] | None = None) -> None:
    """Replace the metadata_props of the ONNX file at `path` with `info`; the graph and weights are untouched.

    `stages`: metadata key (`BEAT_STAGE_KEY`, `RHYTHM_STAGE_KEY`) -> base64 ONNX graph of a sequence stage; a stage
    `info` describes and `stages` does not give keeps the graph the file already holds.
    """
    proto = onnx.load(str(path))
    props = info.to_metadata()
    held = {p.key: p.value for p in proto.metadata_props}
    for key, described in ((BEAT_STAGE_KEY, info.beat_stage), (RHYTHM_STAGE_KEY, info.rhythm_stage)):
        if described is not None:
            props[key] = (stages or {}).get(key) or held[key]
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


class _StreamingStage(nn.Module):
    """A sequence stage as the daemon runs it: probabilities instead of logits."""

    def __init__(self, net: StageNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, features: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        logits, new_state = self.net(features, state)
        return torch.softmax(logits, dim=-1), new_state


def stage_onnx(net: StageNet) -> bytes:
    """A sequence stage as an ONNX graph: features (batch, steps, n) and h in, probs and h_out out."""
    state_out = STAGE_STATE_INPUT + STATE_OUT_SUFFIX
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "stage.onnx"
        export_recurrent(_StreamingStage(net).eval(),
                         (torch.zeros(2, 3, len(net.config.feature_names)), net.initial_state(2)), path,
                         [FEATURES_INPUT, STAGE_STATE_INPUT], [PROBS_OUTPUT, state_out],
                         {FEATURES_INPUT: {0: "batch", 1: "steps"}, PROBS_OUTPUT: {0: "batch", 1: "steps"},
                          STAGE_STATE_INPUT: {1: "batch"}, state_out: {1: "batch"}})
        return path.read_bytes()


# Each sequence stage: its metadata key, its info class, and the tag of its hash in the model's version.
STAGES: dict[str, tuple[str, type[BeatStageInfo] | type[RhythmStageInfo], str]] = {
    "beat_stage": (BEAT_STAGE_KEY, BeatStageInfo, "beats"),
    "rhythm_stage": (RHYTHM_STAGE_KEY, RhythmStageInfo, "rhythm"),
}


def attach_stage(model_path: Path, out: Path, net: StageNet, field: str, provenance: dict[str, Any],
                 update: dict[str, Any] | None = None) -> BeatModel:
    """Copy the model at `model_path` to `out` with `net` as its sequence stage `field` ("beat_stage",
    "rhythm_stage"; the frame weights and the other stage untouched). `provenance`: the stage info's fields besides
    the network's config and version; `update`: other ModelInfo fields to change."""
    key, info_class, tag = STAGES[field]
    graph = stage_onnx(net)
    digest = hashlib.sha256(graph).hexdigest()[:12]
    stage = info_class(**net.config.model_dump(), version=digest, **provenance)
    info = read_metadata(model_path)
    info = info.model_copy(update={field: stage, "version": versioned(info.version, tag, digest), **(update or {})})
    if out != model_path:
        shutil.copy(model_path, out)
    write_metadata(out, info, {key: base64.b64encode(graph).decode("ascii")})
    return BeatModel(out)

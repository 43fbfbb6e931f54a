"""A missing, corrupt or incompatible model file is a clear error at start-up, with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from models import SHIPPED_MODEL
from pipeline.analysis.model import BeatModel, ModelError
from pipeline.tools.broker import free_port


def identity_model(path: Path, metadata: dict[str, str] | None = None) -> Path:
    graph = helper.make_graph([helper.make_node("Identity", ["frames"], ["probs"])], "g",
                              [helper.make_tensor_value_info("frames", TensorProto.FLOAT, [None, None, 12])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, None, 12])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "model file not found"),
    ("corrupt", "cannot load model"),
    ("no_metadata", "metadata is incomplete or invalid"),
    ("metadata_without_fs", "metadata is incomplete or invalid: no fs"),  # no default stands in for it
    ("no_state", "no recurrent state inputs"),
])
def test_bad_model_files(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "model.onnx"
    if kind == "corrupt":
        path.write_bytes(SHIPPED_MODEL.read_bytes()[:5000])
    elif kind == "no_metadata":
        identity_model(path)
    elif kind == "metadata_without_fs":
        meta = {p.key: p.value for p in onnx.load(str(SHIPPED_MODEL)).metadata_props if p.key != "fs"}
        identity_model(path, meta)
    elif kind == "no_state":
        meta = {p.key: p.value for p in onnx.load(str(SHIPPED_MODEL)).metadata_props}
        identity_model(path, meta)
    with pytest.raises(ModelError, match=message):
        BeatModel(path)


def test_daemon_exits_non_zero_on_a_corrupt_model(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not an onnx file")
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(path)}, "mqtt": {"port": free_port()},
                                      "metrics": {"port": None}}))
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "cannot load model" in res.stderr

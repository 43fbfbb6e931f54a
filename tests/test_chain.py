"""The whole offline chain on real records: train a tiny model, export ONNX, evaluate it.

Also: PyTorch and ONNX Runtime agree, and streaming in 1 s windows equals one pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import wfdb

from models import SHIPPED_MODEL
from models.config import ModelConfig
from models.network import BeatNet
from pipeline.analysis.dsp import FilterSpec, Preprocessor
from pipeline.analysis.model import BeatModel, ModelInfo
from pipeline.analysis.streams import BeatStreams
from pipeline.cli import main
from pipeline.tools.records import load_record
from train.config import TrainConfig
from train.dataset import frame_record
from train.trainer import load_model, save_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, physionet: Path) -> Path:
    out = tmp_path_factory.mktemp("runs")
    settings = {"name": "tiny", "out_dir": out, "data.physionet_dir": physionet,
                "data.train_records": "[mitdb/101, mitdb/208]", "data.val_records": "[mitdb/118]",
                "optim.epochs": 2, "optim.segment_s": 60, "optim.chunk_s": 10, "optim.batch_streams": 8,
                "optim.ema_decay": 0, "optim.threads": 1, "optim.lr": 0.01}
    code = main(["--log-level", "WARNING", "train", "--config", str(REPO / "configs" / "train-lstm.yaml"),
                 *(arg for key, value in settings.items() for arg in ("--set", f"{key}={value}"))])
    assert code == 0
    return out / "tiny"


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run: Path) -> Path:
    path = tiny_run / "model.onnx"
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(path)]) == 0
    return path


def test_training_writes_checkpoints_with_config(tiny_run: Path) -> None:
    history = json.loads((tiny_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert all(h["grad_norm_max"] > 0 for h in history)
    net, config, _ = load_model(tiny_run / "last.pt")  # rebuilt from the checkpoint alone
    assert config.name == "tiny" and isinstance(net, BeatNet)


def test_resume_continues_from_last_epoch(tiny_run: Path, tmp_path: Path) -> None:
    code = main(["--log-level", "WARNING", "train", "--config", str(tiny_run / "config.json"), "--resume",
                 "--set", "optim.epochs=3"])
    assert code == 0
    history = json.loads((tiny_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]


def test_onnx_metadata(tiny_onnx: Path, tiny_run: Path) -> None:
    model = BeatModel(tiny_onnx)
    net, config, ckpt = load_model(tiny_run / "best.pt")
    assert model.info.fs == 360.0 and model.info.frame_size == 12
    assert model.info.class_names == ("background", "N", "S", "V", "F", "Q")
    assert model.info.filter == config.filter == FilterSpec()
    assert model.info.decision_weights == ckpt["decision_weights"]
    assert model.state_names == ("h", "c")
    assert "mitdb/101" in model.info.training_data
    props = {p.key for p in onnx.load(str(tiny_onnx)).metadata_props}
    assert props == set(ModelInfo.model_fields)  # each fact once, under its field's name
    # The network's config travels in the metadata: the network can be rebuilt from the ONNX file.
    assert ModelConfig.model_validate(model.info.model_dump(include=set(ModelConfig.model_fields))) == config.model
    BeatNet(model.info).load_state_dict(net.state_dict())


@pytest.mark.parametrize("name", ["100", "208"])
def test_torch_and_onnx_runtime_agree(tiny_run: Path, tiny_onnx: Path, physionet: Path, name: str) -> None:
    net, config, _ = load_model(tiny_run / "best.pt")
    record = load_record(physionet / "mitdb", name)
    frames = frame_record(record, config.model, config.filter, 3).frames[0, :1800]
    with torch.no_grad():
        logits, h, c = net(torch.from_numpy(frames)[None], *net.initial_state(1))
    model = BeatModel(tiny_onnx)
    probs, (h_onnx, c_onnx) = model.run(frames[None], model.initial_state(1))
    np.testing.assert_allclose(probs, torch.softmax(logits, -1).numpy(), atol=1e-4)
    np.testing.assert_allclose(h_onnx, h.numpy(), atol=1e-4)
    np.testing.assert_allclose(c_onnx, c.numpy(), atol=1e-4)


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_other_cells_export_and_agree(tmp_path: Path, cell: str) -> None:
    torch.manual_seed(0)
    config = TrainConfig(model=ModelConfig(cell=cell, hidden_size=16, num_layers=2))
    net = BeatNet(config.model).eval()
    save_checkpoint(tmp_path / "c.pt", net, torch.optim.SGD(net.parameters(), lr=0.1), config, 0, [], 0.0)
    assert main(["export", "--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "m.onnx")]) == 0
    model = BeatModel(tmp_path / "m.onnx")
    assert model.state_names == ("h",) and model.state_shapes == ((2, 16),)
    frames = np.random.default_rng(0).normal(size=(3, 50, 12)).astype(np.float32)
    with torch.no_grad():
        logits, h = net(torch.from_numpy(frames), *net.initial_state(3))
    probs, (h_onnx,) = model.run(frames, model.initial_state(3))
    np.testing.assert_allclose(probs, torch.softmax(logits, -1).numpy(), atol=1e-4)
    np.testing.assert_allclose(h_onnx, h.numpy(), atol=1e-4)


def test_onnx_windows_equal_one_pass(tiny_onnx: Path, physionet: Path) -> None:
    """Per-frame outputs: 1 s windows with carried state vs one pass over 2 min of record 208."""
    model = BeatModel(tiny_onnx)
    record = load_record(physionet / "mitdb", "208")
    frames = Preprocessor(model.info.filter, record.fs, model.info.fs, model.info.frame_size)(
        record.signal_mv[: 360 * 120])
    whole, _ = model.run(frames[None], model.initial_state(1))
    state = model.initial_state(1)
    parts = []
    for t0 in range(0, len(frames), 30):
        probs, state = model.run(frames[None, t0:t0 + 30], state)
        parts.append(probs)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, atol=1e-4)


def test_beats_stream_equal_one_pass(physionet: Path) -> None:
    """Beats of the shipped model from one lead: 1 s windows batched with other devices (two and three leads) vs
    one pass."""
    model = BeatModel(SHIPPED_MODEL)
    record = load_record(physionet / "mitdb", "208")
    x = record.signals_mv[:, : 360 * 120]
    streams = BeatStreams(model, capacity=2)  # grows to 4 slots on the way
    for sid in ("one-pass", "windows", "other-a", "other-b"):
        streams.open(sid, record.fs)
    one_pass = streams.process([("one-pass", ("MLII",), x[:1])])
    windowed = []
    for a in range(0, x.shape[1], 360):
        windowed += streams.process([("windows", ("MLII",), x[:1, a:a + 360]),
                                     ("other-a", record.sig_names, x[:, a:a + 360] * 0.5),
                                     ("other-b", ("I", "II", "III"), np.zeros((3, 360)))])
    mine = [(round(b.time_s, 6), b.class_name) for b in windowed if b.stream_id == "windows"]
    assert mine == [(round(b.time_s, 6), b.class_name) for b in one_pass]
    assert len(mine) > 100


def test_two_leads_batched_equal_alone(physionet: Path) -> None:
    """Two leads in 1 s windows give the same beats alone as batched with devices of one and three leads (which
    leads take part is decided once per window, so with several leads the windows, not the batch, set the beats)."""
    model = BeatModel(SHIPPED_MODEL)
    record = load_record(physionet / "mitdb", "208")
    x = record.signals_mv[:, : 360 * 120]
    alone, batched = BeatStreams(model), BeatStreams(model, capacity=1)
    alone.open("bed", record.fs)
    for sid in ("other-a", "bed", "other-b"):
        batched.open(sid, record.fs)
    a_beats, b_beats = [], []
    for a in range(0, x.shape[1], 360):
        a_beats += alone.process([("bed", record.sig_names, x[:, a:a + 360])])
        b_beats += [b for b in batched.process([("other-a", ("II",), x[1:, a:a + 360] * 2),
                                                ("bed", record.sig_names, x[:, a:a + 360]),
                                                ("other-b", ("I", "II", "III"), np.zeros((3, 360)))])
                    if b.stream_id == "bed"]
    assert [(b.time_s, b.class_name) for b in a_beats] == [(b.time_s, b.class_name) for b in b_beats]
    assert len(a_beats) > 100


def test_a_lead_dropped_mid_stream_leaves_the_beats_to_the_other(physionet: Path) -> None:
    """Two leads, then only the first from 60 s on, then both again: the beats go on from the first lead (every
    reference beat after the change is still found), and the returning lead starts cold without a gap."""
    model = BeatModel(SHIPPED_MODEL)
    record = load_record(physionet / "mitdb", "100")
    x = record.signals_mv[:, : 360 * 180]
    streams = BeatStreams(model)
    streams.open("bed", record.fs)
    found = []
    for k in range(180):
        both = k < 60 or k >= 120
        leads, samples = (record.sig_names, x[:, k * 360:(k + 1) * 360]) if both else (
            record.sig_names[:1], x[:1, k * 360:(k + 1) * 360])
        found += streams.process([("bed", leads, samples)])
    det = np.array([b.time_s for b in found])
    ref = record.beat_samples[record.beat_samples < 180 * 360] / record.fs
    ref = ref[(ref > 5) & (ref < 175)]
    missed = [t for t in ref if np.abs(det - t).min() > 0.15]
    assert not missed and len(det) >= len(ref)
    assert streams.primary_lead("bed") == record.sig_names[0]


def test_the_primary_lead_fails_over_to_a_good_one(physionet: Path) -> None:
    """The shipped model (trained on one lead at a time) reads a device's beats from its primary lead alone. MIT-BIH
    100's MLII goes flat from 40 to 80 s: the analysis moves to V5 and finds every reference beat there, and goes back
    to MLII once it has warmed up again; with both leads good the beats are exactly MLII's alone."""
    model = BeatModel(SHIPPED_MODEL)
    assert model.info.lead_fusion is None
    record = load_record(physionet / "mitdb", "100")
    x = record.signals_mv[:, : 360 * 120].copy()
    x[0, 360 * 40:360 * 80] = 0.0
    both, alone = BeatStreams(model), BeatStreams(model)
    both.open("bed", record.fs)
    alone.open("bed", record.fs)
    found, primary, first_lead = [], [], []
    for k in range(120):
        found += both.process([("bed", record.sig_names, x[:, k * 360:(k + 1) * 360])])
        first_lead += alone.process([("bed", record.sig_names[:1], x[:1, k * 360:(k + 1) * 360])])
        primary.append(both.primary_lead("bed"))
    assert set(primary[:40]) == {"MLII"} and set(primary[41:80]) == {"V5"} and set(primary[86:]) == {"MLII"}
    det = np.array([b.time_s for b in found])
    assert [(b.time_s, b.class_name) for b in found if b.time_s < 39] == [
        (b.time_s, b.class_name) for b in first_lead if b.time_s < 39]
    ref = record.beat_samples / record.fs
    ref = ref[(ref > 46) & (ref < 119)]  # V5 warmed up (5 s) onwards
    assert all(np.abs(det - t).min() <= 0.15 for t in ref) and len(ref) > 70


def test_evaluate_writes_annotations_report_and_plots(tiny_onnx: Path, tiny_run: Path, physionet: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_onnx), "--records", "mitdb/100", "mitdb/231",
                 "--physionet-dir", str(physionet), "--out", str(out), "--annotator", "tiny",
                 "--history", str(tiny_run / "history.json")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["record"] for r in report["per_record"]] == ["100", "231"]
    assert report["gross"]["qrs_se"] > 0.2  # two epochs on two records already find beats
    total = np.sum([r["matrix"] for r in report["per_record"]], axis=0)
    assert total.tolist() == report["gross"]["matrix"]["counts"]
    ann = wfdb.rdann(str(out / "annotations" / "100"), "tiny")
    counts = np.array(report["per_record"][0]["matrix"])
    assert len(ann.sample) >= counts[:, :5].sum()
    for png in ("confusion.png", "per_record.png", "training_curves.png"):
        assert (out / png).stat().st_size > 1000

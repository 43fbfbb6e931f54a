"""The beat-sequence stage: causal rhythm features, training on out-of-fold beats, export, and the model file
that carries both stages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from models import SHIPPED_MODEL
from pipeline.analysis.aami import AAMI_CLASSES
from pipeline.analysis.beat_context import DEFAULT_RR_S, FEATURE_NAMES, BeatContext, rank_in_row, record_features
from pipeline.analysis.model import BEAT_STAGE_KEY, BeatModel, ModelError
from pipeline.analysis.streams import BeatStreams
from pipeline.cli import main
from pipeline.process.state import decode_state, encode_state
from pipeline.tools.records import load_record
from train.beat_stage import beat_sequence, classify, fold_model, train_beat_stage
from train.config import BeatStageTrainConfig
from train.export import stage_onnx, versioned
from train.trainer import DataLeakError

COLUMN = {name: i for i, name in enumerate(FEATURE_NAMES)}


FS, FRAME = 360.0, 12
DELAY_FRAMES = 8  # frames from a beat's R peak to the frame that picks it, as a model with that output delay


def synthetic_beats(times_s: np.ndarray, wide: set[int], seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Frames (n_frames, FRAME) of a signal with a narrow 1 mV QRS at each R peak and a wide, inverted 1.5 mV
    one at the beats numbered in `wide`; and each beat's pick frame."""
    t = np.arange(int(seconds * FS)) / FS
    x = np.zeros_like(t)
    for i, r in enumerate(times_s):
        x += (-1.5 * np.exp(-0.5 * ((t - r) / 0.03) ** 2) if i in wide else np.exp(-0.5 * ((t - r) / 0.008) ** 2))
    frames = x[: len(x) // FRAME * FRAME].reshape(-1, FRAME).astype(np.float32)
    end_frame = np.floor(times_s * FS / FRAME).astype(np.int64) + DELAY_FRAMES + 1
    return frames, end_frame


def r_peak_times(times_s: np.ndarray) -> np.ndarray:
    """Times as the daemon reports them: the centre of the R peak's frame."""
    return (np.floor(times_s * FS / FRAME) * FRAME + FRAME / 2) / FS


def test_a_premature_beat_and_a_wide_beat_stand_out_against_the_stream_s_own_beats() -> None:
    times = r_peak_times(np.append(np.arange(1.0, 12.0), [11.6, 13.6, 14.6]))  # RR 1 s, then 0.6 s, 2 s, 1 s
    frames, end_frame = synthetic_beats(times, wide={13}, seconds=16)
    class_sum = np.tile(np.array([[2.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32), (len(times), 1))
    features = record_features(frames, times, end_frame, class_sum, FS)
    premature, after, wide = features[-3], features[-2], features[-1]
    assert premature[COLUMN["rr_over_local"]] == pytest.approx(0.6, abs=0.04)  # the last 8 RR are all 1 s
    assert after[COLUMN["rr_over_local"]] == pytest.approx(2.0, abs=0.04)  # the median is still 1 s
    assert after[COLUMN["previous_rr_over_local"]] == pytest.approx(premature[COLUMN["rr_over_local"]])
    assert features[0][COLUMN["log_rr_s"]] == pytest.approx(np.log(DEFAULT_RR_S))  # no history: the default RR
    assert premature[COLUMN["rr_irregularity"]] == 0.0 and after[COLUMN["rr_irregularity"]] == 0.0  # one early beat
    assert features[:, COLUMN["p_N"]].tolist() == [1.0] * len(times)  # class sums normalised
    normal = features[:-1]
    assert normal[:, COLUMN["template_correlation"]].min() > 0.95
    assert wide[COLUMN["template_correlation"]] < 0.5
    assert wide[COLUMN["qrs_width_s"]] > 2.5 * normal[:, COLUMN["qrs_width_s"]].max()
    assert normal[:, COLUMN["qrs_pp_over_running"]] == pytest.approx(1.0, abs=0.05)
    assert wide[COLUMN["qrs_pp_over_running"]] == pytest.approx(1.5, abs=0.1)


def test_an_irregular_rhythm_is_irregular() -> None:
    rng = np.random.default_rng(1)
    regular = r_peak_times(np.arange(1.0, 30.0))
    irregular = r_peak_times(np.cumsum(rng.uniform(0.4, 1.2, 40)))
    features = []
    for t in (regular, irregular):
        frames, end_frame = synthetic_beats(t, set(), t[-1] + 2)
        features.append(record_features(frames, t, end_frame, np.ones((len(t), 5), np.float32), FS))
    assert features[0][10:, COLUMN["rr_irregularity"]].max() < 0.05  # frame-centre rounding only
    assert features[1][10:, COLUMN["rr_irregularity"]].min() > 0.1


def test_features_of_windows_of_any_size_equal_one_pass() -> None:
    rng = np.random.default_rng(0)
    times = r_peak_times(np.cumsum(rng.uniform(0.3, 1.6, 200)))
    frames, end_frame = synthetic_beats(times, wide=set(rng.choice(200, 30).tolist()), seconds=times[-1] + 2)
    frames += rng.normal(0, 0.05, frames.shape).astype(np.float32)
    class_sum = rng.uniform(0, 1, (200, 5)).astype(np.float32)
    context = BeatContext(1, FS, FRAME)
    context.grow(3)  # other slots beside it change nothing
    slot = np.array([2])
    stepped, beat, at, restored = [], 0, 0, False
    for size in rng.integers(1, 90, 10_000):  # windows of 1 to 89 frames
        if at >= len(frames):
            break
        signal = context.window(slot, frames[None, at:at + size])
        at += size
        while beat < len(times) and end_frame[beat] < at:  # the beats picked in this window
            stepped.append(context.step(slot, times[beat:beat + 1], end_frame[beat:beat + 1],
                                        class_sum[beat:beat + 1], signal, np.zeros(1, dtype=np.int64)))
            beat += 1
        if beat >= 100 and not restored:  # halfway: through the daemon's state encoding into a fresh context
            saved = decode_state(encode_state("m", {"d": context.save_slot(2)}), "m", 60.0, "test")["d"]
            context = BeatContext(3, FS, FRAME)
            context.load_slot(2, saved)
            restored = True
    assert beat == len(times) and restored
    np.testing.assert_allclose(np.concatenate(stepped), record_features(frames, times, end_frame, class_sum, FS),
                               rtol=1e-5, atol=1e-6)


def test_rank_in_row() -> None:
    assert rank_in_row(np.array([0, 0, 0, 2, 3, 3])).tolist() == [0, 1, 2, 0, 0, 1]
    assert rank_in_row(np.zeros(0, dtype=np.int64)).tolist() == []


@pytest.fixture(scope="module")
def with_beat_stage(tiny_cv: Path, physionet: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`ecgmon train-beat-stage` on the tiny cross-validation's beats (MLII), attached to the shipped frame stage."""
    out = tmp_path_factory.mktemp("beat-stage")
    frame_model = SHIPPED_MODEL
    code = main(["--log-level", "WARNING", "train-beat-stage", "--cv-dir", str(tiny_cv), "--model", str(frame_model),
                 "--out", str(out / "model.onnx"), "--report-dir", str(out / "report"), "--physionet-dir",
                 str(physionet), "--leads", "MLII", "--set", "epochs=2", "--set", "sequence_beats=64", "--set",
                 "model.hidden_size=8"])
    assert code == 0
    return out, frame_model


def test_train_beat_stage_writes_one_model_file_with_both_stages(with_beat_stage: tuple[Path, Path]) -> None:
    out, frame_model = with_beat_stage
    model = BeatModel(out / "model.onnx")
    assert model.beat_stage is not None and model.info.beat_stage is not None
    assert model.info.beat_stage.feature_names == FEATURE_NAMES and model.info.beat_stage.hidden_size == 8
    frame_info = BeatModel(frame_model).info
    stage_hash = model.info.version.split(".beats.")[1].split(".")[0]
    assert model.info.version == versioned(frame_info.version, "beats", stage_hash) != frame_info.version
    assert model.info.ds2_metrics["qrs_se"] > 0  # DS2 scored once, through both stages, and embedded
    before, after = onnx.load(str(frame_model)).graph, onnx.load(str(out / "model.onnx")).graph
    assert [t.raw_data for t in before.initializer] == [t.raw_data for t in after.initializer]  # frame weights kept
    report = json.loads((out / "report" / "cv.json").read_text())
    assert report["seeds"] == [0] and report["k"] == 3
    for stage in ("frame_stage", "both_stages"):
        assert 0.0 <= report["mean_std"][stage]["qrs_se"][0] <= 1.0
    ds2 = json.loads((out / "report" / "ds2" / "report.json").read_text())
    assert len(ds2["records"]) == 22 and ds2["model_version"] == model.info.version


def test_beat_stage_classes_reach_the_stream(with_beat_stage: tuple[Path, Path], physionet: Path) -> None:
    """Beats streamed in 1 s windows have the frame stage's times and the beat stage's classes, stepped beat by
    beat over the one-pass features of the same record."""
    out, frame_model = with_beat_stage
    record = load_record(physionet / "mitdb", "119", ["MLII"])
    record = dataclasses.replace(record, signals_mv=record.signals_mv[:, : 360 * 300])
    model = BeatModel(out / "model.onnx")
    streams = BeatStreams(model)
    streams.open("r", record.fs)
    x = record.signal_mv
    beats = [b for a in range(0, len(x), 360) for b in streams.process([("r", ("MLII",), x[None, a:a + 360])])]
    sequence = beat_sequence(BeatModel(frame_model), "mitdb/119", record, 0, 0)
    assert [b.time_s for b in beats] == sequence.time_s.tolist() and len(beats) > 200
    assert model.beat_stage is not None
    state = model.beat_stage.initial_state(1)
    expected = []
    for row in sequence.features:
        probs, state = model.beat_stage.run(row[None], state)
        expected.append(AAMI_CLASSES[int(probs.argmax())])
    assert [b.class_name for b in beats] == expected
    assert all(0.0 < b.confidence <= 1.0 for b in beats)


def test_beat_stage_torch_and_onnx_agree(tiny_cv: Path, physionet: Path) -> None:
    model = BeatModel(fold_model(tiny_cv, 3, 1, 0))
    sequence = beat_sequence(model, "mitdb/119", load_record(physionet / "mitdb", "119"), 1, 0)
    config = BeatStageTrainConfig.model_validate({"epochs": 1, "sequence_beats": 64, "model": {"hidden_size": 8}})
    net = train_beat_stage([sequence], config, seed=0)
    import onnxruntime as ort

    session = ort.InferenceSession(stage_onnx(net), providers=["CPUExecutionProvider"])
    state = np.zeros((1, 1, 8), dtype=np.float32)
    probs = []
    for row in sequence.features:  # one beat at a time, as the daemon steps it
        p, state = session.run(None, {"features": row[None, None], "h": state})
        probs.append(p[0, 0])
    with torch.no_grad():
        logits, _ = net(torch.from_numpy(sequence.features)[None], net.initial_state(1))
    np.testing.assert_allclose(np.array(probs), torch.softmax(logits[0], -1).numpy(), atol=1e-5)
    assert (np.array(["N", "S", "V", "F", "Q"])[np.argmax(probs, axis=1)] == classify(net, sequence)).all()


def test_beat_sequences_fuse_every_lead_and_take_the_beat_shape_from_the_first(tiny_cv: Path,
                                                                                 physionet: Path) -> None:
    model = BeatModel(fold_model(tiny_cv, 3, 1, 0))
    record = load_record(physionet / "mitdb", "119")
    assert record.sig_names == ("MLII", "V1")
    both = beat_sequence(model, "mitdb/119", record, 1, 0)
    swapped = beat_sequence(model, "mitdb/119", record.only([1, 0]), 1, 0)
    assert len(both.time_s) > 100
    np.testing.assert_array_equal(swapped.time_s, both.time_s)  # the fusion treats every lead alike...
    shape = [COLUMN["qrs_pp_over_running"], COLUMN["qrs_width_s"], COLUMN["template_correlation"]]
    rhythm = [i for i in range(len(FEATURE_NAMES)) if i not in shape]  # RR features and summed class probabilities
    np.testing.assert_allclose(swapped.features[:, rhythm], both.features[:, rhythm], rtol=1e-5, atol=1e-6)
    assert not np.allclose(swapped.features[:, shape], both.features[:, shape])  # ... but the shape is lead 1's
    one = beat_sequence(model, "mitdb/119", record.only([0]), 1, 0)
    twice = beat_sequence(model, "mitdb/119", record.only([0, 0]), 1, 0)
    np.testing.assert_array_equal(twice.time_s, one.time_s)  # a lead fused with itself is that lead
    np.testing.assert_allclose(twice.features, one.features, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(one.time_s, both.time_s) or not np.allclose(one.features, both.features)


def test_folds_naming_ds2_are_refused(tiny_cv: Path, tmp_path: Path, physionet: Path) -> None:
    cv = json.loads((tiny_cv / "cv.json").read_text())
    cv["folds"][0] = [*cv["folds"][0], "mitdb/232"]
    (tmp_path / "cv.json").write_text(json.dumps(cv))
    from train.beat_stage import out_of_fold_sequences

    with pytest.raises(DataLeakError, match="DS2"):
        out_of_fold_sequences(tmp_path, physionet, None)


@pytest.mark.parametrize(("damage", "message"), [
    ("missing", f"holds no {BEAT_STAGE_KEY}"),
    ("not_base64", "is not base64"),
    ("other_features", "computes"),  # a stage trained on features this version does not compute
])
def test_a_damaged_beat_stage_is_a_model_error(tmp_path: Path, damage: str, message: str) -> None:
    proto = onnx.load(str(SHIPPED_MODEL))
    props = {p.key: p.value for p in proto.metadata_props}
    assert BEAT_STAGE_KEY in props, "the shipped model has a beat stage"
    if damage == "missing":
        del props[BEAT_STAGE_KEY]
    elif damage == "not_base64":
        props[BEAT_STAGE_KEY] = "not base64 at all!"
    else:
        stage = json.loads(props["beat_stage"])
        stage["feature_names"] = list(reversed(stage["feature_names"]))
        props["beat_stage"] = json.dumps(stage)
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    with pytest.raises(ModelError, match=message):
        BeatModel(tmp_path / "model.onnx")

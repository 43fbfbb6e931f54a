"""The rhythm stage: per-lead features and labels, training, the stage in the daemon's streams (one pass equals
window by window, saved and restored), and the ventricular alarms it raises."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from models import SHIPPED_MODEL
from models.network import StageNet
from pipeline.alarms.rules import AlarmEvent, DeviceAlarms, SignalCheck
from pipeline.analysis.model import BeatModel, ModelError
from pipeline.analysis.streams import BeatStreams
from pipeline.config import AlarmConfig
from pipeline.detectors.rhythm import RHYTHM_CLASSES, RHYTHM_FEATURE_NAMES
from pipeline.tools.records import EcgRecord, load_record
from train.alarm_score import Episode
from train.config import RhythmTrainConfig
from train.export import attach_stage, read_metadata, write_metadata
from train.rhythm import (
    CLASS,
    IGNORE,
    RhythmSequence,
    episode_labels,
    record_sequences,
    rhythm_probabilities,
    stage_loss,
    train_rhythm_stage,
    weak_labels,
)

CLEAN = SignalCheck(flat=False, saturated=False, unreadable=False, peak_to_peak_mv=1.5)
SECONDS = 90


@pytest.fixture(scope="module")
def cu01(physionet: Path) -> EcgRecord:
    """The first SECONDS of cudb cu01 (one lead, 250 Hz)."""
    record = load_record(physionet / "cudb", "cu01")
    return dataclasses.replace(record, signals_mv=record.signals_mv[:, :round(SECONDS * record.fs)])


@dataclasses.dataclass(frozen=True)
class Staged:
    """A rhythm stage trained one epoch on cu01's windows, attached to the shipped model at `path`."""

    path: Path
    model: BeatModel
    net: StageNet
    sequence: RhythmSequence


@pytest.fixture(scope="module")
def staged(cu01: EcgRecord, tmp_path_factory: pytest.TempPathFactory) -> Staged:
    sequence = record_sequences("cudb/cu01", cu01, BeatModel(SHIPPED_MODEL).info, [], None)[0]
    net = train_rhythm_stage([sequence], RhythmTrainConfig(epochs=1, model={"hidden_size": 8}), seed=0)
    path = tmp_path_factory.mktemp("rhythm") / "model.onnx"
    model = attach_stage(SHIPPED_MODEL, path, net, "rhythm_stage",
                         {"training_data": "test", "cv_metrics": {}, "thresholds": {"VT": 0.5, "VF": 0.5}})
    return Staged(path, model, net, sequence)


def stream(model: BeatModel, record: EcgRecord, streams: BeatStreams | None = None, start: int = 0,
           stop: int | None = None) -> tuple[BeatStreams, list[list[float]]]:
    """Record windows [start, stop) of 1 s through `streams` (a new one, opening the device, by default); the rhythm
    stage's probabilities after each window that has them."""
    if streams is None:
        streams = BeatStreams(model)
        streams.open("d", record.fs)
    probs = []
    for k in range(start, record.window_count(1.0) if stop is None else stop):
        window = record.window(k, 1.0)
        streams.process([("d", window.leads, window.samples_mv)])
        p = streams.rhythm("d")
        if p is not None:
            probs.append([p[c] for c in RHYTHM_CLASSES])
    return streams, probs


class TestStage:
    def test_streamed_window_by_window_it_equals_one_pass_over_the_lead(self, staged: Staged,
                                                                     cu01: EcgRecord) -> None:
        _, probs = stream(staged.model, cu01)
        assert len(probs) == len(staged.sequence.labels) >= SECONDS - 5  # judged once 4 s have been seen
        np.testing.assert_allclose(probs, rhythm_probabilities(staged.net, staged.sequence), atol=1e-5)

    def test_a_saved_device_continues_as_if_never_saved(self, staged: Staged, cu01: EcgRecord) -> None:
        _, whole = stream(staged.model, cu01)
        first, before = stream(staged.model, cu01, stop=40)
        restored = BeatStreams(staged.model)
        restored.restore("d", first.save("d"))
        _, after = stream(staged.model, cu01, restored, start=40)
        np.testing.assert_array_equal(before + after, whole)

    def test_a_model_without_a_rhythm_stage_says_nothing(self, cu01: EcgRecord, tmp_path: Path) -> None:
        path = tmp_path / "without.onnx"
        path.write_bytes(SHIPPED_MODEL.read_bytes())
        write_metadata(path, read_metadata(path).model_copy(update={"rhythm_stage": None}))
        _, probs = stream(BeatModel(path), cu01, stop=10)
        assert probs == []

    def test_a_stage_that_takes_other_features_is_refused(self, staged: Staged, tmp_path: Path) -> None:
        path = tmp_path / "renamed.onnx"
        path.write_bytes(staged.path.read_bytes())
        info = read_metadata(path)
        assert info.rhythm_stage is not None
        renamed = info.rhythm_stage.model_copy(update={"feature_names": (*RHYTHM_FEATURE_NAMES[:-1], "other")})
        write_metadata(path, info.model_copy(update={"rhythm_stage": renamed}))
        with pytest.raises(ModelError, match="train-rhythm"):
            BeatModel(path)


class TestLabels:
    def test_a_window_takes_the_rhythm_it_lies_in_and_straddling_windows_are_left_out(self) -> None:
        end_s = np.arange(4.0, 30.0)
        labels = episode_labels(end_s, [Episode(0.0, 10.0, "N"), Episode(10.0, 20.0, "VF"),
                                        Episode(20.0, 30.0, "VT")])
        assert labels[end_s == 10.0] == CLASS["normal"]  # all 4 s before the VF
        assert labels[end_s == 12.0] == IGNORE  # 2 s of VF
        assert labels[end_s == 13.0] == CLASS["VF"]  # 3 s of VF
        assert labels[end_s == 29.0] == CLASS["VT"]

    def test_an_icu_alarm_labels_the_last_seconds_only(self) -> None:
        end_s = np.arange(4.0, 121.0)
        true_vt = weak_labels(end_s, 120.0, ("ventricular_tachycardia", True))
        false_vf = weak_labels(end_s, 120.0, ("ventricular_fibrillation", False))
        assert set(true_vt[end_s > 115.0]) == {CLASS["VT"]} and set(true_vt[end_s <= 115.0]) == {IGNORE}
        assert set(false_vf[end_s > 115.0]) == {-(2 + CLASS["VF"])}
        assert set(weak_labels(end_s, 120.0, ("extreme_bradycardia", True))) == {IGNORE}

    def test_a_window_known_not_to_be_a_class_lowers_its_probability(self) -> None:
        logits = torch.zeros(1, 1, len(RHYTHM_CLASSES), requires_grad=True)
        loss = stage_loss(logits, torch.tensor([[-(2 + CLASS["VF"])]]), torch.ones(len(RHYTHM_CLASSES)))
        loss.backward()  # type: ignore[no-untyped-call]
        assert logits.grad is not None and logits.grad[0, 0, CLASS["VF"]] > 0  # descent lowers the VF logit


def run(alarms: DeviceAlarms, rhythm: list[dict[str, float]], beats_from: float | None = None) -> list[AlarmEvent]:
    """1 s windows with the rhythm stage saying `rhythm[k]` in window k; N beats every second from `beats_from`."""
    events: list[AlarmEvent] = []
    for k, p in enumerate(rhythm):
        now = k + 1.0
        beats = [(k + 0.5, "N")] if beats_from is not None and k >= beats_from else []
        events += alarms.on_window(CLEAN, beats, now, now, rhythm=p)
    return events


class TestAlarms:
    VT: ClassVar[dict[str, float]] = {"normal": 0.1, "VT": 0.9}
    NORMAL: ClassVar[dict[str, float]] = {"normal": 0.9, "VT": 0.1}

    def alarms(self, raises: list[str]) -> DeviceAlarms:
        return DeviceAlarms("d", AlarmConfig.model_validate({"rhythm_stage": raises}), "v", 0.0,
                            rhythm_thresholds={"VT": 0.5, "VF": 0.5})

    def test_vt_shown_past_its_confirmation_raises_vt_and_clears_after_it_stops(self) -> None:
        events = run(self.alarms(["ventricular_tachycardia"]), [self.NORMAL] * 12 + [self.VT] * 5 + [self.NORMAL] * 12,
                     beats_from=0)
        vt = [(e.state, e.time) for e in events if e.type == "ventricular_tachycardia" and e.state != "updated"]
        assert vt[0] == ("raised", 14.0)  # shown from 13 s, confirmed 1 s later
        assert vt[-1][0] == "cleared" and vt[-1][1] >= 17.0 + AlarmConfig().rhythm_vt_clear_s

    def test_vf_shown_raises_vf_only_where_configured(self) -> None:
        vf = [self.NORMAL] * 12 + [{"normal": 0.1, "VF": 0.9}] * 5
        assert any(e.type == "ventricular_fibrillation" and e.state == "raised"
                   for e in run(self.alarms(["ventricular_fibrillation"]), vf))
        assert not any(e.type == "ventricular_fibrillation" for e in run(self.alarms(["ventricular_tachycardia"]), vf))

    def test_off_by_configuration_or_below_threshold_nothing_is_raised(self) -> None:
        assert not run(self.alarms([]), [self.NORMAL] * 12 + [self.VT] * 10)
        assert not run(self.alarms(["ventricular_tachycardia"]), [self.NORMAL] * 12 + [{"VT": 0.4}] * 10)

    def test_the_warm_up_holds_it_back(self) -> None:
        assert not run(self.alarms(["ventricular_tachycardia"]), [self.VT] * 9)

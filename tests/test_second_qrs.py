"""The second QRS detector (slope energy with gain control) and the alarm rules that take its evidence."""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np

from models import SHIPPED_MODEL
from pipeline.alarms.rules import AlarmEvent, DeviceAlarms, SignalCheck, af_probabilities
from pipeline.analysis.model import BeatModel
from pipeline.config import AlarmConfig
from pipeline.detectors.qrs import QrsDetectorBank, QrsEvidence
from pipeline.tools.records import load_record
from tests.conftest import T0
from train.noise import DETECTION_LAG_S, detected_qrs

CLEAN = SignalCheck(flat=False, saturated=False, unreadable=False, peak_to_peak_mv=1.5)


def se_ppv(found: np.ndarray, reference: np.ndarray, fs: float) -> tuple[float, float]:
    """Sensitivity and positive predictivity of `found` against `reference` (samples), 150 ms matching."""
    near = np.abs(found[None, :] - reference[:, None]) <= 0.15 * fs
    return float(near.any(axis=1).mean()), float(near.any(axis=0).mean())


class TestDetector:
    def test_finds_the_reference_beats_of_a_ds1_record(self, physionet: Path) -> None:
        record = load_record(physionet / "mitdb", "101", ["MLII"])
        n = round(300 * record.fs)
        reference = record.beat_samples[record.beat_samples < n]
        se, ppv = se_ppv(detected_qrs(record.signals_mv[0, :n], record.fs), reference, record.fs)
        assert se >= 0.99 and ppv >= 0.99

    def test_complexes_of_a_tenth_of_the_size_are_found(self, physionet: Path) -> None:
        """Gain control: MIT-BIH 101 scaled to ~0.15 mV QRS complexes loses no beats."""
        record = load_record(physionet / "mitdb", "101", ["MLII"])
        n = round(300 * record.fs)
        reference = record.beat_samples[record.beat_samples < n]
        se, ppv = se_ppv(detected_qrs(0.1 * record.signals_mv[0, :n], record.fs), reference, record.fs)
        assert se >= 0.99 and ppv >= 0.99

    def test_chunks_of_any_size_give_the_detections_of_one_pass(self, physionet: Path) -> None:
        x = load_record(physionet / "mitdb", "101", ["MLII"]).signals_mv[0, :36000].astype(np.float32)
        whole = QrsDetectorBank(1, 360.0)
        whole.update(np.array([0]), x[None, :])
        chunked = QrsDetectorBank(3, 360.0)  # slot 1 of three, fed in uneven chunks
        cuts = np.sort(np.random.default_rng(1).choice(np.arange(1, len(x)), 40, replace=False))
        for a, b in zip([0, *cuts], [*cuts, len(x)], strict=True):
            chunked.update(np.array([1]), x[None, a:b])
        np.testing.assert_array_equal(whole.times_s[0], chunked.times_s[1])
        assert np.isfinite(whole.times_s[0]).all()  # it found complexes to compare

    def test_a_saved_slot_continues_as_if_never_saved(self, physionet: Path) -> None:
        x = load_record(physionet / "mitdb", "101", ["MLII"]).signals_mv[0, :7200].astype(np.float32)
        a, b = QrsDetectorBank(1, 360.0), QrsDetectorBank(2, 360.0)
        a.update(np.array([0]), x[None, :3600])
        b.load_slot(1, a.save_slot(0))
        a.update(np.array([0]), x[None, 3600:])
        b.update(np.array([1]), x[None, 3600:])
        np.testing.assert_array_equal(a.times_s[0], b.times_s[1])

    def test_detections_lag_the_r_peak_by_the_stated_lag(self, physionet: Path) -> None:
        record = load_record(physionet / "mitdb", "101", ["MLII"])
        n = round(120 * record.fs)
        found = detected_qrs(record.signals_mv[0, :n], record.fs) / record.fs  # lag taken off
        reference = record.beat_samples[record.beat_samples < n] / record.fs
        nearest = reference[np.abs(reference[:, None] - found[None, :]).argmin(axis=0)]
        assert abs(float(np.median(found - nearest))) <= 0.5 * DETECTION_LAG_S


def run(alarms: DeviceAlarms, beats: list[float], until_s: float, qrs: list[float] | None = None,
        vf: float | None = None, organized: bool = False) -> list[AlarmEvent]:
    """Feed 1 s windows to `alarms`: N beats at `beats` (s), the second detector's complexes at `qrs` (None: no
    evidence), the VF detector saying VF from `vf` (s) on."""
    events: list[AlarmEvent] = []
    for k in range(int(until_s)):
        now = k + 1.0
        evidence = None if qrs is None else QrsEvidence(tuple(t for t in qrs if now - 12 <= t <= now), organized)
        window_beats = [(t, "N") for t in beats if k <= t < now]
        events += alarms.on_window(CLEAN, window_beats, now, now, vf is not None and now >= vf, None, evidence)
    return events


def raised(events: list[AlarmEvent], alarm_type: str) -> bool:
    return any(e.type == alarm_type and e.state == "raised" for e in events)


class TestConfirmation:
    def test_asystole_not_raised_while_the_second_detector_finds_complexes(self) -> None:
        beats = list(np.arange(0.5, 20.0, 1.0))  # then the network sees nothing
        small = list(np.arange(0.55, 40.0, 1.0))  # the second detector keeps finding complexes
        blips = [25.3, 31.7]  # single complexes far apart: not QRS activity
        checked = AlarmConfig(second_detector=["asystole"])  # not by default: docs/alarms says why
        assert raised(run(DeviceAlarms("d", checked, "v", 0.0), beats, 40), "asystole")
        assert raised(run(DeviceAlarms("d", checked, "v", 0.0), beats, 40, qrs=beats), "asystole")
        assert raised(run(DeviceAlarms("d", checked, "v", 0.0), beats, 40, qrs=beats + blips), "asystole")
        assert not raised(run(DeviceAlarms("d", checked, "v", 0.0), beats, 40, qrs=small), "asystole")
        assert raised(run(DeviceAlarms("d", AlarmConfig(), "v", 0.0), beats, 40, qrs=small), "asystole")

    def test_bradycardia_must_stay_slow_with_the_missed_complexes(self) -> None:
        beats = list(np.arange(0.5, 60.0, 2.0))  # 30 bpm from the network
        missed = sorted(beats + list(np.arange(1.5, 60.0, 2.0)))  # 60 bpm on a readable lead
        checked = AlarmConfig(second_detector=["extreme_bradycardia"])  # not by default: docs/alarms says why
        assert raised(run(DeviceAlarms("d", checked, "v", 0.0), beats, 60, qrs=beats), "extreme_bradycardia")
        assert not raised(run(DeviceAlarms("d", checked, "v", 0.0), beats, 60, qrs=missed), "extreme_bradycardia")
        assert raised(run(DeviceAlarms("d", AlarmConfig(), "v", 0.0), beats, 60, qrs=missed), "extreme_bradycardia")

    def test_tachycardia_counts_the_complexes_the_network_missed(self) -> None:
        beats = list(np.arange(0.5, 60.0, 0.6))  # 100 bpm from the network, every other complex missed
        every = sorted(beats + list(np.arange(0.8, 60.0, 0.6)))  # 200 bpm
        assert not raised(run(DeviceAlarms("d", AlarmConfig(), "v", 0.0), beats, 60, qrs=beats),
                          "extreme_tachycardia")
        assert raised(run(DeviceAlarms("d", AlarmConfig(), "v", 0.0), beats, 60, qrs=every), "extreme_tachycardia")

    def test_vf_on_one_lead_is_not_raised_while_another_shows_organized_complexes(self) -> None:
        beats = list(np.arange(0.5, 30.0, 1.0))
        assert raised(run(DeviceAlarms("d", AlarmConfig(), "v", 0.0), beats, 30, qrs=beats, vf=15.0),
                      "ventricular_fibrillation")
        assert not raised(run(DeviceAlarms("d", AlarmConfig(), "v", 0.0), beats, 30, qrs=beats, vf=15.0,
                              organized=True), "ventricular_fibrillation")


def test_af_judges_beat_times_relative_to_the_stream(physionet: Path) -> None:
    """P(AF) from Unix beat times (the daemon) equals P(AF) from times since the record's start (offline), bit for
    bit, on AF and non-AF rhythm of MIT-BIH 201."""
    record = load_record(physionet / "mitdb", "201", ["MLII"])
    times = record.beat_samples / record.fs
    detector = BeatModel(SHIPPED_MODEL).info.af_detector
    assert detector is not None
    p = []
    for origin in (0.0, T0 + 0.123456789):
        device = DeviceAlarms("d", AlarmConfig(), "v", origin)
        row = []
        for i in range(33, 600):
            device.times, device.classes = array("d", (origin + times[i - 33:i]).tolist()), "N" * 33
            row.append(af_probabilities(detector, [device], [[(origin + times[i], "N")]], [0.5])[0])
        p.append(row)
    assert p[0] == p[1]
    judged = [x for x in p[0] if x is not None]
    assert min(judged) < detector.threshold < max(judged)  # both sides of the threshold were judged

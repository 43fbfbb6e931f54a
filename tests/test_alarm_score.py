"""Alarm scoring on hand-made reference/alarm pairs whose answers are known."""

from __future__ import annotations

import pytest

from train.alarm_score import Episode, alarm_episodes, rhythm_episodes, score_type


class TestReference:
    def test_rhythm_from_aux_notes_and_vf_marks(self) -> None:
        # mitdb style "+" rhythm changes, a cudb style "[ ]" VF episode, beats in between are ignored
        times = [0.0, 10.0, 30.0, 40.0, 55.0, 70.0]
        symbols = ["+", "N", "+", "[", "]", "+"]
        notes = ["(N\x00", "", "(AFIB", "", "", "(N"]
        assert rhythm_episodes(times, symbols, notes, 100.0) == [
            Episode(0.0, 30.0, "N"), Episode(30.0, 40.0, "AF"), Episode(40.0, 55.0, "VF"),
            Episode(55.0, 70.0, "?"), Episode(70.0, 100.0, "N")]

    def test_flutter_counts_as_vf_and_repeats_merge(self) -> None:
        episodes = rhythm_episodes([0.0, 5.0, 9.0], ["+", "+", "+"], ["(VFL", "(VF", "(N"], 20.0)
        assert episodes == [Episode(0.0, 9.0, "VF"), Episode(9.0, 20.0, "N")]

    def test_alarm_episodes_from_events(self) -> None:
        events = [("a", "asystole", "raised", 10.0), ("a", "asystole", "updated", 12.0),
                  ("a", "asystole", "cleared", 15.0), ("b", "ventricular_tachycardia", "raised", 50.0)]
        assert alarm_episodes(events, 60.0) == [Episode(10.0, 15.0, "asystole"),
                                                Episode(50.0, 60.0, "ventricular_tachycardia")]


RHYTHM = (Episode(0.0, 100.0, "N"), Episode(100.0, 130.0, "VF"), Episode(130.0, 3600.0, "N"))


class TestScore:
    rhythm = RHYTHM

    def test_vf_alarmed_late_and_false_alarm_in_normal_rhythm(self) -> None:
        alarms = [Episode(107.0, 131.0, "ventricular_fibrillation"),  # 7 s after onset: alarmed
                  Episode(2000.0, 2010.0, "ventricular_fibrillation")]  # in normal rhythm: false
        s = score_type("ventricular_fibrillation", alarms, self.rhythm, self.rhythm, min_event_s=5.0)
        assert (s.events, s.events_alarmed, s.alarms, s.alarms_true) == (1, 1, 2, 1)
        assert s.delays_s == [7.0]
        assert s.false == [Episode(2000.0, 2010.0, "ventricular_fibrillation")]
        assert s.false_in_normal_rhythm == 1
        summary = s.summary(monitored_h=1.0, normal_h=0.5)
        assert summary["episode_se"] == 1.0 and summary["episode_ppv"] == 0.5
        assert summary["false_per_hour_normal_rhythm"] == 2.0

    def test_missed_when_alarm_comes_after_tolerance(self) -> None:
        alarms = [Episode(136.0, 140.0, "ventricular_fibrillation")]  # 6 s after the end, tolerance 5 s
        s = score_type("ventricular_fibrillation", alarms, self.rhythm, self.rhythm, tolerance_s=5.0)
        assert s.events_alarmed == 0 and s.missed == [Episode(100.0, 130.0, "VF")]
        assert s.alarms_true == 0 and s.false_in_normal_rhythm == 1

    def test_alarm_active_before_onset_has_zero_delay(self) -> None:
        alarms = [Episode(95.0, 120.0, "ventricular_fibrillation")]
        s = score_type("ventricular_fibrillation", alarms, self.rhythm, self.rhythm)
        assert s.delays_s == [0.0] and s.alarms_true == 1

    def test_short_events_not_scored_for_sensitivity(self) -> None:
        rhythm = [Episode(0.0, 50.0, "N"), Episode(50.0, 53.0, "VF"), Episode(53.0, 100.0, "N")]
        s = score_type("ventricular_fibrillation", [], rhythm, rhythm, min_event_s=5.0)
        assert s.events == 0

    def test_asystole_in_vf_is_not_false_but_not_vf_either(self) -> None:
        alarms = [Episode(104.0, 130.0, "asystole")]
        asystole = score_type("asystole", alarms, self.rhythm, self.rhythm)
        vf = score_type("ventricular_fibrillation", alarms, self.rhythm, self.rhythm)
        assert asystole.alarms_true == 1 and asystole.false == []
        assert vf.events == 1 and vf.events_alarmed == 0

    def test_beat_derived_event_matched_within_tolerance(self) -> None:
        references = [*self.rhythm, Episode(500.0, 506.0, "ventricular_tachycardia")]
        alarms = [Episode(509.0, 512.0, "ventricular_tachycardia")]  # 3 s after the reference run ended
        s = score_type("ventricular_tachycardia", alarms, references, self.rhythm)
        assert (s.events, s.events_alarmed, s.alarms_true) == (1, 1, 1)
        assert s.delays_s == [9.0]

    def test_af_duration_statistics(self) -> None:
        rhythm = [Episode(0.0, 100.0, "N"), Episode(100.0, 300.0, "AF"), Episode(300.0, 400.0, "AFL"),
                  Episode(400.0, 1000.0, "N")]
        alarms = [Episode(120.0, 350.0, "atrial_fibrillation"),  # 180 s in AF, 50 s in flutter (justified)
                  Episode(600.0, 650.0, "atrial_fibrillation")]  # 50 s false
        s = score_type("atrial_fibrillation", alarms, rhythm, rhythm)
        summary = s.summary(monitored_h=1.0, normal_h=1.0)
        assert summary["duration_se"] == pytest.approx(180 / 200)
        assert summary["duration_ppv"] == pytest.approx(230 / 280)
        assert (s.events_alarmed, s.alarms_true) == (1, 1)


class TestRhythmLabels:
    def test_physionet_labels_for_lethal_rhythms(self) -> None:
        """The Malignant Ventricular Ectopy Database's "(VFIB", "(ASYS", "(NSR" map onto the scored labels."""
        episodes = rhythm_episodes([0.0, 10.0, 20.0, 30.0], ["+"] * 4, ["(NSR", "(VFIB", "(ASYS", "(VT"], 40.0)
        assert [e.label for e in episodes] == ["N", "VF", "asystole", "VT"]

    def test_vt_episodes_and_beat_derived_vt_are_one_event(self) -> None:
        references = [Episode(10.0, 20.0, "VT"), Episode(12.0, 14.0, "ventricular_tachycardia"),
                      Episode(50.0, 55.0, "VT"), Episode(70.0, 71.0, "VT")]  # the last: a three-beat run
        s = score_type("ventricular_tachycardia", [Episode(11.0, 15.0, "ventricular_tachycardia")], references,
                       [Episode(0.0, 60.0, "N")])
        assert s.events == 2 and s.events_alarmed == 1 and len(s.missed) == 1

"""Alarm rules on constructed beat sequences: each raised and cleared, technical alarms hold back the rest."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.alarms import AlarmEvent, DeviceAlarms, SignalCheck
from pipeline.config import AlarmConfig

CONFIG = AlarmConfig()
CLEAN = SignalCheck(flat=False, saturated=False, noisy=False, peak_to_peak_mv=1.5, noise_mv=0.01)


def feed(alarms: DeviceAlarms, rhythm: list[tuple[str, float]], start: float) -> tuple[list[AlarmEvent], float]:
    """Beats of (class, RR before it in s), one window per beat; returns events and the last beat time."""
    events, t = [], start
    for cls, rr in rhythm:
        t += rr
        events += alarms.on_window(CLEAN, [(t, cls)], t + 0.3, t)
    return events, t


def states(events: list[AlarmEvent], alarm_type: str) -> list[str]:
    return [e.state for e in events if e.type == alarm_type]


def normal(n: int, rr: float = 0.8) -> list[tuple[str, float]]:
    return [("N", rr)] * n


@pytest.mark.parametrize(("alarm_type", "episode"), [
    ("extreme_bradycardia", normal(8, 1.8)),
    ("extreme_tachycardia", normal(25, 0.35)),
    ("ventricular_tachycardia", [("V", 0.4)] * 8),
    ("svt", [("S", 0.4)] * 8),
    ("ventricular_couplet", [("V", 0.6), ("V", 0.6)]),
    ("ventricular_bigeminy", [("V", 0.6), ("N", 1.0)] * 4),
    ("ventricular_trigeminy", [("V", 0.6), ("N", 1.0), ("N", 0.8)] * 4),
])
def test_rhythm_alarm_raised_then_cleared(alarm_type: str, episode: list[tuple[str, float]]) -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    events, t = feed(alarms, normal(20), 0.0)
    assert events == []
    events, t = feed(alarms, episode, t)
    assert states(events, alarm_type)[:1] == ["raised"]
    events, t = feed(alarms, normal(60), t)  # 48 s of sinus rhythm
    assert states(events, alarm_type)[-1:] == ["cleared"]
    assert not alarms.active


def test_pvc_burden() -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    events, t = feed(alarms, ([("N", 0.8)] * 4 + [("V", 0.6)]) * 20, 0.0)  # 20 isolated PVCs in 79 s
    assert states(events, "pvc_burden") == ["raised"]
    events, _ = feed(alarms, normal(100), t)
    assert states(events, "pvc_burden") == ["cleared"]


def test_asystole_raised_after_4_s_and_cleared_by_a_beat() -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    _, t = feed(alarms, normal(10), 0.0)
    assert alarms.on_window(CLEAN, [], t + 4.5, t + 3.9) == []  # 4.5 s of signal, but beats known to 3.9 s only
    events = alarms.on_window(CLEAN, [], t + 4.6, t + 4.2)
    assert states(events, "asystole") == ["raised"]
    assert events[0].priority == "high" and events[0].evidence["seconds_without_qrs"] == pytest.approx(4.2)
    assert events[0].time == pytest.approx(t + 4.0)  # when the pause reached 4 s, not the window's end
    events, _ = feed(alarms, [("N", 4.3)], t)  # the beat that ends the pause, emitted after the raise
    assert states(events, "asystole") == ["cleared"] and events[0].time == pytest.approx(t + 4.3)


def test_a_pause_shorter_than_asystole_emitted_late_raises_nothing() -> None:
    """A beat 3.6 s after the last arrives in the window ending 0.5 s after it: never an asystole."""
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    _, t = feed(alarms, normal(15), 0.0)
    events = alarms.on_window(CLEAN, [], t + 3.5, t + 3.1)
    events += alarms.on_window(CLEAN, [(t + 3.6, "N")], t + 4.1, t + 3.7)
    events += alarms.on_window(CLEAN, [], t + 4.5, t + 4.1)
    assert states(events, "asystole") == []


def test_a_pause_seen_whole_between_two_checks_is_an_asystole() -> None:
    """4.4 s without QRS, ended by a beat that comes out before any window saw 4 s of it: raised, then cleared."""
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    _, t = feed(alarms, normal(15), 0.0)
    events = alarms.on_window(CLEAN, [], t + 3.9, t + 3.6)
    events += alarms.on_window(CLEAN, [(t + 4.4, "N")], t + 4.9, t + 4.6)
    assert [(e.state, e.time) for e in events] == [("raised", pytest.approx(t + 4.0)), ("cleared", t + 4.4)]
    assert events[0].evidence["seconds_without_qrs"] == pytest.approx(4.4)


def test_no_bradycardia_from_the_pause_that_was_an_asystole() -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    _, t = feed(alarms, normal(15), 0.0)
    events = alarms.on_window(CLEAN, [], t + 6.5, t + 6.0)
    events, _ = feed(alarms, normal(8), t + 6.1)
    assert states(events, "asystole") == ["cleared"]
    assert "extreme_bradycardia" not in {e.type for e in events}


def test_pvc_burden_does_not_chatter_around_its_threshold() -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    events, t = feed(alarms, ([("N", 0.8)] * 4 + [("V", 0.6)]) * 20, 0.0)  # 15 PVCs a minute
    events, t = feed(alarms, ([("N", 0.8)] * 5 + [("V", 0.6)]) * 30, t)  # 11-12 a minute: still raised
    events += feed(alarms, ([("N", 0.8)] * 6 + [("V", 0.6)]) * 30, t)[0]  # 10 a minute: still raised, no chatter
    assert states(events, "pvc_burden") == []


def test_leads_off_holds_back_physiological_alarms_and_says_so() -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    _, t = feed(alarms, normal(10), 0.0)
    flat = SignalCheck.batch([np.zeros(360)], CONFIG)[0]
    events = []
    for k in range(10):  # 10 s of flat line: no beats, yet no asystole
        events += alarms.on_window(flat, [], t + k + 1, t + k + 0.7)
    assert [e.type for e in events] == ["leads_off"]
    assert events[0].evidence["physiological_alarms"] == "suspended"
    events, _ = feed(alarms, normal(3), t + 10)
    assert states(events, "leads_off") == ["cleared"]


@pytest.mark.parametrize(("alarm_type", "samples"), [
    ("saturation", np.concatenate([np.zeros(300), np.full(60, 6.0)])),
    ("poor_signal", np.random.default_rng(0).normal(0, 0.5, 360)),
])
def test_signal_checks(alarm_type: str, samples: np.ndarray) -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    events = alarms.on_window(SignalCheck.batch([samples], CONFIG)[0], [], 1.0, 0.7)
    assert states(events, alarm_type) == ["raised"]
    assert states(alarms.on_window(CLEAN, [], 2.0, 1.7), alarm_type) == ["cleared"]


def test_signal_loss_and_gap() -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    assert alarms.on_silence(5.0, 5.0) == []
    assert states(alarms.on_silence(11.0, 11.0), "signal_loss") == ["raised"]
    assert states(alarms.on_silence(12.0, 0.5), "signal_loss") == ["cleared"]
    assert states(alarms.on_gap(20.0, {}), "data_gap") == ["raised"]
    assert alarms.on_window(CLEAN, [], 25.0, 24.7) == []
    assert states(alarms.on_window(CLEAN, [], 31.0, 30.7), "data_gap") == ["cleared"]


def test_windows_dropped_clears_only_after_a_quiet_hold() -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    events = []
    for k in range(30):  # drops every other second (the last at 29 s): one alarm, not fifteen
        events += alarms.on_overload(float(k), k % 2)
    assert states(events, "windows_dropped") == ["raised"]
    assert states(alarms.on_overload(29.0 + CONFIG.overload_hold_s, 0), "windows_dropped") == ["cleared"]


def test_a_clear_never_comes_before_its_raise() -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    raised = alarms.on_silence(50.0, 11.0)[0]
    cleared = alarms.on_silence(40.0, 0.5)[0]  # a restored or skewed clock says earlier
    assert cleared.state == "cleared" and cleared.time >= raised.time


def test_no_physiological_alarm_during_warm_up() -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    events, t = feed(alarms, [("V", 0.4)] * 20, 0.0)  # a VT-like start within the first 10 s
    assert events == []
    events, _ = feed(alarms, [("V", 0.4)] * 8, t)
    assert states(events, "ventricular_tachycardia") == ["raised"]


def test_alarm_id_is_stable_across_updates() -> None:
    alarms = DeviceAlarms("dev", AlarmConfig(update_interval_s=0), "test", 0.0)
    events, _ = feed(alarms, normal(5) + normal(40, 0.3), 0.0)
    tachy = [e for e in events if e.type == "extreme_tachycardia"]
    assert [e.state for e in tachy][:2] == ["raised", "updated"]
    assert len({e.alarm_id for e in tachy}) == 1


def test_reconcile_open_alarms_with_the_restored_state() -> None:
    from pipeline.messages import alarm
    from pipeline.reconcile import reconcile

    held = DeviceAlarms("bed", CONFIG, "test", 0.0)
    kept = held.on_silence(20.0, 11.0)[0]  # signal_loss, open on the broker too: goes on
    stale = held.on_gap(25.0, {})[0]  # data_gap, cleared after the state was saved: forgotten
    lost = DeviceAlarms("bed", CONFIG, "test", 0.0).on_window(  # raised after the save: its state is gone
        SignalCheck.batch([np.concatenate([np.zeros(300), np.full(60, 6.0)])], CONFIG)[0], [], 30.0, 29.7)[0]
    other = DeviceAlarms("cot", CONFIG, "test", 0.0).on_silence(40.0, 12.0)[0]  # a device it never had
    docs = [alarm(kept), alarm(lost), alarm(other), {"alarm_id": "junk"}]
    events = reconcile(docs, {"bed": held}, lambda device: {"bed": 35.0}.get(device, 0.0))
    assert [(e.alarm_id, e.state) for e in events] == [(lost.alarm_id, "cleared"), (other.alarm_id, "cleared")]
    assert events[0].time == 35.0 and events[1].time == 40.0  # never before the raise
    assert held.alarm_ids() == {kept.alarm_id} and stale.alarm_id != kept.alarm_id

"""Alarm rules on constructed beat sequences: each raised and cleared, technical alarms hold back the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.alarms.rules import AlarmEvent, DeviceAlarms, SignalCheck
from pipeline.config import AlarmConfig
from pipeline.io.codec import Window
from pipeline.tools.records import load_record

CONFIG = AlarmConfig()
CLEAN = SignalCheck(flat=False, saturated=False, unreadable=False, peak_to_peak_mv=1.5)


def check(samples_mv: np.ndarray, fs: float = 360.0, adc_gain: float = 200.0) -> SignalCheck:
    """The signal check of one window (mV) that came in ADC units of `adc_gain` per mV."""
    window = Window(0, 0.0, fs, ("MLII",), samples_mv[None], (adc_gain,), (0.0,))
    return SignalCheck.batch([window], [False], [[]], CONFIG)[0]


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
    flat = check(np.zeros(360))
    events = []
    for k in range(10):  # 10 s of flat line: no beats, yet no asystole
        events += alarms.on_window(flat, [], t + k + 1, t + k + 0.7)
    assert [e.type for e in events] == ["leads_off"]
    assert events[0].evidence["physiological_alarms"] == "suspended"
    events, _ = feed(alarms, normal(3), t + 10)
    assert states(events, "leads_off") == ["cleared"]


def test_saturation_raised_and_cleared() -> None:
    alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
    events = alarms.on_window(check(np.concatenate([np.zeros(300), np.full(60, 6.0)])), [], 1.0, 0.7)
    assert states(events, "saturation") == ["raised"]
    assert states(alarms.on_window(CLEAN, [], 2.0, 1.7), "saturation") == ["cleared"]


class TestPoorSignal:
    """The quality detector's verdicts (`SignalCheck.unreadable`) become poor_signal, which holds back the
    non-lethal physiological alarms only."""

    NOISY = SignalCheck(flat=False, saturated=False, unreadable=True, peak_to_peak_mv=3.0)

    def test_raised_at_once_and_cleared_after_a_readable_hold(self) -> None:
        alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
        _, t = feed(alarms, normal(20), 0.0)
        assert states(alarms.on_window(self.NOISY, [], t + 1, t + 0.7), "poor_signal") == ["raised"]
        events = [e for k in range(2, 2 + int(CONFIG.poor_signal_clear_s)) for e in
                  alarms.on_window(CLEAN, [(t + k - 0.5, "N")], t + k, t + k - 0.3)]
        assert states(events, "poor_signal") == ["cleared"]
        assert events[-1].time - t - 1 == pytest.approx(CONFIG.poor_signal_clear_s)

    def test_holds_back_ventricular_tachycardia_but_not_asystole_or_vf(self) -> None:
        alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
        _, t = feed(alarms, normal(20), 0.0)
        events = alarms.on_window(self.NOISY, [], t + 0.3, t)
        assert events[0].evidence["physiological_alarms"] == "suspended except ventricular_fibrillation and asystole"
        for _ in range(10):  # noise called V beats at 150 bpm: no VT alarm
            t += 0.4
            events += alarms.on_window(self.NOISY, [(t, "V")], t + 0.3, t)
        assert {e.type for e in events} == {"poor_signal"}
        for k in range(1, 6):  # then nothing at all: asystole after 4 s, through the noise
            events += alarms.on_window(self.NOISY, [], t + k, t + k)
        assert states(events, "asystole") == ["raised"]
        for k in range(6, 9):  # VF found in the noise
            events += alarms.on_window(self.NOISY, [], t + k, t + k, vf_found=True)
        assert states(events, "ventricular_fibrillation") == ["raised"]

    def test_beats_found_in_noise_do_not_count_after_it(self) -> None:
        alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
        _, t = feed(alarms, normal(20), 0.0)
        events = []
        for _ in range(12):  # noise called V beats (more than pvc_per_min), then readable signal again
            t += 0.4
            events += alarms.on_window(self.NOISY, [(t, "V")], t + 0.3, t)
        events += feed(alarms, normal(int(CONFIG.poor_signal_clear_s / 0.8) + 1), t)[0]
        assert states(events, "poor_signal") == ["raised", "cleared"]
        assert {e.type for e in events} == {"poor_signal"}
        events, _ = feed(alarms, [("V", 0.8)], events[-1].time)  # one real V beat is not a PVC burden
        assert events == []


class TestFibrillation:
    """The VF detector's verdicts per window (`vf_found`) become the ventricular_fibrillation alarm."""

    def test_raised_after_confirmation_supersedes_asystole_and_clears(self) -> None:
        alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
        _, t = feed(alarms, normal(15), 0.0)
        events: list[AlarmEvent] = []
        for k in range(1, 13):  # 12 s of VF: no beats, the detector says VF in every window
            events += alarms.on_window(CLEAN, [], t + k, t + k - 0.3, vf_found=True)
        vf = [e for e in events if e.type == "ventricular_fibrillation"]
        assert [e.state for e in vf] == ["raised"]
        assert vf[0].time == t + 1 + CONFIG.vf_confirm_s and vf[0].priority == "high"
        assert states(events, "asystole") == []  # the pause is VF, not asystole
        after = []
        for k in range(13, 20):  # the detector stops saying VF: cleared vf_clear_s after the last VF window
            after += alarms.on_window(CLEAN, [], t + k, t + k - 0.3, vf_found=False)
        cleared = [e for e in after if e.type == "ventricular_fibrillation"]
        assert [e.state for e in cleared] == ["cleared"] and cleared[0].time == t + 12 + CONFIG.vf_clear_s

    def test_a_break_restarts_the_confirmation(self) -> None:
        alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
        _, t = feed(alarms, normal(15), 0.0)
        events: list[AlarmEvent] = []
        for k, found in enumerate([True, False, True, False, True, False], start=1):
            events += alarms.on_window(CLEAN, [(t + k - 0.5, "N")], t + k, t + k - 0.3, vf_found=found)
        assert states(events, "ventricular_fibrillation") == []


class TestSaturation:
    """Saturation is a signal held at a rail, not a large amplitude."""

    def test_clipped_at_a_rail(self) -> None:
        t = np.arange(360) / 360
        clipped = np.minimum(3.0 * np.sin(2 * np.pi * 1.5 * t), 2.5)  # a large wave flattened at +2.5 mV
        assert check(clipped).saturated

    def test_tall_narrow_peaks_are_not_saturation(self) -> None:
        x = np.zeros(360)
        x[100:104] = [3.0, 8.0, 8.0, 3.0]  # an 8 mV R peak, two samples at its top
        assert not check(x).saturated

    def test_a_plateau_near_the_baseline_is_not_saturation(self) -> None:
        x = np.zeros(360)
        x[:200] = 0.4  # a flat stretch at 0.4 mV: ST segment or baseline, not a rail
        assert not check(x).saturated

    def test_rail_judged_within_the_adc_step(self) -> None:
        x = np.full(360, 2.0)
        x[::2] += 0.002  # 0.4 ADC units apart at 200 units/mV (one value, rounding), 2 units at 1000 units/mV
        x[:100] = 0.0
        assert check(x, adc_gain=200.0).saturated
        assert not check(x, adc_gain=1000.0).saturated

    def test_int16_limits(self) -> None:
        x = np.zeros(360)
        x[10] = 32767 / 200.0  # one sample at the binary format's upper limit
        assert check(x).saturated

    def test_saturation_does_not_hide_ventricular_tachycardia(self) -> None:
        """A clipped QRS still times its beat: VT during saturation is raised, not held back."""
        alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
        _, t = feed(alarms, normal(15), 0.0)
        clipped = check(np.concatenate([np.zeros(300), np.full(60, 6.0)]))
        events = alarms.on_window(clipped, [], t + 0.3, t)
        assert states(events, "saturation") == ["raised"]
        assert events[0].evidence["physiological_alarms"] == "active"
        for k in range(1, 8):
            events += alarms.on_window(clipped, [(t + 0.4 * k, "V")], t + 0.4 * k + 0.3, t + 0.4 * k)
        assert states(events, "ventricular_tachycardia") == ["raised"]

    def test_a_signal_pinned_at_a_rail_holds_back_physiological_alarms(self) -> None:
        """Pinned at -5 mV for most of each window (after a defibrillation, say): nothing can be read."""
        alarms = DeviceAlarms("dev", CONFIG, "test", 0.0)
        _, t = feed(alarms, normal(15), 0.0)
        pinned = check(np.concatenate([np.full(250, -5.0), np.random.default_rng(0).normal(0, 0.5, 110)]))
        assert pinned.saturated and pinned.rail_share > CONFIG.saturation_unreadable_share
        events = []
        for k in range(1, 8):
            events += alarms.on_window(pinned, [(t + 0.4 * k, "V")], t + 0.4 * k + 0.3, t + 0.4 * k, vf_found=True)
        assert [e.type for e in events] == ["saturation"]
        assert events[0].evidence["physiological_alarms"] == "suspended"

    @pytest.mark.parametrize("name", ["cu09", "cu13", "cu31"])
    def test_tall_real_ecg_is_not_saturated(self, physionet: Path, name: str) -> None:
        """cudb records whose waves reach 5 mV were called saturated by the former fixed 5 mV threshold in
        11-26 windows each; held to the rails, they are not."""
        record = load_record(physionet / "cudb", name)
        assert np.abs(record.signal_mv).max() >= 5.0
        windows = [record.window(k, 1.0) for k in range(record.window_count(1.0) - 1)]
        checks = SignalCheck.batch(windows, [False] * len(windows), [[]] * len(windows), CONFIG)
        saturated = sum(c.saturated for c in checks)
        assert saturated <= 0.01 * len(windows)


    def test_real_clipping_is_found(self, physionet: Path) -> None:
        """cudb cu34 clips at +3.198 / -3.200 mV during its arrhythmia: those windows are saturated."""
        record = load_record(physionet / "cudb", "cu34")
        windows = [record.window(k, 1.0) for k in range(record.window_count(1.0) - 1)]
        checks = SignalCheck.batch(windows, [False] * len(windows), [[]] * len(windows), CONFIG)
        saturated = [w for w, c in zip(windows, checks, strict=True) if c.saturated]
        assert len(saturated) >= 20
        assert all(np.isclose(np.abs(w.samples_mv).max(), 3.2, atol=0.01) for w in saturated)


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


def test_reconcile_adopts_the_open_alarms_the_daemon_holds_no_state_for() -> None:
    from pipeline.alarms.reconcile import reconcile
    from pipeline.io.messages import alarm

    held = DeviceAlarms("bed", CONFIG, "test", 0.0)
    kept = held.on_silence(20.0, 11.0)[0]  # signal_loss, open on the broker too: goes on
    stale = held.on_gap(25.0, {})[0]  # data_gap, cleared after the state was saved: forgotten
    lost = DeviceAlarms("bed", CONFIG, "test", 0.0).on_window(  # raised after the save: its state is gone
        check(np.concatenate([np.zeros(300), np.full(60, 6.0)])), [], 30.0, 29.7)[0]
    other = DeviceAlarms("cot", CONFIG, "test", 0.0).on_silence(40.0, 12.0)[0]  # a device it never had
    docs = [alarm(kept), alarm(lost), alarm(other), {"alarm_id": "junk"}]
    alarms_of = {"bed": held}
    adopted = reconcile(docs, alarms_of, lambda device, t: DeviceAlarms(device, CONFIG, "test", t))
    assert adopted == {"bed": 30.0, "cot": 40.0}  # nothing is cleared: no data has judged them again
    assert held.alarm_ids() == {kept.alarm_id, lost.alarm_id} and stale.alarm_id != kept.alarm_id
    assert alarms_of["cot"].alarm_ids() == {other.alarm_id}
    # The adopted saturation alarm keeps its id and is cleared by its rule once a clean window comes.
    events = held.on_window(check(np.zeros(360) + 0.1 * np.sin(np.arange(360))), [], 31.0, 30.7)
    assert [(e.alarm_id, e.state) for e in events if e.type == "saturation"] == [(lost.alarm_id, "cleared")]

"""Beat picking: runs above threshold become beats; window edges change nothing; the beat time line."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.config import ModelConfig
from pipeline.analysis.beats import BeatPickerState, Decision, pick_beats, r_peak_output_frame, r_peak_time_s

DECISION = Decision(0.5, (1.0,) * 5)


def synthetic_probs(rng: np.random.Generator, n_streams: int, n_frames: int) -> np.ndarray:
    probs = np.zeros((n_streams, n_frames, 6), dtype=np.float32)
    probs[:, :, 0] = 1.0
    for s in range(n_streams):
        for start in range(5, n_frames - 5, int(rng.integers(15, 40))):
            width = int(rng.integers(1, 5))
            cls = int(rng.integers(1, 6))
            probs[s, start:start + width, 0] = 0.1
            probs[s, start:start + width, cls] = 0.9
    return probs


def test_one_beat_per_run_with_its_class_and_peak() -> None:
    probs = np.zeros((1, 10, 6), dtype=np.float32)
    probs[0, :, 0] = 1.0
    probs[0, 3:6, 0] = [0.4, 0.1, 0.3]
    probs[0, 3:6, 3] = [0.6, 0.9, 0.7]  # V
    picked = pick_beats(probs, BeatPickerState(1, 6), np.array([0]), DECISION)
    assert picked.frame.tolist() == [4]
    assert picked.class_index.tolist() == [3]
    assert picked.confidence[0] > 0.99


def test_windowed_equals_one_pass() -> None:
    rng = np.random.default_rng(0)
    probs = synthetic_probs(rng, 3, 600)
    whole = pick_beats(probs, BeatPickerState(3, 6), np.arange(3), DECISION)
    state = BeatPickerState(8, 6)
    slots = np.array([5, 1, 7])  # slots need not be rows
    parts = []
    edges = [0, 7, 30, 31, 95, 300, 451, 600]
    for a, b in itertools.pairwise(edges):
        parts.append(pick_beats(probs[:, a:b], state, slots, DECISION))
    got = sorted((int(r), int(f), int(c)) for p in parts for r, f, c in zip(p.row, p.frame, p.class_index,
                                                                            strict=True))
    want = sorted(zip(whole.row.tolist(), whole.frame.tolist(), whole.class_index.tolist(), strict=True))
    assert got == want
    assert len(want) > 40


def test_decision_weights_change_the_choice() -> None:
    sums = np.array([[0.5, 0.4, 0.1, 0.0, 0.0]], dtype=np.float32)  # N slightly ahead of S
    assert Decision(0.5, (1.0,) * 5).classify(sums)[0].tolist() == [1]
    cls, conf = Decision(0.5, (1.0, 1.5, 1.0, 1.0, 1.0)).classify(sums)
    assert cls.tolist() == [2] and conf[0] == np.float32(0.4)


@pytest.mark.parametrize("config", [ModelConfig(), ModelConfig(fs=250.0, frame_size=7, output_delay_frames=3)])
def test_r_peak_frame_and_time_round_trip(config: ModelConfig) -> None:
    """Output frame -> R-peak time -> output frame is the identity; time -> frame -> time lands on the centre
    of the R peak's frame, within half a frame, `output_delay_s` before the output frame's centre."""
    frames = np.arange(config.output_delay_frames, 20_000)
    times = r_peak_time_s(frames, config)
    np.testing.assert_array_equal(r_peak_output_frame(times, config), frames)
    np.testing.assert_allclose(times, (frames + 0.5) * config.frame_s - config.output_delay_s, atol=1e-9)
    peaks = np.random.default_rng(0).uniform(0.0, 600.0, 10_000)
    back = r_peak_time_s(r_peak_output_frame(peaks, config), config)
    assert np.abs(back - peaks).max() <= config.frame_s / 2

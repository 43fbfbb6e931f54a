"""The shared causal DSP: streaming equals one pass, causality, frequency response, resampling."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from pipeline.analysis.dsp import FilterSpec, LinearResampler, Preprocessor, check_fs


def chunks(x: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=40, replace=False))
    return np.split(x, cuts)


@pytest.mark.parametrize("fs", [128.0, 250.0, 360.0, 500.0, 1000.0])
def test_streaming_equals_one_pass(fs: float) -> None:
    rng = np.random.default_rng(int(fs))
    x = rng.normal(size=int(20 * fs)) + 0.5
    whole = Preprocessor(FilterSpec(), fs, 360.0, 12)(x)
    streaming = Preprocessor(FilterSpec(), fs, 360.0, 12)
    parts = np.concatenate([streaming(c) for c in chunks(x, rng)])
    assert parts.shape == whole.shape
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-6)


def test_causal_future_does_not_change_past() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=3600)
    y = rng.normal(size=3600)
    a = Preprocessor(FilterSpec(), 250.0, 360.0, 12)(np.concatenate([x, y]))
    b = Preprocessor(FilterSpec(), 250.0, 360.0, 12)(np.concatenate([x, np.zeros_like(y)]))
    n_past = int(len(x) * 360 / 250) // 12 - 1
    np.testing.assert_array_equal(a[:n_past], b[:n_past])
    assert not np.array_equal(a[n_past + 2:], b[n_past + 2:])


def test_bandpass_response() -> None:
    fs = 360.0
    _, h = signal.sosfreqz(FilterSpec().sos(fs), worN=[0.05, 10.0, 100.0], fs=fs)
    gain = np.abs(h)
    assert gain[1] == pytest.approx(1.0, abs=0.02)  # QRS band passes
    assert gain[0] < 0.02  # baseline wander removed
    assert gain[2] < 0.2  # above the band attenuated


def test_dc_offset_gives_no_start_up_step() -> None:
    frames = Preprocessor(FilterSpec(), 360.0, 360.0, 12)(np.full(3600, 2.5))
    assert np.abs(frames).max() < 1e-6


@pytest.mark.parametrize(("fs_in", "fs_out"), [(128.0, 360.0), (1000.0, 360.0), (250.0, 360.0)])
def test_resampler_keeps_frequency_and_timing(fs_in: float, fs_out: float) -> None:
    t_in = np.arange(int(10 * fs_in)) / fs_in
    y = LinearResampler(fs_in, fs_out)(np.sin(2 * np.pi * 5.0 * t_in))
    t_out = np.arange(len(y)) / fs_out
    np.testing.assert_allclose(y, np.sin(2 * np.pi * 5.0 * t_out), atol=0.01)
    assert len(y) == pytest.approx(10 * fs_out, abs=3)


@pytest.mark.parametrize("fs", [0.0, 100.0, 1200.0])
def test_rejects_unsupported_rate(fs: float) -> None:
    with pytest.raises(ValueError, match="outside the supported"):
        check_fs(fs)


def test_filter_must_fit_below_nyquist() -> None:
    with pytest.raises(ValueError, match="below fs/2"):
        FilterSpec(high_hz=70.0).sos(128.0)

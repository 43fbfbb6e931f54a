"""Property-based: whatever bytes arrive, the decoder returns a valid window or a DecodeError with a known reason."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec import (
    BINARY_HEADER,
    BINARY_MAGIC,
    DECODE_REASONS,
    MIN_T0,
    DecodeError,
    Window,
    decode_window,
    encode_binary,
)
from tests.conftest import T0

LIMIT = 64_000


def check(payload: bytes) -> None:
    try:
        window = decode_window(payload, LIMIT)
    except DecodeError as err:
        assert err.reason in DECODE_REASONS
        return
    assert isinstance(window, Window)
    assert 128 <= window.fs <= 1000 and 0 <= window.seq < 2**32
    one_sample = 1 / window.fs
    assert np.isfinite(window.samples_mv).all() and 0.25 - one_sample <= window.duration_s <= 10 + one_sample


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes(payload: bytes) -> None:
    check(payload)


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=BINARY_HEADER.size - 4, max_size=3000))
def test_random_binary_after_magic(rest: bytes) -> None:
    check(BINARY_MAGIC + rest)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=4), max_leaves=10)


@settings(max_examples=2000, deadline=None)
@given(st.fixed_dictionaries({}, optional={"v": json_values, "seq": json_values, "t0": json_values,
                                           "fs": json_values, "lead": json_values, "gain": json_values,
                                           "baseline": json_values, "samples": json_values}))
def test_random_json_fields(doc: dict[str, object]) -> None:
    check(json.dumps(doc).encode())


@settings(max_examples=1000, deadline=None)
@given(seq=st.integers(0, 2**32 - 1), t0=st.floats(MIN_T0, T0), fs=st.sampled_from([128.0, 250.0, 360.0, 1000.0]),
       seconds=st.sampled_from([0.25, 1.0, 2.5, 10.0]), gain=st.floats(40.0, 1000.0), baseline=st.integers(-2000, 2000),
       seed=st.integers(0, 1000))
def test_valid_binary_windows_decode_exactly(seq: int, t0: float, fs: float, seconds: float, gain: float,
                                             baseline: int, seed: int) -> None:
    adc = np.random.default_rng(seed).integers(-32768, 32767, round(fs * seconds), dtype=np.int16)
    window = decode_window(encode_binary(seq, t0, fs, "MLII", adc, gain, baseline), LIMIT)
    assert window.seq == seq and window.t0 == t0 and math.isclose(window.fs, fs)
    np.testing.assert_allclose(window.samples_mv, (adc.astype(np.float64) - baseline) / np.float32(gain))

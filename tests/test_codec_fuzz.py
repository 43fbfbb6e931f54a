"""Property-based: whatever bytes arrive, the decoder returns a valid window or a DecodeError with a known reason."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.io.codec import (
    BINARY_HEADER_V1,
    BINARY_HEADER_V2,
    BINARY_LEAD_V2,
    BINARY_MAGIC,
    DECODE_REASONS,
    MAX_LEADS,
    MIN_T0,
    DecodeError,
    Window,
    decode_window,
    encode_binary,
    encode_json,
)
from tests.conftest import T0

LIMIT = 64_000
FS = st.sampled_from([128.0, 250.0, 360.0, 1000.0])
LEAD_NAMES = st.lists(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=32),
                      min_size=1, max_size=MAX_LEADS, unique=True)


def check(payload: bytes, limit: int = LIMIT) -> None:
    try:
        window = decode_window(payload, limit)
    except DecodeError as err:
        assert err.reason in DECODE_REASONS
        return
    assert isinstance(window, Window)
    assert 128 <= window.fs <= 1000 and 0 <= window.seq < 2**32
    n_leads = len(window.leads)
    assert 1 <= n_leads <= MAX_LEADS and len(set(window.leads)) == n_leads
    assert len(window.adc_gain) == len(window.adc_baseline) == n_leads and min(window.adc_gain) > 0
    assert window.samples_mv.dtype == np.float64 and window.samples_mv.shape[0] == n_leads
    one_sample = 1 / window.fs
    assert np.isfinite(window.samples_mv).all() and 0.25 - one_sample <= window.duration_s <= 10 + one_sample
    assert np.abs(window.samples_mv).max() <= 1000


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes(payload: bytes) -> None:
    check(payload)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([1, 2, 3]), st.binary(min_size=BINARY_HEADER_V2.size - 5, max_size=3000))
def test_random_binary_after_magic_and_version(version: int, rest: bytes) -> None:
    check(BINARY_MAGIC + bytes([version]) + rest)


@settings(max_examples=600, deadline=None)
@given(n_leads=st.integers(0, 14), n_samples=st.integers(0, 400), rest=st.binary(max_size=3000))
def test_random_binary_after_a_version_2_header(n_leads: int, n_samples: int, rest: bytes) -> None:
    check(BINARY_HEADER_V2.pack(BINARY_MAGIC, 2, n_leads, 0, 1, T0, 360.0, n_samples) + rest)


@settings(max_examples=300, deadline=None)
@given(names=LEAD_NAMES, seconds=st.sampled_from([0.25, 1.0]), data=st.data())
def test_corrupted_valid_binary_windows(names: list[str], seconds: float, data: st.DataObject) -> None:
    """A valid version-2 window with bytes overwritten (mostly in its header and lead table), maybe cut or extended."""
    adc = np.random.default_rng(len(names)).integers(-4000, 4000, (len(names), round(360 * seconds)), dtype=np.int16)
    payload = bytearray(encode_binary(1, T0, 360.0, names, adc, [200.0] * len(names), [0] * len(names)))
    table_end = BINARY_HEADER_V2.size + sum(1 + len(name) + BINARY_LEAD_V2.size for name in names)
    position = st.integers(len(BINARY_MAGIC) + 1, table_end - 1) | st.integers(0, len(payload) - 1)
    for at, value in data.draw(st.lists(st.tuples(position, st.integers(0, 255)), max_size=4)):
        payload[at] = value
    end = data.draw(st.just(len(payload)) | st.integers(0, len(payload) + 4))
    check(bytes(payload[:end] + b"\x00" * (end - len(payload))))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=4), max_leaves=10)


@settings(max_examples=1000, deadline=None)
@given(st.fixed_dictionaries({}, optional={"v": json_values, "seq": json_values, "t0": json_values,
                                           "fs": json_values, "lead": json_values, "gain": json_values,
                                           "baseline": json_values, "samples": json_values}))
def test_random_json_fields(doc: dict[str, object]) -> None:
    check(json.dumps(doc).encode())


ODD_LEAD = st.fixed_dictionaries({}, optional={"lead": json_values, "samples": json_values, "gain": json_values,
                                               "baseline": json_values}) | json_values
LEAD_SCALE = st.fixed_dictionaries({}, optional={"gain": st.floats(0.5, 1000) | st.floats() | json_values,
                                                 "baseline": st.integers(-50, 50) | st.floats() | json_values})


@settings(max_examples=300, deadline=None)
@given(names=st.lists(st.sampled_from(["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6", ""]),
                      max_size=MAX_LEADS + 1),
       n=st.sampled_from([45, 130]), fs=FS, seed=st.integers(0, 1000), data=st.data(),
       sample=st.none() | st.tuples(st.integers(0, MAX_LEADS), st.floats() | st.integers() | json_values),
       shorter=st.none() | st.integers(0, MAX_LEADS),
       odd=st.none() | st.tuples(st.integers(0, MAX_LEADS), ODD_LEAD),
       change=st.none() | st.tuples(st.sampled_from(["v", "seq", "t0", "fs", "leads"]), json_values, st.booleans()))
def test_random_version_2_json(names: list[str], n: int, fs: float, seed: int, data: st.DataObject,
                               sample: tuple[int, object] | None, shorter: int | None, odd: tuple[int, object] | None,
                               change: tuple[str, object, bool] | None) -> None:
    """Version-2 documents, valid or nearly: maybe a sample replaced by anything, a lead one sample short, an odd
    lead entry, a field replaced by anything or left out."""
    rng = np.random.default_rng(seed)
    leads: list[Any] = [{"lead": name, "samples": rng.normal(0, 0.5, n).tolist(), **data.draw(LEAD_SCALE)}
                        for name in names]
    if sample is not None and sample[0] < len(leads):
        leads[sample[0]]["samples"][-1] = sample[1]
    if shorter is not None and shorter < len(leads):
        leads[shorter]["samples"].pop()
    if odd is not None:
        leads[odd[0]:odd[0] + 1] = [odd[1]]
    doc = {"v": 2, "seq": 1, "t0": T0, "fs": fs, "leads": leads}
    if change is not None:
        field, value, drop = change
        doc[field] = value
        if drop:
            del doc[field]
    check(json.dumps(doc).encode())


@settings(max_examples=200, deadline=None)
@given(seq=st.integers(0, 2**32 - 1), t0=st.floats(MIN_T0, T0), fs=FS, seconds=st.sampled_from([0.25, 1.0, 2.5, 10.0]),
       names=LEAD_NAMES, gain=st.floats(40.0, 1000.0), baseline=st.integers(-2000, 2000), seed=st.integers(0, 1000))
def test_valid_binary_windows_decode_exactly(seq: int, t0: float, fs: float, seconds: float, names: list[str],
                                             gain: float, baseline: int, seed: int) -> None:
    adc = np.random.default_rng(seed).integers(-32768, 32767, (len(names), round(fs * seconds)), dtype=np.int16)
    gains = [gain * (k + 1) for k in range(len(names))]
    baselines = [baseline - k for k in range(len(names))]
    payload = encode_binary(seq, t0, fs, names, adc, gains, baselines)
    window = decode_window(payload, len(payload))
    assert window.seq == seq and window.t0 == t0 and math.isclose(window.fs, fs) and window.leads == tuple(names)
    expected = (adc.astype(np.float64) - np.array(baselines)[:, None]) / np.array(gains, np.float32)[:, None]
    np.testing.assert_allclose(window.samples_mv, expected)


@settings(max_examples=150, deadline=None)
@given(seq=st.integers(0, 2**32 - 1), t0=st.floats(MIN_T0, T0), fs=FS, names=LEAD_NAMES, seed=st.integers(0, 1000))
def test_valid_json_windows_decode_exactly(seq: int, t0: float, fs: float, names: list[str], seed: int) -> None:
    samples = np.random.default_rng(seed).normal(0, 1, (len(names), round(fs)))
    payload = encode_json(seq, t0, fs, names, samples, [1.0] * len(names), [0.0] * len(names))
    window = decode_window(payload, len(payload))
    assert (window.seq, window.t0, window.fs, window.leads) == (seq, t0, fs, tuple(names))
    np.testing.assert_array_equal(window.samples_mv, samples)


@settings(max_examples=200, deadline=None)
@given(lead=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=32), fs=FS,
       gain=st.floats(40.0, 1000.0), baseline=st.integers(-2000, 2000), seed=st.integers(0, 1000))
def test_valid_version_1_binary_windows_decode_to_one_lead(lead: str, fs: float, gain: float, baseline: int,
                                                           seed: int) -> None:
    adc = np.random.default_rng(seed).integers(-32768, 32767, round(fs), dtype=np.int16)
    header = BINARY_HEADER_V1.pack(BINARY_MAGIC, 1, len(lead), 0, 3, T0, fs, gain, baseline, 0)
    window = decode_window(header + lead.encode("ascii") + adc.astype("<i2").tobytes(), LIMIT)
    assert window.leads == (lead,) and window.adc_baseline == (baseline,) and window.samples_mv.shape == (1, len(adc))
    np.testing.assert_allclose(window.samples_mv[0], (adc.astype(np.float64) - baseline) / np.float32(gain))

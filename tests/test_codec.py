"""ECG window messages: both encodings round-trip 1 to 12 leads, version 1 still decodes, and every bad input has its
reason."""

from __future__ import annotations

import json
import struct

import jsonschema
import numpy as np
import pytest

from pipeline.io.codec import (
    BINARY_HEADER_V1,
    BINARY_HEADER_V2,
    BINARY_LEAD_V2,
    DECODE_REASONS,
    MAX_LEADS,
    DecodeError,
    decode_window,
    encode_binary,
    encode_json,
)
from tests.conftest import MESSAGE_SCHEMAS, T0

LIMIT = 64_000
NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
ONE_SECOND = [0.1] * 360  # mV at 360 Hz


def adc_leads(n_leads: int, n: int = 360, seed: int = 0) -> np.ndarray:
    """Made-up int16 ADC samples, shape (n_leads, n), every lead different."""
    return np.random.default_rng(seed).integers(-3000, 3000, (n_leads, n), dtype=np.int16)


def binary(n_leads: int = 2, n: int = 360, names: tuple[str, ...] | None = None, gain: float = 200.0,
           t0: float = T0) -> bytes:
    """A version-2 binary window of `n_leads` leads of `n` samples at 360 Hz, gain 200 unless changed."""
    return encode_binary(1, t0, 360.0, names or NAMES[:n_leads], adc_leads(n_leads, n), [gain] * n_leads,
                         [0] * n_leads)


def binary_v1(lead: str = "MLII", adc: np.ndarray | None = None, gain: float = 200.0, baseline: int = 0,
              t0: float = T0, version: int = 1) -> bytes:
    """A version-1 binary window, built by hand as a version-1 sensor does."""
    adc = np.zeros(360, np.int16) if adc is None else adc
    header = BINARY_HEADER_V1.pack(b"ECGW", version, len(lead), 0, 7, t0, 360.0, gain, baseline, 0)
    return header + lead.encode("ascii") + adc.astype("<i2").tobytes()


def json_v1(**changes: object) -> bytes:
    """A version-1 JSON window; a change to None removes the field."""
    doc: dict[str, object] = {"v": 1, "seq": 1, "t0": T0, "fs": 360, "lead": "MLII", "samples": [0.1] * 360}
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def lead(name: object = "II", samples: object = ONE_SECOND, **fields: object) -> dict[str, object]:
    """A version-2 JSON lead entry (default: 1 s at 360 Hz in mV); name or samples None leaves them out."""
    entry = {"lead": name, "samples": samples, **fields}
    return {k: v for k, v in entry.items() if v is not None}


def json_v2(*leads: object, **changes: object) -> bytes:
    """A version-2 JSON window of `leads` (default: leads I and II); a change to None removes the field."""
    doc: dict[str, object] = {"v": 2, "seq": 1, "t0": T0, "fs": 360, "leads": list(leads) or [lead("I"), lead("II")]}
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


@pytest.mark.parametrize("n_leads", [1, 2, 3, MAX_LEADS])
def test_binary_round_trip_to_mv(n_leads: int) -> None:
    adc = adc_leads(n_leads)
    gain = [200.0 + 50 * k for k in range(n_leads)]
    baseline = [1024 - 100 * k for k in range(n_leads)]
    w = decode_window(encode_binary(7, 1.5e9, 360.0, NAMES[:n_leads], adc, gain, baseline), LIMIT)
    assert (w.seq, w.t0, w.fs, w.leads) == (7, 1.5e9, 360.0, NAMES[:n_leads])
    assert (w.adc_gain, w.adc_baseline) == (tuple(gain), tuple(float(b) for b in baseline))
    expected = (adc.astype(np.float64) - np.array(baseline)[:, None]) / np.array(gain)[:, None]
    np.testing.assert_array_equal(w.samples_mv, expected)
    assert w.samples_mv.shape == (n_leads, 360) and w.duration_s == pytest.approx(1.0)


@pytest.mark.parametrize("n_leads", [1, 2, 3, MAX_LEADS])
def test_json_round_trip(n_leads: int) -> None:
    samples = np.random.default_rng(n_leads).normal(0, 1, (n_leads, 128))
    w = decode_window(encode_json(0, T0, 128.0, NAMES[:n_leads], samples, [1.0] * n_leads, [0.0] * n_leads), LIMIT)
    assert w.leads == NAMES[:n_leads] and w.adc_gain == (1.0,) * n_leads and w.adc_baseline == (0.0,) * n_leads
    np.testing.assert_array_equal(w.samples_mv, samples)


def test_json_round_trip_of_adc_units() -> None:
    adc = adc_leads(3)
    w = decode_window(encode_json(0, T0, 360.0, ["I", "II", "V1"], adc, [200, 100, 400], [0, 1024, -5]), LIMIT)
    np.testing.assert_array_equal(w.samples_mv[1], (adc[1] - 1024.0) / 100)
    assert w.adc_gain == (200.0, 100.0, 400.0) and w.adc_baseline == (0.0, 1024.0, -5.0)


def test_json_version_2_gain_and_baseline_default_to_mv() -> None:
    w = decode_window(json_v2(lead("I", [0.5] * 360), lead("II", [995] * 360, gain=200, baseline=895)), LIMIT)
    assert w.adc_gain == (1.0, 200.0) and w.adc_baseline == (0.0, 895.0)
    np.testing.assert_array_equal(w.samples_mv, [[0.5] * 360, [0.5] * 360])


def test_version_1_json_decodes_to_one_lead() -> None:
    w = decode_window(json_v1(v=None, gain=200, baseline=1024, samples=[1124.0] * 360), LIMIT)
    assert (w.seq, w.fs, w.leads, w.adc_gain, w.adc_baseline) == (1, 360.0, ("MLII",), (200.0,), (1024.0,))
    np.testing.assert_array_equal(w.samples_mv, np.full((1, 360), 0.5))
    unnamed = decode_window(json_v1(lead=None), LIMIT)
    assert unnamed.leads == ("",) and unnamed.adc_gain == (1.0,) and unnamed.samples_mv.shape == (1, 360)


def test_version_1_binary_decodes_to_one_lead() -> None:
    adc = np.arange(-180, 180, dtype=np.int16)
    w = decode_window(binary_v1("MLII", adc, 200.0, 1024), LIMIT)
    assert (w.seq, w.t0, w.fs, w.leads, w.adc_gain, w.adc_baseline) == (7, T0, 360.0, ("MLII",), (200.0,), (1024.0,))
    np.testing.assert_array_equal(w.samples_mv, [(adc - 1024.0) / 200.0])
    assert decode_window(binary_v1(""), LIMIT).leads == ("",)


REJECTIONS: dict[str, tuple[bytes, str]] = {
    # version 1, and what every version shares
    "garbage": (b"\x00\x01garbage", "bad_format"),
    "not json": (b"{not json", "bad_json"),
    "json array": (b"[1, 2]", "bad_format"),
    "json trailing": (b"{}garbage", "bad_json"),
    "json number": (b" 17", "bad_json"),
    "no samples": (json_v1(samples=None), "missing_field"),
    "seq string": (json_v1(seq="1"), "bad_field"),
    "seq negative": (json_v1(seq=-1), "bad_seq"),
    "seq 2**32": (json_v1(seq=2**32), "bad_seq"),
    "fs 50": (json_v1(fs=50), "bad_fs"),
    "fs 5000": (json_v1(fs=5000), "bad_fs"),
    "empty": (json_v1(samples=[]), "empty"),
    "short": (json_v1(samples=[0.1] * 10), "bad_length"),
    "long": (json_v1(samples=[0.1] * 4000), "bad_length"),
    "string samples": (json_v1(samples=["a"] * 360), "bad_field"),
    "bool samples": (json_v1(samples=[True] * 360), "bad_field"),
    "v 3": (json_v1(v=3), "bad_version"),
    "v true": (json_v1(v=True), "bad_version"),
    "v string": (json_v2(v="2"), "bad_version"),
    "gain 0": (json_v1(gain=0), "bad_gain"),
    "gain negative": (json_v1(gain=-200), "bad_gain"),
    "baseline infinite": (json_v1(baseline=float("inf")), "bad_field"),
    "v1 binary gain negative": (binary_v1(gain=-200.0), "bad_gain"),
    "t0 1970": (json_v1(t0=1.0), "bad_t0"),
    "t0 2100": (json_v1(t0=4_102_444_800.0), "bad_t0"),
    "v1 binary t0 0": (binary_v1(t0=0.0), "bad_t0"),
    "t0 beyond float": (json_v1(t0=10**400), "out_of_range"),
    "samples 1e300": (json_v1(samples=[1e300] * 360), "out_of_range"),
    "sample beyond float": (json_v1(samples=[10**400] + [0.1] * 359), "out_of_range"),
    "sample 5 V": (json_v1(samples=[0.1] * 359 + [5000]), "out_of_range"),
    "deep json": (b'{"a":' * 1000 + b"1" + b"}" * 1000, "bad_json"),  # 6 KB, deeper than Python's recursion limit
    "long number": (b'{"seq": ' + b"9" * 5000 + b"}", "bad_json"),  # more digits than Python converts
    "t0 bool": (json_v1(t0=True), "bad_field"),
    "lead newline": (json_v1(lead="\n"), "bad_field"),
    "lead number": (json_v1(lead=3), "bad_field"),
    "NaN": (json_v1().replace(b"0.1, 0.1", b"NaN, 0.1", 1), "non_finite"),
    "Infinity": (json_v1().replace(b"0.1, 0.1", b"Infinity, 0.1", 1), "non_finite"),
    "v1 binary header cut": (b"ECGW\x01", "truncated"),
    "v1 binary samples cut": (binary_v1()[:-1], "truncated"),
    "v1 binary lead cut": (binary_v1("MLII")[:BINARY_HEADER_V1.size + 2], "truncated"),
    "v1 binary lead not ASCII": (binary_v1("MLII").replace(b"MLII", b"ML\xffI"), "bad_field"),
    "binary version 3": (binary_v1(version=3), "bad_version"),
    "binary version 0": (b"ECGW\x00" + binary()[5:], "bad_version"),
    "magic only": (b"ECGW", "truncated"),
    "too large": (b"{" + b" " * LIMIT + b"}", "too_large"),
    # version 2 JSON
    "v2 no leads": (json_v2(leads=None), "missing_field"),
    "v2 leads not a list": (json_v2(leads={"lead": "I", "samples": [0.1] * 360}), "bad_field"),
    "v2 0 leads": (json_v2(leads=[]), "lead_count"),
    "v2 13 leads": (json_v2(*(lead(f"V{k}") for k in range(13))), "lead_count"),
    "v2 lead not an object": (json_v2(lead("I"), [0.1] * 360), "bad_field"),
    "v2 lead without name": (json_v2(lead("I"), lead(None)), "missing_field"),
    "v2 lead without samples": (json_v2(lead("I"), lead("II", None)), "missing_field"),
    "v2 lead name empty": (json_v2(lead("")), "bad_field"),
    "v2 lead name 33 chars": (json_v2(lead("V" * 33)), "bad_field"),
    "v2 lead name not a string": (json_v2(lead("I"), lead(["II"])), "bad_field"),
    "v2 duplicate lead": (json_v2(lead("II"), lead("V1"), lead("II")), "duplicate_lead"),
    "v2 lengths differ": (json_v2(lead("I"), lead("II", [0.1] * 359)), "lead_lengths"),
    "v2 a lead empty": (json_v2(lead("I"), lead("II", [])), "lead_lengths"),
    "v2 every lead empty": (json_v2(lead("I", []), lead("II", [])), "empty"),
    "v2 gain 0 in lead 2": (json_v2(lead("I"), lead("II", gain=0)), "bad_gain"),
    "v2 gain a string": (json_v2(lead("I"), lead("II", gain="200")), "bad_field"),
    "v2 baseline bool": (json_v2(lead("I"), lead("II", baseline=True)), "bad_field"),
    "v2 samples not a list": (json_v2(lead("I"), lead("II", 0.1)), "bad_field"),
    "v2 NaN in lead 2": (json_v2(lead("I"), lead("II"), lead("V1", [0.1] * 359 + [float("nan")])), "non_finite"),
    "v2 5 V in lead 1": (json_v2(lead("I"), lead("II", [0.1] * 359 + [5000])), "out_of_range"),
    "v2 sample beyond float": (json_v2(lead("I"), lead("II", [10**400] + [0.1] * 359)), "out_of_range"),
    "v2 short": (json_v2(lead("I", [0.1] * 10), lead("II", [0.1] * 10)), "bad_length"),
    "v2 fs 50": (json_v2(fs=50), "bad_fs"),
    "v2 without v": (json_v2(v=None), "missing_field"),  # read as version 1: no samples
    # version 2 binary
    "binary header cut": (binary()[:BINARY_HEADER_V2.size - 1], "truncated"),
    "binary lead table missing": (binary()[:BINARY_HEADER_V2.size], "truncated"),
    "binary lead table cut in a name": (binary()[:BINARY_HEADER_V2.size + 2], "truncated"),
    "binary lead table cut in lead 2": (binary(3)[:BINARY_HEADER_V2.size + 8 + 9 + 4], "truncated"),  # I, II whole
    "binary samples cut": (binary()[:-1], "truncated"),
    "binary a sample missing": (binary()[:-2], "truncated"),
    "binary n_samples beyond the payload": (binary()[:24] + struct.pack("<I", 2**32 - 1) + binary()[28:], "truncated"),
    "binary bytes after the samples": (binary() + b"\x00\x00", "bad_field"),
    "binary 0 leads": (encode_binary(1, T0, 360.0, [], np.zeros((0, 360), np.int16), [], []), "lead_count"),
    "binary 13 leads": (binary(13, names=tuple(f"V{k}" for k in range(13))), "lead_count"),
    "binary duplicate lead": (binary(3, names=("I", "II", "I")), "duplicate_lead"),
    "binary lead name empty": (binary(2, names=("I", "")), "bad_field"),
    "binary lead name 33 chars": (binary(1, names=("V" * 33,)), "bad_field"),
    "binary lead name not ASCII": (binary(2, names=("I", "V1")).replace(b"V1", b"V\xff"), "bad_field"),
    "binary lead name unprintable": (binary(2, names=("I", "V\x07")), "bad_field"),
    "binary gain negative": (binary(gain=-200.0), "bad_gain"),
    "binary gain NaN": (binary(gain=float("nan")), "bad_gain"),
    "binary no samples": (binary(n=0), "empty"),
    "binary short": (binary(n=10), "bad_length"),
    "binary 1000 V": (binary(gain=0.001), "out_of_range"),
    "binary t0 0": (binary(t0=0.0), "bad_t0"),
}


@pytest.mark.parametrize(("payload", "reason"), REJECTIONS.values(), ids=REJECTIONS.keys())
def test_rejections_have_reasons(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_window(payload, LIMIT)
    assert info.value.reason == reason


def test_every_reason_is_exercised() -> None:
    assert {reason for _, reason in REJECTIONS.values()} == set(DECODE_REASONS)


def binary_with(lead_index: int, gain: float) -> bytes:
    gains = [200.0, 200.0, 200.0]
    gains[lead_index] = gain
    return encode_binary(1, T0, 360.0, ["I", "II", "V5"], adc_leads(3), gains, [0, 0, 0])


@pytest.mark.parametrize(("payload", "reason", "lead_named"), [
    (json_v2(lead("I"), lead("V2", gain=0)), "bad_gain", "lead 1 (V2)"),
    (json_v2(lead("I"), lead("II"), lead("V3", [0.1] * 359 + [float("nan")])), "non_finite", "lead 2 (V3)"),
    (json_v2(lead("I"), lead("aVF", [0.1] * 359 + [5000])), "out_of_range", "lead 1 (aVF)"),
    (json_v2(lead("I"), lead("II", [0.1] * 300)), "lead_lengths", "lead 1 (II) has 300 samples"),
    (json_v2(lead("I"), lead("II", gain="x")), "bad_field", "lead 1 (II)"),
    (json_v2(lead("I"), lead("II"), lead("V1", None)), "missing_field", "leads[2].samples"),
    (json_v2(lead("II"), lead("V1"), lead("II")), "duplicate_lead", "lead 2 repeats the name of lead 0 (II)"),
    (binary_with(2, -1.0), "bad_gain", "lead 2 (V5)"),
    (binary_with(1, 1e-6), "out_of_range", "lead 1 (II)"),
    (binary(2, names=("I", "")), "bad_field", "lead 1"),
])
def test_rejection_details_name_the_lead(payload: bytes, reason: str, lead_named: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_window(payload, LIMIT)
    assert info.value.reason == reason and lead_named in info.value.detail


def test_encoders_need_one_row_of_samples_per_lead() -> None:
    with pytest.raises(ValueError, match="expected"):
        encode_binary(0, T0, 360.0, ["I"], np.zeros(360, np.int16), [200.0], [0])
    with pytest.raises(ValueError, match="expected"):
        encode_json(0, T0, 360.0, ["I", "II"], np.zeros((3, 360)), [1.0] * 2, [0.0] * 2)
    with pytest.raises(ValueError, match="shorter"):
        encode_json(0, T0, 360.0, ["I", "II"], np.zeros((2, 360)), [1.0], [0.0, 0.0])


def test_binary_headers_are_documented() -> None:
    assert BINARY_HEADER_V1.size == 32 and struct.calcsize("<4sBBHIdffhH") == 32
    assert BINARY_HEADER_V2.size == 28 and struct.calcsize("<4sBBHIdfI") == 28
    assert BINARY_LEAD_V2.size == 6
    # 2 leads of 3 samples: header, then per lead: name length, name, gain, baseline; then lead 0's, lead 1's samples
    payload = encode_binary(5, T0, 250.0, ["I", "V1"], np.array([[1, 2, 3], [4, 5, 6]], np.int16), [200.0, 100.0],
                            [-7, 9])
    assert payload == (b"ECGW" + struct.pack("<BBHIdfI", 2, 2, 0, 5, T0, 250.0, 3)
                       + b"\x01I" + struct.pack("<fh", 200.0, -7) + b"\x02V1" + struct.pack("<fh", 100.0, 9)
                       + struct.pack("<6h", 1, 2, 3, 4, 5, 6))


def test_json_windows_match_the_asyncapi_schema() -> None:
    schema = MESSAGE_SCHEMAS["WindowJson"]
    doc = json.loads(encode_json(3, 1.7e9, 250.0, ["MLII", "V1"], adc_leads(2, 250), [200.0, 200.0], [1024, 1024]))
    jsonschema.validate(doc, schema)
    jsonschema.validate(json.loads(json_v1()), schema)
    jsonschema.validate(json.loads(json_v1(v=None, lead=None)), schema)
    for bad in (json_v2(fs=50), json_v2(leads=[]), json_v2(*(lead(f"V{k}") for k in range(13))), json_v2(lead("")),
                json_v2(lead("I"), lead(None)), json_v2(v=None), json_v1(v=2), json_v1(fs=50)):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(bad), schema)


def test_every_rejection_reason_is_documented() -> None:
    from pathlib import Path

    import yaml

    from pipeline.process.daemon import DAEMON_REASONS

    docs = Path(__file__).resolve().parent.parent / "docs"
    spec = yaml.safe_load((docs / "asyncapi.yaml").read_text())
    assert spec["components"]["schemas"]["Rejection"]["properties"]["reason"]["enum"] == [*DECODE_REASONS,
                                                                                         *DAEMON_REASONS]
    daemon_md = (docs / "daemon.md").read_text()
    assert [r for r in (*DECODE_REASONS, *DAEMON_REASONS) if f"| `{r}` |" not in daemon_md] == []

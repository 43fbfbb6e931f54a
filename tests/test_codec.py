"""ECG window messages: both encodings round-trip, and every kind of bad input has its reason."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from pipeline.codec import BINARY_HEADER, DECODE_REASONS, DecodeError, decode_window, encode_binary, encode_json
from tests.conftest import T0

LIMIT = 64_000


def test_binary_round_trip_to_mv() -> None:
    adc = np.arange(-180, 180, dtype=np.int16)
    w = decode_window(encode_binary(7, 1.5e9, 360.0, "MLII", adc, 200.0, 1024), LIMIT)
    assert (w.seq, w.t0, w.fs, w.lead) == (7, 1.5e9, 360.0, "MLII")
    np.testing.assert_array_equal(w.samples_mv, (adc.astype(np.float64) - 1024) / 200.0)
    assert w.duration_s == pytest.approx(1.0)


def test_json_round_trip() -> None:
    samples = np.linspace(-1, 1, 128)
    w = decode_window(encode_json(0, T0, 128.0, "II", samples), LIMIT)
    np.testing.assert_array_equal(w.samples_mv, samples)


def good_json(**changes: object) -> bytes:
    doc: dict[str, object] = {"v": 1, "seq": 1, "t0": T0, "fs": 360, "lead": "MLII", "samples": [0.1] * 360}
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\x00\x01garbage", "bad_format"),
    (b"{not json", "bad_json"),
    (b"[1, 2]", "bad_format"),
    (b"{}garbage", "bad_json"),
    (b" 17", "bad_json"),
    (good_json(samples=None), "missing_field"),
    (good_json(seq="1"), "bad_field"),
    (good_json(seq=-1), "bad_seq"),
    (good_json(seq=2**32), "bad_seq"),
    (good_json(fs=50), "bad_fs"),
    (good_json(fs=5000), "bad_fs"),
    (good_json(samples=[]), "empty"),
    (good_json(samples=[0.1] * 10), "bad_length"),
    (good_json(samples=[0.1] * 4000), "bad_length"),
    (good_json(samples=["a"] * 360), "bad_field"),
    (good_json(v=2), "bad_version"),
    (good_json(gain=0), "bad_gain"),
    (good_json(gain=-200), "bad_gain"),
    (encode_binary(1, T0, 360.0, "MLII", np.zeros(360, np.int16), -200.0), "bad_gain"),
    (good_json(t0=1.0), "bad_t0"),  # 1970
    (good_json(t0=4_102_444_800.0), "bad_t0"),  # 2100
    (encode_binary(1, 0.0, 360.0, "MLII", np.zeros(360, np.int16), 200.0), "bad_t0"),
    (good_json(t0=10**400), "out_of_range"),
    (good_json(samples=[1e300] * 360), "out_of_range"),
    (good_json(samples=[10**400] + [0.1] * 359), "out_of_range"),
    (good_json(samples=[0.1] * 359 + [5000]), "out_of_range"),  # 5 V
    (b'{"a":' * 1000 + b"1" + b"}" * 1000, "bad_json"),  # 6 KB, deeper than Python's recursion limit
    (b'{"seq": ' + b"9" * 5000 + b"}", "bad_json"),  # more digits than Python converts
    (good_json(t0=True), "bad_field"),
    (good_json(lead="\n"), "bad_field"),
    (good_json().replace(b"0.1, 0.1", b"NaN, 0.1", 1), "non_finite"),
    (good_json().replace(b"0.1, 0.1", b"Infinity, 0.1", 1), "non_finite"),
    (b"ECGW\x01", "truncated"),
    (encode_binary(1, 0.0, 360.0, "MLII", np.zeros(360, np.int16), 200.0)[:-1], "truncated"),
    (b"ECGW\x02" + encode_binary(1, 0.0, 360.0, "MLII", np.zeros(360, np.int16), 200.0)[5:], "bad_version"),
    (b"{" + b" " * LIMIT + b"}", "too_large"),
], ids=lambda value: value[:40].decode("latin-1") if isinstance(value, bytes) else value)
def test_rejections_have_reasons(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_window(payload, LIMIT)
    assert info.value.reason == reason


def test_binary_header_size_is_documented() -> None:
    assert BINARY_HEADER.size == 32
    assert struct.calcsize("<4sBBHIdffhH") == 32


def test_json_windows_match_the_asyncapi_schema() -> None:
    from pathlib import Path

    import jsonschema
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml").read_text())
    schema = spec["components"]["schemas"]["WindowJson"]
    doc = json.loads(encode_json(3, 1.7e9, 250.0, "MLII", np.arange(250, dtype=np.int16), 200.0, 1024))
    jsonschema.validate(doc, schema)
    doc["fs"] = 50
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def test_every_rejection_reason_is_documented() -> None:
    from pathlib import Path

    import yaml

    from pipeline.daemon import DAEMON_REASONS

    docs = Path(__file__).resolve().parent.parent / "docs"
    spec = yaml.safe_load((docs / "asyncapi.yaml").read_text())
    assert spec["components"]["schemas"]["Rejection"]["properties"]["reason"]["enum"] == [*DECODE_REASONS,
                                                                                         *DAEMON_REASONS]
    daemon_md = (docs / "daemon.md").read_text()
    assert [r for r in (*DECODE_REASONS, *DAEMON_REASONS) if f"| `{r}` |" not in daemon_md] == []

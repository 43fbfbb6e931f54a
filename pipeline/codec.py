"""ECG window messages: decoding (JSON and compact binary) with clear reasons for rejection.

A window is a run of consecutive samples of one lead of one device. JSON, for
interoperability::

    {"v": 1, "seq": 17, "t0": 1764500000.25, "fs": 360, "lead": "MLII",
     "gain": 200, "baseline": 1024, "samples": [995, 1001, ...]}

Samples are converted to mV as (sample - baseline) / gain (WFDB's adc_gain and baseline;
gain 1 and baseline 0, the defaults, mean the samples are already in mV).

Binary, for throughput (little-endian): a 32-byte header then int16 samples::

    magic b"ECGW" | version u8 = 1 | lead length u8 | reserved u16 | seq u32 |
    t0 f64 (s, Unix time of the first sample) | fs f32 (Hz) | gain f32 (ADC units per mV) |
    baseline i16 | reserved u16 | lead (ASCII, lead-length bytes) | samples i16 * n

The docs/asyncapi.yaml document is the reference for both.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from pipeline.dsp import MAX_FS_HZ, MIN_FS_HZ

BINARY_MAGIC = b"ECGW"
BINARY_HEADER = struct.Struct("<4sBBHIdffhH")
FORMAT_VERSION = 1
MIN_WINDOW_S = 0.25
MAX_WINDOW_S = 10.0
MAX_ABS_MV = 1000.0  # no electrode potential, offset included, comes near 1 V: larger samples are garbage (mV)
MIN_T0 = 946_684_800.0  # 2000-01-01T00:00:00Z (s, Unix time)
MAX_CLOCK_AHEAD_S = 86_400.0  # a t0 more than a day ahead of the daemon's clock is a broken sensor clock (s)


# Why a payload is not a valid ECG window (docs/daemon.md explains each, docs/asyncapi.yaml lists them).
DECODE_REASONS = ("too_large", "bad_format", "bad_json", "missing_field", "bad_field", "bad_version", "truncated",
                  "bad_seq", "bad_t0", "bad_fs", "bad_gain", "empty", "non_finite", "out_of_range", "bad_length")


class DecodeError(ValueError):
    """A message that is not a valid ECG window; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Window:
    """One decoded ECG window.

    Attributes:
        seq: sequence number of the window (0 .. 2**32 - 1), +1 per window.
        t0: time of the first sample (s, Unix time).
        fs: sampling rate (Hz).
        lead: lead name, e.g. "MLII".
        samples_mv: the samples in mV, float64.
        adc_gain: ADC units per mV the samples came in (1: they came in mV).
        adc_baseline: ADC value of 0 mV.
    """

    seq: int
    t0: float
    fs: float
    lead: str
    samples_mv: NDArray[np.float64]
    adc_gain: float = 1.0
    adc_baseline: float = 0.0

    @property
    def duration_s(self) -> float:
        return len(self.samples_mv) / self.fs


def decode_window(payload: bytes, max_bytes: int, now: float | None = None) -> Window:
    """Decode a JSON or binary window (chosen by the first bytes) or raise DecodeError; nothing else escapes.

    Args:
        payload: the message.
        max_bytes: larger payloads are rejected unread.
        now: the daemon's clock (s, Unix time; default: time.time()), bounding t0 from above.
    """
    if len(payload) > max_bytes:
        raise DecodeError("too_large", f"{len(payload)} bytes > limit {max_bytes}")
    latest_t0 = (time.time() if now is None else now) + MAX_CLOCK_AHEAD_S
    try:
        if payload.startswith(BINARY_MAGIC):
            return _decode_binary(payload, latest_t0)
        if payload[:1] in (b"{", b" ", b"\n", b"\t", b"\r"):
            return _decode_json(payload, latest_t0)
    except (ValueError, TypeError, OverflowError, RecursionError) as err:  # DecodeError is a ValueError
        if isinstance(err, DecodeError):
            raise
        raise DecodeError("bad_field", f"{type(err).__name__}: {str(err)[:200]}") from err
    raise DecodeError("bad_format", "neither JSON nor a binary window (magic ECGW)")


def _decode_binary(payload: bytes, latest_t0: float) -> Window:
    if len(payload) < BINARY_HEADER.size:
        raise DecodeError("truncated", f"{len(payload)} bytes < header {BINARY_HEADER.size}")
    _, version, lead_len, _, seq, t0, fs, gain, baseline, _ = BINARY_HEADER.unpack_from(payload)
    if version != FORMAT_VERSION:
        raise DecodeError("bad_version", f"format version {version}, expected {FORMAT_VERSION}")
    body = payload[BINARY_HEADER.size:]
    if len(body) < lead_len or (len(body) - lead_len) % 2:
        raise DecodeError("truncated", "lead name or samples cut short")
    try:
        lead = body[:lead_len].decode("ascii")
    except UnicodeDecodeError as err:
        raise DecodeError("bad_field", "lead is not ASCII") from err
    samples = np.frombuffer(body[lead_len:], dtype="<i2")
    return _checked(seq, t0, fs, lead, samples, gain, baseline, latest_t0)


def _decode_json(payload: bytes, latest_t0: float) -> Window:
    try:
        doc = json.loads(payload)
    except RecursionError as err:
        raise DecodeError("bad_json", "nested too deeply") from err
    except ValueError as err:  # also numbers of more digits than Python converts, and bad UTF-8
        raise DecodeError("bad_json", str(err)[:200]) from err
    if not isinstance(doc, dict):
        raise DecodeError("bad_json", "top level is not an object")
    version = doc.get("v", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise DecodeError("bad_version", f"format version {version!r}, expected {FORMAT_VERSION}")
    for key in ("seq", "t0", "fs", "samples"):
        if key not in doc:
            raise DecodeError("missing_field", key)
    seq, t0, fs = doc["seq"], doc["t0"], doc["fs"]
    gain, baseline, lead = doc.get("gain", 1.0), doc.get("baseline", 0.0), doc.get("lead", "")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise DecodeError("bad_field", "seq must be an integer")
    for name, value in (("t0", t0), ("fs", fs), ("gain", gain), ("baseline", baseline)):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise DecodeError("bad_field", f"{name} must be a number")
    if not isinstance(lead, str):
        raise DecodeError("bad_field", "lead must be a string")
    samples = doc["samples"]
    if not isinstance(samples, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in samples):
        raise DecodeError("bad_field", "samples must be a list of numbers")
    try:
        values = np.asarray(samples, dtype=np.float64)
    except OverflowError as err:  # an integer beyond float64
        raise DecodeError("out_of_range", "a sample is beyond any float") from err
    return _checked(seq, _float(t0, "t0"), _float(fs, "fs"), lead, values, _float(gain, "gain"),
                    _float(baseline, "baseline"), latest_t0)


def _float(value: float, name: str) -> float:
    try:
        return float(value)
    except OverflowError as err:
        raise DecodeError("out_of_range", f"{name} is beyond any float") from err


def _checked(seq: int, t0: float, fs: float, lead: str, samples: NDArray[np.float64] | NDArray[np.int16],
             gain: float, baseline: float, latest_t0: float) -> Window:
    """The window, or DecodeError naming what is wrong; `samples` are ADC units, int16 (binary) or float (JSON)."""
    if not 0 <= seq < 2**32:
        raise DecodeError("bad_seq", f"seq {seq} outside 0 .. 2**32-1")
    if not (math.isfinite(t0) and MIN_T0 <= t0 <= latest_t0):
        raise DecodeError("bad_t0", f"t0 {t0} outside 2000-01-01 .. one day ahead of the daemon's clock "
                                    f"({MIN_T0:.0f} .. {latest_t0:.0f} s, Unix time)")
    if not (math.isfinite(fs) and MIN_FS_HZ <= fs <= MAX_FS_HZ):
        raise DecodeError("bad_fs", f"fs {fs} Hz outside {MIN_FS_HZ:g}-{MAX_FS_HZ:g} Hz")
    if not (math.isfinite(gain) and gain > 0):
        raise DecodeError("bad_gain", f"gain {gain} ADC units per mV is not a positive finite number")
    if not math.isfinite(baseline):
        raise DecodeError("bad_field", f"baseline {baseline} is not finite")
    if len(lead) > 32 or not lead.isprintable():
        raise DecodeError("bad_field", "lead must be at most 32 printable characters")
    if samples.size == 0:
        raise DecodeError("empty", "no samples")
    if samples.dtype.kind == "f" and not np.isfinite(samples).all():
        raise DecodeError("non_finite", "samples contain NaN or Inf")
    duration = samples.size / fs
    one_sample = 1.0 / fs  # 0.25 s is not a whole number of samples at every rate (62.5 at 250 Hz)
    if not MIN_WINDOW_S - one_sample <= duration <= MAX_WINDOW_S + one_sample:
        raise DecodeError("bad_length", f"window of {duration:.3f} s outside {MIN_WINDOW_S}-{MAX_WINDOW_S} s")
    with np.errstate(over="ignore"):
        largest = max(abs(float(samples.min()) - baseline), abs(float(samples.max()) - baseline)) / gain
        samples_mv = (samples.astype(np.float64) - baseline) / gain
    if not largest <= MAX_ABS_MV:  # also catches overflow to inf
        raise DecodeError("out_of_range", f"a sample of {largest:.3g} mV is beyond ±{MAX_ABS_MV:g} mV")
    return Window(seq=seq, t0=t0, fs=fs, lead=lead, samples_mv=samples_mv, adc_gain=gain, adc_baseline=baseline)


def encode_binary(seq: int, t0: float, fs: float, lead: str, samples: NDArray[np.int16], gain: float,
                  baseline: int = 0) -> bytes:
    """A binary window of int16 ADC samples (mV = (sample - baseline) / gain)."""
    lead_bytes = lead.encode("ascii")
    header = BINARY_HEADER.pack(BINARY_MAGIC, FORMAT_VERSION, len(lead_bytes), 0, seq, t0, fs, gain, baseline, 0)
    return header + lead_bytes + np.asarray(samples, dtype="<i2").tobytes()


def encode_json(seq: int, t0: float, fs: float, lead: str, samples: NDArray[np.floating] | NDArray[np.integer],
                gain: float = 1.0, baseline: float = 0.0) -> bytes:
    """A JSON window."""
    return json.dumps({"v": FORMAT_VERSION, "seq": seq, "t0": t0, "fs": fs, "lead": lead, "gain": gain,
                       "baseline": baseline, "samples": np.asarray(samples).tolist()}).encode()

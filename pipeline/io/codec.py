"""ECG window messages: decoding (JSON and compact binary) with clear reasons for rejection.

A window is a run of consecutive samples of 1 to MAX_LEADS (12) leads of one device, sampled
together: one rate, the same number of samples in every lead. Samples are converted to mV as
(sample - baseline) / gain, per lead (WFDB's adc_gain and baseline; gain 1 and baseline 0, the
defaults, mean the samples are already in mV). The encoders write version 2; version 1 (one
lead) is still decoded, into a one-lead window.

JSON, for interoperability; version 2 ("v" required, "gain" and "baseline" optional per lead)::

    {"v": 2, "seq": 17, "t0": 1764500000.25, "fs": 360,
     "leads": [{"lead": "MLII", "gain": 200, "baseline": 1024, "samples": [995, 1001, ...]},
               {"lead": "V1", "gain": 200, "baseline": 1024, "samples": [1012, 1010, ...]}]}

version 1 ("v", "lead", "gain" and "baseline" optional)::

    {"v": 1, "seq": 17, "t0": 1764500000.25, "fs": 360, "lead": "MLII", "gain": 200, "baseline": 1024, "samples": [...]}

Binary, for throughput (little-endian, int16 samples). Version 2: a 28-byte header, a lead
table, then the samples lead-major (lead 0's n_samples samples, then lead 1's, ...)::

    magic b"ECGW" | version u8 = 2 | n_leads u8 | reserved u16 | seq u32 |
    t0 f64 (s, Unix time of the first sample) | fs f32 (Hz) | n_samples u32 (per lead) |
    n_leads * (name length u8 | name ASCII | gain f32 (ADC units per mV) | baseline i16) |
    samples i16 * n_leads * n_samples

version 1: a 32-byte header then one lead::

    magic b"ECGW" | version u8 = 1 | lead length u8 | reserved u16 | seq u32 | t0 f64 | fs f32 |
    gain f32 | baseline i16 | reserved u16 | lead (ASCII, lead-length bytes) | samples i16 * n

The docs/asyncapi.yaml document is the reference for both.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.analysis.dsp import MAX_FS_HZ, MIN_FS_HZ

BINARY_MAGIC = b"ECGW"
BINARY_HEADER_V1 = struct.Struct("<4sBBHIdffhH")
BINARY_HEADER_V2 = struct.Struct("<4sBBHIdfI")
BINARY_LEAD_V2 = struct.Struct("<fh")  # a lead table entry after its name: gain, baseline
FORMAT_VERSION = 2  # what the encoders write; version 1 is still decoded
MAX_LEADS = 12
MAX_LEAD_NAME = 32  # characters
MIN_WINDOW_S = 0.25
MAX_WINDOW_S = 10.0
MAX_ABS_MV = 1000.0  # no electrode potential, offset included, comes near 1 V: larger samples are garbage (mV)
MIN_T0 = 946_684_800.0  # 2000-01-01T00:00:00Z (s, Unix time)
MAX_CLOCK_AHEAD_S = 86_400.0  # a t0 more than a day ahead of the daemon's clock is a broken sensor clock (s)


# Why a payload is not a valid ECG window (docs/daemon.md explains each, docs/asyncapi.yaml lists them).
DECODE_REASONS = ("too_large", "bad_format", "bad_json", "missing_field", "bad_field", "bad_version", "truncated",
                  "lead_count", "lead_lengths", "duplicate_lead", "bad_seq", "bad_t0", "bad_fs", "bad_gain", "empty",
                  "non_finite", "out_of_range", "bad_length")


class DecodeError(ValueError):
    """A message that is not a valid ECG window; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Window:
    """One decoded ECG window: 1 to MAX_LEADS leads of one device, sampled together.

    Attributes:
        seq: sequence number of the window (0 .. 2**32 - 1), +1 per window.
        t0: time of the first sample (s, Unix time).
        fs: sampling rate of every lead (Hz).
        leads: lead names, e.g. ("MLII", "V1"), unique; ("",) for the single unnamed lead of a
            version-1 message without one.
        samples_mv: the samples, shape (n_leads, n_samples), float64 (mV).
        adc_gain: per lead, ADC units per mV the samples came in (1: they came in mV).
        adc_baseline: per lead, ADC value of 0 mV.
    """

    seq: int
    t0: float
    fs: float
    leads: tuple[str, ...]
    samples_mv: NDArray[np.float64]
    adc_gain: tuple[float, ...]
    adc_baseline: tuple[float, ...]

    @property
    def duration_s(self) -> float:
        """Length of the window (s)."""
        return int(self.samples_mv.shape[1]) / self.fs


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
    if len(payload) <= len(BINARY_MAGIC):
        raise DecodeError("truncated", "no format version after the magic")
    version = payload[len(BINARY_MAGIC)]
    if version == 1:
        return _decode_binary_v1(payload, latest_t0)
    if version == 2:
        return _decode_binary_v2(payload, latest_t0)
    raise DecodeError("bad_version", f"format version {version}, expected 1 or 2")


def _decode_binary_v1(payload: bytes, latest_t0: float) -> Window:
    if len(payload) < BINARY_HEADER_V1.size:
        raise DecodeError("truncated", f"{len(payload)} bytes < header {BINARY_HEADER_V1.size}")
    _, _, lead_len, _, seq, t0, fs, gain, baseline, _ = BINARY_HEADER_V1.unpack_from(payload)
    body = payload[BINARY_HEADER_V1.size:]
    if len(body) < lead_len or (len(body) - lead_len) % 2:
        raise DecodeError("truncated", "lead name or samples cut short")
    lead = _lead_name(body[:lead_len], 0, 1)
    samples = np.frombuffer(body[lead_len:], dtype="<i2")
    return _checked(seq, t0, fs, [lead], [gain], [baseline], samples[None, :], latest_t0)


def _decode_binary_v2(payload: bytes, latest_t0: float) -> Window:
    if len(payload) < BINARY_HEADER_V2.size:
        raise DecodeError("truncated", f"{len(payload)} bytes < header {BINARY_HEADER_V2.size}")
    _, _, n_leads, _, seq, t0, fs, n_samples = BINARY_HEADER_V2.unpack_from(payload)
    _check_lead_count(n_leads)
    table, pos = [], BINARY_HEADER_V2.size
    for i in range(n_leads):  # name length, name, gain, baseline
        if pos >= len(payload) or pos + 1 + payload[pos] + BINARY_LEAD_V2.size > len(payload):
            raise DecodeError("truncated", f"lead table cut short in lead {i}")
        name_end = pos + 1 + payload[pos]
        table.append((_lead_name(payload[pos + 1:name_end], i, 2), *BINARY_LEAD_V2.unpack_from(payload, name_end)))
        pos = name_end + BINARY_LEAD_V2.size
    size = pos + 2 * n_leads * n_samples
    if len(payload) < size:
        raise DecodeError("truncated", f"{len(payload)} bytes < {size} for {n_leads} leads of {n_samples} samples")
    if len(payload) > size:
        raise DecodeError("bad_field", f"{len(payload) - size} bytes after {n_leads} leads of {n_samples} samples")
    names, gains, baselines = zip(*table, strict=True)
    samples = np.frombuffer(payload, dtype="<i2", count=n_leads * n_samples, offset=pos)
    return _checked(seq, t0, fs, names, gains, baselines, samples.reshape(n_leads, n_samples), latest_t0)


def _decode_json(payload: bytes, latest_t0: float) -> Window:
    try:
        doc = json.loads(payload)
    except RecursionError as err:
        raise DecodeError("bad_json", "nested too deeply") from err
    except ValueError as err:  # also numbers of more digits than Python converts, and bad UTF-8
        raise DecodeError("bad_json", str(err)[:200]) from err
    if not isinstance(doc, dict):
        raise DecodeError("bad_json", "top level is not an object")
    version = doc.get("v", 1)
    if isinstance(version, bool) or version not in (1, 2):
        raise DecodeError("bad_version", f"format version {version!r:.40}, expected 1 or 2")
    for key in ("seq", "t0", "fs", "samples" if version == 1 else "leads"):
        if key not in doc:
            raise DecodeError("missing_field", key)
    seq, t0, fs = doc["seq"], doc["t0"], doc["fs"]
    if type(seq) is not int:  # json.loads makes exact types: bool is not int here
        raise DecodeError("bad_field", "seq must be an integer")
    for name, value in (("t0", t0), ("fs", fs)):
        if type(value) not in (int, float):
            raise DecodeError("bad_field", f"{name} must be a number")
    entries = [doc] if version == 1 else doc["leads"]  # a version-1 document is its own single lead
    if not isinstance(entries, list):
        raise DecodeError("bad_field", "leads must be a list")
    _check_lead_count(len(entries))
    names, gains, baselines, samples = zip(*(_json_lead(entry, i, version) for i, entry in enumerate(entries)),
                                           strict=True)
    for i, lead in enumerate(samples):
        if len(lead) != len(samples[0]):
            raise DecodeError("lead_lengths", f"{_label(i, names[i])} has {len(lead)} samples, "
                                              f"{_label(0, names[0])} {len(samples[0])}")
    return _checked(seq, _float(t0, "t0"), _float(fs, "fs"), names, gains, baselines, np.stack(samples), latest_t0)


def _json_lead(entry: Any, i: int, version: int) -> tuple[str, float, float, NDArray[np.float64]]:
    """Name, gain, baseline and samples (ADC units) of the JSON lead `entry`, the i-th."""
    where = f"leads[{i}]" if version > 1 else "lead"
    if not isinstance(entry, dict):
        raise DecodeError("bad_field", f"{where} is not an object")
    for key in ("lead", "samples") if version > 1 else ("samples",):
        if key not in entry:
            raise DecodeError("missing_field", f"{where}.{key}" if version > 1 else key)
    lead, samples = entry.get("lead", ""), entry["samples"]
    gain, baseline = entry.get("gain", 1.0), entry.get("baseline", 0.0)
    if not isinstance(lead, str):
        raise DecodeError("bad_field", f"{where} name must be a string")
    label = _label(i, _lead_name(lead, i, version))
    for name, value in (("gain", gain), ("baseline", baseline)):
        if type(value) not in (int, float):
            raise DecodeError("bad_field", f"{label}: {name} must be a number")
    if not isinstance(samples, list) or not set(map(type, samples)) <= {int, float}:
        raise DecodeError("bad_field", f"{label}: samples must be a list of numbers")
    try:
        values = np.asarray(samples, dtype=np.float64)
    except OverflowError as err:  # an integer beyond float64
        raise DecodeError("out_of_range", f"{label}: a sample is beyond any float") from err
    return lead, _float(gain, f"{label}: gain"), _float(baseline, f"{label}: baseline"), values


def _float(value: float, name: str) -> float:
    try:
        return float(value)
    except OverflowError as err:
        raise DecodeError("out_of_range", f"{name} is beyond any float") from err


def _lead_name(name: str | bytes, i: int, version: int) -> str:
    """The i-th lead's name (bytes: ASCII), checked: 0 (version 1) or 1 to MAX_LEAD_NAME printable characters."""
    try:
        text = name.decode("ascii") if isinstance(name, bytes) else name
    except UnicodeDecodeError as err:
        raise DecodeError("bad_field", f"lead {i}: name is not ASCII") from err
    if len(text) > MAX_LEAD_NAME or not text.isprintable() or (version > 1 and not text):
        raise DecodeError("bad_field", f"lead {i}: name must be {int(version > 1)} to {MAX_LEAD_NAME} printable "
                                       "characters")
    return text


def _label(i: int, name: str) -> str:
    """How a detail names a lead (its name already checked)."""
    return f"lead {i} ({name})" if name else f"lead {i}"


def _check_lead_count(n_leads: int) -> None:
    if not 1 <= n_leads <= MAX_LEADS:
        raise DecodeError("lead_count", f"{n_leads} leads, expected 1 to {MAX_LEADS}")


def _checked(seq: int, t0: float, fs: float, names: Sequence[str], gains: Sequence[float], baselines: Sequence[float],
             samples: NDArray[np.float64] | NDArray[np.int16], latest_t0: float) -> Window:
    """The window, or DecodeError naming what is wrong; `samples` (n_leads, n) are ADC units, int16 or float."""
    if not 0 <= seq < 2**32:
        raise DecodeError("bad_seq", f"seq {seq} outside 0 .. 2**32-1")
    if not (math.isfinite(t0) and MIN_T0 <= t0 <= latest_t0):
        raise DecodeError("bad_t0", f"t0 {t0} outside 2000-01-01 .. one day ahead of the daemon's clock "
                                    f"({MIN_T0:.0f} .. {latest_t0:.0f} s, Unix time)")
    if not (math.isfinite(fs) and MIN_FS_HZ <= fs <= MAX_FS_HZ):
        raise DecodeError("bad_fs", f"fs {fs} Hz outside {MIN_FS_HZ:g}-{MAX_FS_HZ:g} Hz")
    for i, (name, gain, baseline) in enumerate(zip(names, gains, baselines, strict=True)):
        if not (math.isfinite(gain) and gain > 0):
            raise DecodeError("bad_gain", f"{_label(i, name)}: gain {gain} ADC units per mV is not a positive "
                                          "finite number")
        if not math.isfinite(baseline):
            raise DecodeError("bad_field", f"{_label(i, name)}: baseline {baseline} is not finite")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise DecodeError("duplicate_lead", f"lead {i} repeats the name of {_label(names.index(name), name)}")
    if samples.shape[1] == 0:
        raise DecodeError("empty", "no samples")
    bad = np.flatnonzero(~np.isfinite(samples).all(axis=1))  # int16 samples always are
    if bad.size:
        i = int(bad[0])
        raise DecodeError("non_finite", f"{_label(i, names[i])}: samples contain NaN or Inf")
    duration = samples.shape[1] / fs
    one_sample = 1.0 / fs  # 0.25 s is not a whole number of samples at every rate (62.5 at 250 Hz)
    if not MIN_WINDOW_S - one_sample <= duration <= MAX_WINDOW_S + one_sample:
        raise DecodeError("bad_length", f"window of {duration:.3f} s outside {MIN_WINDOW_S}-{MAX_WINDOW_S} s")
    with np.errstate(over="ignore"):
        samples_mv = (samples - np.array(baselines, float)[:, None]) / np.array(gains, float)[:, None]
    largest = np.abs(samples_mv).max(axis=1)
    bad = np.flatnonzero(~(largest <= MAX_ABS_MV))  # also catches overflow to inf
    if bad.size:
        i = int(bad[0])
        raise DecodeError("out_of_range", f"{_label(i, names[i])}: a sample of {largest[i]:.3g} mV is beyond "
                                          f"±{MAX_ABS_MV:g} mV")
    return Window(seq=seq, t0=t0, fs=fs, leads=tuple(names), samples_mv=samples_mv,
                  adc_gain=tuple(float(g) for g in gains), adc_baseline=tuple(float(b) for b in baselines))


def _by_lead(samples: NDArray[Any], leads: Sequence[str]) -> NDArray[Any]:
    """`samples` as an array of shape (len(leads), n), or ValueError."""
    array = np.asarray(samples)
    if array.ndim != 2 or array.shape[0] != len(leads):
        raise ValueError(f"samples of shape {array.shape} for {len(leads)} leads: expected ({len(leads)}, n)")
    return array


def encode_binary(seq: int, t0: float, fs: float, leads: Sequence[str], samples: NDArray[np.int16],
                  gain: Sequence[float], baseline: Sequence[int]) -> bytes:
    """A version-2 binary window: int16 ADC samples of shape (n_leads, n); mV = (sample - baseline) / gain per lead."""
    adc = _by_lead(samples, leads).astype("<i2")
    parts = [BINARY_HEADER_V2.pack(BINARY_MAGIC, FORMAT_VERSION, len(leads), 0, seq, t0, fs, adc.shape[1])]
    for lead, lead_gain, lead_baseline in zip(leads, gain, baseline, strict=True):
        name = lead.encode("ascii")
        parts += [bytes([len(name)]), name, BINARY_LEAD_V2.pack(lead_gain, lead_baseline)]
    return b"".join([*parts, adc.tobytes()])


def encode_json(seq: int, t0: float, fs: float, leads: Sequence[str], samples: NDArray[np.floating] |
                NDArray[np.integer], gain: Sequence[float], baseline: Sequence[float]) -> bytes:
    """A version-2 JSON window: samples of shape (n_leads, n); mV = (sample - baseline) / gain per lead."""
    rows = _by_lead(samples, leads)
    return json.dumps({"v": FORMAT_VERSION, "seq": seq, "t0": t0, "fs": fs, "leads": [
        {"lead": lead, "gain": float(lead_gain), "baseline": float(lead_baseline), "samples": row.tolist()}
        for lead, lead_gain, lead_baseline, row in zip(leads, gain, baseline, rows, strict=True)]}).encode()


ACK_ACTIONS = {"acknowledge": None, "silence": 120.0}  # action -> how long it silences the alarm (s)
MAX_ACK_BYTES = 1024


@dataclass(frozen=True)
class Ack:
    """A staff acknowledgement of one open alarm (`<prefix>/acks/<device>`, docs/asyncapi.yaml)."""

    alarm_id: str
    by: str  # the staff login
    silence_s: float | None  # how long the alarm is silenced (s); None: acknowledged only


def decode_ack(payload: bytes) -> Ack:
    """An acknowledgement from its JSON payload {"alarm_id", "action": acknowledge | silence, "by"}; DecodeError
    with the reason otherwise."""
    if len(payload) > MAX_ACK_BYTES:
        raise DecodeError("too_large", f"{len(payload)} bytes; an acknowledgement is at most {MAX_ACK_BYTES}")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DecodeError("bad_json", str(err)) from err
    if not isinstance(doc, dict) or set(doc) != {"alarm_id", "action", "by"}:
        raise DecodeError("bad_ack", "an acknowledgement is an object with exactly alarm_id, action and by")
    alarm_id, action, by = doc["alarm_id"], doc["action"], doc["by"]
    if not isinstance(alarm_id, str) or not 0 < len(alarm_id) <= 100:
        raise DecodeError("bad_ack", "alarm_id must be a string of 1-100 characters")
    if not isinstance(by, str) or not 0 < len(by) <= 100:
        raise DecodeError("bad_ack", "by must be a string of 1-100 characters (the staff login)")
    if action not in ACK_ACTIONS:
        raise DecodeError("bad_ack", f"action must be one of {sorted(ACK_ACTIONS)}")
    return Ack(alarm_id, by, ACK_ACTIONS[action])

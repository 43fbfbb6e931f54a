"""The daemon's per-device state, so a restart or a hand-off to another daemon does not cold-start active patients.

One binary document: on disk a file written atomically (temporary file, then rename), and the checkpoints a
partitioned source hands between daemons (pipeline/io/rabbit.py). Its layout: the magic `ECGS`, the format
(uint16, little-endian), then a MessagePack map {model_version, saved_at, devices}; every numpy array in a
device's state travels as raw little-endian bytes behind a small header (an extension type: dtype, shape), so
nothing is converted to text and back and every value comes back bit for bit. A document that is missing,
unreadable, corrupt, of another format or from another model version is reported and ignored: the daemon then
starts those devices cold, never fails.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

log = logging.getLogger(__name__)

# 2: streams carry the beat context and beat stage state; 3: VF history, VF and AF alarm timing; 4: recent signal
# with the VF and quality verdicts, poor-signal timing; 5: the streams' time line (restart after a flat line); 8: the
# rhythm stage's state and verdicts per lead; 9: the beat context's P-wave template and consistency; 10: binary
# (MessagePack with raw arrays) instead of gzip JSON
STATE_FORMAT = 10
MAGIC = b"ECGS"
HEADER = struct.Struct("<4sH")  # magic, format
ARRAY = 1  # the MessagePack extension type of a numpy array
ARRAY_DTYPES = frozenset({"<f2", "<f4", "<f8", "<i1", "<i2", "<i4", "<i8", "<u1", "<u2", "<u4", "<u8", "|b1", "|i1",
                          "|u1"})


def _pack(value: Any) -> Any:
    """MessagePack's fallback for numpy values: an array as its dtype, shape and raw little-endian bytes."""
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        dtype = array.dtype.str.encode()
        head = struct.pack(f"<B{len(dtype)}sB{array.ndim}I", len(dtype), dtype, array.ndim, *array.shape)
        return msgpack.ExtType(ARRAY, head + array.tobytes())
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot save a {type(value).__name__} in the state")


def _unpack(code: int, data: bytes) -> Any:
    if code != ARRAY:
        raise ValueError(f"unknown extension type {code}")
    n = data[0]
    dtype = data[1:1 + n].decode()
    if dtype not in ARRAY_DTYPES:
        raise ValueError(f"array of dtype {dtype!r}")
    ndim = data[1 + n]
    shape = struct.unpack_from(f"<{ndim}I", data, 2 + n)
    return np.frombuffer(data, dtype=dtype, offset=2 + n + 4 * ndim).reshape(shape).copy()


def encode_state(model_version: str, devices: dict[str, dict[str, Any]]) -> bytes:
    """Devices' states as one document (see the module docstring), stamped with the format, model version and
    time. A device's state: nested maps, lists, numbers, strings and numpy arrays."""
    doc = {"model_version": model_version, "saved_at": time.time(), "devices": devices}
    body: bytes = msgpack.packb(doc, default=_pack, use_bin_type=True)
    return HEADER.pack(MAGIC, STATE_FORMAT) + body


def decode_state(blob: bytes, model_version: str, max_age_s: float, source: str) -> dict[str, dict[str, Any]]:
    """Devices' states from a document of `encode_state`, or {} (with a warning naming `source` and saying why)
    when it cannot be used."""
    try:
        magic, version = HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise ValueError("not an ecgmon state document")
        if version != STATE_FORMAT:
            raise ValueError(f"format {version} is not {STATE_FORMAT}")
        doc = msgpack.unpackb(blob[HEADER.size:], ext_hook=_unpack, raw=False)
        devices = doc["devices"] if isinstance(doc, dict) else None
        if not isinstance(devices, dict):
            raise ValueError("devices is not a mapping")
    except (struct.error, ValueError, KeyError, TypeError, msgpack.UnpackException) as err:
        log.warning("saved state %s is unreadable or corrupt (%s): ignored, devices start cold", source, err)
        return {}
    if doc.get("model_version") != model_version:
        log.warning("saved state %s is from model %s, not %s: ignored", source, doc.get("model_version"),
                    model_version)
        return {}
    age = time.time() - float(doc.get("saved_at", 0))
    if age > max_age_s:
        log.warning("saved state %s is %.0f s old (limit %.0f s): ignored", source, age, max_age_s)
        return {}
    return devices


def save_state(path: Path, model_version: str, devices: dict[str, dict[str, Any]]) -> None:
    """Write every device's state to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_state(model_version, devices))
    os.replace(tmp, path)
    log.info("saved the state of %d devices to %s", len(devices), path)


def load_state(path: Path, model_version: str, max_age_s: float) -> dict[str, dict[str, Any]]:
    """Devices' states from `path`, or {} (with a warning saying why) when it cannot be used."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        log.info("no saved state at %s: devices start cold", path)
        return {}
    except OSError as err:
        log.warning("saved state %s is unreadable (%s): ignored, devices start cold", path, err)
        return {}
    return decode_state(blob, model_version, max_age_s, str(path))

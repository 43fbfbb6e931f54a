"""The daemon's per-device state, so a restart or a hand-off to another daemon does not cold-start active patients.

One gzip-compressed JSON document: on disk a file written atomically (temporary file, then rename), and the
checkpoints a partitioned source hands between daemons (pipeline/io/rabbit.py). A document that is missing,
unreadable, corrupt, of another format or from another model version is reported and ignored: the daemon
then starts those devices cold, never fails.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# 2: streams carry the beat context and beat stage state; 3: VF history, VF and AF alarm timing; 4: recent signal
# with the VF and quality verdicts, poor-signal timing; 5: the streams' time line (restart after a flat line); 8: the
# rhythm stage's state and verdicts per lead; 9: the beat context's P-wave template and consistency
STATE_FORMAT = 9


def encode_state(model_version: str, devices: dict[str, dict[str, Any]]) -> bytes:
    """Devices' states as one document (gzip JSON), stamped with the format, model version and time."""
    doc = {"format": STATE_FORMAT, "model_version": model_version, "saved_at": time.time(), "devices": devices}
    return gzip.compress(json.dumps(doc).encode(), compresslevel=1)


def decode_state(blob: bytes, model_version: str, max_age_s: float, source: str) -> dict[str, dict[str, Any]]:
    """Devices' states from a document of `encode_state`, or {} (with a warning naming `source` and saying why)
    when it cannot be used."""
    try:
        doc = json.loads(gzip.decompress(blob))
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else '?'} is not {STATE_FORMAT}")
        devices = doc["devices"]
        if not isinstance(devices, dict):
            raise ValueError("devices is not a mapping")
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
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

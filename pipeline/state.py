"""The daemon's per-device state on disk, so a restart does not cold-start active patients.

One gzip-compressed JSON file, written atomically (temporary file, then rename). A file that is
missing, unreadable, corrupt, of another format or from another model version is reported
and ignored: the daemon then starts its devices cold, never fails.
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
# with the VF and quality verdicts, poor-signal timing
STATE_FORMAT = 4


def save_state(path: Path, model_version: str, devices: dict[str, dict[str, Any]]) -> None:
    """Write every device's state to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": STATE_FORMAT, "model_version": model_version, "saved_at": time.time(), "devices": devices}
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    log.info("saved the state of %d devices to %s", len(devices), path)


def load_state(path: Path, model_version: str, max_age_s: float) -> dict[str, dict[str, Any]]:
    """Devices' states from `path`, or {} (with a warning saying why) when it cannot be used."""
    if not path.exists():
        log.info("no saved state at %s: devices start cold", path)
        return {}
    try:
        with gzip.open(path, "rt") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else '?'} is not {STATE_FORMAT}")
        devices = doc["devices"]
        if not isinstance(devices, dict):
            raise ValueError("devices is not a mapping")
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
        log.warning("saved state %s is unreadable or corrupt (%s): ignored, devices start cold", path, err)
        return {}
    if doc.get("model_version") != model_version:
        log.warning("saved state %s is from model %s, not %s: ignored", path, doc.get("model_version"), model_version)
        return {}
    age = time.time() - float(doc.get("saved_at", 0))
    if age > max_age_s:
        log.warning("saved state %s is %.0f s old (limit %.0f s): ignored", path, age, max_age_s)
        return {}
    return devices

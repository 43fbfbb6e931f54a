"""Single-lead version-1 ECG windows, byte for byte as sensors built before multi-lead send them (the daemon still
accepts them): most tests send one lead this way, which keeps version 1 tested end to end."""

from __future__ import annotations

import json

import numpy as np
from numpy.typing import NDArray

from pipeline.io.codec import BINARY_HEADER_V1, BINARY_MAGIC


def binary_v1(seq: int, t0: float, fs: float, lead: str, samples: NDArray[np.integer], gain: float,
              baseline: int = 0) -> bytes:
    """A version-1 binary window of int16 ADC samples (mV = (sample - baseline) / gain)."""
    name = lead.encode("ascii")
    header = BINARY_HEADER_V1.pack(BINARY_MAGIC, 1, len(name), 0, seq, t0, fs, gain, baseline, 0)
    return header + name + np.asarray(samples, dtype="<i2").tobytes()


def json_v1(seq: int, t0: float, fs: float, lead: str, samples: NDArray[np.floating] | NDArray[np.integer],
            gain: float = 1.0, baseline: float = 0.0) -> bytes:
    """A version-1 JSON window."""
    return json.dumps({"v": 1, "seq": seq, "t0": t0, "fs": fs, "lead": lead, "gain": gain, "baseline": baseline,
                       "samples": np.asarray(samples).tolist()}).encode()

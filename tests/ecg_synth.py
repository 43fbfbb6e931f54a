"""Constructed ECG for alarm tests: real MIT-BIH beats (DS1 record 208: N and V; 209: S) spliced at chosen RR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from pipeline.tools.records import load_record

FS = 360.0
PRE_S, POST_S = 0.25, 0.45


def beat_templates(physionet: Path) -> dict[str, list[NDArray[np.float64]]]:
    """A few real beats per class, baseline-corrected (mV at 360 Hz), R peak at PRE_S."""
    out: dict[str, list[NDArray[np.float64]]] = {}
    for record_name, wanted in (("208", "NV"), ("209", "S")):
        record = load_record(physionet / "mitdb", record_name)
        pre, post = round(PRE_S * FS), round(POST_S * FS)
        for cls in wanted:
            picks = [s for s, c in zip(record.beat_samples, record.beat_classes, strict=True)
                     if c == cls and pre < s < len(record.signal_mv) - post][100:104]
            beats = [record.signal_mv[s - pre:s + post] for s in picks]
            out[cls] = [b - np.median(b[:20]) for b in beats]
    return out


def synthesize(templates: dict[str, list[NDArray[np.float64]]], rhythm: list[tuple[str, float]],
               tail_s: float = 1.0, seed: int = 0) -> NDArray[np.float64]:
    """ECG (mV, 360 Hz) with beats of class c after RR (s) for each (c, RR) in `rhythm`, plus `tail_s` of baseline.

    Baseline carries 0.02 mV of noise, so beat-free stretches are not a flat line.
    """
    r_times = np.cumsum([rr for _, rr in rhythm])
    n = round((r_times[-1] + tail_s) * FS) + 1
    rng = np.random.default_rng(seed)
    signal = rng.normal(0.0, 0.02, n)
    pre, post = round(PRE_S * FS), round(POST_S * FS)
    for i, ((cls, rr), t) in enumerate(zip(rhythm, r_times, strict=True)):
        template = templates[cls][i % len(templates[cls])]
        rr_next = rhythm[i + 1][1] if i + 1 < len(rhythm) else POST_S * 2
        a = min(pre, round(0.45 * rr * FS))
        b = min(post, round(0.55 * rr_next * FS))
        r = round(t * FS)
        if r - a >= 0 and r + b <= n:
            signal[r - a:r + b] += template[pre - a:pre + b]
    result: NDArray[np.float64] = signal
    return result

"""The rhythm stage's inputs: what each lead's last seconds look like, once per window.

The rhythm stage is a small recurrent network (`ecgmon train-rhythm`) that steps once per window of each lead,
after the VF and signal-quality detectors, over the same `pipeline.analysis.recent.RECENT_S` of band-passed
signal at 90 Hz, and says which of RHYTHM_CLASSES the lead shows: "normal" is any rhythm that is none of the
others (sinus, AF, ectopy), "noise" a lead whose signal is artefact. Its memory carries what one 4 s view
cannot: that the waves have been fast and wide for a while, or that organized complexes came before.

Features of one lead's window (RHYTHM_FEATURE_NAMES):
- the VF detector's `pipeline.detectors.vf` measures (amplitude included: `log_amplitude_mv`);
- `band_*`: log of the share of the 0.5-45 Hz power in each band of BAND_EDGES_HZ (VF and flutter at 3-8 Hz,
  QRS complexes above 8 Hz, electrode motion below 2 Hz);
- `log_qrs_rate_bpm` and `qrs_found`: the second QRS detector's (`pipeline.detectors.qrs`) rate on this lead (0
  and 0 when it has fewer than 3 complexes in its window).
"""

from __future__ import annotations

import itertools

import numpy as np
from numpy.typing import NDArray

from pipeline.analysis.recent import Spectrum
from pipeline.detectors.vf import VF_FEATURE_NAMES

RHYTHM_CLASSES = ("normal", "VT", "VF", "asystole", "noise")
BAND_EDGES_HZ = (0.5, 1.5, 2.5, 3.5, 4.5, 6.0, 8.0, 12.0, 20.0, 45.0)
RHYTHM_FEATURE_NAMES = (*VF_FEATURE_NAMES,
                        *(f"band_{lo:g}_{hi:g}_hz" for lo, hi in itertools.pairwise(BAND_EDGES_HZ)),
                        "log_qrs_rate_bpm", "qrs_found")
SHARE_FLOOR = 1e-4  # below this share of the power a band counts as empty (log of 0 is undefined)


def rhythm_features(vf: NDArray[np.float64], spec: Spectrum, qrs_rate_bpm: NDArray[np.float64]
                    ) -> NDArray[np.float32]:
    """RHYTHM_FEATURE_NAMES of n leads' windows: `vf` (n, len(VF_FEATURE_NAMES)) their VF measures, `spec` their
    spectrum (`pipeline.analysis.recent.spectrum`), `qrs_rate_bpm` (n,) the second QRS detector's rate (bpm, NaN
    when it has none)."""
    in_band = [(spec.freq >= lo) & (spec.freq < hi) for lo, hi in itertools.pairwise(BAND_EDGES_HZ)]
    power = np.stack([spec.power[:, m].sum(axis=1) for m in in_band], axis=1)
    shares = power / np.maximum(power.sum(axis=1, keepdims=True), 1e-12)
    found = np.isfinite(qrs_rate_bpm)
    rate = np.where(found, np.log(np.where(found, qrs_rate_bpm, 1.0)), 0.0)
    return np.hstack([vf, np.log(shares + SHARE_FLOOR), rate[:, None], found[:, None]]).astype(np.float32)

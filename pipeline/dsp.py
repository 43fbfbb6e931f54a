"""Causal ECG preprocessing shared by training and the daemon (no train/serve skew).

Every step keeps its state between calls, so a signal fed chunk by chunk gives exactly
the same output as one call over the whole signal: band-pass (Butterworth, scipy
second-order sections), resampling to the model rate (linear interpolation on an exact
rational time grid) and framing into fixed-size frames. Nothing looks ahead and nothing
uses whole-record statistics. Amplitudes stay in physical units (mV).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import signal

FloatArray = NDArray[np.float32]

MIN_FS_HZ = 128.0
MAX_FS_HZ = 1000.0


@dataclass(frozen=True)
class FilterSpec:
    """Causal Butterworth band-pass.

    Args:
        low_hz: high-pass corner (Hz).
        high_hz: low-pass corner (Hz); also the anti-aliasing filter before resampling.
        order: Butterworth order of each edge (the band-pass has 2 * order poles).
    """

    low_hz: float = 0.5
    high_hz: float = 40.0
    order: int = 2

    def sos(self, fs: float) -> NDArray[np.float64]:
        """Second-order sections of this filter for a signal sampled at `fs` (Hz)."""
        if not self.high_hz < fs / 2:
            raise ValueError(f"filter high_hz={self.high_hz} Hz must be below fs/2 = {fs / 2} Hz")
        sos: NDArray[np.float64] = signal.butter(
            self.order, [self.low_hz, self.high_hz], btype="bandpass", fs=fs, output="sos"
        )
        return sos

    def to_dict(self) -> dict[str, Any]:
        return {"type": "butterworth-bandpass", "low_hz": self.low_hz, "high_hz": self.high_hz,
                "order": self.order, "causal": True}


def check_fs(fs: float) -> None:
    """Raise ValueError unless `fs` (Hz) is a supported input sampling rate."""
    if not MIN_FS_HZ <= fs <= MAX_FS_HZ:
        raise ValueError(f"fs={fs} Hz is outside the supported {MIN_FS_HZ:g}-{MAX_FS_HZ:g} Hz")


class CausalBandpass:
    """Band-pass with carried state; the first sample seeds a steady state (no start-up step)."""

    def __init__(self, spec: FilterSpec, fs: float) -> None:
        self._sos = spec.sos(fs)
        self._zi_unit = signal.sosfilt_zi(self._sos)
        self._zi: NDArray[np.float64] | None = None

    def __call__(self, x_mv: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
        """Filter the next chunk (mV) and return it filtered (mV)."""
        if x_mv.size == 0:
            return np.zeros(0)
        if self._zi is None:
            self._zi = self._zi_unit * float(x_mv[0])
        y, self._zi = signal.sosfilt(self._sos, x_mv, zi=self._zi)
        result: NDArray[np.float64] = y
        return result


class LinearResampler:
    """Resample from `fs_in` to `fs_out` (Hz) by linear interpolation, chunk by chunk.

    Output sample k sits at input position k * fs_in / fs_out, computed in exact
    rational arithmetic; it is produced once the input sample after it has arrived,
    so chunking never changes the output. Anti-aliasing is the band-pass applied before.
    """

    def __init__(self, fs_in: float, fs_out: float) -> None:
        self._ratio = Fraction(fs_in).limit_denominator(1000) / Fraction(fs_out).limit_denominator(1000)
        self._identity = self._ratio == 1
        self._n_in = 0  # input samples consumed so far
        self._n_out = 0  # output samples produced so far
        self._last = 0.0  # input sample n_in - 1

    def __call__(self, x: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
        x = np.asarray(x, dtype=np.float64)
        if self._identity or x.size == 0:
            return np.asarray(x, dtype=np.float64)
        num, den = self._ratio.numerator, self._ratio.denominator
        last_index = self._n_in + x.size - 1
        # Output k is ready when floor(k * num / den) + 1 <= last_index, i.e. k * num < last_index * den.
        k_end = (last_index * den - 1) // num + 1
        k = np.arange(self._n_out, max(k_end, self._n_out), dtype=np.int64)
        i0 = (k * num) // den
        frac = ((k * num) % den) / den
        ext = np.concatenate(([self._last], x))  # ext[j] is input sample n_in - 1 + j
        j0 = i0 - (self._n_in - 1)
        y = ext[j0] * (1.0 - frac) + ext[j0 + 1] * frac
        self._n_out += k.size
        self._n_in += x.size
        self._last = float(x[-1])
        return y


class Framer:
    """Cut a sample stream into frames of `frame_size` samples, carrying the remainder."""

    def __init__(self, frame_size: int) -> None:
        self.frame_size = frame_size
        self._rest = np.zeros(0, dtype=np.float32)

    def __call__(self, x: NDArray[np.floating[Any]]) -> FloatArray:
        """Return the complete frames, shape (n_frames, frame_size)."""
        buf = np.concatenate((self._rest, np.asarray(x, dtype=np.float32)))
        n = buf.size // self.frame_size
        self._rest = buf[n * self.frame_size:]
        return buf[: n * self.frame_size].reshape(n, self.frame_size)


class Preprocessor:
    """Band-pass, resample and frame one ECG stream: mV at `fs_in` in, model frames out."""

    def __init__(self, spec: FilterSpec, fs_in: float, fs_model: float, frame_size: int) -> None:
        check_fs(fs_in)
        self.fs_in = fs_in
        self._bandpass = CausalBandpass(spec, fs_in)
        self._resample = LinearResampler(fs_in, fs_model)
        self._framer = Framer(frame_size)

    def __call__(self, x_mv: NDArray[np.floating[Any]]) -> FloatArray:
        """Process the next chunk (mV at fs_in); return new frames (n_frames, frame_size), mV."""
        return self._framer(self._resample(self._bandpass(x_mv)))

"""Causal ECG preprocessing shared by training and the daemon (no train/serve skew).

Every step keeps its state between calls, so a signal fed chunk by chunk gives exactly
the same output as one call over the whole signal: band-pass (Butterworth, scipy
second-order sections, seeded by the first sample so a DC offset gives no start-up step),
resampling to the model rate (linear interpolation on an exact rational time grid) and
framing into fixed-size frames. Nothing looks ahead and nothing uses whole-record
statistics. Amplitudes stay in physical units (mV). Training runs one stream
(`Preprocessor`); the daemon runs many at once (`PreprocessorBank`); both are the same code.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from scipy import signal

FloatArray = NDArray[np.float32]

MIN_FS_HZ = 128.0
MAX_FS_HZ = 1000.0


class FilterSpec(BaseModel):
    """Causal Butterworth band-pass, applied at the input rate: the one definition of the filter, used by the
    training config's `filter:` section and carried in every model's metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low_hz: float = Field(0.5, gt=0, description="high-pass corner (Hz)")
    high_hz: float = Field(40.0, gt=0, description="low-pass corner (Hz), also the anti-aliasing before resampling")
    order: int = Field(2, ge=1, le=8, description="Butterworth order of each edge (2 * order poles in all)")

    def sos(self, fs: float) -> NDArray[np.float64]:
        """Second-order sections of this filter for a signal sampled at `fs` (Hz)."""
        if not self.high_hz < fs / 2:
            raise ValueError(f"filter high_hz={self.high_hz} Hz must be below fs/2 = {fs / 2} Hz")
        sos: NDArray[np.float64] = signal.butter(
            self.order, [self.low_hz, self.high_hz], btype="bandpass", fs=fs, output="sos"
        )
        return sos


def check_fs(fs: float) -> None:
    """Raise ValueError unless `fs` (Hz) is a supported input sampling rate."""
    if not MIN_FS_HZ <= fs <= MAX_FS_HZ:
        raise ValueError(f"fs={fs} Hz is outside the supported {MIN_FS_HZ:g}-{MAX_FS_HZ:g} Hz")


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

    def state(self) -> list[float]:
        """Position (input and output samples so far) and the last input sample, to save and restore."""
        return [self._n_in, self._n_out, self._last]

    def set_state(self, state: list[float]) -> None:
        self._n_in, self._n_out, self._last = int(state[0]), int(state[1]), float(state[2])

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


class PreprocessorBank:
    """Band-pass, resample and frame many streams, each in its own slot of the state arrays.

    Windows of streams with the same rate and length are filtered in one scipy call
    (state gathered from and scattered back to their slots). Rows at the model rate whose
    length is a whole number of frames (the usual case) are framed by a reshape.
    """

    def __init__(self, spec: FilterSpec, fs_model: float, frame_size: int, capacity: int = 1) -> None:
        self.spec, self.fs_model, self.frame_size = spec, fs_model, frame_size
        n_sections = spec.sos(max(2.5 * spec.high_hz, MIN_FS_HZ)).shape[0]
        self._zi = np.zeros((capacity, n_sections, 2))  # filter state per slot
        self._seeded = np.zeros(capacity, dtype=bool)  # False until a slot's first sample seeds its state
        self._fs = np.zeros(capacity)
        self._resamplers: dict[int, LinearResampler] = {}
        self._rest: dict[int, NDArray[np.float32]] = {}  # samples short of a whole frame, per slot
        self._sos: dict[float, tuple[NDArray[np.float64], NDArray[np.float64]]] = {}

    @property
    def capacity(self) -> int:
        return len(self._fs)

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self._zi = np.concatenate([self._zi, np.zeros((extra, *self._zi.shape[1:]))])
        self._seeded = np.concatenate([self._seeded, np.zeros(extra, dtype=bool)])
        self._fs = np.concatenate([self._fs, np.zeros(extra)])

    def open(self, slot: int, fs: float) -> None:
        """Start `slot` afresh for a stream sampled at `fs` (Hz)."""
        check_fs(fs)
        if fs not in self._sos:
            sos = self.spec.sos(fs)
            self._sos[fs] = (sos, signal.sosfilt_zi(sos))
        self._seeded[slot] = False
        self._fs[slot] = fs
        self._rest.pop(slot, None)
        self._resamplers.pop(slot, None)
        if fs != self.fs_model:
            self._resamplers[slot] = LinearResampler(fs, self.fs_model)

    def save_slot(self, slot: int) -> dict[str, Any]:
        """The slot's state: numbers and arrays (pipeline/process/state.py)."""
        resampler = self._resamplers.get(slot)
        return {"fs": float(self._fs[slot]), "zi": self._zi[slot].copy(), "seeded": bool(self._seeded[slot]),
                "rest": self._rest.get(slot, np.zeros(0, dtype=np.float32)).copy(),
                "resampler": None if resampler is None else resampler.state()}

    def load_slot(self, slot: int, doc: dict[str, Any]) -> None:
        """Restore a slot saved by `save_slot`."""
        self.open(slot, float(doc["fs"]))
        self._zi[slot] = np.asarray(doc["zi"], dtype=np.float64).reshape(self._zi.shape[1:])
        self._seeded[slot] = bool(doc["seeded"])
        if len(doc["rest"]):
            self._rest[slot] = np.asarray(doc["rest"], dtype=np.float32)
        if doc["resampler"] is not None:
            self._resamplers[slot].set_state(doc["resampler"])

    def follow(self, slot: int, source: int) -> None:
        """Open `slot` cold (its filter seeded by its next sample) on the framing phase of `source` (may be `slot`
        itself): from here on a window gives both slots the same number of frames, at the same times."""
        doc = self.save_slot(source)
        self.load_slot(slot, {**doc, "seeded": False, "rest": np.zeros_like(doc["rest"])})

    def __call__(self, slots: list[int], windows: list[NDArray[np.floating[Any]]]) -> list[FloatArray]:
        """Process the next window (mV at the slot's rate) of each slot; return each one's new frames.

        A slot appears at most once. Frames are (n_frames, frame_size) in mV at the model rate.
        """
        out: list[FloatArray] = [np.zeros((0, self.frame_size), dtype=np.float32)] * len(slots)
        groups: dict[tuple[float, int], list[int]] = {}
        for row, (slot, x) in enumerate(zip(slots, windows, strict=True)):
            if len(x):
                groups.setdefault((float(self._fs[slot]), len(x)), []).append(row)
        for (fs, n), rows in groups.items():
            idx = np.array([slots[r] for r in rows])
            x = np.stack([windows[r] for r in rows]).astype(np.float64, copy=False)
            sos, zi_unit = self._sos[fs]
            fresh = ~self._seeded[idx]
            if fresh.any():
                self._zi[idx[fresh]] = zi_unit[None] * x[fresh, :1, None]
                self._seeded[idx[fresh]] = True
            y, zf = signal.sosfilt(sos, x, axis=1, zi=self._zi[idx].transpose(1, 0, 2))
            self._zi[idx] = zf.transpose(1, 0, 2)
            if fs == self.fs_model and n % self.frame_size == 0 and not any(s in self._rest for s in idx):
                frames = y.astype(np.float32).reshape(len(rows), n // self.frame_size, self.frame_size)
                for k, r in enumerate(rows):
                    out[r] = frames[k]
                continue
            for k, r in enumerate(rows):
                out[r] = self._frame(int(idx[k]), y[k])
        return out

    def _frame(self, slot: int, y: NDArray[np.float64]) -> FloatArray:
        resampler = self._resamplers.get(slot)
        samples = resampler(y) if resampler is not None else y
        buf = np.concatenate((self._rest.pop(slot, np.zeros(0, np.float32)), samples.astype(np.float32)))
        n = len(buf) // self.frame_size
        if len(buf) > n * self.frame_size:
            self._rest[slot] = buf[n * self.frame_size:]
        return buf[: n * self.frame_size].reshape(n, self.frame_size)


class Preprocessor:
    """One stream through the bank's code: mV at `fs_in` in, model frames out (training uses this)."""

    def __init__(self, spec: FilterSpec, fs_in: float, fs_model: float, frame_size: int) -> None:
        self.fs_in = fs_in
        self._bank = PreprocessorBank(spec, fs_model, frame_size)
        self._bank.open(0, fs_in)

    def __call__(self, x_mv: NDArray[np.floating[Any]]) -> FloatArray:
        """Process the next chunk (mV at fs_in); return new frames (n_frames, frame_size), mV."""
        return self._bank([0], [x_mv])[0]

"""Admission: does a window continue its device's stream, start it, restart it after a gap, or come too late?

Pure bookkeeping per device (sequence numbers, expected start time, rate, last arrival): no I/O,
no clock of its own, no model state. The daemon acts on each verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pipeline.io.codec import Window

SEQ_MOD = 2**32


def at_or_before(seq: int, mark: int) -> bool:
    """Whether `seq` comes no later than `mark` (modulo SEQ_MOD: within half the range behind it)."""
    return (mark - seq) % SEQ_MOD < SEQ_MOD // 2


Kind = Literal["new", "next", "restart", "duplicate", "late"]


@dataclass
class DeviceStream:
    """Bookkeeping of one device's stream.

    Attributes:
        fs: sampling rate (Hz).
        origin: signal time of the stream's first sample since it (re)started (s, Unix time).
        next_seq: the seq expected next. next_t0: the t0 expected next (s, Unix time).
        last_arrival: when its last window arrived (s, monotonic clock of the caller).
    """

    fs: float
    origin: float
    next_seq: int
    next_t0: float
    last_arrival: float


@dataclass(frozen=True)
class Verdict:
    """What a window is to its device's stream.

    kind: "new" (a device's first window), "next" (continues it, whatever its leads: a lead set that changes
    is the analysis's business), "restart" (a gap in seq or time, or a change of rate: the analysis restarts cold,
    `detail` says why), "duplicate" or "late" (a
    seq already analysed: drop it).
    """

    kind: Kind
    stream: DeviceStream | None
    detail: dict[str, Any] | None = None

    @property
    def analysed(self) -> bool:
        return self.kind in ("new", "next", "restart")


class Admission:
    """Every live device's stream bookkeeping."""

    def __init__(self, max_gap_s: float) -> None:
        """`max_gap_s`: a t0 further than this from where the last window ended is a gap (s)."""
        self.max_gap_s = max_gap_s
        self.streams: dict[str, DeviceStream] = {}

    def admit(self, device: str, window: Window, received: float) -> Verdict:
        """The verdict on `window` of `device`, arrived at `received` (s, monotonic); updates the stream."""
        stream = self.streams.get(device)
        if stream is None:
            return Verdict("new", self._start(device, window, received))
        ahead = (window.seq - stream.next_seq) % SEQ_MOD
        if ahead >= SEQ_MOD // 2:  # behind what was already analysed
            return Verdict("duplicate" if ahead == SEQ_MOD - 1 else "late", None)
        time_gap = abs(window.t0 - stream.next_t0) > self.max_gap_s
        if ahead or time_gap or window.fs != stream.fs:
            detail = {"expected_seq": stream.next_seq, "seq": window.seq, "expected_t0": stream.next_t0,
                      "t0": window.t0, "fs": window.fs}
            return Verdict("restart", self._start(device, window, received), detail)
        self._advance(stream, window, received)
        return Verdict("next", stream)

    def restart(self, device: str, window: Window) -> DeviceStream:
        """Restart `device`'s stream at `window` (already admitted), e.g. after an internal error."""
        return self._start(device, window, self.streams[device].last_arrival)

    def forget(self, device: str) -> None:
        del self.streams[device]

    def save(self, device: str, unix_minus_monotonic: float) -> dict[str, Any]:
        """JSON-able bookkeeping; the last arrival as Unix time, so that it survives a restart."""
        doc = asdict(self.streams[device])
        doc["last_arrival_unix"] = doc.pop("last_arrival") + unix_minus_monotonic
        return doc

    def restore(self, device: str, doc: dict[str, Any], unix_minus_monotonic: float) -> None:
        """Bookkeeping saved by `save` (raises KeyError, ValueError or TypeError on a malformed doc)."""
        self.streams[device] = DeviceStream(float(doc["fs"]), float(doc["origin"]),
                                            int(doc["next_seq"]), float(doc["next_t0"]),
                                            float(doc["last_arrival_unix"]) - unix_minus_monotonic)

    def _start(self, device: str, window: Window, received: float) -> DeviceStream:
        stream = DeviceStream(window.fs, window.t0, window.seq, window.t0, received)
        self._advance(stream, window, received)
        self.streams[device] = stream
        return stream

    @staticmethod
    def _advance(stream: DeviceStream, window: Window, received: float) -> None:
        stream.next_seq = (window.seq + 1) % SEQ_MOD
        stream.next_t0 = window.t0 + window.duration_s
        stream.last_arrival = received

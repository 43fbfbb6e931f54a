"""Admission of windows to their device's stream: pure bookkeeping, then the daemon acting on it (via the seam)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import DaemonConfig
from pipeline.io.codec import Window
from pipeline.process.admission import Admission
from pipeline.process.daemon import Daemon
from tests.conftest import T0
from tests.seam import MemorySink, MemorySource
from tests.wire import binary_v1


def window(seq: int, t0: float, fs: float = 360.0, leads: tuple[str, ...] = ("MLII",), seconds: float = 1.0
           ) -> Window:
    return Window(seq=seq, t0=t0, fs=fs, leads=leads, samples_mv=np.zeros((len(leads), round(fs * seconds))),
                  adc_gain=(1.0,) * len(leads), adc_baseline=(0.0,) * len(leads))


def test_a_stream_starts_continues_and_drops_what_it_has_seen() -> None:
    a = Admission(max_gap_s=0.05)
    assert a.admit("bed", window(7, T0), 1.0).kind == "new"
    assert a.admit("bed", window(8, T0 + 1), 2.0).kind == "next"
    assert a.admit("bed", window(8, T0 + 1), 2.1).kind == "duplicate"
    assert a.admit("bed", window(5, T0 - 2), 2.2).kind == "late"
    assert a.admit("bed", window(9, T0 + 2.04), 3.0).kind == "next"  # within max_gap_s of where it should start
    stream = a.streams["bed"]
    assert (stream.next_seq, stream.last_arrival) == (10, 3.0) and stream.next_t0 == pytest.approx(T0 + 3.04)


@pytest.mark.parametrize(("changed", "why"), [
    (window(11, T0 + 2), "a seq skipped"),
    (window(9, T0 + 2.5), "a time gap"),
    (window(9, T0 + 2, fs=250.0), "another rate"),
])
def test_a_gap_or_change_restarts_the_stream(changed: Window, why: str) -> None:
    a = Admission(max_gap_s=0.05)
    a.admit("bed", window(8, T0 + 1), 1.0)
    verdict = a.admit("bed", changed, 2.0)
    assert verdict.kind == "restart", why
    assert verdict.detail is not None and verdict.detail["expected_seq"] == 9
    assert verdict.stream is not None and verdict.stream.origin == changed.t0
    assert a.admit("bed", window(changed.seq + 1, changed.t0 + changed.duration_s, changed.fs), 3.0).kind == "next"


def test_sequence_numbers_wrap() -> None:
    a = Admission(max_gap_s=0.05)
    kinds = [a.admit("bed", window(seq, T0 + k), float(k)).kind for k, seq in enumerate([2**32 - 2, 2**32 - 1, 0, 1])]
    assert kinds == ["new", "next", "next", "next"]
    assert a.admit("bed", window(2**32 - 1, T0 + 1), 5.0).kind == "late"


def test_save_and_restore() -> None:
    a = Admission(max_gap_s=0.05)
    a.admit("quiet", window(0, T0), 1.0)
    a.admit("busy", window(0, T0), 9.0)
    doc = a.save("quiet", unix_minus_monotonic=1000.0)
    assert doc["last_arrival_unix"] == 1001.0
    b = Admission(max_gap_s=0.05)
    b.restore("quiet", doc, unix_minus_monotonic=2000.0)  # after a restart the monotonic clock is another
    assert b.streams["quiet"].last_arrival == -999.0  # still 1,001 s of Unix time ago... on the new clock
    assert b.admit("quiet", window(1, T0 + 1), 0.0).kind == "next"
    a.forget("quiet")
    assert list(a.streams) == ["busy"]


def test_the_daemon_counts_drops_and_raises_data_gap_on_a_restart() -> None:
    source, sink = MemorySource(), MemorySink()
    daemon = Daemon(DaemonConfig.model_validate({"metrics": {"port": None}}), source, sink)
    assert daemon.start()
    try:
        adc = (np.random.default_rng(0).normal(0, 0.1, 360) * 200).astype(np.int16)
        for seq in (0, 1, 1, 0, 5, 6):  # then a duplicate, a late one, a gap
            source.send("bed", binary_v1(seq, T0 + seq, 360.0, "MLII", adc, 200.0))
        beats = sink.wait_for("beats", lambda d: len(d) == 4)
        assert [b["seq"] for b in beats] == [0, 1, 5, 6]
        gap = sink.wait_for("alarm", bool)[0]
        assert (gap["type"], gap["state"], gap["evidence"]["expected_seq"]) == ("data_gap", "raised", 2)
        stats = daemon.stats()
        assert (stats["dropped_duplicate"], stats["dropped_late"], stats["gaps"]) == (1, 1, 1)
    finally:
        daemon.stop()

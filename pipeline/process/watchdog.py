"""Liveness of the analysis worker: stalled when it has not turned for a while, failed when it ended."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PERIOD_S = 1.0


class Watchdog:
    """The worker calls `turn()` on every pass of its loop; a thread of its own checks on it.

    `on_change(alive)` runs (on the watchdog's thread) whenever liveness changes; `failed` is set,
    for good, if the worker thread ends without having been asked to.
    """

    def __init__(self, stall_s: float, on_change: Callable[[bool], None]) -> None:
        """`stall_s`: a worker that has not turned for this long is stalled (s)."""
        self.stall_s = stall_s
        self.failed = threading.Event()
        self._on_change = on_change
        self._alive = True
        self._last_turn = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._alive

    def turn(self) -> None:
        self._last_turn = time.monotonic()

    def start(self, worker: threading.Thread, worker_stopping: threading.Event) -> None:
        self.turn()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(worker, worker_stopping), name="ecgmon-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _watch(self, worker: threading.Thread, worker_stopping: threading.Event) -> None:
        while not self._stop.wait(PERIOD_S):
            if not worker.is_alive() and not worker_stopping.is_set():
                log.critical("the analysis worker stopped: no more beats or alarms; the daemon must exit")
                self._set(False)
                self.failed.set()
                return
            self._set(time.monotonic() - self._last_turn < self.stall_s)

    def _set(self, alive: bool) -> None:
        if alive == self._alive:
            return
        self._alive = alive
        if alive:
            log.warning("analysis running again")
        else:
            log.critical("analysis stalled for more than %g s", self.stall_s)
        self._on_change(alive)

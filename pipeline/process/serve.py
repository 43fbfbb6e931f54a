"""Process life of `ecgmon serve`: start, wait for a signal, drain and stop; a second signal stops draining."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from pipeline.config import DaemonConfig
from pipeline.process.daemon import Daemon

log = logging.getLogger(__name__)

EXIT_START_FAILED = 1
EXIT_ANALYSIS_FAILED = 3
EXIT_FORCED = 130


def serve(config: DaemonConfig, daemon: Daemon | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; `daemon`: one made from `config` unless given.

    The first signal stops gracefully: no more windows, those taken are drained (up to
    drain_timeout_s), the state saved, `offline` published. A second signal cuts the draining short;
    the rest of the stop still runs. Exit code 0 after a graceful stop, 130 after a forced one, 1 if
    start-up failed, 3 if the analysis stopped (so that a supervisor restarts the process).
    """
    stop = threading.Event()
    daemon = daemon or Daemon(config)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            log.error("second %s: stopping without draining the windows left", signal.Signals(signum).name)
            daemon.hurry()
            return
        log.info("%s: shutting down gracefully (again to force)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if not daemon.start():
        return EXIT_START_FAILED
    while not stop.wait(0.5) and not daemon.failed.is_set():
        pass
    daemon.stop()
    if daemon.failed.is_set():
        log.critical("stopped: the analysis failed")
        return EXIT_ANALYSIS_FAILED
    log.info("stopped")
    return EXIT_FORCED if daemon.hurried else 0

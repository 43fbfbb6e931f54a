"""Process life of `ecgmon serve`: start, wait for a signal, drain and stop; a second signal forces exit."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from pipeline.config import DaemonConfig
from pipeline.daemon import Daemon

log = logging.getLogger(__name__)

EXIT_FORCED = 130
EXIT_ANALYSIS_FAILED = 3


def serve(config: DaemonConfig, daemon: Daemon | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; exit code 0 after a graceful stop, 1 if start-up failed,
    3 if the analysis stopped (so that a supervisor restarts the process). `daemon`: one made from
    `config` unless given."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            log.error("second %s: exiting now without draining", signal.Signals(signum).name)
            os._exit(EXIT_FORCED)
        log.info("%s: shutting down gracefully (again to force)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon = daemon or Daemon(config)
    if not daemon.start():
        return 1
    while not stop.wait(0.5) and not daemon.failed.is_set():
        pass
    daemon.stop()
    if daemon.failed.is_set():
        log.critical("stopped: the analysis failed")
        return EXIT_ANALYSIS_FAILED
    log.info("stopped")
    return 0

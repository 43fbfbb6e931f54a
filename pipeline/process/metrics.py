"""Prometheus metrics of one daemon (own registry, so several daemons can share a process in tests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector


class BatchHistogram(Collector):
    """A Prometheus histogram fed a whole batch of values at once (one numpy call, not one call per window)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry
                 ) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: above the largest bound
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: NDArray[np.float64]) -> None:
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def totals(self) -> tuple[int, float]:
        """How many values were observed, and their sum."""
        with self._lock:
            return int(self._counts.sum()), self._sum

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative, total = np.cumsum(self._counts).tolist(), self._sum
        buckets = [(str(float(b)), c) for b, c in zip(self._bounds.tolist(), cumulative, strict=False)]
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], [*buckets, ("+Inf", cumulative[-1])], total)
        yield family


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_in = Counter("ecgmon_messages_in", "ECG window messages received (analysed, rejected or "
                                   "dropped)", registry=r)
        self.rejected = Counter("ecgmon_messages_rejected", "messages rejected, by reason", ["reason"], registry=r)
        self.dropped = Counter("ecgmon_windows_dropped", "valid windows not analysed, by reason", ["reason"],
                               registry=r)
        self.windows = Counter("ecgmon_windows_processed", "windows analysed", registry=r)
        self.beats = Counter("ecgmon_beats", "beats detected, by AAMI class", ["aami_class"], registry=r)
        self.alarms = Counter("ecgmon_alarm_events", "alarm events, by type and state", ["type", "state"],
                              registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
        self.latency = BatchHistogram("ecgmon_window_latency_seconds", "inside the daemon: paho handed the window "
                                      "over -> its results handed to paho (excludes the network, the broker and "
                                      "paho's own queues)", buckets, r)
        self.result_delay = BatchHistogram("ecgmon_result_delay_seconds", "end of a window's last sample (sensor "
                                           "clock) -> its results published (daemon clock): the whole path, if the "
                                           "clocks agree", (*buckets, 10.0, 30.0, 60.0), r)
        self.batch_size = BatchHistogram("ecgmon_batch_windows", "windows per model run",
                                         (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096), r)
        self.active_streams = Gauge("ecgmon_active_streams", "devices with live state", registry=r)
        self.queue_depth = Gauge("ecgmon_queue_windows", "windows waiting for analysis", registry=r)
        self.active_alarms = Gauge("ecgmon_active_alarms", "alarms currently raised", registry=r)
        self.alarm_messages_pending = Gauge("ecgmon_alarm_messages_pending", "alarm and status messages the broker "
                                            "has not acknowledged yet", registry=r)
        self.alarm_message_delay = Gauge("ecgmon_alarm_message_delay_seconds", "how long the oldest of them has "
                                         "waited", registry=r)
        self.alarm_messages_lost = Gauge("ecgmon_alarm_messages_lost", "alarm and status messages the broker never "
                                         "acknowledged (the daemon stopped first), since start", registry=r)
        self.analysis_alive = Gauge("ecgmon_analysis_alive", "1 while the analysis worker is turning, 0 when "
                                    "it has stalled for watchdog_s or stopped", registry=r)

        self._server: WSGIServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0 picks a free port); returns the port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

"""The ecgmon daemon: ECG windows in, batched stateful inference, beats and alarms out.

Threads: the source's (paho's network thread) only queues raw payloads; one worker
decodes, batches windows from many devices into one model run (waiting at most
`batching.max_wait_ms` to fill a batch), runs the alarm rules and publishes; a watchdog
reports when the worker stalls and marks the daemon failed if it ever stops.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from pipeline.alarms import AlarmEvent, DeviceAlarms, SignalCheck, clear_orphan
from pipeline.codec import DecodeError, Window, decode_window
from pipeline.config import ConfigError, DaemonConfig
from pipeline.io import MqttSink, MqttSource, ResultSink, WindowSource
from pipeline.metrics import DaemonMetrics
from pipeline.model import BeatModel, ModelError
from pipeline.mqtt import DEVICE_ID, ConnectError, MqttClient, Topics
from pipeline.state import load_state, save_state
from pipeline.streams import Beat, BeatStreams

log = logging.getLogger(__name__)

SEQ_MOD = 2**32
HOUSEKEEPING_S = 1.0
WATCHDOG_PERIOD_S = 1.0
REJECT_INTERVAL_S = 5.0  # at most one rejection message per device (and one log line) this often
MAX_REJECT_KEYS = 100_000
DAEMON_REASONS = ("bad_device_id", "internal_error")  # rejections of the daemon's own, beside the decoder's


@dataclass
class DeviceStream:
    """Bookkeeping of one device's stream (its DSP/model state lives in BeatStreams)."""

    device: str
    fs: float
    lead: str
    origin: float  # signal time of the first sample since the stream (re)started (s)
    next_seq: int
    next_t0: float  # expected t0 of the next window (s)
    last_arrival: float  # monotonic time of the last window (s)
    alarms: DeviceAlarms


@dataclass(frozen=True)
class Pending:
    device: str
    payload: bytes
    received: float  # monotonic (s)


class Daemon:
    """`start()` brings it up step by step; `stop()` drains and tears down in reverse order.

    `failed` is set if analysis stopped for good (the process should exit non-zero).
    """

    def __init__(self, config: DaemonConfig, source: WindowSource | None = None,
                 sink: ResultSink | None = None) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix)
        self.metrics = DaemonMetrics()
        self.metrics_port: int | None = None
        self.failed = threading.Event()
        self._source, self._sink = source, sink
        self._mqtt: MqttClient | None = None
        self._queue: queue.Queue[Pending] = queue.Queue(maxsize=config.streams.queue_windows)
        self._stop_worker = threading.Event()
        self._stop_watchdog = threading.Event()
        self._worker: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._heartbeat = time.monotonic()  # the worker's last turn
        self._analysis_alive = True
        self._announced = False
        self._devices: dict[str, DeviceStream] = {}
        self._streams: BeatStreams | None = None
        self._model: BeatModel | None = None
        self._counts: defaultdict[str, int] = defaultdict(int)
        self._counts_lock = threading.Lock()
        self._last_reject_of: dict[str, float] = {}
        self._last_reject_log = 0.0
        self._degraded_since: float | None = None
        self._last_drop = 0.0  # monotonic time of the last window dropped for overload (s)
        self._next_stats = 0.0
        self._dropped_of: Counter[str] = Counter()  # windows dropped per device since the last housekeeping
        self._dropped_lock = threading.Lock()
        self._next_save = time.monotonic() + config.state.save_interval_s
        self.metrics.active_alarms.set_function(self._count_active_alarms)
        self.metrics.analysis_alive.set_function(lambda: float(self._analysis_alive))

    # --- life cycle -----------------------------------------------------------------------------
    def start(self) -> bool:
        """Bring the daemon up; on the first failing step log why, undo the earlier steps, return False.

        Windows are taken (queued) from the moment the source starts, so that a persistent session's
        queued windows are kept; the worker analyses them once open alarms have been reconciled.
        """
        steps = (self._load_model, self._restore_state, self._start_metrics, self._make_io, self._start_source,
                 self._connect, self._reconcile_alarms, self._start_worker, self._announce_online)
        for step in steps:
            try:
                step()
            except (ModelError, ConnectError, ConfigError, OSError) as err:
                log.error("start-up failed in %s: %s", step.__name__.lstrip("_"), err)
                self.stop()
                return False
        log.info("ecgmon daemon up: model %s, topics %s, metrics port %s", self.model_version,
                 self.topics.ecg(), self.metrics_port)
        return True

    def stop(self) -> None:
        """Stop taking windows, finish those in flight (up to drain_timeout_s), save the state, publish
        offline, disconnect."""
        if self._source is not None:
            self._source.stop()
        if self._worker is not None:
            self._drain()
            self._stop_worker.set()
            self._worker.join()
            self._worker = None
            self._save_state()
        if self._watchdog is not None:
            self._stop_watchdog.set()
            self._watchdog.join()
            self._watchdog = None
        if self._announced and (self._mqtt is None or self._mqtt.connected):
            self._publish_status("offline", wait=True)
        self._announced = False
        if self._mqtt is not None:
            self._mqtt.disconnect()
            self._mqtt = None
        self.metrics.close()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout_s
        while not self._queue.empty() and time.monotonic() < deadline and self._worker_alive():
            time.sleep(0.01)
        if not self._queue.empty():
            log.warning("drain timeout: %d windows not analysed", self._queue.qsize())

    @property
    def model_version(self) -> str:
        return self._model.info.version if self._model else "none"

    @property
    def analysis_alive(self) -> bool:
        """False while the worker has not turned for `watchdog_s`, or after it stopped."""
        return self._analysis_alive

    def _load_model(self) -> None:
        m = self.config.model
        self._model = BeatModel(m.path, m.intra_op_threads, m.inter_op_threads)
        self._streams = BeatStreams(self._model)

    def _restore_state(self) -> None:
        """Devices saved by the previous run resume where they were; a bad or old file is reported and ignored."""
        path = self.config.state.path
        if path is None or self._streams is None:
            return
        for device, doc in load_state(path, self.model_version, self.config.state.max_age_s).items():
            try:
                self._streams.restore(device, doc["streams"])
                alarms = DeviceAlarms.from_dict(device, self.config.alarms, self.model_version, doc["alarms"])
                s = doc["stream"]
                silent_s = max(0.0, time.time() - float(s["last_arrival_unix"]))  # across the restart too
                self._devices[device] = DeviceStream(device, float(s["fs"]), str(s["lead"]), float(s["origin"]),
                                                     int(s["next_seq"]), float(s["next_t0"]),
                                                     time.monotonic() - silent_s, alarms)
            except (KeyError, ValueError, TypeError) as err:
                log.warning("saved state of device %r is malformed (%s): it starts cold", device, err)
                if device in self._devices:
                    del self._devices[device]
        log.info("restored %d devices from %s", len(self._devices), path)
        self.metrics.active_streams.set(len(self._devices))

    def _save_state(self) -> None:
        path = self.config.state.path
        if path is None or self._streams is None:
            return
        unix_minus_monotonic = time.time() - time.monotonic()
        devices = {d: {"stream": {"fs": s.fs, "lead": s.lead, "origin": s.origin, "next_seq": s.next_seq,
                                  "next_t0": s.next_t0, "last_arrival_unix": s.last_arrival + unix_minus_monotonic},
                       "streams": self._streams.save(d), "alarms": s.alarms.to_dict()}
                   for d, s in self._devices.items()}
        try:
            save_state(path, self.model_version, devices)
        except OSError as err:
            log.error("cannot save the state to %s: %s", path, err)

    def _start_metrics(self) -> None:
        if self.config.metrics.port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics.host, self.config.metrics.port)

    def _make_io(self) -> None:
        """The MQTT client, source and sink, unless both were given; not connected yet."""
        if self._source is not None and self._sink is not None:
            return
        c = self.config.mqtt
        will = (self.topics.status, b'{"state":"offline","reason":"connection lost"}')
        tls = None if c.tls is None else {"ca_certs": str(c.tls.ca_file),
                                          "certfile": str(c.tls.cert_file) if c.tls.cert_file else None,
                                          "keyfile": str(c.tls.key_file) if c.tls.key_file else None}
        self._mqtt = MqttClient(c.host, c.port, c.client_id, username=c.username, password=c.secret(),
                                keepalive_s=c.keepalive_s, session_expiry_s=c.session_expiry_s, will=will,
                                reconnect_min_s=c.reconnect_min_s, reconnect_max_s=c.reconnect_max_s, tls=tls,
                                on_connected=self._on_connected)
        self._source = self._source or MqttSource(self._mqtt, self.topics, c.qos_in)
        self._sink = self._sink or MqttSink(self._mqtt, self.topics, self.config.output.beats)

    def _start_source(self) -> None:
        assert self._source is not None
        self._source.start(self._deliver)

    def _connect(self) -> None:
        if self._mqtt is not None:
            self._mqtt.connect()

    def _on_connected(self, reconnect: bool) -> None:
        """After a reconnect the last will has said offline: say online again (network thread)."""
        if reconnect and self._announced:
            self._publish_status("online")

    def _reconcile_alarms(self) -> None:
        """Make what subscribers saw (the broker's open alarms) and the restored alarm state agree.

        An open alarm the daemon holds no state for (raised after the last save, or on another daemon)
        is cleared now and raised anew if still true; a restored alarm that subscribers saw cleared is
        forgotten.
        """
        assert self._sink is not None
        docs = self._sink.open_alarms()
        if docs is None:
            return
        open_ids = {str(d.get("alarm_id")) for d in docs}
        held: set[str] = set()
        for stream in self._devices.values():
            stream.alarms.keep_only(open_ids)
            held |= stream.alarms.alarm_ids()
        orphans = [d for d in docs if str(d.get("alarm_id")) not in held]
        for doc in orphans:
            device = self._devices.get(str(doc.get("device")))
            event = clear_orphan(doc, device.next_t0 if device else 0.0,
                                 "the daemon restarted without this alarm's state; re-evaluated from new data")
            if event is not None:
                self._emit([event])
        log.info("open alarms on the broker: %d, continued: %d, cleared: %d", len(docs), len(docs) - len(orphans),
                 len(orphans))

    def _start_worker(self) -> None:
        self._stop_worker.clear()
        self._heartbeat = time.monotonic()
        self._worker = threading.Thread(target=self._run, name="ecgmon-worker", daemon=True)
        self._worker.start()
        self._stop_watchdog.clear()
        self._watchdog = threading.Thread(target=self._watch, name="ecgmon-watchdog", daemon=True)
        self._watchdog.start()

    def _announce_online(self) -> None:
        self._announced = True
        self._publish_status("online")

    def _publish_status(self, state: str, wait: bool = False) -> None:
        doc = {"state": state, "model_version": self.model_version, "time": time.time(),
               "degraded": self._degraded_since is not None, "analysis_alive": self._analysis_alive}
        if wait and self._mqtt is not None:
            info = self._mqtt.publish(self.topics.status, json.dumps(doc), qos=1, retain=True)
            info.wait_for_publish(timeout=self.config.drain_timeout_s)
        elif self._sink is not None:
            self._sink.status(doc)

    # --- intake (source thread) -----------------------------------------------------------------
    def _deliver(self, device: str, payload: bytes, received: float) -> bool:
        """Queue a window; True when taken (queued, or dropped for overload and counted)."""
        self.metrics.messages_in.inc()
        try:
            self._queue.put_nowait(Pending(device, payload, received))
        except queue.Full:
            self._count_drop("overload")
            with self._dropped_lock:
                self._dropped_of[device] += 1
                self._last_drop = time.monotonic()
                if self._degraded_since is None:
                    self._degraded_since = self._last_drop
                    log.error("cannot keep up: window queue full (%d), dropping windows", self._queue.maxsize)
                    self._publish_status("online")
        return True

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

    def _count_drop(self, reason: str) -> None:
        self.metrics.dropped.labels(reason).inc()
        self._count(f"dropped_{reason}")

    # --- watchdog -------------------------------------------------------------------------------
    def _worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _watch(self) -> None:
        """Liveness of the analysis: stalled after `watchdog_s` without a worker turn; failed if it stopped."""
        while not self._stop_watchdog.wait(WATCHDOG_PERIOD_S):
            if not self._worker_alive() and not self._stop_worker.is_set():
                log.critical("the analysis worker stopped: no more beats or alarms; the daemon must exit")
                self._analysis_alive = False
                self.failed.set()
                return
            alive = time.monotonic() - self._heartbeat < self.config.watchdog_s
            if alive != self._analysis_alive:
                self._analysis_alive = alive
                (log.info if alive else log.critical)("analysis %s", "running again" if alive else
                                                      f"stalled for more than {self.config.watchdog_s:g} s")
                self._publish_status("online")

    # --- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # the watchdog sees the worker gone and fails the daemon
            log.critical("the analysis worker died", exc_info=True)

    def _loop(self) -> None:
        next_housekeeping = time.monotonic() + HOUSEKEEPING_S
        while not self._stop_worker.is_set():  # stop() lets the queue drain first, up to drain_timeout_s
            self._heartbeat = time.monotonic()
            batch = self._gather()
            if batch:
                self._process(batch)
            if time.monotonic() >= next_housekeeping:
                self._housekeeping()
                next_housekeeping = time.monotonic() + HOUSEKEEPING_S

    def _gather(self) -> list[Pending]:
        """Up to max_batch pending windows, waiting at most max_wait_ms after the first."""
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.config.batching.max_wait_ms / 1000
        while len(batch) < self.config.batching.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        self.metrics.queue_depth.set(self._queue.qsize())
        return batch

    def _process(self, batch: list[Pending]) -> None:
        """Decode and admit each window, then run them in rounds where each device appears once.

        An unexpected error is contained: logged, counted, the windows concerned rejected with the
        reason `internal_error` and their devices' analysis restarted; every other window goes on.
        """
        rounds: list[list[tuple[DeviceStream, Window, float]]] = []
        seen: defaultdict[str, int] = defaultdict(int)
        for item in batch:
            try:
                admitted = self._admit(item)
            except Exception as err:  # any bug: contained to this window
                self._internal_error(item.device, err)
                continue
            if admitted is not None:
                k = seen[item.device]
                seen[item.device] += 1
                if k == len(rounds):
                    rounds.append([])
                rounds[k].append((admitted[0], admitted[1], item.received))
        for group in rounds:
            try:
                self._analyse(group)
            except Exception as err:  # any bug in the model stage: contained to this group's windows
                for stream, window, _ in group:
                    self._internal_error(stream.device, err, stream, window)

    def _internal_error(self, device: str, err: Exception, stream: DeviceStream | None = None,
                        window: Window | None = None) -> None:
        """Log, count and reject the window; its device's analysis restarts (data_gap) if it had begun."""
        log.exception("internal error on a window of %r: %s", device, err)
        self._count("internal_errors")
        self._reject(device, "internal_error", f"{type(err).__name__}: the window was not analysed")
        if stream is not None and window is not None:
            self._emit(stream.alarms.on_gap(window.t0, {"reason": "internal error"}))
            self._open(device, window, stream.alarms)

    def _admit(self, item: Pending) -> tuple[DeviceStream, Window] | None:
        """Decode a payload and update its device's stream; None when it is rejected or dropped."""
        if not DEVICE_ID.match(item.device):
            self._reject(item.device, "bad_device_id", "device id must be 1-64 of A-Z a-z 0-9 _ . -")
            return None
        try:
            window = decode_window(item.payload, self.config.streams.max_message_bytes)
        except DecodeError as err:
            self._reject(item.device, err.reason, err.detail)
            return None
        stream = self._devices.get(item.device)
        if stream is None:
            stream = self._open(item.device, window)
        else:
            ahead = (window.seq - stream.next_seq) % SEQ_MOD
            if ahead >= SEQ_MOD // 2:  # behind what was already analysed
                self._count_drop("duplicate" if ahead == SEQ_MOD - 1 else "late")
                return None
            time_gap = abs(window.t0 - stream.next_t0) > self.config.streams.max_gap_s
            if ahead or time_gap or window.fs != stream.fs or window.lead != stream.lead:
                detail = {"expected_seq": stream.next_seq, "seq": window.seq, "expected_t0": stream.next_t0,
                          "t0": window.t0, "fs": window.fs}
                log.info("device %s: gap or change in its stream (%s); state reset", item.device, detail)
                self._count("gaps")
                events = stream.alarms.on_gap(window.t0, detail)
                stream = self._open(item.device, window, stream.alarms)
                self._emit(events)
        stream.next_seq = (window.seq + 1) % SEQ_MOD
        stream.next_t0 = window.t0 + window.duration_s
        stream.last_arrival = item.received
        return stream, window

    def _open(self, device: str, window: Window, alarms: DeviceAlarms | None = None) -> DeviceStream:
        assert self._streams is not None
        self._streams.open(device, window.fs)
        if alarms is None:
            alarms = DeviceAlarms(device, self.config.alarms, self.model_version, window.t0)
        stream = DeviceStream(device, window.fs, window.lead, window.t0, window.seq, window.t0, 0.0, alarms)
        self._devices[device] = stream
        self.metrics.active_streams.set(len(self._devices))
        return stream

    def _analyse(self, group: list[tuple[DeviceStream, Window, float]]) -> None:
        assert self._streams is not None and self._sink is not None
        self.metrics.batch_size.observe(len(group))
        beats_of: defaultdict[str, list[Beat]] = defaultdict(list)
        for beat in self._streams.process([(s.device, w.samples_mv) for s, w, _ in group]):
            beats_of[beat.stream_id].append(beat)
        checks = SignalCheck.batch([w.samples_mv for _, w, _ in group], self.config.alarms)
        for (stream, window, received), check in zip(group, checks, strict=True):
            try:
                self._report(stream, window, check, beats_of[stream.device])
            except Exception as err:  # any bug in the output stage: contained to this window
                self._internal_error(stream.device, err, stream, window)
                continue
            self.metrics.latency.observe(time.monotonic() - received)
        self.metrics.windows.inc(len(group))
        self._count("windows", len(group))

    def _report(self, stream: DeviceStream, window: Window, check: SignalCheck, found: list[Beat]) -> None:
        """Publish a window's beats, then run its device's alarm rules."""
        assert self._streams is not None and self._sink is not None
        beats = [(stream.origin + b.time_s, b.class_name, b.confidence) for b in found]
        end = window.t0 + window.duration_s
        self._sink.beats(stream.device, {
            "device": stream.device, "seq": window.seq, "t0": window.t0, "model_version": self.model_version,
            "beats": [{"time": round(t, 4), "class": c, "confidence": round(p, 3)} for t, c, p in beats]})
        for _, cls, _ in beats:
            self.metrics.beats.labels(cls).inc()
        analysed_until = stream.origin + self._streams.analysed_until_s(stream.device)
        self._emit(stream.alarms.on_window(check, [(t, c) for t, c, _ in beats], end, analysed_until))
        self.metrics.result_delay.observe(max(0.0, time.time() - end))

    def _reject(self, device: str, reason: str, detail: str) -> None:
        """Count a rejection; publish it at most every REJECT_INTERVAL_S per device (invalid ids share one)."""
        assert self._sink is not None
        self.metrics.rejected.labels(reason).inc()
        self._count("rejected")
        now = time.monotonic()
        if now - self._last_reject_log >= REJECT_INTERVAL_S:
            self._last_reject_log = now
            log.warning("rejected a message from %r: %s: %s", device[:100], reason, detail)
        key = device if DEVICE_ID.match(device) else ""
        if now - self._last_reject_of.get(key, -REJECT_INTERVAL_S) < REJECT_INTERVAL_S:
            return
        if len(self._last_reject_of) >= MAX_REJECT_KEYS:
            self._last_reject_of.clear()
        self._last_reject_of[key] = now
        self._sink.rejected({"device": device[:100], "reason": reason, "detail": detail, "time": time.time()})

    def _emit(self, events: list[AlarmEvent]) -> None:
        assert self._sink is not None
        for event in events:
            self._sink.alarm(event)
            self.metrics.alarms.labels(event.type, event.state).inc()
            level = logging.WARNING if event.state == "raised" else logging.INFO
            log.log(level, "alarm %s %s %s (%s)", event.device, event.type, event.state, event.priority)

    def _count_active_alarms(self) -> float:
        """For the gauge, read at scrape time (metrics thread): a snapshot of the devices."""
        return float(sum(len(s.alarms.active) for s in list(self._devices.values())))

    def _housekeeping(self) -> None:
        """Signal loss, idle eviction, stats, recovery from overload."""
        assert self._streams is not None and self._sink is not None
        now = time.monotonic()
        with self._dropped_lock:
            dropped, self._dropped_of = self._dropped_of, Counter()
            last_drop = self._last_drop
        for device, stream in list(self._devices.items()):
            silent = now - stream.last_arrival
            signal_now = stream.next_t0 + silent
            if dropped[device] or "windows_dropped" in stream.alarms.active:
                self._emit(stream.alarms.on_overload(signal_now, dropped[device]))
            if silent >= self.config.streams.idle_evict_s:
                self._emit(stream.alarms.clear_all(signal_now, f"device silent {silent:.0f} s: state evicted"))
                self._streams.close(device)
                del self._devices[device]
                self._count("evicted")
            else:
                self._emit(stream.alarms.on_silence(signal_now, silent))
        self.metrics.active_streams.set(len(self._devices))
        if (self._degraded_since is not None and self._queue.qsize() < self._queue.maxsize // 2
                and now - last_drop >= self.config.alarms.overload_hold_s):
            log.warning("caught up after overload (%.1f s)", now - self._degraded_since)
            self._degraded_since = None
            self._publish_status("online")
        if self.config.state.path is not None and now >= self._next_save:
            self._next_save = now + self.config.state.save_interval_s
            self._save_state()
        if now >= self._next_stats:
            self._next_stats = now + self.config.output.stats_interval_s
            self._sink.stats(self.stats())

    def stats(self) -> dict[str, Any]:
        """Counters since start, for the stats topic."""
        with self._counts_lock:
            counts = dict(self._counts)
        return {"time": time.time(), "model_version": self.model_version, "active_streams": len(self._devices),
                "queue_windows": self._queue.qsize(), "degraded": self._degraded_since is not None,
                "analysis_alive": self._analysis_alive, **counts}

"""The ecgmon daemon: ECG windows in, batched stateful inference, beats and alarms out.

Threads: the source's (paho's network thread) only queues raw payloads; one worker
decodes, batches windows from many devices into one model run (waiting at most
`batching.max_wait_ms` to fill a batch), runs the alarm rules and publishes.
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

from pipeline.alarms import AlarmEvent, DeviceAlarms, SignalCheck
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
REJECT_LOG_INTERVAL_S = 5.0


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
    """`start()` brings it up step by step; `stop()` drains and tears down in reverse order."""

    def __init__(self, config: DaemonConfig, source: WindowSource | None = None,
                 sink: ResultSink | None = None) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix)
        self.metrics = DaemonMetrics()
        self.metrics_port: int | None = None
        self._source, self._sink = source, sink
        self._mqtt: MqttClient | None = None
        self._queue: queue.Queue[Pending] = queue.Queue(maxsize=config.streams.queue_windows)
        self._intake_open = threading.Event()
        self._stop_worker = threading.Event()
        self._worker: threading.Thread | None = None
        self._devices: dict[str, DeviceStream] = {}
        self._streams: BeatStreams | None = None
        self._model: BeatModel | None = None
        self._counts: defaultdict[str, int] = defaultdict(int)
        self._last_reject_log = 0.0
        self._degraded_since: float | None = None
        self._next_stats = 0.0
        self._dropped_of: Counter[str] = Counter()  # windows dropped per device since the last housekeeping
        self._dropped_lock = threading.Lock()
        self._next_save = time.monotonic() + config.state.save_interval_s

    # --- life cycle -----------------------------------------------------------------------------
    def start(self) -> bool:
        """Bring the daemon up; on the first failing step log why, undo the earlier steps, return False."""
        steps = (self._load_model, self._restore_state, self._start_metrics, self._connect, self._start_worker,
                 self._start_source, self._announce_online)  # online only once windows are being taken
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
        """Stop taking windows, finish those in flight (up to drain_timeout_s), publish offline, disconnect."""
        self._intake_open.clear()
        if self._source is not None and self._worker is not None:
            self._source.stop()
        if self._worker is not None:
            deadline = time.monotonic() + self.config.drain_timeout_s
            while not self._queue.empty() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not self._queue.empty():
                log.warning("drain timeout: %d windows not analysed", self._queue.qsize())
            self._stop_worker.set()
            self._worker.join()
            self._worker = None
            self._save_state()
        if self._mqtt is not None:
            if self._mqtt.connected:
                self._publish_status("offline", wait=True)
            self._mqtt.disconnect()
            self._mqtt = None
        self.metrics.close()

    @property
    def model_version(self) -> str:
        return self._model.info.version if self._model else "none"

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
                self._devices[device] = DeviceStream(device, float(s["fs"]), str(s["lead"]), float(s["origin"]),
                                                     int(s["next_seq"]), float(s["next_t0"]), time.monotonic(), alarms)
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
        devices = {d: {"stream": {"fs": s.fs, "lead": s.lead, "origin": s.origin, "next_seq": s.next_seq,
                                  "next_t0": s.next_t0},
                       "streams": self._streams.save(d), "alarms": s.alarms.to_dict()}
                   for d, s in self._devices.items()}
        try:
            save_state(path, self.model_version, devices)
        except OSError as err:
            log.error("cannot save the state to %s: %s", path, err)

    def _start_metrics(self) -> None:
        if self.config.metrics.port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics.host, self.config.metrics.port)

    def _connect(self) -> None:
        if self._source is not None and self._sink is not None:
            return
        c = self.config.mqtt
        will = (self.topics.status, b'{"state":"offline","reason":"connection lost"}')
        tls = None if c.tls is None else {"ca_certs": str(c.tls.ca_file),
                                          "certfile": str(c.tls.cert_file) if c.tls.cert_file else None,
                                          "keyfile": str(c.tls.key_file) if c.tls.key_file else None}
        self._mqtt = MqttClient(c.host, c.port, c.client_id, username=c.username, password=c.secret(),
                                keepalive_s=c.keepalive_s, session_expiry_s=c.session_expiry_s, will=will,
                                reconnect_min_s=c.reconnect_min_s, reconnect_max_s=c.reconnect_max_s, tls=tls)
        self._mqtt.connect()
        self._source = self._source or MqttSource(self._mqtt, self.topics, c.qos_in)
        self._sink = self._sink or MqttSink(self._mqtt, self.topics, self.config.output.beats)

    def _announce_online(self) -> None:
        self._publish_status("online")

    def _start_worker(self) -> None:
        self._stop_worker.clear()
        self._worker = threading.Thread(target=self._run, name="ecgmon-worker", daemon=True)
        self._worker.start()

    def _start_source(self) -> None:
        assert self._source is not None
        self._intake_open.set()
        self._source.start(self._deliver)

    def _publish_status(self, state: str, wait: bool = False) -> None:
        doc = {"state": state, "model_version": self.model_version, "time": time.time(),
               "degraded": self._degraded_since is not None}
        if wait and self._mqtt is not None:
            info = self._mqtt.publish(self.topics.status, json.dumps(doc), qos=1, retain=True)
            info.wait_for_publish(timeout=self.config.drain_timeout_s)
        elif self._sink is not None:
            self._sink.status(doc)

    # --- intake (source thread) -----------------------------------------------------------------
    def _deliver(self, device: str, payload: bytes, received: float) -> None:
        if not self._intake_open.is_set():
            self._count_drop("shutting_down")
            return
        try:
            self._queue.put_nowait(Pending(device, payload, received))
        except queue.Full:
            self._count_drop("overload")
            with self._dropped_lock:
                self._dropped_of[device] += 1
            if self._degraded_since is None:
                self._degraded_since = time.monotonic()
                log.error("cannot keep up: window queue full (%d), dropping windows", self._queue.maxsize)
                self._publish_status("online")

    def _count_drop(self, reason: str) -> None:
        self.metrics.dropped.labels(reason).inc()
        self._counts[f"dropped_{reason}"] += 1

    # --- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        next_housekeeping = time.monotonic() + HOUSEKEEPING_S
        while not self._stop_worker.is_set():  # stop() lets the queue drain first, up to drain_timeout_s
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
        """Decode and admit each window, then run them in rounds where each device appears once."""
        rounds: list[list[tuple[DeviceStream, Window, float]]] = []
        seen: defaultdict[str, int] = defaultdict(int)
        for item in batch:
            admitted = self._admit(item)
            if admitted is not None:
                k = seen[item.device]
                seen[item.device] += 1
                if k == len(rounds):
                    rounds.append([])
                rounds[k].append((admitted[0], admitted[1], item.received))
        for group in rounds:
            self._analyse(group)

    def _admit(self, item: Pending) -> tuple[DeviceStream, Window] | None:
        """Decode a payload and update its device's stream; None when it is rejected or dropped."""
        self.metrics.messages_in.inc()
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
                self._counts["gaps"] += 1
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
        assert self._streams is not None and self._sink is not None and self._model is not None
        self.metrics.batch_size.observe(len(group))
        beats_of: defaultdict[str, list[Beat]] = defaultdict(list)
        for beat in self._streams.process([(s.device, w.samples_mv) for s, w, _ in group]):
            beats_of[beat.stream_id].append(beat)
        delay_s = self._model.info.output_delay_frames * self._model.info.frame_s
        checks = SignalCheck.batch([w.samples_mv for _, w, _ in group], self.config.alarms)
        class_counts: Counter[str] = Counter()
        for (stream, window, received), check in zip(group, checks, strict=True):
            beats = [(stream.origin + b.time_s, b.class_name, b.confidence) for b in beats_of[stream.device]]
            end = window.t0 + window.duration_s
            self._sink.beats(stream.device, {
                "device": stream.device, "seq": window.seq, "t0": window.t0, "model_version": self.model_version,
                "beats": [{"time": round(t, 4), "class": c, "confidence": round(p, 3)} for t, c, p in beats]})
            class_counts.update(c for _, c, _ in beats)
            events = stream.alarms.on_window(check, end, end - delay_s)
            events += stream.alarms.on_beats([(t, c) for t, c, _ in beats], end)
            self._emit(events)
            self.metrics.latency.observe(time.monotonic() - received)
        for cls, count in class_counts.items():
            self.metrics.beats.labels(cls).inc(count)
        self.metrics.windows.inc(len(group))
        self._counts["windows"] += len(group)

    def _reject(self, device: str, reason: str, detail: str) -> None:
        assert self._sink is not None
        self.metrics.rejected.labels(reason).inc()
        self._counts["rejected"] += 1
        now = time.monotonic()
        if now - self._last_reject_log >= REJECT_LOG_INTERVAL_S:  # rate-limited log and error topic
            self._last_reject_log = now
            log.warning("rejected a message from %r: %s: %s", device, reason, detail)
            if DEVICE_ID.match(device):
                self._sink.rejected(device, {"device": device, "reason": reason, "detail": detail,
                                             "time": time.time()})

    def _emit(self, events: list[AlarmEvent]) -> None:
        assert self._sink is not None
        for event in events:
            self._sink.alarm(event)
            self.metrics.alarms.labels(event.type, event.state).inc()
            if event.state != "updated":
                self.metrics.active_alarms.inc(1 if event.state == "raised" else -1)
            level = logging.WARNING if event.state == "raised" else logging.INFO
            log.log(level, "alarm %s %s %s (%s)", event.device, event.type, event.state, event.priority)

    def _housekeeping(self) -> None:
        """Signal loss, idle eviction, stats, recovery from overload."""
        assert self._streams is not None and self._sink is not None
        now = time.monotonic()
        with self._dropped_lock:
            dropped, self._dropped_of = self._dropped_of, Counter()
        for device, stream in list(self._devices.items()):
            silent = now - stream.last_arrival
            signal_now = stream.next_t0 + silent
            if dropped[device] or "windows_dropped" in stream.alarms.active:
                self._emit(stream.alarms.on_overload(signal_now, dropped[device]))
            if silent >= self.config.streams.idle_evict_s:
                self._emit(stream.alarms.clear_all(signal_now, f"device silent {silent:.0f} s: state evicted"))
                self._streams.close(device)
                del self._devices[device]
                self._counts["evicted"] += 1
            else:
                self._emit(stream.alarms.on_silence(signal_now, silent))
        self.metrics.active_streams.set(len(self._devices))
        if self._degraded_since is not None and self._queue.qsize() < self._queue.maxsize // 2:
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
        return {"time": time.time(), "model_version": self.model_version, "active_streams": len(self._devices),
                "queue_windows": self._queue.qsize(), "degraded": self._degraded_since is not None,
                **self._counts}

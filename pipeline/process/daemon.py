"""The ecgmon daemon: ECG windows in, batched stateful inference, beats and alarms out.

Threads: the source's (paho's network thread) only queues raw payloads; one worker decodes,
admits (pipeline/process/admission.py), batches windows from many devices into one model run (waiting
at most `batching.max_wait_ms` to fill a batch), runs the alarm rules and publishes the messages
of pipeline/io/messages.py; a watchdog (pipeline/process/watchdog.py) reports when the worker stalls.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import ssl
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.alarms.reconcile import reconcile
from pipeline.alarms.rules import AlarmEvent, DeviceAlarms, SignalCheck, af_probabilities
from pipeline.analysis.model import BeatModel, ModelError, rhythm_thresholds
from pipeline.analysis.streams import Beat, BeatStreams
from pipeline.config import ConfigError, DaemonConfig
from pipeline.detectors.qrs import QrsEvidence
from pipeline.io import messages
from pipeline.io.codec import DecodeError, Window, decode_ack, decode_window
from pipeline.io.mqtt import DEVICE_ID, ConnectError, MqttClient, Topics
from pipeline.io.sources import MqttSink, MqttSource, Progress, ResultSink, WindowSource
from pipeline.process.admission import Admission, DeviceStream, at_or_before
from pipeline.process.metrics import DaemonMetrics
from pipeline.process.state import decode_state, encode_state, load_state, save_state
from pipeline.process.watchdog import Watchdog

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 1.0
ALARM_DELAY_S = 5.0  # alarm messages waiting longer than this for the broker: said on the status topic
SAME_TIME_S = 1e-6  # window end times closer than this are the same (s)
REJECT_INTERVAL_S = 5.0  # at most one rejection message per device (and one log line) this often
# Reasons of the daemon's own on the error topic, beside the decoder's: rejections, then valid windows not analysed
DAEMON_REASONS = ("bad_device_id", "internal_error", "duplicate", "late")


@dataclass(frozen=True)
class Pending:
    device: str
    payload: bytes
    received: float  # monotonic (s)
    done: Callable[[], None] | None  # the source's acknowledgement, once the window is finished with
    task: Callable[[], None] | None = None  # instead of a window: run this on the worker (`call_soon`)


@dataclass
class BeatBatch:
    """A device's beats gathered for the `output.beats_every_s` cadence."""

    t0: float  # start of the first window gathered (s, signal time)
    t1: float
    seq: int  # of the last window gathered
    beats: list[tuple[float, str, float]]


@dataclass(frozen=True)
class Admitted:
    device: str
    stream: DeviceStream
    window: Window
    received: float  # monotonic (s)


class Daemon:
    """`start()` brings it up step by step; `stop()` undoes the steps: windows stop first, then drain.

    `failed` is set if the analysis stopped for good (the process should exit non-zero).
    """

    def __init__(self, config: DaemonConfig, source: WindowSource | None = None,
                 sink: ResultSink | None = None) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix, config.mqtt.client_id if config.source == "rabbitmq" else None)
        self.metrics = DaemonMetrics()
        self.metrics_port: int | None = None
        self.watchdog = Watchdog(config.watchdog_s, lambda alive: self._publish_status("online"))
        self.failed = self.watchdog.failed
        self.source, self._sink = source, sink  # where windows come from (made at start when not given)
        self._mqtt: MqttClient | None = None
        self._model: BeatModel | None = None
        self._streams: BeatStreams | None = None
        self._admission = Admission(config.streams.max_gap_s)
        self._alarms: dict[str, DeviceAlarms] = {}  # every device known: streaming, or dormant with open alarms
        # Devices without a stream whose open alarms stay until their data returns: evicted after idle_evict_s, or
        # known only from the open alarms on the broker at start. Device -> (signal time when it went silent (s),
        # when it went silent (s, monotonic)).
        self._dormant: dict[str, tuple[float, float]] = {}
        self._beat_batches: dict[str, BeatBatch] = {}  # with output.beats_every_s > 0
        # Devices taken over from a daemon that died, whose windows up to their mark come again: analysed without
        # publishing what their results were (`restore_devices`).
        self._published: dict[str, Progress] = {}
        self._queue: queue.Queue[Pending] = queue.Queue(maxsize=config.streams.queue_windows)
        self._worker: threading.Thread | None = None
        self._stop_worker = threading.Event()
        self._batch_full = threading.Event()  # set when max_batch windows wait (`_gather`)
        self._hurry = threading.Event()  # set by a second signal: stop draining
        self._announced = False
        self._counts: defaultdict[str, int] = defaultdict(int)
        self._counts_lock = threading.Lock()  # counts are written by the source's thread too
        self._reject_log = messages.Throttle(REJECT_INTERVAL_S)
        self._reject_publish = messages.Throttle(REJECT_INTERVAL_S)
        self._degraded_since: float | None = None
        self._last_drop = 0.0  # monotonic time of the last window dropped for overload (s)
        self._dropped_of: Counter[str] = Counter()  # windows dropped per device since the last housekeeping
        self._dropped_lock = threading.Lock()
        self._next_stats = 0.0
        self._last_taken = 0.0  # arrival time (s, monotonic) of the last window the worker took from the queue
        self._next_save = time.monotonic() + config.state.save_interval_s
        self._unsaved: list[Callable[[], None]] = []  # acknowledgements of windows the next state save covers
        self._saver: threading.Thread | None = None  # writing the last snapshot to state.path
        self._unproven_since: float | None = None  # monotonic time the source's link stopped being proven
        self._alarms_delayed = False  # alarm messages have waited for the broker more than ALARM_DELAY_S
        self.metrics.active_alarms.set_function(self._count_active_alarms)
        self.metrics.analysis_alive.set_function(lambda: float(self.watchdog.alive))
        for gauge, key in ((self.metrics.alarm_messages_pending, "alarms_pending"),
                           (self.metrics.alarm_message_delay, "alarm_delay_s"),
                           (self.metrics.alarm_messages_lost, "alarms_lost")):
            gauge.set_function(functools.partial(self._sink_figure, key))

    # --- life cycle -----------------------------------------------------------------------------
    def start(self) -> bool:
        """Bring the daemon up; on the first failing step log why, undo the earlier steps, return False.

        Windows are taken (queued) from the moment the connection is up, so that those the broker kept
        for the persistent session are not lost; the worker analyses them once open alarms are reconciled.
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
        """Undo start(): take no more windows, drain those taken (up to drain_timeout_s, less after
        `hurry()`), stop the worker and save the state, announce offline, disconnect, close the metrics."""
        if self.source is not None:
            self.source.stop()
        self._stop_worker_thread()
        if self.source is not None:
            self.source.close()
        self._announce_offline()
        if self._sink is not None:
            self._sink.close(self.config.drain_timeout_s)
        self._mqtt = None
        self.metrics.close()

    def hurry(self) -> None:
        """Stop draining (a second signal): the rest of stop() still runs; windows left are logged."""
        self._hurry.set()

    @property
    def hurried(self) -> bool:
        return self._hurry.is_set()

    @property
    def model_version(self) -> str:
        return self._model.info.version if self._model else "none"

    @property
    def model(self) -> BeatModel:
        """The loaded model (after start)."""
        if self._model is None:
            raise ModelError("no model loaded: the daemon has not started")
        return self._model

    @property
    def analysis_alive(self) -> bool:
        """False while the worker has not turned for `watchdog_s`, or after it stopped."""
        return self.watchdog.alive

    @property
    def connected(self) -> bool:
        """Connected to the MQTT broker (always False on a cluster, and with a source and sink of the caller's)."""
        return self._mqtt is not None and self._mqtt.connected

    def _load_model(self) -> None:
        m = self.config.model
        self._model = BeatModel(m.path, m.intra_op_threads, m.inter_op_threads)
        self._streams = BeatStreams(self._model, flat_mv=self.config.alarms.flat_mv)

    def _restore_state(self) -> None:
        """Devices saved by the previous run resume where they were; a bad or old file is reported and ignored."""
        path = self.config.state.path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise OSError(f"state.path: cannot write in {path.parent} (set state.path, or null to keep no state)")
        n = self._restore_devices(load_state(path, self.model_version, self.config.state.max_age_s))
        log.info("restored %d devices from %s", n, path)

    def _save_state(self, wait: bool = False) -> None:
        """Snapshot every device (on the worker), then write it to state.path and acknowledge the windows it covers
        to the broker (on a saver thread; `wait`: here). A save still being written is not overtaken."""
        path = self.config.state.path
        if path is None or (self._saver is not None and self._saver.is_alive()):
            return
        devices = self._device_states([*self._admission.streams, *self._dormant])
        acks, self._unsaved = self._unsaved, []

        def write() -> None:
            try:
                save_state(path, self.model_version, devices)
            except OSError as err:
                log.error("cannot save the state to %s: %s; its windows are acknowledged unsaved", path, err)
            for ack in acks:
                ack()

        if wait:
            write()
        else:
            self._saver = threading.Thread(target=write, name="ecgmon-state", daemon=True)
            self._saver.start()

    def _finished(self, done: Callable[[], None] | None) -> None:
        """A window is finished with: acknowledge it to its source now, or, with a state file, once a save covers
        it (so that a daemon killed before the save gets it again, and continues warm from the saved state)."""
        if done is None:
            return
        if self.config.state.path is None:
            done()
        else:
            self._unsaved.append(done)

    def _device_states(self, devices: list[str]) -> dict[str, dict[str, Any]]:
        """Everything the daemon holds of each of `devices` it holds, as JSON-able values (a dormant device: its
        alarms, and when it went silent)."""
        assert self._streams is not None
        unix_minus_monotonic = time.time() - time.monotonic()
        docs: dict[str, dict[str, Any]] = {
            d: {"stream": self._admission.save(d, unix_minus_monotonic), "streams": self._streams.save(d),
                "alarms": self._alarms[d].to_dict()} for d in devices if d in self._admission.streams}
        docs.update({d: {"dormant": [self._dormant[d][0], self._dormant[d][1] + unix_minus_monotonic],
                         "alarms": self._alarms[d].to_dict()} for d in devices if d in self._dormant})
        return docs

    def _restore_devices(self, docs: dict[str, dict[str, Any]]) -> int:
        """Continue each device from its saved state (a malformed one starts cold); returns how many resumed."""
        assert self._streams is not None
        unix_minus_monotonic = time.time() - time.monotonic()
        restored = 0
        for device, doc in docs.items():
            self._forget(device)
            try:
                self._alarms[device] = DeviceAlarms.from_dict(device, self.config.alarms, self.model_version,
                                                              self.model.info.af_detector, doc["alarms"],
                                                              rhythm_thresholds(self.model))
                if "dormant" in doc:
                    signal_time, silent_since_unix = doc["dormant"]
                    self._dormant[device] = (float(signal_time), float(silent_since_unix) - unix_minus_monotonic)
                else:
                    self._streams.restore(device, doc["streams"])
                    self._admission.restore(device, doc["stream"], unix_minus_monotonic)
                restored += 1
            except (KeyError, ValueError, TypeError) as err:
                log.warning("saved state of device %r is malformed (%s): it starts cold", device, err)
                self._forget(device)
        self.metrics.active_streams.set(len(self._admission.streams))
        return restored

    # --- hand-off between daemons (pipeline/io/sources.py DeviceStates, for a partitioned source) ------------
    def call_soon(self, task: Callable[[], None]) -> None:
        """Run `task` on the worker once the windows delivered before it are finished with (never dropped: waits
        for room in the queue)."""
        self._queue.put(Pending("", b"", time.monotonic(), None, task))

    def save_devices(self, devices: list[str], forget: bool) -> bytes:
        """The state of those of `devices` this daemon holds, as one document; with `forget`, they then leave it
        (their gathered beats published first). On the worker (`call_soon`), or after it stopped."""
        blob = encode_state(self.model_version, self._device_states(devices))
        if forget:
            for device in devices:
                self._forget(device)
        return blob

    def restore_devices(self, blob: bytes | None, source: str, published: dict[str, Progress]) -> int:
        """Continue the devices of a `save_devices` document from `source` (a bad or foreign one is reported and
        ignored; None: there is none, the devices start from their first window); returns how many resumed. The
        windows that come again up to each device's mark in `published` (`ResultSink.progress` of the daemon that
        held it) are analysed without publishing their results, which went out before. On the worker
        (`call_soon`)."""
        assert self._sink is not None
        restored = 0 if blob is None else self._restore_devices(
            decode_state(blob, self.model_version, self.config.state.max_age_s, source))
        self._published.update(published)
        self._sink.progress(published)  # this daemon's marks start where the last one's stopped
        return restored

    def publish_open_alarms(self) -> None:
        """Publish the last message of each open alarm of the devices this daemon holds again, after every message
        published so far. On the worker (`call_soon`)."""
        assert self._sink is not None
        for alarms in self._alarms.values():
            for event in alarms.open_events():
                self._sink.open_alarm(messages.alarm(event))

    def _start_metrics(self) -> None:
        if self.config.metrics.port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics.host, self.config.metrics.port)

    def _make_io(self) -> None:
        """The source and sink (over one MQTT client, or over a RabbitMQ cluster), unless both were given; not
        connected yet."""
        if self.source is not None and self._sink is not None:
            return
        c = self.config.mqtt
        if self.config.source == "rabbitmq":
            from pipeline.io.rabbit import PartitionedSource, Partitions, connection_parameters  # pika only where used
            from pipeline.io.rabbit_sink import AmqpSink

            r = self.config.rabbitmq
            context = None
            if r.tls is not None:
                context = ssl.create_default_context(cafile=r.tls.ca_file)
                if r.tls.cert_file is not None:
                    context.load_cert_chain(r.tls.cert_file, r.tls.key_file)
            params = connection_parameters(r.addresses(), r.username, r.password.get_secret_value(), context)
            partitions = Partitions(c.topic_prefix, r.partitions)
            source = PartitionedSource(params, partitions, c.client_id, self, r.prefetch, r.checkpoint_s)
            self.source = self.source or source
            self._sink = self._sink or AmqpSink(params, self.topics, self.config.output.beats, partitions,
                                                source.partition_of)
            return
        tls = None if c.tls is None else c.tls.paho_options()
        self._mqtt = MqttClient(c.host, c.port, c.client_id, username=c.username, password=c.secret(),
                                keepalive_s=c.keepalive_s, session_expiry_s=c.session_expiry_s,
                                will=(self.topics.status, messages.last_will()), reconnect_min_s=c.reconnect_min_s,
                                reconnect_max_s=c.reconnect_max_s, tls=tls, on_connected=self._on_connected,
                                protocol=c.protocol)
        self.source = self.source or MqttSource(self._mqtt, self.topics, c.qos_in)
        self._sink = self._sink or MqttSink(self._mqtt, self.topics, self.config.output.beats)

    def _start_source(self) -> None:
        assert self.source is not None
        self.source.start(self._deliver, self._acknowledge)

    def _connect(self) -> None:
        assert self._sink is not None
        self._sink.open()

    def _on_connected(self, reconnect: bool) -> None:
        """After a reconnect the last will has said offline: say online again (network thread)."""
        if reconnect and self._announced:
            self._publish_status("online")

    def _reconcile_alarms(self) -> None:
        """Clear the open alarms this daemon holds no state for (pipeline/alarms/reconcile.py). Not on a partitioned
        source: there the other daemons hold the other devices' alarms, and alarms move with their devices."""
        assert self._sink is not None
        if self.config.source == "rabbitmq":
            return
        docs = self._sink.open_alarms()
        if docs is not None:
            for device, signal_time in reconcile(docs, self._alarms, self._new_alarms).items():
                if device not in self._admission.streams:
                    self._dormant[device] = (signal_time, time.monotonic())

    def _new_alarms(self, device: str, started: float) -> DeviceAlarms:
        """A device's alarm state from nothing, its stream (re)started at `started` (s, signal time)."""
        return DeviceAlarms(device, self.config.alarms, self.model_version, started, self.model.info.af_detector,
                            rhythm_thresholds(self.model))

    def _start_worker(self) -> None:
        self._stop_worker.clear()
        self._worker = threading.Thread(target=self._run, name="ecgmon-worker", daemon=True)
        self._worker.start()
        self.watchdog.start(self._worker, self._stop_worker)

    def _stop_worker_thread(self) -> None:
        if self._worker is None:
            return
        deadline = time.monotonic() + self.config.drain_timeout_s
        while (not self._queue.empty() and time.monotonic() < deadline and not self._hurry.is_set()
               and self._worker.is_alive()):
            time.sleep(0.01)
        if not self._queue.empty():
            log.warning("stopping with %d windows not analysed", self._queue.qsize())
        self._stop_worker.set()
        self._worker.join(max(0.0, deadline - time.monotonic()) + HOUSEKEEPING_S)
        self.watchdog.stop()
        self._worker = None
        self._flush_beats()
        if self._saver is not None:
            self._saver.join()
        self._save_state(wait=True)

    def _announce_online(self) -> None:
        self._announced = True
        self._publish_status("online")

    def _announce_offline(self) -> None:
        """Say offline (the sink's close waits for it to go out)."""
        if self._announced:
            self._publish_status("offline")
        self._announced = False

    def _publish_status(self, state: str) -> None:
        if self._sink is not None:
            self._sink.status(messages.status(state, self.model_version, self._degraded_since is not None,
                                              self.watchdog.alive, time.time(), self._alarms_delayed))

    def _check_alarm_delivery(self) -> None:
        """Say on the status topic when alarm messages have waited for the broker more than ALARM_DELAY_S, and
        when they no longer do."""
        assert self._sink is not None
        delayed = self._sink_figure("alarm_delay_s") > ALARM_DELAY_S
        if delayed != self._alarms_delayed:
            self._alarms_delayed = delayed
            log.log(logging.ERROR if delayed else logging.WARNING, "alarm messages %s",
                    f"delayed more than {ALARM_DELAY_S:g} s" if delayed else "delivered on time again")
            self._publish_status("online")

    # --- intake (source thread) -----------------------------------------------------------------
    def _deliver(self, device: str, payload: bytes, received: float, done: Callable[[], None] | None = None) -> None:
        """Queue a window, or drop it for overload and count it."""
        self.metrics.messages_in.inc()
        try:
            self._queue.put_nowait(Pending(device, payload, received, done))
            if self._queue.qsize() >= self.config.batching.max_batch:
                self._batch_full.set()
        except queue.Full:
            if done is not None:
                done()
            self._count_drop("overload")
            with self._dropped_lock:
                self._dropped_of[device] += 1
                self._last_drop = time.monotonic()
                if self._degraded_since is None:
                    self._degraded_since = self._last_drop
                    log.error("cannot keep up: window queue full (%d), dropping windows", self._queue.maxsize)
                    self._publish_status("online")

    def _acknowledge(self, device: str, payload: bytes) -> None:
        """A staff acknowledgement of one of `device`'s alarms, handled on the worker (`_on_ack`)."""
        self.call_soon(functools.partial(self._on_ack, device, payload))

    def _on_ack(self, device: str, payload: bytes) -> None:
        """Record an acknowledgement in the open alarm's state and publish it in the alarm's `updated` event; reject
        (with the reason, counted) one that is malformed or names no open alarm of the device."""
        try:
            ack = decode_ack(payload)
        except DecodeError as err:
            self._reject(device, err.reason, err.detail)
            return
        alarms = self._alarms.get(device)
        events = [] if alarms is None else alarms.acknowledge(ack.alarm_id, ack.by, time.time(), ack.silence_s)
        if not events:
            self._reject(device, "unknown_alarm", f"no open alarm {ack.alarm_id[:100]!r} of this device to acknowledge")
            return
        self._count("acknowledged")
        log.info("alarm %s of %s acknowledged by %s%s", ack.alarm_id, device, ack.by,
                 "" if ack.silence_s is None else f", silenced for {ack.silence_s:g} s")
        self._emit(events)

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

    def _count_drop(self, reason: str) -> None:
        self.metrics.dropped.labels(reason).inc()
        self._count(f"dropped_{reason}")

    # --- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # the watchdog sees the worker gone and fails the daemon
            log.critical("the analysis worker died", exc_info=True)

    def _loop(self) -> None:
        next_housekeeping = time.monotonic() + HOUSEKEEPING_S
        while not self._stop_worker.is_set():  # stop() lets the queue drain first, up to drain_timeout_s
            self.watchdog.turn()
            batch = self._gather()
            if batch:
                self._process(batch)
            if time.monotonic() >= next_housekeeping:
                self._housekeeping()
                next_housekeeping = time.monotonic() + HOUSEKEEPING_S

    def _gather(self) -> list[Pending]:
        """Up to max_batch pending windows, waiting at most max_wait_ms after the first: the worker sleeps until a
        full batch waits or the time is up (one wake-up per batch, not one per window), then takes them all."""
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        max_batch = self.config.batching.max_batch
        self._batch_full.clear()
        if self._queue.qsize() + 1 < max_batch:
            self._batch_full.wait(self.config.batching.max_wait_ms / 1000)
        while len(batch) < max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.metrics.queue_depth.set(self._queue.qsize())
        self._last_taken = batch[-1].received
        return batch

    def _process(self, batch: list[Pending]) -> None:
        """Decode and admit each window, then run them in rounds where each device appears once.

        An unexpected error is contained: logged, counted, the windows concerned rejected with the
        reason `internal_error` and their devices' analysis restarted; every other window goes on.
        """
        tasks = [i for i, item in enumerate(batch) if item.task is not None]
        if tasks:  # the windows before each task, then the task
            start = 0
            for i in tasks:
                self._process(batch[start:i])
                task = batch[i].task
                assert task is not None
                try:
                    task()
                except Exception:  # a bug in a hand-off task: logged; the windows go on
                    log.exception("a task from the source failed")
                start = i + 1
            self._process(batch[start:])
            return
        rounds: list[list[Admitted]] = []
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
                rounds[k].append(admitted)
        for group in rounds:
            try:
                self._analyse(group)
            except Exception as err:  # any bug in the model stage: contained to this group's windows
                for a in group:
                    self._internal_error(a.device, err, a.window)
        for item in batch:  # every window of the batch is finished with: analysed, rejected or dropped
            self._finished(item.done)

    def _admit(self, item: Pending) -> Admitted | None:
        """Decode a payload and admit it to its device's stream; None when it is rejected or dropped."""
        assert self._streams is not None
        if not DEVICE_ID.match(item.device):
            self._reject(item.device, "bad_device_id", "device id must be 1-64 of A-Z a-z 0-9 _ . -")
            return None
        try:
            window = decode_window(item.payload, self.config.streams.max_message_bytes)
        except DecodeError as err:
            self._reject(item.device, err.reason, err.detail)
            return None
        verdict = self._admission.admit(item.device, window, item.received)
        if verdict.stream is None:
            self._count_drop(verdict.kind)
            self._tell_device(item.device, verdict.kind, f"seq {window.seq} was already analysed (expected "
                              f"{self._admission.streams[item.device].next_seq}): the window was dropped")
            return None
        if verdict.kind == "new":
            if item.device in self._dormant:  # its open alarms stay, and are judged again from the new data
                del self._dormant[item.device]
                self._alarms[item.device].resume(window.t0)
            else:
                self._alarms[item.device] = self._new_alarms(item.device, window.t0)
        if verdict.kind != "next":
            self._streams.open(item.device, window.fs)
        if verdict.kind == "restart":
            self._published.pop(item.device, None)  # not the windows its mark was for
            log.info("device %s: gap or change in its stream (%s); analysis restarted", item.device, verdict.detail)
            self._count("gaps")
            self._emit(self._alarms[item.device].on_gap(window.t0, verdict.detail or {}))
        self.metrics.active_streams.set(len(self._admission.streams))
        return Admitted(item.device, verdict.stream, window, item.received)

    def _internal_error(self, device: str, err: Exception, window: Window | None = None) -> None:
        """Log, count and reject the window; its device's analysis restarts (data_gap) if it had begun."""
        log.exception("internal error on a window of %r: %s", device, err)
        self._count("internal_errors")
        self._reject(device, "internal_error", f"{type(err).__name__}: the window was not analysed")
        if window is not None and self._streams is not None:
            self._admission.restart(device, window)
            self._streams.open(device, window.fs)
            self._emit(self._alarms[device].on_gap(window.t0, {"reason": "internal error"}))

    def _analyse(self, group: list[Admitted]) -> None:
        """One model run over `group` (each device once), then each window's report; the AF detector judges every
        device with new beats in one computation, and the metrics are counted once per group."""
        assert self._streams is not None
        self.metrics.batch_size.observe_many(np.array([len(group)], dtype=np.float64))
        found: defaultdict[str, list[Beat]] = defaultdict(list)
        for beat in self._streams.process([(a.device, a.window.leads, a.window.samples_mv) for a in group]):
            found[beat.stream_id].append(beat)
        beats = [[(a.stream.origin + b.time_s, b.class_name, b.confidence) for b in found[a.device]] for a in group]
        devices = [a.device for a in group]
        checks = SignalCheck.batch([a.window for a in group], self._streams.unreadable_many(devices),
                                   [self._streams.unreadable_leads(d) for d in devices], self.config.alarms)
        p_af = af_probabilities(self.model.info.af_detector, [self._alarms[a.device] for a in group],
                                [[(t, c) for t, c, _ in b] for b in beats],
                                [self._streams.p_wave_consistency(a.device) for a in group])
        analysed_until = self._streams.analysed_until_many(devices)
        evidence = zip(self._streams.vf_found_many(devices), self._streams.qrs_evidence_many(devices),
                       self._streams.rhythm_many(devices), strict=True)
        reported: list[Admitted] = []
        done: dict[str, Progress] = {}
        for a, check, window_beats, p, until, (vf, qrs, rhythm) in zip(group, checks, beats, p_af, analysed_until,
                                                                       evidence, strict=True):
            try:
                progress = self._report(a, check, window_beats, p, a.stream.origin + until, vf, qrs, rhythm)
                if progress is not None:
                    done[a.device] = progress
            except Exception as err:  # any bug in the output stage: contained to this window
                self._internal_error(a.device, err, a.window)
                continue
            reported.append(a)
        if done:
            assert self._sink is not None
            self._sink.progress(done)
        now_monotonic, now_unix = time.monotonic(), time.time()
        self.metrics.latency.observe_many(np.array([now_monotonic - a.received for a in reported]))
        self.metrics.result_delay.observe_many(np.maximum(
            0.0, np.array([now_unix - a.window.t0 - a.window.duration_s for a in reported])))
        for cls, n in Counter(c for b in beats for _, c, _ in b).items():
            self.metrics.beats.labels(cls).inc(n)
        self.metrics.windows.inc(len(group))
        self._count("windows", len(group))

    def _report(self, a: Admitted, check: SignalCheck, beats: list[tuple[float, str, float]], p_af: float | None,
                analysed_until: float, vf_found: bool, qrs: QrsEvidence, rhythm: dict[str, float] | None
                ) -> Progress | None:
        """Publish a window's beats (R-peak time s, AAMI class, confidence), gathered with the next windows' at the
        `output.beats_every_s` cadence, then run its device's alarm rules and publish their events; returns how far
        the device's results have gone. A window that comes again up to its device's mark in `_published` updates
        the alarm rules and publishes only the beats its first analysis had not (None)."""
        assert self._streams is not None
        end = a.window.t0 + a.window.duration_s
        events = self._alarms[a.device].on_window(check, [(t, c) for t, c, _ in beats], end, analysed_until,
                                                  vf_found, p_af, qrs.shifted(a.stream.origin), rhythm)
        mark = self._published.get(a.device)
        if mark is not None and not (at_or_before(a.window.seq, mark.seq) and end <= mark.end + SAME_TIME_S):
            del self._published[a.device]  # past its mark: published from here on
            mark = None
        if mark is not None:  # it comes again: its alarm events went out, and its beats unless still gathered
            self._count("replayed")
            if end > mark.beats_until + SAME_TIME_S:
                self._gather_beats(a, end, beats)
            return None
        self._gather_beats(a, end, beats)
        self._emit(events)
        pending = self._beat_batches.get(a.device)
        return Progress(a.window.seq, end, end if pending is None else pending.t0)

    def _gather_beats(self, a: Admitted, end: float, beats: list[tuple[float, str, float]]) -> None:
        """Add a window's beats to its device's gathered ones, and publish them once they span
        `output.beats_every_s`."""
        gathered = self._beat_batches.get(a.device)
        if gathered is None:
            gathered = BeatBatch(a.window.t0, end, a.window.seq, beats)
        else:
            gathered.t1, gathered.seq = end, a.window.seq
            gathered.beats.extend(beats)
        if end - gathered.t0 >= self.config.output.beats_every_s:
            self._beat_batches.pop(a.device, None)
            self._publish_beats(a.device, gathered)
        else:
            self._beat_batches[a.device] = gathered

    def _publish_beats(self, device: str, gathered: BeatBatch) -> None:
        assert self._sink is not None
        self._sink.beats(messages.beats(device, gathered.seq, gathered.t0, gathered.t1, self.model_version,
                                        gathered.beats))

    def _flush_beats(self, device: str | None = None) -> None:
        """Publish the beats gathered so far for `device` (None: every device)."""
        for d in [device] if device is not None else list(self._beat_batches):
            gathered = self._beat_batches.pop(d, None)
            if gathered is not None:
                self._publish_beats(d, gathered)

    def _reject(self, device: str, reason: str, detail: str) -> None:
        """Count a rejection, then tell the device (`_tell_device`)."""
        self.metrics.rejected.labels(reason).inc()
        self._count("rejected")
        self._tell_device(device, reason, detail)

    def _tell_device(self, device: str, reason: str, detail: str) -> None:
        """Say why a message of `device` was not analysed: logged at most every REJECT_INTERVAL_S, and published on
        its error topic as often per device (invalid device ids share one)."""
        assert self._sink is not None
        now = time.monotonic()
        if self._reject_log.allow("", now):
            log.warning("did not analyse a message from %r: %s: %s", device[:100], reason, detail)
        if self._reject_publish.allow(device if DEVICE_ID.match(device) else "", now):
            self._sink.rejected(messages.rejection(device, reason, detail, time.time()))

    def _emit(self, events: list[AlarmEvent]) -> None:
        assert self._sink is not None
        for event in events:
            self._sink.alarm(messages.alarm(event))
            self.metrics.alarms.labels(event.type, event.state).inc()
            level = logging.WARNING if event.state == "raised" else logging.INFO
            log.log(level, "alarm %s %s %s (%s)", event.device, event.type, event.state, event.priority)

    def _sink_figure(self, key: str) -> float:
        """One of the sink's counts, for a gauge read at scrape time (metrics thread)."""
        return float(self._sink.counts().get(key, 0)) if self._sink is not None else 0.0

    def _count_active_alarms(self) -> float:
        """For the gauge, read at scrape time (metrics thread): a snapshot of the devices."""
        return float(sum(len(a.active) for a in list(self._alarms.values())))

    def _forget(self, device: str) -> None:
        """Drop everything the daemon holds of `device` (its gathered beats published first)."""
        self._flush_beats(device)
        if self._streams is not None and self._streams.is_open(device):
            self._streams.close(device)
        self._alarms.pop(device, None)
        self._dormant.pop(device, None)
        self._published.pop(device, None)
        self._admission.streams.pop(device, None)

    def _housekeeping(self) -> None:
        """Signal loss, idle eviction, stats, recovery from overload, state saves."""
        assert self._sink is not None and self.source is not None
        now = time.monotonic()
        with self._dropped_lock:
            dropped, self._dropped_of = self._dropped_of, Counter()
            last_drop = self._last_drop
        known = self._known_until(now)
        for device, stream in list(self._admission.streams.items()):
            alarms = self._alarms[device]
            silent = max(0.0, known - stream.last_arrival)
            signal_now = stream.next_t0 + silent
            if dropped[device] or "windows_dropped" in alarms.active:
                self._emit(alarms.on_overload(signal_now, dropped[device]))
            self._emit(alarms.on_silence(signal_now, silent))  # an evicted device's loss is raised first
            if silent >= self.config.streams.idle_evict_s:
                self._evict(device, signal_now, now - silent)
        for device, (signal_time, since) in self._dormant.items():  # raised once, never cleared: no data came
            silent = max(0.0, known - since)
            alarms = self._alarms[device]
            if silent >= self.config.alarms.signal_loss_s and "signal_loss" not in alarms.active:
                self._emit(alarms.on_silence(signal_time + silent, silent))
        self.metrics.active_streams.set(len(self._admission.streams))
        if (self._degraded_since is not None and self._queue.qsize() < self._queue.maxsize // 2
                and now - last_drop >= self.config.alarms.overload_hold_s):
            log.warning("caught up after overload (%.1f s)", now - self._degraded_since)
            self._degraded_since = None
            self._publish_status("online")
            self._repair_open_alarms()
        if self.config.state.path is not None and (
                now >= self._next_save or len(self._unsaved) >= self.config.state.max_unsaved_windows
                or (self._unsaved and self._unproven_since is not None)):  # the broker may wait for acknowledgements
            self._next_save = now + self.config.state.save_interval_s
            self._save_state()
        self._check_alarm_delivery()
        if now >= self._next_stats:
            self._next_stats = now + self.config.output.stats_interval_s
            self._sink.stats(self.stats())

    def _known_until(self, now: float) -> float:
        """The time (s, monotonic) up to which every window sent has been admitted: not beyond what the source has
        proven delivered (its link may be down or stalled), nor beyond the arrival of the last window taken while
        older ones still wait in the queue (a backlog is not signal loss)."""
        assert self.source is not None
        proven = self.source.proven_until(now)
        if now - proven > MqttSource.PROBE_S * 2:
            if self._unproven_since is None:
                self._unproven_since = proven
                log.warning("the source has not proven its link since %.1f s ago: devices' silence is not counted "
                            "meanwhile", now - proven)
        elif self._unproven_since is not None:
            log.warning("the source's link is proven again after %.1f s", now - self._unproven_since)
            self._unproven_since = None
        return min(proven, now if self._queue.empty() else self._last_taken)

    def _evict(self, device: str, signal_now: float, silent_since: float) -> None:
        """Forget a silent device's analysis; its open alarms (its signal loss at least) stay until data returns."""
        alarms = self._alarms[device]
        self._forget(device)
        self._count("evicted")
        if alarms.active:
            alarms.forget_beats()
            self._alarms[device] = alarms
            self._dormant[device] = (signal_now, silent_since)

    def _repair_open_alarms(self) -> None:
        """Make the open alarms kept for subscribers (retained on the broker) those the daemon holds: after an
        overload some of their messages may have been delayed past a restart of the broker's view."""
        assert self._sink is not None
        docs = self._sink.open_alarms()
        if docs is None:
            return
        held = {(d, e.type): e for d, alarms in self._alarms.items() for e in alarms.open_events()}
        stale = {(str(doc.get("device")), str(doc.get("type"))) for doc in docs} - set(held)
        for device, alarm_type in stale:
            self._sink.forget_open_alarm(device, alarm_type)
        for event in held.values():
            self._sink.open_alarm(messages.alarm(event))
        log.info("open alarms re-published: %d held, %d stale copies emptied", len(held), len(stale))

    def stats(self) -> dict[str, Any]:
        """The stats message: counters since start and the daemon's state now."""
        with self._counts_lock:
            counts: dict[str, int | float] = dict(self._counts)
        counts.update(self._sink.counts() if self._sink is not None else {"reconnects": 0})
        counts["stream_slots"] = self._streams.capacity if self._streams is not None else 0
        counts["dormant_devices"] = len(self._dormant)
        counts["unsaved_windows"] = len(self._unsaved)
        return messages.stats(self.model_version, len(self._admission.streams), self._queue.qsize(),
                              self._degraded_since is not None, self.watchdog.alive, counts, time.time())

"""Results back through a RabbitMQ cluster: the sink of daemons on the partitioned source (pipeline/io/rabbit.py).

Every message is published over AMQP to `amq.topic` with the routing key of its MQTT topic, where the cluster's
MQTT plugin delivers it to MQTT subscribers unchanged (`ecgmon alerts`, nurses' stations): same topics, same
payloads (the plugin delivers what comes over AMQP at the subscription's QoS); alarms are persistent, so the
queues of persistent sessions keep them on disk while a subscriber is away. The sink's connection
fails over between the nodes like the source's, so results do not depend on any one node.

Messages go in batches, without a round trip each: the sending thread takes what the outbox holds (up to
BATCH_MESSAGES), publishes it inside an AMQP transaction and commits, one round trip per batch; the cluster's
commit-ok says it has taken every message of the batch. A batch that is not committed (its node died) is sent
again, whole, after the reconnect, so delivery is at least once, in order (alarms carry their id, beats their
seq).

The daemon says after each window's results how far its device has got (`progress`); the sink folds that into its
partition's progress mark ({device: seq and end of its last window whose alarm events went out, end of its last
window whose beats did}) and writes the mark to the partition's marks queue (its newest kept) in the same
transaction as the results it covers: in every transaction that carries an alarm event of the partition (a batch
with an alarm event waits for the progress that follows it), at least every MARK_EVERY_S otherwise, and when the
sink is idle. A daemon that takes the partition over after a kill -9 analyses the windows up to each device's mark
again without publishing their results (pipeline/io/rabbit.py): alarm events never go out twice, beats at most for
the last MARK_EVERY_S. Messages
wait in a bounded outbox while no node answers: beats, rejections and stats are dropped when it is full (counted
and logged), alarms and status wait for room.

RabbitMQ keeps no retained message that comes over AMQP (nor, in 3.10, sends retained messages to wildcard
subscriptions, or shares them between nodes), so on a cluster status is not retained and there is no retained
copy of the open alarms (`open_alarms` is unknown): a subscriber learns them from the alarm events, and asks for
those open before it came on `<prefix>/query/active` (pipeline/io/rabbit.py), which the daemons answer on
`<prefix>/active/<device>/<type>`, in order with their other messages.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import BasicProperties

from pipeline.io.mqtt import ConnectError, Topics, encode_json
from pipeline.io.rabbit import Partitions, close_quietly, connect, encode_marks, routing_key
from pipeline.io.sources import Progress

log = logging.getLogger(__name__)

OUTBOX_MESSAGES = 10_000
BATCH_MESSAGES = 500  # the most messages in one transaction
DROP_LOG_EVERY = 100  # dropped messages between two warnings
MARK_EVERY_S = 1.0  # a partition's progress mark is written at least this often while its devices' results flow (s)
PROGRESS_WAIT_S = 0.05  # how long a batch with an alarm event waits for the progress that follows it (s)
MARK_KEEP_S = 600.0  # a device without results for this long leaves its partition's mark (s)


@dataclass(frozen=True)
class _Message:
    topic: str
    body: bytes
    persistent: bool  # kept on disk by the queues of persistent sessions (alarms, status)
    alarm_of: str = ""  # the device whose alarm event it is: its partition's mark goes in the same transaction


@dataclass(frozen=True)
class _Progress:
    done: dict[str, Progress]


_CLOSE = _Message("", b"", False)


class AmqpSink:
    """Results to `amq.topic` over AMQP (a ResultSink). `params`: the cluster's nodes
    (pipeline/io/rabbit.py `connection_parameters`)."""

    def __init__(self, params: list[pika.ConnectionParameters], topics: Topics, publish_beats: bool,
                 partitions: Partitions, partition_of: Callable[[str], int | None],
                 outbox_messages: int = OUTBOX_MESSAGES, reconnect_max_s: float = 10.0) -> None:
        """`partitions`, `partition_of`: where each device's progress mark goes (the source's partitions)."""
        self._params, self._topics, self._publish_beats = params, topics, publish_beats
        self._partitions, self._partition_of = partitions, partition_of
        self._outbox: queue.Queue[_Message | _Progress] = queue.Queue(maxsize=outbox_messages)
        # per partition: device -> (its mark, when it last moved (s, monotonic)); the partitions whose mark moved
        # since it was last written, and when each was last written (s, monotonic)
        self._marks: defaultdict[int, dict[str, tuple[Progress, float]]] = defaultdict(dict)
        self._moved: set[int] = set()
        self._marked_at: defaultdict[int, float] = defaultdict(float)
        self._reconnect_max_s = reconnect_max_s
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._thread: threading.Thread | None = None
        self._abandon = threading.Event()  # close's timeout passed: send no more
        self._last_status: _Message | None = None
        self.reconnects = 0
        self._dropped_lock = threading.Lock()  # the worker and the source's thread both send
        self.dropped = 0  # beats, rejections and stats not sent because the outbox was full

    def open(self) -> None:
        """Connect to the first node that answers (ConnectError if none does) and start sending."""
        self._connect()
        self._abandon.clear()
        self._thread = threading.Thread(target=self._run, name="ecgmon-results", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float) -> None:
        """Send what is queued (for up to `timeout_s`; what is left then is logged) and disconnect."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):  # then the join times out too
            self._outbox.put(_CLOSE, timeout=timeout_s)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abandon.set()
            self._thread.join(5.0)
            log.warning("closed with %d results not sent: no RabbitMQ node confirmed them", self._outbox.qsize())
        self._thread = None

    def counts(self) -> dict[str, int | float]:
        return {"reconnects": self.reconnects, "results_dropped": self.dropped}

    # ResultSink
    def beats(self, doc: dict[str, Any]) -> None:
        if self._publish_beats:
            self._drop_if_full(_Message(self._topics.beats(doc["device"]), encode_json(doc), False))

    def alarm(self, doc: dict[str, Any]) -> None:
        self._outbox.put(_Message(self._topics.alarms(doc["device"]), encode_json(doc), True, doc["device"]))

    def open_alarm(self, doc: dict[str, Any]) -> None:
        """On its `active` topic, not retained (a subscriber asked on `<prefix>/query/active`)."""
        self._outbox.put(_Message(self._topics.active(doc["device"], doc["type"]), encode_json(doc), True))

    def rejected(self, doc: dict[str, Any]) -> None:
        self._drop_if_full(_Message(self._topics.errors(doc["device"]), encode_json(doc), False))

    def stats(self, doc: dict[str, Any]) -> None:
        self._drop_if_full(_Message(self._topics.stats, encode_json(doc), False))

    def status(self, doc: dict[str, Any]) -> None:
        """Not retained (the cluster cannot); sent again after every reconnect."""
        self._last_status = _Message(self._topics.status, encode_json(doc), True)
        self._outbox.put(self._last_status)

    def open_alarms(self) -> list[dict[str, Any]] | None:
        return None

    def forget_open_alarm(self, device: str, alarm_type: str) -> None:
        """Nothing to empty: the cluster keeps no copies of open alarms."""

    def progress(self, done: dict[str, Progress]) -> None:
        """Moves the devices' marks once what went before is committed (dropped when the outbox is full: a mark
        that lags has results published again after a hand-off, never lost)."""
        with contextlib.suppress(queue.Full):
            self._outbox.put_nowait(_Progress(done))

    def _drop_if_full(self, message: _Message) -> None:
        try:
            self._outbox.put_nowait(message)
        except queue.Full:
            with self._dropped_lock:
                self.dropped += 1
                dropped = self.dropped
            if dropped % DROP_LOG_EVERY == 1:
                log.warning("results outbox full (%d messages; no RabbitMQ node keeps up): %s dropped, %d so far",
                            self._outbox.maxsize, message.topic, dropped)

    # the sending thread
    def _connect(self) -> None:
        close_quietly(self._connection)  # its channel failed
        self._connection = connect(self._params)
        self._channel = self._connection.channel()
        self._channel.tx_select()

    def _send(self, batch: list[_Message | _Progress], idle: bool = False) -> None:
        """Publish `batch` in one transaction with the progress marks due (`_due_marks`) and commit it (raises
        pika's AMQPError if the connection goes); after a reconnect the last status goes first."""
        if self._channel is None or not self._channel.is_open:
            self._connect()
            self.reconnects += 1
            if self._last_status is not None and self._last_status not in batch:
                batch = [self._last_status, *batch]
        assert self._channel is not None
        alarmed: set[int | None] = set()
        for message in batch:
            if isinstance(message, _Progress):
                self._move_marks(message.done)
                continue
            if message.alarm_of:
                alarmed.add(self._partition_of(message.alarm_of))
            properties = BasicProperties(delivery_mode=pika.DeliveryMode.Persistent if message.persistent else None)
            self._channel.basic_publish("amq.topic", routing_key(message.topic), message.body, properties)
        marked = self._due_marks(alarmed, idle)
        for p in marked:
            self._channel.basic_publish("", self._partitions.marks_queue(p),
                                        encode_marks({d: mark for d, (mark, _) in self._marks[p].items()}),
                                        BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))
        self._channel.tx_commit()
        now = time.monotonic()
        for p in marked:
            self._moved.discard(p)
            self._marked_at[p] = now

    def _move_marks(self, done: dict[str, Progress]) -> None:
        now = time.monotonic()
        for device, mark in done.items():
            p = self._partition_of(device)
            if p is not None:
                self._marks[p][device] = (mark, now)
                self._moved.add(p)

    def _due_marks(self, alarmed: set[int | None], idle: bool) -> list[int]:
        """The partitions whose mark goes in this transaction: those with an alarm event in it (so that a daemon
        that takes a partition over never publishes an alarm event again), and the others whose mark moved, every
        MARK_EVERY_S or when the sink is idle; each forgets the devices without results for MARK_KEEP_S."""
        now = time.monotonic()
        due = sorted(p for p in self._moved if p in alarmed or idle or now - self._marked_at[p] >= MARK_EVERY_S)
        for p in due:
            self._marks[p] = {d: (mark, t) for d, (mark, t) in self._marks[p].items() if now - t < MARK_KEEP_S}
        return due

    def _take(self) -> list[_Message | _Progress]:
        """The next batch: what the outbox holds, up to BATCH_MESSAGES, after waiting up to 1 s for the first; and
        after an alarm event, up to the progress that follows it (waiting up to PROGRESS_WAIT_S for each message)."""
        try:
            batch: list[_Message | _Progress] = [self._outbox.get(timeout=1.0)]
        except queue.Empty:
            return []
        alarm_unmarked = False  # an alarm event taken without the progress that follows it
        while batch[-1] is not _CLOSE:
            last = batch[-1]
            if isinstance(last, _Progress):
                alarm_unmarked = False
            elif last.alarm_of:
                alarm_unmarked = True
            if len(batch) >= BATCH_MESSAGES and not alarm_unmarked:
                break
            try:
                batch.append(self._outbox.get(timeout=PROGRESS_WAIT_S) if alarm_unmarked else self._outbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        delay = 0.5
        batch: list[_Message | _Progress] = []  # taken from the outbox, not yet committed
        closing = False
        while not self._abandon.is_set():
            if not batch:
                if closing:
                    break
                batch = self._take()
                if not batch:
                    self._idle()
                    continue
                if batch[-1] is _CLOSE:
                    batch.pop()
                    closing = True
                    continue
            try:
                self._send(batch)
                batch, delay = [], 0.5
            except (pika.exceptions.AMQPError, ConnectError) as err:
                log.warning("results: RabbitMQ connection lost or refused (%s); sending again in %.1f s", err, delay)
                self._channel = None
                self._abandon.wait(delay)
                delay = min(2 * delay, self._reconnect_max_s)
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.close()
            except pika.exceptions.AMQPError as err:
                log.warning("closing the results connection: %s", err)

    def _idle(self) -> None:
        """With nothing to send: write the marks that moved, or answer the node's heartbeats."""
        if self._moved:
            try:
                self._send([], idle=True)
            except (pika.exceptions.AMQPError, ConnectError) as err:
                log.warning("results: RabbitMQ connection lost or refused (%s)", err)
                self._channel = None
        elif self._connection is not None and self._connection.is_open:
            try:
                self._connection.process_data_events(time_limit=0)
            except pika.exceptions.AMQPError as err:
                log.warning("results: RabbitMQ connection lost (%s)", err)
                self._channel = None

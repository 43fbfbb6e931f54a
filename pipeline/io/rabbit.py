"""Windows from a partitioned queue on a RabbitMQ cluster: the source for running many daemons.

Devices keep publishing MQTT (`<prefix>/ecg/<device>`) to any node; RabbitMQ's MQTT plugin puts each
message on `amq.topic` with routing key `<prefix>.ecg.<device>`. A consistent-hash exchange bound to
that key spreads the devices over `partitions` quorum queues (replicated over the cluster), so a
device always lands in the same partition, in order. The partition queues have single active
consumer: the broker lets one daemon at a time consume a partition, so each device is analysed
by exactly one daemon.

The daemons spread the partitions among themselves: each publishes a heartbeat every
`HEARTBEAT_S` (routing key `<prefix>.daemons.<id>` on `amq.topic`), counts as members the daemons
heard within `MEMBER_TIMEOUT_S`, and consumes the partitions rendezvous hashing with bounded load
gives it among them (`owners`). Every daemon that sees the same members computes the same owners; when one
joins or leaves only its share moves, and a daemon that stops hearing another takes its
partitions over. While members disagree (a few seconds), single active consumer still keeps a
partition with one daemon. A daemon that dies does not wait out the timeout: the node it was connected to
sees its connection close and says so on the cluster's event exchange (`amq.rabbitmq.event`, plugin
`rabbitmq_event_exchange`; the connection is named `ecgmon-daemon <id>`), and every other daemon drops it from
the members at once, until it is heard again. A node that dies says nothing: its daemons' partitions move after
the timeout, by which time the queues it led have new leaders. Without the plugin, the timeout alone says so.

The devices' state goes with their partition. Every `checkpoint_s` (and sooner when half the prefetch waits for one,
or at once after a staff acknowledgement) the daemon checkpoints the state of each partition's devices (filters,
recurrent and beat-stage state, beat picking, alarms, last seq: the daemon's `save_devices`) to the partition's state
queue, a quorum queue that keeps its newest few, versioned, and only then acknowledges the windows that checkpoint
covers: the windows since stay in the partition, a replayable log. A daemon that lets a partition go checkpoints it
one last time before it closes the partition's channel. Beside the checkpoints, the results sink keeps each
partition's progress mark (how far each device's results have gone out, pipeline/io/rabbit_sink.py). A daemon that
becomes a partition's active consumer restores its checkpoint and its mark before its first window; after a kill -9,
the windows since the checkpoint come again: it analyses them (the same beats, the same alarm ids) and publishes
only what goes past the mark. So whoever takes a partition over, after a hand-off or a kill -9, continues its
devices warm: no warm-up, no window lost, no alarm event published twice, open alarms carried on.

A subscriber that comes late asks for the alarms open before it came on `<prefix>/query/active` (RabbitMQ keeps
no retained copies of them): every daemon hears it with its heartbeats and publishes the open alarms of the devices
it holds on `<prefix>/active/<device>/<type>` through its sink.

The topology is declared idempotently by every daemon at start.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import ssl
import threading
import time
from dataclasses import dataclass, field

import msgpack
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from pipeline.io import messages
from pipeline.io.codec import DecodeError, decode_window
from pipeline.io.mqtt import ConnectError, Topics
from pipeline.io.sources import Acknowledge, Deliver, DeviceStates, Progress

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
MEMBER_TIMEOUT_S = 5.0
LEAVING = b"leaving"  # the last heartbeat of a daemon that stops
# A daemon that becomes a partition's consumer may get the windows its previous consumer had taken and not
# acknowledged after the windows published since (RabbitMQ 3.10 activates the next single active consumer before
# it returns the previous one's), and the returned ones in any order, so for this long it holds every window back,
# then gives them to the daemon in the order of their start times (s).
HANDOFF_GRACE_S = 1.0
# A partition's state queue keeps its newest checkpoints, each with a version (`VERSION` header: nanoseconds, and
# above the version it follows), and a restore takes the highest: a checkpoint that the cluster refused to confirm
# while a queue leader moved can still be written later, over newer ones, and must not win.
CHECKPOINTS_KEPT = 3
VERSION = "ecgmon-version"
EVENT_EXCHANGE = "amq.rabbitmq.event"  # the cluster's own events (plugin rabbitmq_event_exchange)
CONNECTION_CLOSED = "connection.closed"  # its event for a client connection that closed, sent by that node
DAEMON_CONNECTION = "ecgmon-daemon "  # + member id: the name of a daemon's source connection
QUERY_INTERVAL_S = 1.0  # the open alarms are published again at most this often (s); queries meanwhile wait


def connection_parameters(nodes: list[tuple[str, int]], username: str, password: str,
                          tls: ssl.SSLContext | None = None) -> list[pika.ConnectionParameters]:
    """How to reach each node (host, AMQP port), tried in order; `tls`: for TLS listeners."""
    credentials = pika.PlainCredentials(username, password)
    return [pika.ConnectionParameters(host, port, credentials=credentials, heartbeat=10, blocked_connection_timeout=30,
                                      connection_attempts=1,
                                      ssl_options=None if tls is None else pika.SSLOptions(tls, host))
            for host, port in nodes]


def connect(params: list[pika.ConnectionParameters], name: str | None = None) -> pika.BlockingConnection:
    """A connection to the first node that answers, named `name` for the cluster's events; ConnectError if none
    does."""
    if name is not None:
        params = [copy.copy(p) for p in params]
        for p in params:
            p.client_properties = {"connection_name": name}
    try:
        return pika.BlockingConnection(params)
    except pika.exceptions.AMQPConnectionError as err:
        nodes = ", ".join(f"{p.host}:{p.port}" for p in params)
        raise ConnectError(f"cannot reach a RabbitMQ node ({nodes}): {err!r}") from err


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    """Close a connection that failed, if it is still open (what goes wrong then is moot)."""
    if connection is not None and connection.is_open:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()


def routing_key(topic: str) -> str:
    """The routing key on `amq.topic` of an MQTT topic: RabbitMQ's MQTT plugin swaps "/" and "." between them."""
    return topic.translate(_MQTT_SWAP)


_MQTT_SWAP = str.maketrans("/.", "./")


def start_time(payload: bytes) -> float:
    """A window's t0 (s, the device's clock); -inf for one the daemon will reject (it goes first)."""
    try:
        return decode_window(payload, max_bytes=len(payload)).t0
    except DecodeError:
        return -math.inf


def owners(partitions: int, members: list[str]) -> list[str]:
    """The member that consumes each partition: rendezvous hashing with bounded load. Each partition goes to
    the member with the highest hash of (partition, member) that holds fewer than ceil(partitions / members),
    so none holds more than that, and a member joining or leaving moves little more than its share."""
    cap = -(-partitions // len(members))
    held = dict.fromkeys(members, 0)
    out = []
    for p in range(partitions):
        ranked = sorted(members, key=lambda m: hashlib.sha256(f"{p}/{m}".encode()).digest(), reverse=True)
        owner = next(m for m in ranked if held[m] < cap)
        held[owner] += 1
        out.append(owner)
    return out


@dataclass(frozen=True)
class Partitions:
    """The queues devices are spread over, under one topic prefix."""

    prefix: str
    count: int

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.ecg.partitions"

    def queue(self, k: int) -> str:
        return f"{self.prefix}.ecg.p{k:02d}"

    def heartbeat_key(self, member: str = "") -> str:
        """The routing key of a daemon's heartbeats (without `member`: what every one starts with)."""
        return routing_key(f"{self.prefix}/daemons/{member}")

    def state_queue(self, k: int) -> str:
        """Where partition k's checkpoints are kept: its newest few."""
        return f"{self.prefix}.ecg.state.p{k:02d}"

    def marks_queue(self, k: int) -> str:
        """Where partition k's progress mark is kept (pipeline/io/rabbit_sink.py): its newest only."""
        return f"{self.prefix}.ecg.marks.p{k:02d}"

    def declare(self, channel: BlockingChannel) -> None:
        """Exchange, quorum queues with single active consumer, their state queues, and the bindings (idempotent)."""
        channel.exchange_declare(self.exchange, exchange_type="x-consistent-hash", durable=True)
        channel.exchange_bind(destination=self.exchange, source="amq.topic",
                              routing_key=routing_key(f"{self.prefix}/ecg/*"))
        for k in range(self.count):
            channel.queue_declare(self.queue(k), durable=True,
                                  arguments={"x-queue-type": "quorum", "x-single-active-consumer": True})
            channel.queue_bind(self.queue(k), self.exchange, routing_key="1")  # equal weights
            channel.queue_declare(self.state_queue(k), durable=True,
                                  arguments={"x-queue-type": "quorum", "x-max-length": CHECKPOINTS_KEPT})
            channel.queue_declare(self.marks_queue(k), durable=True,
                                  arguments={"x-queue-type": "quorum", "x-max-length": 1})


def encode_marks(marks: dict[str, Progress]) -> bytes:
    """A partition's progress mark: {device: [seq, end, beats_until]} in MessagePack."""
    body: bytes = msgpack.packb({device: list(mark) for device, mark in marks.items()})
    return body


def decode_marks(body: bytes, source: str) -> dict[str, Progress]:
    """The marks of `encode_marks`, or {} (with a warning naming `source`) when they are unreadable: the windows
    since the checkpoint are then published again."""
    try:
        doc = msgpack.unpackb(body, raw=False)
        return {str(device): Progress(int(seq), float(end), float(beats)) for device, (seq, end, beats) in doc.items()}
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as err:
        log.warning("progress mark of %s is unreadable (%s): its windows since the checkpoint are published again",
                    source, err)
        return {}


def _has_event_exchange(connection: pika.BlockingConnection) -> bool:
    """Whether the cluster publishes its events to EVENT_EXCHANGE and this login may read them (asked on a channel
    of its own: a refusal closes the channel)."""
    channel = connection.channel()
    try:
        channel.exchange_declare(EVENT_EXCHANGE, passive=True)
    except pika.exceptions.ChannelClosedByBroker as err:
        log.warning("no %s (%s): a daemon that dies is noticed after %g s without its heartbeats, not at once",
                    EVENT_EXCHANGE, err.reply_text, MEMBER_TIMEOUT_S)
        return False
    channel.close()
    return True


@dataclass
class _Consumer:
    """This daemon's consumer of one partition, on a channel of its own (closing it hands back what is not
    acknowledged)."""

    channel: BlockingChannel
    partition: int
    fresh: bool = True  # no window yet: its checkpoint is restored before the first (a standby never gets one)
    releasing: bool = False  # being handed over: windows are left for the next owner
    checkpointing: bool = False  # a checkpoint is on its way
    acknowledged: bool = False  # a staff acknowledgement was handed to the daemon since the last checkpoint
    finished: list[int] = field(default_factory=list)  # delivery tags the daemon has finished with, not acked
    devices: set[str] = field(default_factory=set)
    held: list[tuple[str, bytes, int]] | None = None  # new windows held back after a hand-off: (device, payload, tag)
    hold_until: float = 0.0  # monotonic time the held windows go to the daemon


class PartitionedSource:
    """ECG windows from the partition queues this daemon is the active consumer of (a WindowSource).

    `params`: the cluster's nodes (`connection_parameters`); the source connects to the first that answers and,
    when its connection is lost, to the next, with backoff. `states`: the daemon, whose devices' state the source
    checkpoints and restores. `close` is called once the daemon's worker has stopped.

    A daemon that stops says so in its last heartbeat; when one is no longer heard, the first of the daemons left
    publishes the offline status it could not (`<prefix>/status/<daemon>`, the last will of the MQTT daemon).
    """

    def __init__(self, params: list[pika.ConnectionParameters], partitions: Partitions, member_id: str,
                 states: DeviceStates, prefetch: int = 1000, checkpoint_s: float = 2.0,
                 reconnect_max_s: float = 10.0) -> None:
        self._params = params
        self.partitions = partitions
        self.member_id = member_id
        self._states = states
        self._heard: dict[str, float] = {}  # daemon id -> monotonic time of its last heartbeat
        self._left: set[str] = set()  # daemons that said they stop
        self._versions: dict[int, int] = {}  # partition -> version of the last checkpoint restored or written
        self._consumers: dict[int, _Consumer] = {}
        self._partition_of: dict[str, int] = {}  # device -> its partition (fixed by the exchange's hash)
        self._lock = threading.Lock()  # _Consumer.finished and .devices are written by the worker too
        self._members: list[str] = []  # as last seen, and the partitions they give this daemon
        self._owned: set[int] = set()
        self._channel: BlockingChannel | None = None  # heartbeats and members
        self._store: BlockingChannel | None = None  # checkpoints, with publisher confirms
        self._next_heartbeat = self._next_checkpoint = self._last_answer = 0.0
        self._answer_due: float | None = None  # when to publish the open alarms a subscriber asked for (monotonic)
        self._prefetch, self._checkpoint_s = prefetch, checkpoint_s
        self._reconnect_max_s = reconnect_max_s
        self._deliver: Deliver | None = None
        self._acknowledge: Acknowledge | None = None
        self._connection: pika.BlockingConnection | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stopping = threading.Event()  # deliver no more (the connection stays for the last checkpoints)
        self.reconnects = 0
        self.checkpoints = 0  # written
        self.restored = 0  # devices continued from a checkpoint
        self.deaths_noticed = 0  # daemons dropped from the members at once, on the cluster's event

    def start(self, deliver: Deliver, acknowledge: Acknowledge) -> None:
        """Connect, declare the topology and consume this daemon's partitions (raise ConnectError if no node
        answers). Every daemon hears every acknowledgement; the one that holds its device applies it."""
        self._deliver, self._acknowledge = deliver, acknowledge
        self._stopping.clear()
        self._connect()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ecgmon-rabbit", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        """Connect and declare (ConnectError if no node answers, or the node refuses any of it)."""
        self._connection = connect(self._params, DAEMON_CONNECTION + self.member_id)
        try:
            self._declare(self._connection)
        except pika.exceptions.AMQPError as err:
            close_quietly(self._connection)
            raise ConnectError(f"RabbitMQ refused the daemon's topology or consumers: {err!r}") from err

    def _declare(self, connection: pika.BlockingConnection) -> None:
        channel = connection.channel()
        self.partitions.declare(channel)
        self._store = connection.channel()
        self._store.confirm_delivery()
        heartbeats = self.partitions.heartbeat_key()
        query = routing_key(Topics(self.partitions.prefix).query_active)
        acks = routing_key(Topics(self.partitions.prefix).acks(""))

        def on_control(ch: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
            if method.routing_key == query:  # a subscriber asks for the open alarms (answered in _rebalance)
                if self._answer_due is None:
                    self._answer_due = max(time.monotonic(), self._last_answer + QUERY_INTERVAL_S)
                return
            if method.routing_key.startswith(acks):
                device = routing_key(method.routing_key[len(acks):])
                with self._lock:
                    holder = next((c for c in self._consumers.values() if device in c.devices), None)
                if holder is not None and self._acknowledge is not None:
                    self._acknowledge(device, body)
                    holder.acknowledged = True  # checkpointed at once, so that no kill loses it
                return
            if method.exchange == EVENT_EXCHANGE:  # a connection closed: a daemon's, if it died
                name = (properties.headers or {}).get("user_provided_name", b"")
                name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                member = name[len(DAEMON_CONNECTION):] if name.startswith(DAEMON_CONNECTION) else None
                if member is not None and member != self.member_id and self._heard.pop(member, None) is not None:
                    log.warning("daemon %s is gone (its connection closed): its partitions move now", member)
                    self.deaths_noticed += 1
                return
            member = routing_key(method.routing_key[len(heartbeats):])
            if body == LEAVING:
                self._heard.pop(member, None)
                self._left.add(member)
            else:
                self._heard[member] = time.monotonic()
                self._left.discard(member)

        members = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        if _has_event_exchange(connection):
            channel.queue_bind(members, EVENT_EXCHANGE, routing_key=CONNECTION_CLOSED)
        channel.queue_bind(members, "amq.topic", routing_key=f"{heartbeats}#")
        channel.queue_bind(members, "amq.topic", routing_key=query)
        channel.queue_bind(members, "amq.topic", routing_key=f"{acks}*")
        channel.basic_consume(members, on_control, auto_ack=True)
        self._channel = channel
        self._consumers = {}
        self._members = []
        self._next_heartbeat = 0.0
        self._next_checkpoint = time.monotonic() + self._checkpoint_s
        self._rebalance()

    def _consume(self, p: int) -> None:
        """Become a consumer of partition p: its active consumer once no other daemon is."""
        assert self._connection is not None and self._deliver is not None
        channel = self._connection.channel()
        channel.basic_qos(prefetch_count=self._prefetch)
        consumer = _Consumer(channel, p)
        prefix_len = len(self.partitions.prefix) + len(".ecg.")

        def on_message(ch: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
            if consumer.releasing or self._stopping.is_set():
                return  # left unacknowledged: back to the partition when its channel closes
            if consumer.fresh:  # this daemon has just become the partition's active consumer
                consumer.fresh = False
                if self._restore(p):  # it had an owner before, whose windows may come back after newer ones
                    consumer.held, consumer.hold_until = [], time.monotonic() + HANDOFF_GRACE_S
            device = routing_key(method.routing_key[prefix_len:])
            if consumer.held is not None:
                consumer.held.append((device, body, method.delivery_tag))
            else:
                self._hand(consumer, device, body, method.delivery_tag)

        channel.basic_consume(self.partitions.queue(p), on_message)
        self._consumers[p] = consumer

    def _hand(self, consumer: _Consumer, device: str, body: bytes, tag: int) -> None:
        """Give the daemon one window of `consumer`'s partition."""
        assert self._deliver is not None
        with self._lock:
            consumer.devices.add(device)
        self._partition_of[device] = consumer.partition

        def done() -> None:  # on the worker: acknowledged with the next checkpoint
            with self._lock:
                consumer.finished.append(tag)

        self._deliver(device, body, time.monotonic(), done)

    def _restore(self, p: int) -> bool:
        """Have the daemon continue partition p's devices from its checkpoint, before any of its windows; False if
        p has none."""
        assert self._store is not None
        # All taken off the queue, and the newest put back at once: a checkpoint left unacknowledged in the queue
        # would make it drop the next checkpoint rather than this one (x-max-length counts it, and drops the oldest
        # ready one).
        found = [(int((properties.headers or {}).get(VERSION, 0)), body)
                 for properties, body in self._drain(self.partitions.state_queue(p))]
        marks = self._read_marks(p)
        self._partition_of.update(dict.fromkeys(marks, p))  # for this daemon's marks, before their windows come
        if not found and not marks:
            log.info("partition %d: never consumed before, its devices start cold", p)
            return False
        blob: bytes | None = None
        if found:
            version, blob = max(found, key=lambda checkpoint: checkpoint[0])
            self._versions[p] = version - 1
            self._write_checkpoint(p, blob)

        def restore() -> None:
            n = self._states.restore_devices(blob, f"checkpoint of partition {p}", marks)
            self.restored += n
            log.info("partition %d: %d devices continue from its checkpoint, the results of %d published up to "
                     "their marks", p, n, len(marks))

        self._states.call_soon(restore)
        return True

    def _checkpoint(self, p: int, consumer: _Consumer, release: bool) -> None:
        """Checkpoint partition p on the worker (after the windows delivered so far), then acknowledge the windows
        it covers; with `release`, the daemon forgets p's devices and p's channel closes."""
        connection = self._connection
        assert connection is not None
        consumer.checkpointing, consumer.acknowledged = True, False

        def save() -> None:  # on the worker
            with self._lock:
                devices, tags = sorted(consumer.devices), consumer.finished
                consumer.finished = []
            blob = self._states.save_devices(devices, forget=release)
            try:
                connection.add_callback_threadsafe(lambda: self._stored(p, consumer, blob, tags, release))
            except pika.exceptions.AMQPError:  # the connection is gone: its windows went back to the partition
                log.warning("partition %d: checkpoint not written, the connection is gone", p)

        self._states.call_soon(save)

    def _drain(self, queue: str) -> list[tuple[BasicProperties, bytes]]:
        """Every message of `queue`, taken off it, oldest first."""
        assert self._store is not None
        taken: list[tuple[BasicProperties, bytes]] = []
        while True:
            method, properties, body = self._store.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((properties, body))

    def _read_marks(self, p: int) -> dict[str, Progress]:
        """Partition p's progress mark (put back at once for whoever comes next), {} if it has none."""
        assert self._store is not None
        queue = self.partitions.marks_queue(p)
        taken = self._drain(queue)
        if not taken:
            return {}
        newest = taken[-1][1]
        self._store.basic_publish("", queue, newest, BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
                                  mandatory=True)
        return decode_marks(newest, f"partition {p}")

    def partition_of(self, device: str) -> int | None:
        """The partition `device`'s windows come from (None before this daemon got one)."""
        return self._partition_of.get(device)

    def _write_checkpoint(self, p: int, blob: bytes) -> None:
        """Make `blob` partition p's newest checkpoint, once the cluster confirms it (raises pika's AMQPError if
        not)."""
        assert self._store is not None
        version = max(self._versions.get(p, 0) + 1, time.time_ns())
        self._store.basic_publish("", self.partitions.state_queue(p), blob,
                                  BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                                  headers={VERSION: version}), mandatory=True)
        self._versions[p] = version

    def _stored(self, p: int, consumer: _Consumer, blob: bytes, tags: list[int], release: bool) -> None:
        """Write partition p's checkpoint (confirmed by the cluster), then acknowledge what it covers. One the
        cluster refuses (a queue leader moving) acknowledges nothing: its windows wait for the next checkpoint, or
        go back to the partition with the release."""
        consumer.checkpointing = False
        try:
            self._write_checkpoint(p, blob)
        except pika.exceptions.NackError:
            log.warning("partition %d: checkpoint not confirmed by the cluster; its windows wait for the next", p)
            with self._lock:
                consumer.finished = tags + consumer.finished
            tags = []
        else:
            self.checkpoints += 1
        if consumer.channel.is_open:
            for tag in sorted(tags):  # one by one: held windows may be finished after later ones
                consumer.channel.basic_ack(tag)
            if release:
                consumer.channel.close()  # what is not acknowledged goes back to the partition, for its next owner
        if release and self._consumers.get(p) is consumer:
            del self._consumers[p]

    @property
    def assigned(self) -> list[int]:
        """The partitions this daemon consumes now (it is their active consumer once the previous one lets go)."""
        return sorted(p for p, c in self._consumers.items() if not c.releasing)

    def members(self) -> list[str]:
        """The daemons heard within MEMBER_TIMEOUT_S, this one included."""
        now = time.monotonic()
        return sorted({self.member_id, *(m for m, t in self._heard.items() if now - t < MEMBER_TIMEOUT_S)})

    def _rebalance(self) -> None:
        """Heartbeat when due; consume the partitions this daemon owns among the members now, and only those;
        have the open alarms published when asked; checkpoint the partitions it is the active consumer of when
        due."""
        assert self._channel is not None
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_S
            self._channel.basic_publish("amq.topic", self.partitions.heartbeat_key(self.member_id), b"")
        members = self.members()
        if members != self._members:  # the owners change only with the members
            self._announce_gone(sorted(set(self._members) - set(members) - self._left), members)
            self._members = members
            self._owned = {p for p, owner in enumerate(owners(self.partitions.count, members))
                           if owner == self.member_id}
        for p in sorted(self._owned - set(self._consumers)):
            self._consume(p)
        for p in sorted(set(self._consumers) - self._owned):
            consumer = self._consumers[p]
            if consumer.releasing or consumer.checkpointing:
                continue
            consumer.releasing = True
            if consumer.fresh:  # a standby holds nothing of p, and must not overwrite its checkpoint
                consumer.channel.close()
                del self._consumers[p]
            else:
                self._checkpoint(p, consumer, release=True)
        for consumer in self._consumers.values():
            if consumer.held is not None and now >= consumer.hold_until and not consumer.releasing:
                held, consumer.held = consumer.held, None
                for device, body, tag in sorted(held, key=lambda window: start_time(window[1])):
                    self._hand(consumer, device, body, tag)
        if self._answer_due is not None and now >= self._answer_due:
            self._answer_due, self._last_answer = None, now
            self._states.call_soon(self._states.publish_open_alarms)
        due = now >= self._next_checkpoint
        if due:
            self._next_checkpoint = now + self._checkpoint_s
        for p, consumer in list(self._consumers.items()):
            if consumer.fresh or consumer.releasing or consumer.checkpointing:
                continue
            crowded = len(consumer.finished) >= self._prefetch // 2  # half the prefetch waits for a checkpoint
            if consumer.acknowledged or (consumer.finished and (due or crowded)):
                self._checkpoint(p, consumer, release=False)

    def _announce_gone(self, gone: list[str], members: list[str]) -> None:
        """Publish the offline status of daemons no longer heard that did not say they stop (by the first of the
        daemons left only)."""
        assert self._channel is not None
        if members[0] != self.member_id:
            return
        for member in gone:
            log.warning("daemon %s not heard for %g s: announced offline", member, MEMBER_TIMEOUT_S)
            self._channel.basic_publish("amq.topic", routing_key(Topics(self.partitions.prefix, member).status),
                                        messages.last_will())

    def _let_go(self) -> None:
        """After the connection is lost: the broker has put every window not acknowledged back in its partition,
        for whoever consumes it next (this daemon again, from the checkpoint): forget the devices."""
        devices = sorted({d for c in self._consumers.values() for d in c.devices})
        self._consumers = {}

        def forget() -> None:
            self._states.save_devices(devices, forget=True)

        if devices:
            self._states.call_soon(forget)

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                if self._connection is None or not self._connection.is_open:
                    self._connect()
                    delay = 0.5
                assert self._connection is not None
                self._connection.process_data_events(time_limit=0.1)
                self._rebalance()
            except (pika.exceptions.AMQPError, ConnectError) as err:
                self.reconnects += 1
                log.warning("RabbitMQ connection lost or refused (%s); reconnecting in %.1f s", err, delay)
                close_quietly(self._connection)  # a channel error leaves it open, with this daemon's consumers
                self._connection = None
                self._let_go()
                self._stop.wait(delay)
                delay = min(2 * delay, self._reconnect_max_s)
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.process_data_events(time_limit=0)  # checkpoints already on their way
                for p, consumer in list(self._consumers.items()):  # the worker has stopped: save here
                    if not consumer.fresh:
                        with self._lock:
                            devices, tags = sorted(consumer.devices), consumer.finished
                        self._stored(p, consumer, self._states.save_devices(devices, forget=True), tags, True)
                assert self._channel is not None
                self._channel.basic_publish("amq.topic", self.partitions.heartbeat_key(self.member_id), LEAVING)
                self._connection.close()
            except pika.exceptions.AMQPError as err:
                log.warning("closing the RabbitMQ connection: %s", err)
        self._connection = None

    def proven_until(self, now: float) -> float:
        """`now`: windows come over AMQP connections whose loss the source sees at once, and are not lost while it
        reconnects (they wait in their partitions)."""
        return now

    def stop(self) -> None:
        """Deliver no more windows; the connection stays for the daemon to finish those delivered, until `close`."""
        self._stopping.set()

    def close(self) -> None:
        """Once the daemon's worker has stopped: checkpoint every partition this daemon is the active consumer of,
        acknowledge the windows the checkpoints cover and close the connection (windows not finished with go back
        to their partitions)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

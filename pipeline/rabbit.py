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
partition with one daemon.

The topology is declared idempotently by every daemon at start. A window is acknowledged once the
daemon has finished with it (analysed, rejected or dropped), so the windows a daemon had taken
when it died go back to their partition for the daemon that takes it over.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from pipeline.io import Deliver
from pipeline.mqtt import ConnectError

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
MEMBER_TIMEOUT_S = 5.0


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

    def declare(self, channel: BlockingChannel) -> None:
        """Exchange, quorum queues with single active consumer, and the bindings (idempotent)."""
        channel.exchange_declare(self.exchange, exchange_type="x-consistent-hash", durable=True)
        channel.exchange_bind(destination=self.exchange, source="amq.topic", routing_key=f"{self.prefix}.ecg.*")
        for k in range(self.count):
            channel.queue_declare(self.queue(k), durable=True,
                                  arguments={"x-queue-type": "quorum", "x-single-active-consumer": True})
            channel.queue_bind(self.queue(k), self.exchange, routing_key="1")  # equal weights


class PartitionedSource:
    """ECG windows from the partition queues this daemon is the active consumer of (a WindowSource).

    `nodes`: the cluster's nodes as (host, AMQP port); the source connects to the first that answers and, when
    its connection is lost, to the next, with backoff.
    """

    def __init__(self, nodes: list[tuple[str, int]], partitions: Partitions, member_id: str, username: str = "guest",
                 password: str = "guest", prefetch: int = 1000, reconnect_max_s: float = 10.0) -> None:
        credentials = pika.PlainCredentials(username, password)
        self._params = [pika.ConnectionParameters(host, port, credentials=credentials, heartbeat=10,
                                                  blocked_connection_timeout=30, connection_attempts=1)
                        for host, port in nodes]
        self.partitions = partitions
        self.member_id = member_id
        self._heard: dict[str, float] = {}  # daemon id -> monotonic time of its last heartbeat
        self._consuming: dict[int, str] = {}  # partition -> consumer tag
        self._members: list[str] = []  # as last seen, and the partitions they give this daemon
        self._owned: set[int] = set()
        self._channel: BlockingChannel | None = None
        self._on_message: Callable[[BlockingChannel, Basic.Deliver, BasicProperties, bytes], None] | None = None
        self._next_heartbeat = 0.0
        self._prefetch = prefetch
        self._reconnect_max_s = reconnect_max_s
        self._deliver: Deliver | None = None
        self._connection: pika.BlockingConnection | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stopping = threading.Event()  # deliver no more (the connection stays for the last acks)
        self.reconnects = 0

    def start(self, deliver: Deliver) -> None:
        """Connect, declare the topology and consume every partition (raise ConnectError if no node answers)."""
        self._deliver = deliver
        self._stopping.clear()
        self._connect()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ecgmon-rabbit", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        try:
            self._connection = pika.BlockingConnection(self._params)
        except pika.exceptions.AMQPConnectionError as err:
            nodes = ", ".join(f"{p.host}:{p.port}" for p in self._params)
            raise ConnectError(f"cannot reach a RabbitMQ node ({nodes}): {err!r}") from err
        channel = self._connection.channel()
        channel.basic_qos(prefetch_count=self._prefetch)
        self.partitions.declare(channel)
        prefix_len = len(self.partitions.prefix) + len(".ecg.")
        deliver = self._deliver
        assert deliver is not None

        connection = self._connection

        def on_message(ch: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
            if self._stopping.is_set():  # back to the partition, for the daemon that takes it next
                ch.basic_nack(method.delivery_tag, requeue=True)
                return
            tag = method.delivery_tag

            def ack() -> None:  # on the worker thread, once the window is analysed (or rejected, or dropped)
                try:
                    connection.add_callback_threadsafe(lambda: ch.basic_ack(tag) if ch.is_open else None)
                except pika.exceptions.AMQPError:  # that connection is gone: the broker has requeued the window
                    log.debug("window not acknowledged: its connection is gone")

            deliver(method.routing_key[prefix_len:], body, time.monotonic(), ack)

        heartbeats = f"{self.partitions.prefix}.daemons."

        def on_heartbeat(ch: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
            self._heard[method.routing_key[len(heartbeats):]] = time.monotonic()

        members = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(members, "amq.topic", routing_key=f"{heartbeats}#")
        channel.basic_consume(members, on_heartbeat, auto_ack=True)
        self._channel, self._on_message = channel, on_message
        self._consuming = {}
        self._next_heartbeat = 0.0
        self._rebalance()

    @property
    def assigned(self) -> list[int]:
        """The partitions this daemon consumes now (it is their active consumer once the previous one lets go)."""
        return sorted(self._consuming)

    def members(self) -> list[str]:
        """The daemons heard within MEMBER_TIMEOUT_S, this one included."""
        now = time.monotonic()
        return sorted({self.member_id, *(m for m, t in self._heard.items() if now - t < MEMBER_TIMEOUT_S)})

    def _rebalance(self) -> None:
        """Heartbeat when due; consume the partitions this daemon owns among the members now, and only those."""
        assert self._channel is not None and self._on_message is not None
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_S
            self._channel.basic_publish("amq.topic", f"{self.partitions.prefix}.daemons.{self.member_id}", b"")
        members = self.members()
        if members != self._members:  # the owners change only with the members
            self._members = members
            self._owned = {p for p, owner in enumerate(owners(self.partitions.count, members))
                           if owner == self.member_id}
        owned = self._owned
        for p in sorted(owned - set(self._consuming)):
            self._consuming[p] = self._channel.basic_consume(self.partitions.queue(p), self._on_message)
        for p in sorted(set(self._consuming) - owned):  # unacknowledged deliveries go back to the partition
            self._channel.basic_cancel(self._consuming.pop(p))

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
                self._connection = None
                self._stop.wait(delay)
                delay = min(2 * delay, self._reconnect_max_s)
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.process_data_events(time_limit=0)  # the acknowledgements still queued
                self._connection.close()
            except pika.exceptions.AMQPError as err:
                log.warning("closing the RabbitMQ connection: %s", err)
        self._connection = None

    def stop(self) -> None:
        """Deliver no more windows; the connection stays to acknowledge those delivered, until `close`."""
        self._stopping.set()

    def close(self) -> None:
        """Acknowledge what the daemon has finished with and close the connection: windows delivered but not
        finished with go back to their partitions."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

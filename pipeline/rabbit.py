"""Windows from a partitioned queue on a RabbitMQ cluster: the source for running many daemons.

Devices keep publishing MQTT (`<prefix>/ecg/<device>`) to any node; RabbitMQ's MQTT plugin puts each
message on `amq.topic` with routing key `<prefix>.ecg.<device>`. A consistent-hash exchange bound to
that key spreads the devices over `partitions` quorum queues (replicated over the cluster), so a
device always lands in the same partition, in order. Every daemon consumes every partition with
single active consumer: the broker gives each partition to one daemon at a time and, when that
daemon's connection dies, to another, so each device is analysed by exactly one daemon.

The topology is declared idempotently by every daemon at start. Windows are acknowledged once the
daemon has queued them, as the MQTT source does at QoS 1; unacknowledged ones are redelivered to
the partition's next consumer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from pipeline.io import Deliver
from pipeline.mqtt import ConnectError

log = logging.getLogger(__name__)


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

    def __init__(self, nodes: list[tuple[str, int]], partitions: Partitions, username: str = "guest",
                 password: str = "guest", prefetch: int = 1000, reconnect_max_s: float = 10.0) -> None:
        credentials = pika.PlainCredentials(username, password)
        self._params = [pika.ConnectionParameters(host, port, credentials=credentials, heartbeat=10,
                                                  blocked_connection_timeout=30, connection_attempts=1)
                        for host, port in nodes]
        self.partitions = partitions
        self._prefetch = prefetch
        self._reconnect_max_s = reconnect_max_s
        self._deliver: Deliver | None = None
        self._connection: pika.BlockingConnection | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.reconnects = 0

    def start(self, deliver: Deliver) -> None:
        """Connect, declare the topology and consume every partition (raise ConnectError if no node answers)."""
        self._deliver = deliver
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

        def on_message(ch: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
            deliver(method.routing_key[prefix_len:], body, time.monotonic())
            ch.basic_ack(method.delivery_tag)

        for k in range(self.partitions.count):
            channel.basic_consume(self.partitions.queue(k), on_message)
        log.info("consuming %d partitions from RabbitMQ (active where no other daemon is)", self.partitions.count)

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                if self._connection is None or not self._connection.is_open:
                    self._connect()
                    delay = 0.5
                assert self._connection is not None
                self._connection.process_data_events(time_limit=0.1)
            except (pika.exceptions.AMQPError, ConnectError) as err:
                self.reconnects += 1
                log.warning("RabbitMQ connection lost or refused (%s); reconnecting in %.1f s", err, delay)
                self._connection = None
                self._stop.wait(delay)
                delay = min(2 * delay, self._reconnect_max_s)

    def stop(self) -> None:
        """Consume no more; unacknowledged windows go back to their partitions for the next consumer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.close()
            except pika.exceptions.AMQPError as err:
                log.warning("closing the RabbitMQ connection: %s", err)
        self._connection = None

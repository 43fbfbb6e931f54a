"""A minimal in-process MQTT v5 broker: the demo's fallback where Debian's mosquitto is absent.

Loopback only, anonymous, clean sessions: CONNECT (with last will), PUBLISH at QoS 0 and 1,
retained messages, SUBSCRIBE / UNSUBSCRIBE with wildcards, PINGREQ, DISCONNECT. It is a
convenience for trying ecgmon on one machine, not a production broker (use mosquitto:
deploy/ and the tests do).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType

from paho.mqtt.client import topic_matches_sub

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 10, 11, 12, 13, 14


class ProtocolError(ValueError):
    """A malformed or unsupported packet: the connection is closed."""


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + encode_varint(len(body)) + body


def utf8(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">H", len(raw)) + raw


class Reader:
    """Cursor over a packet body."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("packet shorter than its fields")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.u8()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 21:
                raise ProtocolError("variable integer too long")

    def string(self) -> str:
        return self.take(self.u16()).decode()

    def binary(self) -> bytes:
        return self.take(self.u16())

    def skip_properties(self) -> None:
        self.take(self.varint())

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)


@dataclass(eq=False)
class Session:
    sock: socket.socket
    client_id: str = ""
    subscriptions: dict[str, int] = field(default_factory=dict)  # filter -> max QoS
    will: tuple[str, bytes, int, bool] | None = None
    next_id: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id


class EmbeddedBroker:
    """Start with `start()` (or as a context manager); listens on 127.0.0.1:`port` (0 picks one)."""

    def __init__(self, port: int = 0) -> None:
        self.host = "127.0.0.1"
        self._sessions: set[Session] = set()
        self._retained: dict[str, tuple[bytes, int]] = {}
        self._lock = threading.Lock()
        broker = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                broker._serve(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer((self.host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="embedded-broker", daemon=True)

    def start(self) -> EmbeddedBroker:
        self._thread.start()
        log.info("embedded MQTT broker on %s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for session in self._sessions:
                session.sock.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- one connection -------------------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        session = Session(sock)
        clean_exit = False
        try:
            kind, _, body = self._read_packet(sock)
            if kind != CONNECT:
                raise ProtocolError("first packet must be CONNECT")
            self._connect(session, Reader(body))
            with self._lock:
                self._sessions.add(session)
            session.send(packet(CONNACK, 0, b"\x00\x00\x00"))
            while True:
                kind, flags, body = self._read_packet(sock)
                if kind == DISCONNECT:
                    clean_exit = not body or body[0] == 0
                    return
                self._dispatch(session, kind, flags, Reader(body))
        except (OSError, ProtocolError, ConnectionError, UnicodeDecodeError) as err:
            log.debug("embedded broker: connection %r closed: %s", session.client_id, err)
        finally:
            with self._lock:
                self._sessions.discard(session)
            sock.close()
            if session.will is not None and not clean_exit:
                self._publish(*session.will)

    @staticmethod
    def _read_packet(sock: socket.socket) -> tuple[int, int, bytes]:
        def read(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = sock.recv(n - len(data))
                if not chunk:
                    raise ConnectionError("peer closed")
                data += chunk
            return data

        first = read(1)[0]
        length, shift = 0, 0
        while True:
            b = read(1)[0]
            length |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
        return first >> 4, first & 0x0F, read(length)

    def _connect(self, session: Session, r: Reader) -> None:
        if r.string() != "MQTT" or r.u8() != 5:
            raise ProtocolError("only MQTT v5 is supported")
        flags = r.u8()
        r.u16()  # keepalive
        r.skip_properties()
        session.client_id = r.string()
        if flags & 0x04:
            r.skip_properties()
            topic, payload = r.string(), r.binary()
            session.will = (topic, payload, (flags >> 3) & 0x03, bool(flags & 0x20))

    def _dispatch(self, session: Session, kind: int, flags: int, r: Reader) -> None:
        if kind == PUBLISH:
            qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
            topic = r.string()
            if qos:
                packet_id = r.u16()
            r.skip_properties()
            self._publish(topic, r.rest(), qos, retain)
            if qos:
                session.send(packet(PUBACK, 0, struct.pack(">H", packet_id)))
        elif kind == SUBSCRIBE:
            packet_id = r.u16()
            r.skip_properties()
            granted = []
            while r.pos < len(r.data):
                topic_filter, options = r.string(), r.u8()
                qos = min(options & 0x03, 1)
                with self._lock:
                    session.subscriptions[topic_filter] = qos
                    retained = [(t, p, q) for t, (p, q) in self._retained.items() if topic_matches_sub(topic_filter, t)]
                granted.append(qos)
                for topic, payload, q in retained:
                    self._send_publish(session, topic, payload, min(q, qos), retain=True)
            session.send(packet(SUBACK, 0, struct.pack(">H", packet_id) + b"\x00" + bytes(granted)))
        elif kind == UNSUBSCRIBE:
            packet_id = r.u16()
            r.skip_properties()
            count = 0
            while r.pos < len(r.data):
                with self._lock:
                    session.subscriptions.pop(r.string(), None)
                count += 1
            session.send(packet(UNSUBACK, 0, struct.pack(">H", packet_id) + b"\x00" + b"\x00" * count))
        elif kind == PINGREQ:
            session.send(packet(PINGRESP, 0, b""))
        elif kind != PUBACK:  # acknowledgements of what we sent need no answer
            raise ProtocolError(f"unsupported packet type {kind}")

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = (payload, qos)
                else:
                    self._retained.pop(topic, None)
            targets = [(s, max(q for f, q in s.subscriptions.items() if topic_matches_sub(f, topic)))
                       for s in self._sessions if any(topic_matches_sub(f, topic) for f in s.subscriptions)]
        for session, sub_qos in targets:
            with contextlib.suppress(OSError):  # that subscriber is going away; its own thread cleans up
                self._send_publish(session, topic, payload, min(qos, sub_qos), retain=False)

    @staticmethod
    def _send_publish(session: Session, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        head = utf8(topic) + (struct.pack(">H", session.packet_id()) if qos else b"") + b"\x00"
        session.send(packet(PUBLISH, qos << 1 | int(retain), head + payload))

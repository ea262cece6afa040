"""Two ends of a transport (pyzmq CURVE, raw TCP, keel's session alone), one process each.

``run.py`` starts ``peer.py recv`` in one network namespace and ``peer.py
send`` in the other. Each message starts with the sender's
``CLOCK_MONOTONIC`` in nanoseconds (the clock is shared by every process on
the machine, namespaces included), so the receiver measures one-way latency
itself. Modes:

- ``flood``: the sender sends ``count`` messages as fast as it can; the
  receiver reports the time of its first and last receive.
- ``pingpong``: the sender sends one message, waits for a one-byte reply,
  then sends the next; the receiver reports each message's one-way latency.

The receiver prints one JSON line with its figures and exits.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

STAMP = struct.Struct(">Q")


def payload(size: int) -> bytes:
    return STAMP.pack(time.monotonic_ns()) + b"\x5a" * (size - STAMP.size)


def zmq_sockets(role: str, address: str, keys: dict[str, str]) -> tuple[Any, Any]:
    import zmq

    context = zmq.Context()
    if role == "recv":
        data = context.socket(zmq.PULL)
        data.curve_server = True
        data.curve_secretkey = keys["server_secret"].encode()
        data.curve_publickey = keys["server_public"].encode()
        data.bind(f"tcp://{address}")
        reply = context.socket(zmq.PUSH)
        reply.curve_server = True
        reply.curve_secretkey = keys["server_secret"].encode()
        reply.curve_publickey = keys["server_public"].encode()
        host, _, port = address.rpartition(":")
        reply.bind(f"tcp://{host}:{int(port) + 1}")
        return data, reply
    data = context.socket(zmq.PUSH)
    reply = context.socket(zmq.PULL)
    for sock in (data, reply):
        sock.curve_serverkey = keys["server_public"].encode()
        sock.curve_publickey = keys["client_public"].encode()
        sock.curve_secretkey = keys["client_secret"].encode()
    host, _, port = address.rpartition(":")
    data.connect(f"tcp://{address}")
    reply.connect(f"tcp://{host}:{int(port) + 1}")
    return data, reply


class KeelChannel:
    """keel's secure channel alone (``keel.mesh.session``) over one TCP connection."""

    def __init__(self, sock: socket.socket, session: Any) -> None:
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.session = session
        self.pending: list[bytes] = []

    @classmethod
    def connect(cls, address: str, keys: dict[str, str]) -> KeelChannel:
        from keel.mesh.identity import NodeIdentity
        from keel.mesh.kem import get_kem
        from keel.mesh.session import Session

        host, _, port = address.rpartition(":")
        me = NodeIdentity.generate()
        session = Session.initiator(
            me,
            remote_static=bytes.fromhex(keys["keel_public"]),
            kem=get_kem(),
            clock=time.monotonic,
        )
        channel = cls(socket.create_connection((host, int(port))), session)
        channel.sock.sendall(session.start())
        channel.wait_open()
        return channel

    @classmethod
    def accept(cls, server: socket.socket, keys: dict[str, str]) -> KeelChannel:
        from keel.mesh.identity import NodeIdentity
        from keel.mesh.kem import get_kem
        from keel.mesh.session import Session

        me = NodeIdentity(bytes.fromhex(keys["keel_static"]), bytes.fromhex(keys["keel_signing"]))
        conn, _ = server.accept()
        channel = cls(conn, Session.responder(me, kem=get_kem(), clock=time.monotonic))
        channel.wait_open()
        return channel

    def wait_open(self) -> None:
        from keel.mesh.session import HandshakeComplete

        while True:
            event = self._next()
            if isinstance(event, HandshakeComplete):
                return

    def _next(self) -> Any:
        from keel.mesh.session import Message, NeedData

        while True:
            event = self.session.next_event()
            out = self.session.data_to_send()
            if out:
                self.sock.sendall(out)
            if not isinstance(event, NeedData):
                if isinstance(event, Message):
                    return event.data
                return event
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("peer closed")
            self.session.receive_data(chunk)

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.session.send_message(data))

    def recv(self) -> bytes:
        while True:
            event = self._next()
            if isinstance(event, bytes):
                return event


class Tcp:
    """Length-prefixed messages over one TCP connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(len(data).to_bytes(4, "big") + data)

    def recv(self) -> bytes:
        while True:
            if len(self.buffer) >= 4:
                length = int.from_bytes(self.buffer[:4], "big")
                if len(self.buffer) >= 4 + length:
                    data = bytes(self.buffer[4 : 4 + length])
                    del self.buffer[: 4 + length]
                    return data
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("peer closed")
            self.buffer += chunk


def receive(args: argparse.Namespace) -> dict[str, Any]:
    keys = json.loads(args.keys) if args.keys else {}
    get: Callable[[], bytes]
    ack: Callable[[], object]
    if args.transport == "zmq":
        data, reply = zmq_sockets("recv", args.address, keys)
        get, ack = data.recv, (lambda: reply.send(b"k"))
    else:
        host, _, port = args.address.rpartition(":")
        server = socket.create_server((host, int(port)))
        print("ready", flush=True)
        channel: Tcp | KeelChannel
        if args.transport == "keel":
            channel = KeelChannel.accept(server, keys)
        else:
            channel = Tcp(server.accept()[0])
        get, ack = channel.recv, (lambda: channel.send(b"k"))
    if args.transport == "zmq":
        print("ready", flush=True)
    latencies: list[int] = []
    first = last = 0
    for i in range(args.count):
        message = get()
        now = time.monotonic_ns()
        if i == 0:
            first = now
        last = now
        latencies.append(now - STAMP.unpack_from(message)[0])
        if args.mode == "pingpong":
            ack()
    return {"first_ns": first, "last_ns": last, "latencies_ns": latencies}


def send(args: argparse.Namespace) -> dict[str, Any]:
    keys = json.loads(args.keys) if args.keys else {}
    if args.transport == "zmq":
        data, reply = zmq_sockets("send", args.address, keys)
        put, wait = data.send, reply.recv
        time.sleep(0.5)  # let CURVE finish its handshake before the clock starts
    elif args.transport == "keel":
        channel = KeelChannel.connect(args.address, keys)
        put, wait = channel.send, channel.recv
    else:
        host, _, port = args.address.rpartition(":")
        tcp = Tcp(socket.create_connection((host, int(port))))
        put, wait = tcp.send, tcp.recv
    start = time.monotonic_ns()
    for _ in range(args.count):
        put(payload(args.size))
        if args.mode == "pingpong":
            wait()
    done = {"start_ns": start}
    if args.transport == "zmq":
        time.sleep(0.2)  # the zmq I/O thread flushes before the context is torn down
    return done


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["send", "recv"])
    parser.add_argument("--transport", choices=["zmq", "tcp", "keel"], required=True)
    parser.add_argument("--mode", choices=["flood", "pingpong"], required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--keys", default="")
    args = parser.parse_args()
    result = receive(args) if args.role == "recv" else send(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Agents' binary streams (``keel.mesh.local``) on the control socket: the asyncio side.

The ``stream`` control verb upgrades an agent's connection
(:class:`keel.api.Upgrade`); :func:`serve` then reads its frames until it
hangs up. A SEND goes to ``submit`` (queued, refused, or busy after waiting
for room: while it waits, this stream's later frames wait in the socket, so
a pipelining agent slows to the mesh's pace); SUBSCRIBE and ACK go to the
node's :class:`Subscriptions` (:class:`keel.mesh.inbox.Inbox`), which hands
messages back through :meth:`LocalStream.deliver`. A malformed frame, or a
SUBSCRIBE to a topic the agent may not read (``may_read``), gets an ERROR
frame and the connection ends; what the stream held goes back to the inbox
either way. ``reads`` (None: every topic) bounds what the stream's ACKs may
delete: an agent acknowledges only messages on topics it may read.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from keel.mesh import local
from keel.mesh.agent_frames import AgentFrames
from keel.mesh.ids import check_topic
from keel.mesh.local import Kind, LocalStreamError, SendEntry, Status

DELIVER_FRAME = 1 << 20  # a stream's DELIVER frames are about this big at most

Submit = Callable[[Sequence[SendEntry]], Awaitable[tuple[Status, str]]]
Reads = Callable[[str], bool]


class LocalStream:
    """One agent's stream: what is written to it, DELIVER entries batched into frames.

    A DELIVER frame goes out in pieces (its head, then each entry's head and
    payload): while the transport holds nothing unsent, they go to the
    socket in one gathering ``sendmsg`` (no join of the payloads into one
    bytes); what the socket does not take, and everything once something
    waits in the transport, goes through the transport, in order.
    """

    _numbers = itertools.count(1)

    def __init__(
        self, writer: asyncio.StreamWriter, reads: Reads | None = None, reader: str | None = None
    ) -> None:
        self.number = next(self._numbers)
        self.writer = writer
        self.reads = reads  # the topics whose messages this stream may acknowledge (None: all)
        self.reader = reader  # the agent on this stream (None: the node itself)
        self.closed = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._sock = _gathering_socket(writer)

    def deliver(self, head: bytes, payload: bytes) -> None:
        """Queue one DELIVER entry (its head, then its payload) for the next frame."""
        self._out += (head, payload)
        self._out_bytes += len(head) + len(payload)
        if self._out_bytes >= DELIVER_FRAME:
            self.flush()

    def flush(self, *, always: bool = False) -> None:
        """Write the DELIVER frame queued so far (an empty one too with ``always``)."""
        if self._out or always:
            if not self.closed and not self.writer.is_closing():
                self._out.insert(0, local.FRAME.pack(Kind.DELIVER, self._out_bytes))
                self._send(self._out, local.FRAME.size + self._out_bytes)
            self._out = []
            self._out_bytes = 0

    def _send(self, parts: list[bytes], size: int) -> None:
        """Write ``parts`` (``size`` bytes in all)."""
        rest: Sequence[bytes | memoryview] = parts
        if self._sock is not None and not self.writer.transport.get_write_buffer_size():
            try:
                sent = self._sock.sendmsg(parts[:_IOV_MAX])
            except OSError:  # full (EAGAIN), or broken: the transport finds out and says so
                sent = 0
            rest = () if sent == size else _after(parts, sent)
        if rest:
            self.writer.writelines(rest)

    def write(self, data: bytes) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(data)

    def close(self) -> None:
        """The stream is over: nothing more is written to it (its socket's duplicate closed;
        the node's :meth:`Subscriptions.stream_closed` does this)."""
        self.closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_IOV_MAX: Final = 1024  # pieces per sendmsg (Linux's limit)


def _gathering_socket(writer: asyncio.StreamWriter) -> socket.socket | None:
    """A socket of the stream's own (a duplicate descriptor, non-blocking as the
    transport's) for ``sendmsg``; None if the transport has no socket."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        dup = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
    except OSError:
        return None
    dup.setblocking(False)
    return dup


def _after(parts: Sequence[bytes], sent: int) -> Sequence[bytes | memoryview]:
    """What of ``parts`` is left once their first ``sent`` bytes went."""
    for at, part in enumerate(parts):
        if sent < len(part):
            return [memoryview(part)[sent:], *parts[at + 1 :]] if sent else parts[at:]
        sent -= len(part)
    return ()


class Subscriptions(Protocol):
    """What a stream asks of the node's inbox."""

    def stream_opened(self, stream: LocalStream) -> None: ...

    def subscribe(
        self, stream: LocalStream, topic: str, max_unacked: int, max_bytes: int
    ) -> None: ...

    def stream_acked(self, stream: LocalStream, receipts: Sequence[int]) -> None: ...

    def stream_closed(self, stream: LocalStream) -> None: ...


async def serve(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    inbox: Subscriptions,
    submit: Submit,
    may_read: Callable[[str], str | None] | None = None,
    reads: Reads | None = None,
    agent: str | None = None,
) -> None:
    """Frames from one agent until it hangs up (``keel.mesh.local`` has their form)."""
    stream = LocalStream(writer, reads, agent)
    inbox.stream_opened(stream)
    subscribed = False
    try:
        frames = AgentFrames(reader, writer)
        while (frame := await frames.next()) is not None:
            kind, body = frame
            if kind in (Kind.SEND, Kind.SEND_TO):
                request, messages = local.decode_send(body, to_agents=kind == Kind.SEND_TO)
                status, error = await submit(messages)
                stream.write(local.encode_sent(request, status, error))
            elif kind == Kind.ACK:
                inbox.stream_acked(stream, local.decode_ack(body))
            elif kind == Kind.SUBSCRIBE and not subscribed:
                topic, max_unacked, max_bytes = _subscription(bytes(body))
                refusal = None if may_read is None else may_read(topic)
                if refusal is not None:
                    stream.write(local.frame(Kind.ERROR, (local.REFUSED + refusal).encode()))
                    return
                subscribed = True
                inbox.subscribe(stream, topic, max_unacked, max_bytes)
            else:
                stream.write(_error(kind, subscribed))
                return
            await writer.drain()
    except ConnectionError:
        pass  # the agent hung up
    except LocalStreamError as exc:
        stream.write(local.frame(Kind.ERROR, f"malformed frame: {exc}".encode()))
    finally:
        stream.closed = True
        inbox.stream_closed(stream)


def _subscription(body: bytes) -> tuple[str, int, int]:
    topic, max_unacked, max_bytes = local.decode_subscribe(body)
    try:
        check_topic(topic)
    except ValueError as exc:
        raise LocalStreamError(str(exc)) from None
    return topic, max_unacked, max_bytes


def _error(kind: int, subscribed: bool) -> bytes:
    """The ERROR frame for a frame the daemon does not take here."""
    if kind == Kind.SUBSCRIBE and subscribed:
        problem = "a stream subscribes once"
    else:
        problem = f"unknown frame type 0x{kind:02x}"
    return local.frame(Kind.ERROR, f"malformed frame: {problem}".encode())

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
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from keel import api
from keel.mesh import local
from keel.mesh.ids import check_topic
from keel.mesh.local import Kind, LocalStreamError, SendEntry, Status

DELIVER_FRAME = 1 << 20  # a stream's DELIVER frames are about this big at most

Submit = Callable[[Sequence[SendEntry]], Awaitable[tuple[Status, str]]]
Reads = Callable[[str], bool]


class LocalStream:
    """One agent's stream: what is written to it, DELIVER entries batched into frames."""

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
                head = local.FRAME.pack(Kind.DELIVER, self._out_bytes)
                self.writer.writelines([head, *self._out])  # one join, then the socket
            self._out = []
            self._out_bytes = 0

    def write(self, data: bytes) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(data)


class Subscriptions(Protocol):
    """What a stream asks of the node's inbox."""

    def stream_opened(self, stream: LocalStream) -> None: ...

    def subscribe(
        self, stream: LocalStream, topic: str, max_unacked: int, max_bytes: int
    ) -> None: ...

    def stream_acked(self, stream: LocalStream, receipts: Sequence[int]) -> None: ...

    def stream_closed(self, stream: LocalStream) -> None: ...


class _Frames(asyncio.BufferedProtocol):
    """The reading side of an agent's connection, once it is a stream: frames, read in place.

    Takes the transport over from the control server's ``StreamReader``
    (what that reader holds unread comes first); the connection's writing
    side stays the ``StreamWriter``'s: its flow control and close go on to
    the stream protocol it replaces. While ``QUEUE`` bytes or more of frames
    wait to be taken the connection is not read: later frames wait in the
    socket.
    """

    QUEUE: Final = 4 << 20

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport, inner = writer.transport, writer.transport.get_protocol()
        if not isinstance(transport, asyncio.Transport) or not isinstance(inner, asyncio.Protocol):
            raise TypeError("an agent's stream needs a socket transport of asyncio's streams")
        self.inner = inner  # the writer's: drain, close
        self.transport = transport
        self.frames = local.FrameReader()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._ended = transport.is_closing()
        transport.set_protocol(self)  # nothing more reaches ``reader``
        self._feed(api.take_unread(reader))
        self._ended = self._ended or reader.at_eof()
        if not self._ended:
            self._flow()

    async def next(self) -> tuple[int, local.Body] | None:
        """The next frame (its body valid until the next call); None: the agent hung up.

        ``LocalStreamError`` for a frame head past the limit (after the frames before it).
        """
        while True:
            frame = self.frames.pop()
            if frame is not None:
                if self._paused:
                    self._flow()
                return frame
            if self._ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _feed(self, data: bytes) -> None:
        view, at = memoryview(data), 0
        while at < len(data):
            into = self.frames.buffer()
            count = min(len(into), len(data) - at)
            into[:count] = view[at : at + count]
            self.frames.filled(count)
            at += count

    def _flow(self) -> None:
        """Read while few enough frames wait (and no bad head ended the stream)."""
        full = self.frames.queued >= self.QUEUE or self.frames.failed
        if full and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        elif not full and self._paused:
            self._paused = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- asyncio's calls

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.frames.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.frames.filled(nbytes)
        if self.frames.queued or self.frames.failed:
            self._wake()
            self._flow()

    def eof_received(self) -> bool | None:
        self._ended = True
        self._wake()
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._wake()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


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
        frames = _Frames(reader, writer)
        while (frame := await frames.next()) is not None:
            kind, body = frame
            if kind in (Kind.SEND, Kind.SEND_TO):
                request, messages = local.decode_send(body, to_agents=kind == Kind.SEND_TO)
                status, error = await submit(messages)
                stream.write(local.encode_sent(request, status, error))
            elif kind == Kind.ACK:
                inbox.stream_acked(stream, local.decode_ack(body))
            elif kind == Kind.SUBSCRIBE and not subscribed:
                topic, max_unacked, max_bytes = _subscription(body)
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


def _subscription(body: local.Body) -> tuple[str, int, int]:
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

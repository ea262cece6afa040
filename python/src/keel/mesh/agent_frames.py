"""The reading side of an agent's stream (``keel.mesh.agent_streams``): frames read in place.

The control server reads an agent's request lines with a ``StreamReader``;
once the connection is a binary stream, :class:`AgentFrames` takes its
reading over (a ``BufferedProtocol``: asyncio reads straight into the
buffers :class:`keel.mesh.local.FrameReader` names), so a large SEND
frame's body goes from the socket into one buffer, with no copy on the way,
and each payload is copied out of it once (``local.decode_send``). The old
path copied every payload three times (the reader's buffer, the frame's
bytes, the payload's bytes) and allocated a 256 KiB ``bytes`` per read.
"""

from __future__ import annotations

import asyncio
from typing import Final

from keel import api
from keel.mesh import local


class AgentFrames(asyncio.BufferedProtocol):
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
        self._paused = not transport.is_reading()  # the StreamReader's doing, if it held a lot
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
        if self.frames.ready or self.frames.failed:
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

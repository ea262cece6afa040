"""Frames on the TCP stream, and the records inside transport messages. Pure.

**Frames.** Every Noise message (handshake or transport) travels as::

    length: u16, big-endian  ||  message: `length` bytes      (1 <= length <= 65535)

``FrameReader`` cuts frames out of whatever chunks the socket delivers. A
length over the configured maximum is refused as soon as its two bytes
arrive (nothing is buffered for it); a zero length is refused; an EOF inside
a frame is a truncation.

**Records.** The plaintext of every transport message is one record::

    type: u8  ||  body

    0x00 DATA       body = the last (or only) chunk of an application message
    0x01 DATA_MORE  body = a chunk; more of the same message follows
    0x02 KEEPALIVE  body empty
    0x03 REKEY      body empty; the sender rekeys its sending key after this record
    0x04 CLOSE      body = UTF-8 reason (<= 256 bytes); the sender sends nothing more
"""

from __future__ import annotations

import enum

from keel.mesh.errors import LocalProtocolError, RemoteProtocolError

LENGTH_SIZE = 2
MAX_FRAME_SIZE = 65535
MAX_CLOSE_REASON = 256


class RecordType(enum.IntEnum):
    DATA = 0x00
    DATA_MORE = 0x01
    KEEPALIVE = 0x02
    REKEY = 0x03
    CLOSE = 0x04


_EMPTY_BODY = frozenset({RecordType.KEEPALIVE, RecordType.REKEY})


def encode_frame(message: bytes, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    if not 0 < len(message) <= max_frame_size:
        raise LocalProtocolError(
            f"frame of {len(message)} bytes is outside 1..{max_frame_size}",
            hint="a message was not split into chunks",
        )
    return len(message).to_bytes(LENGTH_SIZE, "big") + message


class FrameReader:
    """Buffer stream bytes; hand out whole frames.

    A frame that lies whole inside one fed chunk is handed out as a
    ``memoryview`` of that chunk (no copy: a chunk is immutable ``bytes``);
    only a frame cut across chunks is gathered in a buffer (and handed out
    as a read-only view of that buffer, which the reader then lets go of:
    no second copy).
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size <= MAX_FRAME_SIZE:
            raise LocalProtocolError(f"max_frame_size must be in 1..{MAX_FRAME_SIZE}")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()  # the start of a frame cut across chunks
        self._data = memoryview(b"")  # the chunk fed last, read from ``_pos`` on
        self._pos = 0
        self._eof = False

    def feed(self, data: bytes) -> None:
        """Append stream bytes; ``b""`` means the peer closed its side."""
        if self._eof:
            if data:
                raise LocalProtocolError("data received after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._pos < len(self._data):  # fed again before every frame was taken
            self._buffer += self._data[self._pos :]
        self._data = memoryview(bytes(data))  # no copy of ``bytes``
        self._pos = 0

    @property
    def eof(self) -> bool:
        """True once EOF was fed and every whole frame has been taken."""
        return self._eof and not self.buffered

    @property
    def buffered(self) -> int:
        return len(self._buffer) + len(self._data) - self._pos

    def _length(self, head: bytes | bytearray | memoryview) -> int:
        length = int.from_bytes(head[:LENGTH_SIZE], "big")
        if length == 0:
            raise RemoteProtocolError("zero-length frame", hint="garbage on the connection")
        if length > self.max_frame_size:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds the maximum of {self.max_frame_size}",
                hint="oversized frame or garbage on the connection",
            )
        return length

    def next_frame(self) -> bytes | memoryview | None:
        """The next whole frame, or ``None`` if more bytes are needed (or at a clean EOF)."""
        data, pos = self._data, self._pos
        if self._buffer:
            return self._from_buffer()
        left = len(data) - pos
        if left >= LENGTH_SIZE:
            end = pos + LENGTH_SIZE + self._length(data[pos : pos + LENGTH_SIZE])
            if end <= len(data):
                self._pos = end
                return data[pos + LENGTH_SIZE : end]
        if left:  # the start of a frame: kept until the rest arrives
            self._buffer += data[pos:]
            self._pos = len(data)
        self._check_truncated()
        return None

    def _from_buffer(self) -> bytes | memoryview | None:
        """Complete the frame begun in the buffer from the chunk fed last."""
        buffer, data = self._buffer, self._data
        if len(buffer) < LENGTH_SIZE:
            take = min(LENGTH_SIZE - len(buffer), len(data) - self._pos)
            buffer += data[self._pos : self._pos + take]
            self._pos += take
            if len(buffer) < LENGTH_SIZE:
                self._check_truncated()
                return None
        total = LENGTH_SIZE + self._length(buffer)
        take = min(max(0, total - len(buffer)), len(data) - self._pos)
        buffer += data[self._pos : self._pos + take]
        self._pos += take
        if len(buffer) < total:
            self._check_truncated()
            return None
        if len(buffer) == total:  # the usual case: handed out as a view, not copied again
            self._buffer = bytearray()
            return memoryview(buffer)[LENGTH_SIZE:].toreadonly()
        with memoryview(buffer) as view:  # one copy, not two
            frame = bytes(view[LENGTH_SIZE:total])
        del buffer[:total]
        return frame

    def _check_truncated(self) -> None:
        if self._eof and self.buffered:
            raise RemoteProtocolError(
                f"connection closed in the middle of a frame ({self.buffered} bytes left)",
                hint="truncated stream",
            )


def encode_record(kind: RecordType, body: bytes = b"") -> bytes:
    return bytes([kind]) + body


def decode_record(plaintext: bytes) -> tuple[RecordType, bytes]:
    if not plaintext:
        raise RemoteProtocolError("empty transport record", hint="malformed transport message")
    try:
        kind = RecordType(plaintext[0])
    except ValueError:
        raise RemoteProtocolError(
            f"unknown transport record type 0x{plaintext[0]:02x}",
            hint="peer speaks a different protocol version",
        ) from None
    body = plaintext[1:]
    if kind in _EMPTY_BODY and body:
        raise RemoteProtocolError(f"{kind.name} record with a body", hint="malformed record")
    if kind is RecordType.CLOSE and len(body) > MAX_CLOSE_REASON:
        raise RemoteProtocolError("CLOSE reason too long", hint="malformed record")
    return kind, body

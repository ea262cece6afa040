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
    """Buffer stream bytes; hand out whole frames."""

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size <= MAX_FRAME_SIZE:
            raise LocalProtocolError(f"max_frame_size must be in 1..{MAX_FRAME_SIZE}")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._eof = False

    def feed(self, data: bytes) -> None:
        """Append stream bytes; ``b""`` means the peer closed its side."""
        if self._eof:
            if data:
                raise LocalProtocolError("data received after EOF")
            return
        if not data:
            self._eof = True
        self._buffer += data

    @property
    def eof(self) -> bool:
        """True once EOF was fed and every whole frame has been taken."""
        return self._eof and not self._buffer

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_frame(self) -> bytes | None:
        """The next whole frame, or ``None`` if more bytes are needed (or at a clean EOF)."""
        if len(self._buffer) >= LENGTH_SIZE:
            length = int.from_bytes(self._buffer[:LENGTH_SIZE], "big")
            if length == 0:
                raise RemoteProtocolError("zero-length frame", hint="garbage on the connection")
            if length > self.max_frame_size:
                raise RemoteProtocolError(
                    f"frame of {length} bytes exceeds the maximum of {self.max_frame_size}",
                    hint="oversized frame or garbage on the connection",
                )
            if len(self._buffer) >= LENGTH_SIZE + length:
                with memoryview(self._buffer) as view:  # one copy, not two
                    frame = bytes(view[LENGTH_SIZE : LENGTH_SIZE + length])
                del self._buffer[: LENGTH_SIZE + length]
                return frame
        if self._eof and self._buffer:
            raise RemoteProtocolError(
                f"connection closed in the middle of a frame ({len(self._buffer)} bytes left)",
                hint="truncated stream",
            )
        return None


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

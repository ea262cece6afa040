"""The binary local stream between agents and their daemon: frames and their bodies. Pure.

An agent opens the node's control socket (``/run/keel/mesh.sock``), sends
the JSON request ``{"verb": "stream", "args": {}}``, reads the JSON reply
(``{"ok": true, "result": {"stream": 1, "node": ...}}``) and from then on
both sides exchange binary frames on that connection::

    type: u8  ||  length: u32, big-endian  ||  body: `length` bytes   (length <= 16 MiB)

Agent to daemon:

    0x01 SEND       request: u32 || entries, each
                    id (16) || to (32, ASCII node id) || ttl_ms: u64 (0: the daemon's default)
                    || topic_length: u8 || topic || size: u32 || payload
    0x02 SUBSCRIBE  max_unacked: u32 || max_bytes: u32 || topic_length: u8 || topic   (once;
                    answered with a DELIVER frame, empty if nothing waits)
    0x03 ACK        receipts, u64 each: handled, delete them

Daemon to agent:

    0x81 SENT       request: u32 || status: u8 || UTF-8 error (status 1 or 2)
                    status 0: queued; 1: refused (a bad recipient, topic, size...);
                    2: busy (the outbox stayed full for 5 s: nothing queued, send it
                    again later). While a SEND waits for room the daemon reads nothing
                    more from that stream, so a pipelining agent slows to the mesh's pace.
    0x82 DELIVER    entries, each
                    receipt: u64 || id (16) || from (32) || received: f64 (Unix seconds)
                    || flags: u8 (bit 0: room) || room (16, if flags bit 0) || size: u32 || payload
    0x83 ERROR      UTF-8 text; the daemon then closes the connection. Text that
                    starts "refused: " says the agent may not do what it asked (a
                    SUBSCRIBE to a topic beyond its mesh grant); other text, that a
                    frame was malformed

A SEND is all or nothing, like the JSON ``send_many`` (one transaction); its
SENT comes once every message of it is in the outbox. Several SENDs may be in
flight; SENTs come back in order. After SUBSCRIBE the daemon pushes the
topic's messages as they arrive, keeping at most ``max_unacked`` messages and
``max_bytes`` bytes (but always at least one message) handed out and not yet
acknowledged; what a stream had not acknowledged when it closes is handed out
again. A receipt below 2^63 names a stored message and stays valid across
reconnects and daemon restarts; one with the top bit set names a message the
daemon handed over from memory and is valid only on the stream that got it
(an agent drops those when its connection ends: the daemon hands the
messages out again, under new receipts).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, NamedTuple

MAX_FRAME: Final = 16 << 20
SOCKET_BUFFER: Final = 4 << 20  # both ends ask for this much (keel.api.widen; the kernel caps it)
FRAME: Final = struct.Struct(">BI")
_SEND_HEAD = struct.Struct(">16s32sQB")
_SIZE = struct.Struct(">I")
_REQUEST = struct.Struct(">I")
_SUBSCRIBE = struct.Struct(">IIB")
_DELIVER_HEAD = struct.Struct(">Q16s32sdB")
_RECEIPT = struct.Struct(">Q")
_SENT = struct.Struct(">IB")
FLAG_ROOM: Final = 0x01
REFUSED: Final = "refused: "  # an ERROR text with this prefix: not permitted, not malformed
STREAM_RECEIPTS: Final = 1 << 63  # receipts from here on are valid on their stream only


class Kind(enum.IntEnum):
    SEND = 0x01
    SUBSCRIBE = 0x02
    ACK = 0x03
    SENT = 0x81
    DELIVER = 0x82
    ERROR = 0x83


class LocalStreamError(ValueError):
    """A malformed frame or body (the daemon answers ERROR and hangs up)."""


class SendEntry(NamedTuple):
    """A message an agent sends: ``id`` 32 hex digits, ``ttl_ms`` 0 for the default."""

    id: str
    to: str
    topic: str
    payload: bytes
    ttl_ms: int = 0

    def __repr__(self) -> str:  # never the payload
        return f"SendEntry(id={self.id!r}, to={self.to!r}, topic={self.topic!r})"


class Delivered(NamedTuple):
    receipt: int
    id: str
    sender: str
    received: float
    room: str | None
    payload: bytes

    def __repr__(self) -> str:  # never the payload
        return f"Delivered(receipt={self.receipt}, id={self.id!r}, sender={self.sender!r})"


def frame(kind: Kind, body: bytes) -> bytes:
    if len(body) > MAX_FRAME:
        raise LocalStreamError(f"a frame body carries at most {MAX_FRAME} bytes")
    return FRAME.pack(kind, len(body)) + body


def read_frame_head(head: bytes) -> tuple[int, int]:
    """(type, length) from the 5-byte frame head; ``LocalStreamError`` if too long."""
    kind, length = FRAME.unpack(head)
    if length > MAX_FRAME:
        raise LocalStreamError(f"frame of {length} bytes is over {MAX_FRAME}")
    return kind, length


def _ascii(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise LocalStreamError(f"{what} is not ASCII") from None


# ---------------------------------------------------------------- SEND


def send_entry_head(message: SendEntry) -> bytes:
    """A SEND entry up to its payload (the entry is this head, then ``message.payload``)."""
    topic = message.topic.encode("ascii")
    to = message.to.encode("ascii")
    if len(to) != 32 or not 0 < len(topic) < 256 or len(message.id) != 32:
        raise LocalStreamError("to must be a node id, topic 1 to 255 ASCII characters")
    return b"".join(
        (
            _SEND_HEAD.pack(bytes.fromhex(message.id), to, message.ttl_ms, len(topic)),
            topic,
            _SIZE.pack(len(message.payload)),
        )
    )


def send_entry(message: SendEntry) -> bytes:
    return send_entry_head(message) + message.payload


def encode_send(request: int, entries: Sequence[bytes]) -> bytes:
    """A SEND frame from ``send_entry`` results (or their pieces, in order: joined once)."""
    size = _REQUEST.size + sum(len(e) for e in entries)
    if size > MAX_FRAME:
        raise LocalStreamError(f"a frame body carries at most {MAX_FRAME} bytes")
    return b"".join((FRAME.pack(Kind.SEND, size), _REQUEST.pack(request), *entries))


def decode_send(body: bytes) -> tuple[int, list[SendEntry]]:
    if len(body) < _REQUEST.size:
        raise LocalStreamError("SEND without a request number")
    (request,) = _REQUEST.unpack_from(body)
    view = memoryview(body)
    at, end = _REQUEST.size, len(body)
    out: list[SendEntry] = []
    try:
        while at < end:
            raw_id, to, ttl_ms, topic_length = _SEND_HEAD.unpack_from(body, at)
            at += _SEND_HEAD.size
            topic = _ascii(body[at : at + topic_length], "topic")
            at += topic_length
            (size,) = _SIZE.unpack_from(body, at)
            at += _SIZE.size
            if at + size > end:
                raise LocalStreamError("SEND entry runs past the frame's end")
            payload = bytes(view[at : at + size])
            at += size
            out.append(SendEntry(raw_id.hex(), _ascii(to, "to"), topic, payload, ttl_ms))
    except struct.error:
        raise LocalStreamError("SEND entry runs past the frame's end") from None
    finally:
        view.release()
    if not out:
        raise LocalStreamError("SEND without a message")
    return request, out


class Status(enum.IntEnum):
    QUEUED = 0
    REFUSED = 1
    BUSY = 2


def encode_sent(request: int, status: Status = Status.QUEUED, error: str = "") -> bytes:
    return frame(Kind.SENT, _SENT.pack(request, status) + error.encode())


def decode_sent(body: bytes) -> tuple[int, Status, str]:
    """(request, status, error text: empty when queued)."""
    if len(body) < _SENT.size:
        raise LocalStreamError("SENT too short")
    request, status = _SENT.unpack_from(body)
    try:
        status = Status(status)
    except ValueError:
        raise LocalStreamError(f"SENT status {status} is not 0, 1 or 2") from None
    text = body[_SENT.size :].decode("utf-8", errors="replace")
    return request, status, text or ("" if status is Status.QUEUED else "refused")


# ---------------------------------------------------------------- SUBSCRIBE / ACK


def encode_subscribe(topic: str, max_unacked: int, max_bytes: int) -> bytes:
    raw = topic.encode("ascii")
    return frame(Kind.SUBSCRIBE, _SUBSCRIBE.pack(max_unacked, max_bytes, len(raw)) + raw)


def decode_subscribe(body: bytes) -> tuple[str, int, int]:
    if len(body) < _SUBSCRIBE.size:
        raise LocalStreamError("SUBSCRIBE too short")
    max_unacked, max_bytes, length = _SUBSCRIBE.unpack_from(body)
    if len(body) != _SUBSCRIBE.size + length:
        raise LocalStreamError("SUBSCRIBE topic length does not match the frame")
    return _ascii(body[_SUBSCRIBE.size :], "topic"), max_unacked, max_bytes


def encode_ack(receipts: Iterable[int]) -> bytes:
    listed = list(receipts)
    return frame(Kind.ACK, struct.pack(f">{len(listed)}Q", *listed))


def decode_ack(body: bytes) -> tuple[int, ...]:
    if len(body) % _RECEIPT.size:
        raise LocalStreamError("ACK length is not a multiple of 8")
    return struct.unpack(f">{len(body) // _RECEIPT.size}Q", body)


# ---------------------------------------------------------------- DELIVER


def deliver_entry_head(
    receipt: int, message_id: str, *, sender: str, received: float, room: str | None, size: int
) -> bytes:
    """A DELIVER entry up to its payload (the entry is this head, then the payload)."""
    flags = FLAG_ROOM if room is not None else 0
    head = _DELIVER_HEAD.pack(
        receipt, bytes.fromhex(message_id), sender.encode("ascii"), received, flags
    )
    if room is not None:
        head += bytes.fromhex(room)
    return head + _SIZE.pack(size)


def deliver_entry(
    receipt: int, message_id: str, *, sender: str, received: float, room: str | None, payload: bytes
) -> bytes:
    head = deliver_entry_head(
        receipt, message_id, sender=sender, received=received, room=room, size=len(payload)
    )
    return head + payload


def decode_deliver(body: bytes) -> Iterator[Delivered]:
    view = memoryview(body)
    at, end = 0, len(body)
    try:
        while at < end:
            receipt, raw_id, sender, received, flags = _DELIVER_HEAD.unpack_from(body, at)
            at += _DELIVER_HEAD.size
            room = None
            if flags & FLAG_ROOM:
                room = body[at : at + 16].hex()
                at += 16
            (size,) = _SIZE.unpack_from(body, at)
            at += _SIZE.size
            if at + size > end:
                raise LocalStreamError("DELIVER entry runs past the frame's end")
            payload = bytes(view[at : at + size])
            at += size
            yield Delivered(receipt, raw_id.hex(), _ascii(sender, "from"), received, room, payload)
    except struct.error:
        raise LocalStreamError("DELIVER entry runs past the frame's end") from None
    finally:
        view.release()

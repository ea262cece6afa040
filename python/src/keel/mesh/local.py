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
    0x04 SEND_TO    as SEND, each entry with the agent it is for after ttl_ms:
                    ... || ttl_ms: u64 || agent_length: u8 (0: none) || agent || topic_length ...
                    (to send to AGENT@NODE; the sending agent is never in a frame: the
                    daemon knows it from the socket's credentials)
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
                    || flags: u8 (bit 0: room; bit 1: agent) || room (16, if flags bit 0)
                    || agent_length: u8 || agent (the sending agent, if flags bit 1)
                    || size: u32 || payload
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

import collections
import enum
import mmap
import struct
from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple

from keel.mesh.buffers import BufferPool

MAX_FRAME: Final = 16 << 20
SOCKET_BUFFER: Final = 4 << 20  # both ends ask for this much (keel.api.widen; the kernel caps it)
FRAME: Final = struct.Struct(">BI")
_SEND_HEAD = struct.Struct(">16s32sQB")
_SIZE = struct.Struct(">I")
_TTL_LENGTH = struct.Struct(">QB")  # a SEND entry's ttl_ms, and the length after it
_REQUEST = struct.Struct(">I")
_SUBSCRIBE = struct.Struct(">IIB")
_DELIVER_HEAD = struct.Struct(">Q16s32sdB")
_DELIVER_PLAIN = struct.Struct(">Q16s32sdBI")  # a head without room or agent, with the size
DELIVER_PLAIN: Final = _DELIVER_PLAIN  # (receipt, id, sender, received, 0, size): the inbox's
_RECEIPT = struct.Struct(">Q")
VIEW_MIN: Final = 16 << 10  # decode_send: a payload this large, in a large frame, is a view of it
_SENT = struct.Struct(">IB")
FLAG_ROOM: Final = 0x01
FLAG_AGENT: Final = 0x02
REFUSED: Final = "refused: "  # an ERROR text with this prefix: not permitted, not malformed
STREAM_RECEIPTS: Final = 1 << 63  # receipts from here on are valid on their stream only


class Kind(enum.IntEnum):
    SEND = 0x01
    SUBSCRIBE = 0x02
    ACK = 0x03
    SEND_TO = 0x04
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
    payload: bytes | memoryview  # decode_send: a large one is a read-only view of its frame
    ttl_ms: int = 0
    to_agent: str | None = None  # the agent on node ``to`` it is for (a SEND_TO frame)

    def __repr__(self) -> str:  # never the payload
        return f"SendEntry(id={self.id!r}, to={self.to!r}, topic={self.topic!r})"


class Delivered(NamedTuple):
    receipt: int
    id: str
    sender: str
    received: float
    room: str | None
    payload: bytes
    agent: str | None = None  # the sending agent, as its node stamped it

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


def _ascii(raw: bytes | bytearray, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise LocalStreamError(f"{what} is not ASCII") from None


# ---------------------------------------------------------------- SEND


def send_entry_route(
    to: str, topic: str, ttl_ms: int = 0, to_agent: str | None = None, *, to_agents: bool = False
) -> bytes:
    """A SEND entry's head between its id and its size (recipient, TTL, agent, topic): the
    same for every message to one recipient on one topic; ``to_agents`` as below."""
    raw_topic = topic.encode("ascii")
    raw_to = to.encode("ascii")
    if len(raw_to) != 32 or not 0 < len(raw_topic) < 256:
        raise LocalStreamError("to must be a node id, topic 1 to 255 ASCII characters")
    if not to_agents:
        if to_agent is not None:
            raise LocalStreamError("a message for an agent goes in a SEND_TO frame")
        return b"".join((raw_to, _TTL_LENGTH.pack(ttl_ms, len(raw_topic)), raw_topic))
    agent = (to_agent or "").encode("ascii")  # the agent's length and name, then the topic's
    if len(agent) > 255:
        raise LocalStreamError("an agent's name is at most 255 ASCII characters")
    return b"".join(
        (raw_to, _TTL_LENGTH.pack(ttl_ms, len(agent)), agent, bytes([len(raw_topic)]), raw_topic)
    )


def send_entry_head(message: SendEntry, *, to_agents: bool = False) -> bytes:
    """A SEND entry up to its payload (the entry is this head, then ``message.payload``);
    ``to_agents``: in the form of a SEND_TO frame."""
    route = send_entry_route(
        message.to, message.topic, message.ttl_ms, message.to_agent, to_agents=to_agents
    )
    if len(message.id) != 32:
        raise LocalStreamError("an id is 32 hex digits")
    return b"".join((bytes.fromhex(message.id), route, _SIZE.pack(len(message.payload))))


def send_entry(message: SendEntry, *, to_agents: bool = False) -> bytes:
    return send_entry_head(message, to_agents=to_agents) + message.payload


def encode_send_parts(
    request: int, entries: Sequence[bytes | memoryview], *, to_agents: bool = False
) -> list[bytes | memoryview]:
    """``encode_send``'s frame in pieces, in order (its head, then ``entries``): for a
    gathering write (``sendmsg``), so the payloads are not copied into one bytes."""
    size = _REQUEST.size + sum(len(e) for e in entries)
    if size > MAX_FRAME:
        raise LocalStreamError(f"a frame body carries at most {MAX_FRAME} bytes")
    kind = Kind.SEND_TO if to_agents else Kind.SEND
    return [FRAME.pack(kind, size) + _REQUEST.pack(request), *entries]


def encode_send(request: int, entries: Sequence[bytes], *, to_agents: bool = False) -> bytes:
    """A SEND (``to_agents``: SEND_TO) frame from ``send_entry`` results (or their pieces,
    in order: joined once)."""
    size = _REQUEST.size + sum(len(e) for e in entries)
    if size > MAX_FRAME:
        raise LocalStreamError(f"a frame body carries at most {MAX_FRAME} bytes")
    kind = Kind.SEND_TO if to_agents else Kind.SEND
    return b"".join((FRAME.pack(kind, size), _REQUEST.pack(request), *entries))


def decode_send(body: Body, *, to_agents: bool = False) -> tuple[int, list[SendEntry]]:
    """A SEND (``to_agents``: SEND_TO) frame's request number and messages.

    A payload of ``VIEW_MIN`` bytes or more in a body that is a view (a large
    frame's, read into a buffer of its own: ``FrameReader``) is a read-only
    view of it, not a copy: it keeps the frame's buffer from being used
    again while it lives. Other payloads are copied out of ``body`` (which
    may be a buffer read into again later).
    """
    if len(body) < _REQUEST.size:
        raise LocalStreamError("SEND without a request number")
    (request,) = _REQUEST.unpack_from(body)
    view = memoryview(body)
    lend = not isinstance(body, bytes)
    payloads = view.toreadonly() if lend else view
    at, end = _REQUEST.size, len(body)
    out: list[SendEntry] = []
    append = out.append
    head, unpack_head = _SEND_HEAD.size, _SEND_HEAD.unpack_from
    size_length, unpack_size = _SIZE.size, _SIZE.unpack_from
    names: dict[bytes, str] = {}  # recipients, as sent: the same few in a frame
    try:
        while at < end:
            raw_id, to, ttl_ms, topic_length = unpack_head(view, at)
            at += head
            to_agent = None
            if to_agents:  # what was read as the topic's length is the agent's
                if topic_length:
                    to_agent = _ascii_view(view[at : at + topic_length], "agent")
                    if len(to_agent) != topic_length:
                        raise LocalStreamError("SEND_TO entry runs past the frame's end")
                at += topic_length
                topic_length = view[at]
                at += 1
            topic = _ascii_view(view[at : at + topic_length], "topic")
            at += topic_length
            (size,) = unpack_size(view, at)
            at += size_length
            stop = at + size
            if stop > end:
                raise LocalStreamError("SEND entry runs past the frame's end")
            recipient = names.get(to)
            if recipient is None:
                recipient = names[to] = _ascii(to, "to")
            payload = payloads[at:stop] if lend and size >= VIEW_MIN else bytes(view[at:stop])
            append(SendEntry(raw_id.hex(), recipient, topic, payload, ttl_ms, to_agent))
            at = stop
    except (struct.error, IndexError):
        raise LocalStreamError("SEND entry runs past the frame's end") from None
    finally:
        view.release()  # the payloads' views stay valid: they hold the buffer themselves
    if not out:
        raise LocalStreamError("SEND without a message")
    return request, out


def _ascii_view(raw: memoryview, what: str) -> str:
    """``_ascii`` of a slice of a frame's body, without copying it out first."""
    try:
        return str(raw, "ascii")
    except UnicodeDecodeError:
        raise LocalStreamError(f"{what} is not ASCII") from None


class Status(enum.IntEnum):
    QUEUED = 0
    REFUSED = 1
    BUSY = 2


def encode_sent(request: int, status: Status = Status.QUEUED, error: str = "") -> bytes:
    return frame(Kind.SENT, _SENT.pack(request, status) + error.encode())


def decode_sent(body: bytes | bytearray | memoryview) -> tuple[int, Status, str]:
    """(request, status, error text: empty when queued)."""
    if len(body) < _SENT.size:
        raise LocalStreamError("SENT too short")
    request, status = _SENT.unpack_from(body)
    try:
        status = Status(status)
    except ValueError:
        raise LocalStreamError(f"SENT status {status} is not 0, 1 or 2") from None
    text = bytes(body[_SENT.size :]).decode("utf-8", errors="replace")
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


def decode_ack(body: Body) -> tuple[int, ...]:
    if len(body) % _RECEIPT.size:
        raise LocalStreamError("ACK length is not a multiple of 8")
    return struct.unpack(f">{len(body) // _RECEIPT.size}Q", body)


# ---------------------------------------------------------------- DELIVER


def deliver_entry_head(
    receipt: int,
    message_id: str,
    *,
    sender: str,
    received: float,
    room: str | None,
    size: int,
    agent: str | None = None,
) -> bytes:
    """A DELIVER entry up to its payload (the entry is this head, then the payload)."""
    if room is None and agent is None:  # the common case: one pack
        return _DELIVER_PLAIN.pack(
            receipt, bytes.fromhex(message_id), sender.encode("ascii"), received, 0, size
        )
    flags = (FLAG_ROOM if room is not None else 0) | (FLAG_AGENT if agent is not None else 0)
    head = _DELIVER_HEAD.pack(
        receipt, bytes.fromhex(message_id), sender.encode("ascii"), received, flags
    )
    if room is not None:
        head += bytes.fromhex(room)
    if agent is not None:
        name = agent.encode("ascii")
        head += bytes([len(name)]) + name
    return head + _SIZE.pack(size)


def deliver_entry(
    receipt: int,
    message_id: str,
    *,
    sender: str,
    received: float,
    room: str | None,
    payload: bytes,
    agent: str | None = None,
) -> bytes:
    head = deliver_entry_head(
        receipt,
        message_id,
        sender=sender,
        received=received,
        room=room,
        size=len(payload),
        agent=agent,
    )
    return head + payload


def decode_deliver(body: bytes | bytearray | memoryview) -> list[Delivered]:
    """The entries of a DELIVER body, each payload its own ``bytes`` (one copy: ``body``
    may be a view of a buffer read into again later)."""
    view = memoryview(body)
    at, end = 0, len(view)
    out: list[Delivered] = []
    plain, unpack_plain = _DELIVER_PLAIN.size, _DELIVER_PLAIN.unpack_from
    senders: dict[bytes, str] = {}  # the same few in a frame
    try:
        while at < end:
            receipt, raw_id, sender, received, flags, size = unpack_plain(view, at)
            room = agent = None
            if flags:  # a room or an agent between the flags and the size
                at += _DELIVER_HEAD.size
                if flags & FLAG_ROOM:
                    room = view[at : at + 16].hex()
                    at += 16
                if flags & FLAG_AGENT:
                    length = view[at]
                    agent = _ascii_view(view[at + 1 : at + 1 + length], "agent")
                    at += 1 + length
                (size,) = _SIZE.unpack_from(view, at)
                at += _SIZE.size
            else:
                at += plain
            if at + size > end:
                raise LocalStreamError("DELIVER entry runs past the frame's end")
            name = senders.get(sender)
            if name is None:
                name = senders[sender] = _ascii(sender, "from")
            out.append(
                Delivered(
                    receipt, raw_id.hex(), name, received, room, bytes(view[at : at + size]), agent
                )
            )
            at += size
    except (struct.error, IndexError):
        raise LocalStreamError("DELIVER entry runs past the frame's end") from None
    finally:
        view.release()
    return out


# ---------------------------------------------------------------- reading frames


Body = bytes | memoryview  # a frame's body: bytes, or a view of the buffer it was read into


class FrameReader:
    """Frames out of a byte stream, each byte read where it is used. Pure: the caller reads.

    The caller reads into :meth:`buffer` and says how much came with
    :meth:`filled`; :meth:`pop` gives the complete frames in order (type,
    body). A frame of up to ``SCRATCH`` bytes is read into a scratch buffer,
    several in one read, and its body copied out (``bytes``). A larger
    frame's body is read straight into a buffer of its own (the head alone
    is read first after such a frame, so none of the body lands in the
    scratch buffer) and handed out as a ``memoryview`` of it. That buffer
    comes from :data:`BODIES` (``keel.mesh.buffers``): it is used again for
    a later large frame once no view of it is left (``decode_send``'s
    payloads are views of it: they hold it until they are dropped). A body
    over ``KEEP`` bytes gets an anonymous mapping, whose memory is taken
    only as the bytes arrive: a head alone costs no 16 MiB. A frame head announcing more than
    ``MAX_FRAME`` bytes ends the stream: :meth:`pop` raises its
    ``LocalStreamError`` after the frames before it.
    """

    SCRATCH: Final = 64 << 10
    KEEP: Final = 4 << 20

    def __init__(self) -> None:
        self._scratch = bytearray(self.SCRATCH)
        self._view = memoryview(self._scratch)
        self._start = 0  # the scratch buffer holds unparsed bytes in [_start, _end)
        self._end = 0
        self._head_only = False  # the next read takes a frame head only (after a large frame)
        self._body: memoryview | None = None  # the large frame being read: its whole buffer
        self._kind = 0
        self._length = 0
        self._got = 0
        self._frames: collections.deque[tuple[int, Body]] = collections.deque()
        self._error: LocalStreamError | None = None
        self.queued = 0  # bytes of the complete frames not yet popped

    @property
    def ready(self) -> bool:
        """A complete frame waits to be popped (empty ones too)."""
        return bool(self._frames)

    @property
    def failed(self) -> bool:
        """A bad frame head ended the stream (nothing more need be read)."""
        return self._error is not None

    def buffer(self) -> memoryview:
        """Where the next read goes (never empty)."""
        if self._body is not None:
            return self._body[self._got : self._length]
        start, end = self._start, self._end
        if start:  # a partial frame is left: to the front (a few bytes, or a small frame)
            self._view[: end - start] = self._view[start:end]
            end -= start
            self._start, self._end = 0, end
        if self._head_only and end < FRAME.size:
            return self._view[end : FRAME.size]
        return self._view[end:]

    def filled(self, count: int) -> None:
        """``count`` bytes were read into the last :meth:`buffer`."""
        if self._error is not None:
            return  # the stream is over: what follows a bad head means nothing
        if self._body is None:
            self._end += count
            self._parse()
            return
        self._got += count
        if self._got == self._length:
            self._queue(self._kind, self._body[: self._length])
            self._body = None
            self._head_only = True

    def pop(self) -> tuple[int, Body] | None:
        """The next complete frame, or None (a large body's buffer is used again for a later
        frame only once nothing holds a view of it)."""
        if self._frames:
            kind, body = self._frames.popleft()
            self.queued -= len(body)
            return kind, body
        if self._error is not None:
            raise self._error
        return None

    def _queue(self, kind: int, body: Body) -> None:
        self._frames.append((kind, body))
        self.queued += len(body)

    def _parse(self) -> None:
        view, at, end = self._view, self._start, self._end
        head = FRAME.size
        while end - at >= head:
            kind, length = FRAME.unpack_from(view, at)
            if length > MAX_FRAME:
                self._error = LocalStreamError(f"frame of {length} bytes is over {MAX_FRAME}")
                self._start = self._end = 0
                return
            stop = at + head + length
            if head + length > self.SCRATCH:  # large: its body gets a buffer of its own
                self._large(kind, length, view[at + head : end])
                self._start = self._end = 0
                return
            if stop > end:
                break
            self._queue(kind, bytes(view[at + head : stop]))
            self._head_only = False
            at = stop
        if at == end:
            self._start = self._end = 0
        else:
            self._start = at

    def _large(self, kind: int, length: int, begun: memoryview) -> None:
        """Read a large frame's body into a buffer of its own (``begun``: what came already)."""
        buffer: bytearray | mmap.mmap
        if length > self.KEEP:
            buffer = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE)
        else:
            buffer = BODIES.take(length)
        body = memoryview(buffer)
        got = len(begun)
        body[:got] = begun
        self._kind, self._length, self._got, self._body = kind, length, got, body


# The large SEND frames' bodies of all agents' streams (one event loop thread): their
# payloads' views live until the recipients acknowledge them (or the outbox's payload cache
# drops them), so a flood holds a few of these at a time.
BODIES: Final = BufferPool(keep=16, keep_bytes=16 << 20)

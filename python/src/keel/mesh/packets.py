"""The application layer's packets, carried one per session message. Pure.

Every ``Message`` a ``Session`` delivers holds exactly one packet::

    type: u8  ||  header_length: u16, big-endian  ||  header  ||  body

``header`` is a JSON object in canonical form (``canonical_json``) and
``body`` is raw bytes (only ``MSG`` has one). Types:

    0x10 MSG      an application message; header {"id","topic","exp"} for a
                  direct message, plus {"room","from","rv","sig"} for a room
                  message, plus "agent" (the sending agent) and/or "to" (the
                  receiving agent) when agents are named (revision 3);
                  body = the payload
    0x11 ACK      {"ok": [ids], "busy": [ids], "rejected": [{"id","reason"}]}
    0x12 RECORDS  {"records": [record, ...]} (membership and room records)
    0x13 MSGS     several MSGs in binary, no header (application revision 2,
                  sent only to peers that announce it in the handshake)

Decoding is strict (exact key sets, types, sizes); anything else is a
``RemoteProtocolError``, after which the shell drops the connection.
``docs/mesh-protocol.md`` ("Application layer") is the normative text.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from keel.config import parse_json
from keel.errors import ConfigError
from keel.mesh.encoding import b64u_decode, b64u_encode
from keel.mesh.errors import LocalProtocolError, RemoteProtocolError
from keel.mesh.ids import (
    MAX_AGENT,
    MESSAGE_ID_BYTES,
    SIGNATURE_SIZE,
    check_topic,
    is_agent_name,
    is_message_id,
    is_node_id,
)

HEADER_LENGTH_SIZE: Final = 2
MAX_HEADER: Final = 65535
MAX_PAYLOAD: Final = 960 * 1024  # a packet stays under the session's 1 MiB message limit
MAX_ACK_IDS: Final = 4096
MAX_REASON: Final = 200
APP_REVISION: Final = 4  # the application-layer revision this node speaks (MSGS: 2, agents: 3)
AGENTS_REVISION: Final = 3  # the revision from which MSG and MSGS may name agents
ROOM_AGENTS_REVISION: Final = 4  # the revision from which a room message's agent is signed
MAX_BATCH_MESSAGES: Final = 4096  # per MSGS packet: what one ACK list may answer
MAX_BATCH_BYTES: Final = 1 << 20  # a MSGS packet is one session message
MAX_EXPIRY: Final = (1 << 64) - 1  # exp and rv are u64 in MSGS


class PacketType(enum.IntEnum):
    MSG = 0x10
    ACK = 0x11
    RECORDS = 0x12
    MSGS = 0x13


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, non-ASCII escaped: the bytes every signature covers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class RoomStamp:
    """What makes a room message verifiable by every member, whoever delivers it."""

    room: str
    author: str
    version: int
    signature: bytes = field(repr=False)


class Msg(NamedTuple):
    """One message (a tuple: built for every message on the hot path)."""

    id: str
    topic: str
    expires: int  # Unix seconds, sender's clock
    payload: bytes | memoryview  # decoded: bytes; sent: a view of an agent's frame, maybe
    room: RoomStamp | None = None
    agent: str | None = None  # the sending agent, stamped by the sending node
    to: str | None = None  # the agent it is for on the receiving node (None: the node's topic)

    def __repr__(self) -> str:  # never the payload
        return (
            f"Msg(id={self.id!r}, topic={self.topic!r}, expires={self.expires}, room={self.room!r}"
            f", agent={self.agent!r}, to={self.to!r})"
        )


@dataclass(frozen=True)
class Ack:
    ok: tuple[str, ...] = ()
    busy: tuple[str, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()  # (id, reason)


@dataclass(frozen=True)
class Records:
    records: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Msgs:
    """Several messages in one packet (MSGS, application revision 2)."""

    messages: tuple[Msg, ...]


Packet = Msg | Ack | Records | Msgs


# ---------------------------------------------------------------- encoding


def _pack(kind: PacketType, header: Mapping[str, Any], body: bytes | memoryview = b"") -> bytes:
    raw = canonical_json(header)
    if len(raw) > MAX_HEADER:
        raise LocalProtocolError(f"{kind.name} header of {len(raw)} bytes is over {MAX_HEADER}")
    return bytes([kind]) + len(raw).to_bytes(HEADER_LENGTH_SIZE, "big") + raw + body


def encode(packet: Packet) -> bytes:
    if isinstance(packet, Msg):
        if len(packet.payload) > MAX_PAYLOAD:
            raise LocalProtocolError(
                f"payload of {len(packet.payload)} bytes exceeds the maximum of {MAX_PAYLOAD}"
            )
        # Every field is a number or a string of [A-Za-z0-9._:/@+=-], so this
        # formatting is the canonical JSON (sorted keys, no whitespace) itself.
        room = packet.room
        if packet.agent is not None or packet.to is not None:
            return _pack(PacketType.MSG, _msg_header(packet), packet.payload)
        if room is None:
            text = f'{{"exp":{packet.expires},"id":"{packet.id}","topic":"{packet.topic}"}}'
        else:
            text = (
                f'{{"exp":{packet.expires},"from":"{room.author}","id":"{packet.id}",'
                f'"room":"{room.room}","rv":{room.version},'
                f'"sig":"{b64u_encode(room.signature)}","topic":"{packet.topic}"}}'
            )
        raw = text.encode()
        return b"\x10" + len(raw).to_bytes(HEADER_LENGTH_SIZE, "big") + raw + packet.payload
    if isinstance(packet, Msgs):
        return encode_msgs(packet.messages)
    if isinstance(packet, Ack):
        return _pack(
            PacketType.ACK,
            {
                "ok": list(packet.ok),
                "busy": list(packet.busy),
                "rejected": [{"id": i, "reason": r} for i, r in packet.rejected],
            },
        )
    return _pack(PacketType.RECORDS, {"records": list(packet.records)})


def encode_ok_ack(ids: Sequence[str]) -> bytes | None:
    """``encode(Ack(tuple(ids)))`` for message ids, written without the JSON encoder;
    None if an id is not a message id (then ``encode`` it is)."""
    raw = b'{"busy":[],"ok":["' + '","'.join(ids).encode() + b'"],"rejected":[]}'
    if (
        not 0 < len(ids) <= MAX_ACK_IDS
        or len(raw) != 32 + 35 * len(ids)  # as many ids as the pattern finds: no id held '","'
        or _PLAIN_ACK.fullmatch(raw) is None
    ):
        return None
    return b"\x11" + len(raw).to_bytes(HEADER_LENGTH_SIZE, "big") + raw


def _msg_header(message: Msg) -> dict[str, Any]:
    header: dict[str, Any] = {"id": message.id, "topic": message.topic, "exp": message.expires}
    room = message.room
    if room is not None:
        header.update(
            room=room.room,
            rv=room.version,
            sig=b64u_encode(room.signature),
            **{"from": room.author},
        )
    if message.agent is not None:
        header["agent"] = message.agent
    if message.to is not None:
        header["to"] = message.to
    return header


# MSGS entries: flags, id, exp; room, from, rv, sig (room messages only); the agents
# (flag 0x02: sending agent and receiving agent, each a u8 length and ASCII, 0: none);
# topic; payload.
_ENTRY = struct.Struct(">B16sQ")
_ROOM = struct.Struct(">16s32sQ64s")
_LENGTH = struct.Struct(">I")
_FLAG_ROOM = 0x01
_FLAG_AGENTS = 0x02
MSGS_HEADER: Final = bytes([PacketType.MSGS, 0, 0])  # type, then an empty header


def batchable(message: Msg) -> bool:
    """Whether ``message`` fits a MSGS entry (an expiry or room version past 2^64 - 1 does not)."""
    room = message.room
    return (
        0 <= message.expires <= MAX_EXPIRY
        and len(message.id) == 2 * MESSAGE_ID_BYTES
        and (room is None or (room.version <= MAX_EXPIRY and len(room.author) == 32))
    )


def msgs_entry_head(message: Msg) -> bytes:
    """A MSGS entry up to its payload (the entry is this head, then ``message.payload``)."""
    topic = message.topic.encode("ascii")
    room = message.room
    agents = message.agent is not None or message.to is not None
    flags = (_FLAG_ROOM if room is not None else 0) | (_FLAG_AGENTS if agents else 0)
    head = _ENTRY.pack(flags, bytes.fromhex(message.id), message.expires)
    if room is not None:
        head += _ROOM.pack(
            bytes.fromhex(room.room), room.author.encode("ascii"), room.version, room.signature
        )
    if agents:
        sender = (message.agent or "").encode("ascii")
        to = (message.to or "").encode("ascii")
        head += b"".join((bytes([len(sender)]), sender, bytes([len(to)]), to))
    return b"".join((head, bytes([len(topic)]), topic, _LENGTH.pack(len(message.payload))))


def msgs_entry(message: Msg) -> bytes:
    """One MSGS entry (``encode_msgs`` joins them behind ``MSGS_HEADER``)."""
    return msgs_entry_head(message) + message.payload


def encode_msgs(messages: Sequence[Msg]) -> bytes:
    """A MSGS packet; ``LocalProtocolError`` past the limits (the caller splits batches)."""
    if not 0 < len(messages) <= MAX_BATCH_MESSAGES:
        raise LocalProtocolError(f"a MSGS packet holds 1 to {MAX_BATCH_MESSAGES} messages")
    for message in messages:
        if len(message.payload) > MAX_PAYLOAD:
            raise LocalProtocolError(
                f"payload of {len(message.payload)} bytes exceeds the maximum of {MAX_PAYLOAD}"
            )
        if not batchable(message):
            raise LocalProtocolError(f"message {message.id} does not fit a MSGS entry (exp, rv)")
    packet = MSGS_HEADER + b"".join(msgs_entry(m) for m in messages)
    if len(packet) > MAX_BATCH_BYTES:
        raise LocalProtocolError(f"MSGS packet of {len(packet)} bytes is over {MAX_BATCH_BYTES}")
    return packet


def split_records(records: Sequence[Mapping[str, Any]], limit: int = 60_000) -> list[Records]:
    """Batch records into RECORDS packets whose headers stay under ``limit`` bytes."""
    batches: list[Records] = []
    current: list[Mapping[str, Any]] = []
    size = 0
    for record in records:
        length = len(canonical_json(record)) + 1
        if current and size + length > limit:
            batches.append(Records(tuple(current)))
            current, size = [], 0
        current.append(record)
        size += length
    if current:
        batches.append(Records(tuple(current)))
    return batches


# ---------------------------------------------------------------- decoding


def _bad(problem: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed packet: {problem}", hint="peer bug or garbage")


def decode(data: bytes | memoryview) -> Packet:
    """Parse one packet; ``RemoteProtocolError`` for anything off.

    ``data`` may be a view (a session's message, see ``keel.mesh.session.Message``):
    what the packet holds is copied out of it (payloads as ``bytes``).
    """
    if len(data) < 1 + HEADER_LENGTH_SIZE:
        raise _bad(f"{len(data)} bytes is shorter than a packet's fixed part")
    try:
        kind = PacketType(data[0])
    except ValueError:
        raise _bad(f"unknown packet type 0x{data[0]:02x}") from None
    length = int.from_bytes(data[1:3], "big")
    if kind is PacketType.ACK and len(data) == 3 + length:
        fast = _PLAIN_ACK.fullmatch(data, 3)
        if fast is not None:  # the usual ACK: only ok ids, in canonical form
            ids = fast.group(1)
            ok = tuple(ids[1:-1].decode("ascii").split('","')) if ids else ()
            if len(ok) <= MAX_ACK_IDS:
                return Ack(ok)
    if kind is PacketType.MSGS:
        if length:
            raise _bad("MSGS has no header (its header length must be 0)")
        return _decode_msgs(data)
    if len(data) < 3 + length:
        raise _bad(f"header length {length} runs past the packet's end")
    try:
        header = parse_json(bytes(data[3 : 3 + length]), source=f"{kind.name} header")
    except ConfigError as exc:
        raise _bad(str(exc)) from None
    if not isinstance(header, dict):
        raise _bad(f"{kind.name} header is not a JSON object")
    body = data[3 + length :]
    if kind is PacketType.MSG:
        return _decode_msg(header, body)
    if body:
        raise _bad(f"{kind.name} packet with a body")
    if kind is PacketType.ACK:
        return _decode_ack(header)
    return _decode_records(header)


# An ACK whose only ids are "ok", exactly as ``encode`` writes it (canonical JSON):
# read without the JSON parser. Whatever else an ACK holds takes the general path.
_PLAIN_ACK: Final = re.compile(
    rb'\{"busy":\[\],"ok":\[((?:"[0-9a-f]{32}",)*"[0-9a-f]{32}")?\],"rejected":\[\]\}'
)


def _keys(header: Mapping[str, Any], what: str, required: set[str], optional: set[str]) -> None:
    keys = set(header)
    if not required <= keys or not keys <= required | optional:
        raise _bad(f"{what} fields must be {sorted(required)} (optionally {sorted(optional)})")


def _int(value: object, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(f"{what} must be an integer >= {minimum}")
    return value


def _agent(value: object, what: str) -> str:
    if not is_agent_name(value):
        raise _bad(f"{what} must be an agent name (1 to {MAX_AGENT} of a-z, 0-9, '_', '-')")
    return str(value)


def _decode_msg(header: Mapping[str, Any], body: bytes | memoryview) -> Msg:
    room_keys = {"room", "from", "rv", "sig"}
    _keys(header, "MSG", {"id", "topic", "exp"}, room_keys | {"agent", "to"})
    if not is_message_id(header["id"]):
        raise _bad("MSG id must be 32 lowercase hex digits")
    try:
        topic = check_topic(header["topic"])
    except ValueError as exc:
        raise _bad(str(exc)) from None
    if len(body) > MAX_PAYLOAD:
        raise _bad(f"payload of {len(body)} bytes exceeds {MAX_PAYLOAD}")
    stamp = None
    present = room_keys & set(header)
    if present:
        if present != room_keys:
            raise _bad("a room MSG carries all of room, from, rv and sig")
        if not is_message_id(header["room"]):
            raise _bad("room id must be 32 lowercase hex digits")
        if not is_node_id(header["from"]):
            raise _bad("from is not a node id")
        try:
            signature = b64u_decode(header["sig"], "sig", SIGNATURE_SIZE)
        except ValueError as exc:
            raise _bad(str(exc)) from None
        stamp = RoomStamp(header["room"], header["from"], _int(header["rv"], "rv", 1), signature)
    agent = _agent(header["agent"], "MSG agent") if "agent" in header else None
    to = _agent(header["to"], "MSG to") if "to" in header else None
    return Msg(header["id"], topic, _int(header["exp"], "exp"), bytes(body), stamp, agent, to)


_valid_topics: dict[bytes, str] = {}


def _topic(raw: bytes) -> str:
    """A MSGS entry's topic, checked once per distinct topic (a small cache)."""
    topic = _valid_topics.get(raw)
    if topic is None:
        try:
            topic = check_topic(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise _bad(
                "MSGS entry topic must be 1 to 128 characters of [A-Za-z0-9._:/@+=-]"
            ) from None
        if len(_valid_topics) >= 1024:
            _valid_topics.clear()
        _valid_topics[raw] = topic
    return topic


def _decode_msgs(data: bytes | memoryview) -> Msgs:
    view = memoryview(data)
    end = len(data)
    at = 3
    messages: list[Msg] = []
    append = messages.append
    entry, entry_size = _ENTRY.unpack_from, _ENTRY.size
    length = _LENGTH.unpack_from
    topics = _valid_topics
    new_msg = tuple.__new__  # Msg(...) without its Python-level __new__: one per message
    try:
        while at < end:
            if len(messages) == MAX_BATCH_MESSAGES:
                raise _bad(f"MSGS holds more than {MAX_BATCH_MESSAGES} messages")
            flags, raw_id, expires = entry(data, at)
            at += entry_size
            stamp = agent = to = None
            if flags:
                if flags & ~(_FLAG_ROOM | _FLAG_AGENTS):
                    raise _bad(
                        f"MSGS entry flags 0x{flags:02x} (only bits 0, room, and 1, agents, "
                        "are defined)"
                    )
                if flags & _FLAG_ROOM:
                    room, author, version, signature = _ROOM.unpack_from(data, at)
                    at += _ROOM.size
                    author_id = author.decode("ascii", errors="replace")
                    if not is_node_id(author_id):
                        raise _bad("MSGS entry from is not a node id")
                    if version < 1:
                        raise _bad("MSGS entry rv must be an integer >= 1")
                    stamp = RoomStamp(room.hex(), author_id, version, signature)
                if flags & _FLAG_AGENTS:
                    agent, at = _entry_agent(data, at, "agent")
                    to, at = _entry_agent(data, at, "to")
                    if agent is None and to is None:
                        raise _bad("MSGS entry with the agents flag names no agent")
            topic_end = at + 1 + data[at]
            raw_topic = bytes(view[at + 1 : topic_end])
            topic = topics.get(raw_topic) or _topic(raw_topic)
            (size,) = length(data, topic_end)
            at = topic_end + 4
            if size > MAX_PAYLOAD:
                raise _bad(f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
            if at + size > end:
                raise _bad("MSGS entry runs past the packet's end")
            payload = bytes(view[at : at + size])
            at += size
            append(new_msg(Msg, (raw_id.hex(), topic, expires, payload, stamp, agent, to)))
    except (struct.error, IndexError):
        raise _bad("MSGS entry runs past the packet's end") from None
    finally:
        view.release()
    if not messages:
        raise _bad("MSGS holds no message")
    return Msgs(tuple(messages))


def _entry_agent(data: bytes | memoryview, at: int, what: str) -> tuple[str | None, int]:
    """An agent field of a MSGS entry (u8 length, ASCII; 0: none) and where the next begins."""
    length = data[at]
    if not length:
        return None, at + 1
    name = bytes(data[at + 1 : at + 1 + length]).decode("ascii", errors="replace")
    if len(name) != length or not is_agent_name(name):
        raise _bad(
            f"MSGS entry {what} must be an agent name (1 to {MAX_AGENT} of a-z, 0-9, '_', '-')"
        )
    return name, at + 1 + length


def _ids(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_ACK_IDS:
        raise _bad(f"ACK {what} must be a list of at most {MAX_ACK_IDS} ids")
    if not all(is_message_id(i) for i in value):
        raise _bad(f"ACK {what} holds something that is not a message id")
    return tuple(value)


def _decode_ack(header: Mapping[str, Any]) -> Ack:
    _keys(header, "ACK", {"ok", "busy", "rejected"}, set())
    rejected = header["rejected"]
    if not isinstance(rejected, list) or len(rejected) > MAX_ACK_IDS:
        raise _bad(f"ACK rejected must be a list of at most {MAX_ACK_IDS} entries")
    pairs: list[tuple[str, str]] = []
    for entry in rejected:
        if (
            not isinstance(entry, dict)
            or set(entry) != {"id", "reason"}
            or not is_message_id(entry["id"])
            or not isinstance(entry["reason"], str)
            or len(entry["reason"]) > MAX_REASON
        ):
            raise _bad('ACK rejected entries are {"id": message id, "reason": short text}')
        pairs.append((entry["id"], entry["reason"]))
    return Ack(_ids(header["ok"], "ok"), _ids(header["busy"], "busy"), tuple(pairs))


def _decode_records(header: Mapping[str, Any]) -> Records:
    _keys(header, "RECORDS", {"records"}, set())
    records = header["records"]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise _bad("RECORDS records must be a list of JSON objects")
    return Records(tuple(records))

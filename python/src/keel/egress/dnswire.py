"""Quick reads of the DNS messages the proxy sees most, straight from the wire.

dnspython reads any message exactly, but it builds objects for every name,
record and option: 0.1 to 0.2 ms a message on a small, busy server, twice on
the path of every answer (the agent's question, the upstream's reply). Most
messages have one of two simple shapes:

- a question: a header, one question of class IN, at most an OPT record
  without options (what stub resolvers send);
- an answer: a header with NOERROR, the question, an answer section of A,
  AAAA and CNAME records of class IN, no authority records, at most an OPT
  record without options (what a resolver returns for a name that exists).

:func:`read_query` and :func:`read_response` read those shapes in a few
microseconds and return None for anything else, including anything they are
unsure of; the caller then hands the message to dnspython, whose verdict
stands. Whatever is accepted here dnspython accepts too and reads the same
way (``tests/unit/egress/test_dnswire.py`` holds the two readers side by side
on generated and mutated messages), so the fast path changes speed, never a
decision. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

Labels = tuple[bytes, ...]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HEADER = struct.Struct("!HHHHHH")
HEADER_SIZE = HEADER.size  # 12: no name may point into it
QUESTION_TAIL = struct.Struct("!HH")
RR_TAIL = struct.Struct("!HHIH")

QR = 0x8000
OPCODE = 0x7800
TC = 0x0200
RCODE = 0x000F

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1
# Questions the proxy refuses (OPT, IXFR, AXFR): dnspython's path answers them.
REFUSED_QUESTIONS = frozenset((41, 251, 252))
ADDRESS_LENGTH = {TYPE_A: 4, TYPE_AAAA: 16}

MAX_NAME = 255  # octets of a name on the wire, the root label included
MAX_POINTERS = 16  # compression pointers followed in one name (dnspython's limit)
MAX_TTL = 0x7FFFFFFF  # a TTL with the top bit set is read as 0 (RFC 2181 section 8)


@dataclass(frozen=True)
class QuickQuery:
    """A question of the simple shape, as the client sent it."""

    id: int
    flags: int
    labels: Labels  # as sent (case kept), without the root label
    rdtype: int
    question_end: int  # offset just past the question (name, type, class)
    edns: int  # EDNS version, -1 without an OPT record
    ednsflags: int  # the OPT record's whole TTL field (extended rcode, version, DO)
    payload: int  # the OPT record's class: the client's UDP payload size


@dataclass(frozen=True)
class Record:
    """One answer record: an address (A, AAAA) or an alias (CNAME)."""

    owner: Labels  # lowercased
    rdtype: int
    ttl: int
    ttl_at: int  # offset of the TTL field in the message
    address: IPAddress | None = None
    target: Labels | None = None  # a CNAME's target, lowercased


@dataclass(frozen=True)
class QuickResponse:
    """An upstream's answer of the simple shape."""

    id: int
    flags: int
    question: Labels  # lowercased
    rdtype: int
    rdclass: int
    records: tuple[Record, ...]
    opt_at: int | None  # offset of the OPT record (the message's last), None without one


def read_name(wire: bytes, pos: int, end: int) -> tuple[Labels, int] | None:
    """The labels of the name at ``pos`` (read no further than ``end``) and the offset after it.

    Compression pointers are followed as dnspython follows them: each must
    point before the previous one and before the start of the name, the
    labels it leads to must end before the part that pointed to them, and at
    most :data:`MAX_POINTERS` are followed. None when the name is malformed,
    too long, or uses a label type other than a plain label or a pointer.
    """
    labels: list[bytes] = []
    length = 1  # the root label
    biggest = pos  # pointers must point before this
    segment = pos  # where the part being read began
    after: int | None = None  # the offset after the name in the message
    hops = 0
    while True:
        if pos >= end:
            return None
        count = wire[pos]
        pos += 1
        if count == 0:
            break
        if count < 64:
            if pos + count > end:
                return None
            length += count + 1
            if length > MAX_NAME:
                return None
            labels.append(wire[pos : pos + count])
            pos += count
        elif count >= 192:
            if pos >= end:
                return None
            target = ((count & 0x3F) << 8) | wire[pos]
            pos += 1
            # A pointer into the header names bytes the proxy rewrites (the id) when it
            # forwards an answer as it came: its meaning would change. dnspython's path,
            # which encodes the reply afresh, takes such a message.
            if target < HEADER_SIZE or target >= biggest:
                return None
            hops += 1
            if hops > MAX_POINTERS:
                return None
            if after is None:
                after = pos
            biggest = target
            end = segment  # what is pointed to must not overlap what points
            segment = pos = target
        else:
            return None
    return tuple(labels), pos if after is None else after


def _lower(labels: Labels) -> Labels:
    return tuple(label.lower() for label in labels)


def _opt_and_end(wire: bytes, pos: int, additional: int) -> tuple[int, int, int | None] | None:
    """The rest of a message from ``pos``: nothing, or one OPT record without options (its
    owner the root) that ends the message. (class, ttl, offset) of that OPT record,
    (0, 0, None) without one; None for anything else."""
    if not additional:
        return (0, 0, None) if pos == len(wire) else None
    end = pos + 1 + RR_TAIL.size
    if end != len(wire) or wire[pos] != 0:
        return None
    rdtype, rdclass, ttl, rdlength = RR_TAIL.unpack_from(wire, pos + 1)
    if rdtype != TYPE_OPT or rdlength != 0:
        return None
    return rdclass, ttl, pos


def read_query(wire: bytes) -> QuickQuery | None:
    """A client's question of the simple shape, or None (dnspython decides on the rest)."""
    if len(wire) < HEADER.size:
        return None
    query_id, flags, questions, answers, authority, additional = HEADER.unpack_from(wire)
    if flags & (QR | OPCODE) or questions != 1 or answers or authority or additional > 1:
        return None
    pos = HEADER.size
    labels: list[bytes] = []
    length = 1
    while True:  # a question is never compressed (nothing precedes it to point to)
        if pos >= len(wire):
            return None
        count = wire[pos]
        pos += 1
        if count == 0:
            break
        if count >= 64 or pos + count > len(wire):
            return None
        length += count + 1
        if length > MAX_NAME:
            return None
        labels.append(wire[pos : pos + count])
        pos += count
    if pos + QUESTION_TAIL.size > len(wire):
        return None
    rdtype, rdclass = QUESTION_TAIL.unpack_from(wire, pos)
    if rdclass != CLASS_IN or rdtype in REFUSED_QUESTIONS:
        return None
    pos += QUESTION_TAIL.size
    rest = _opt_and_end(wire, pos, additional)
    if rest is None:
        return None
    payload, ednsflags, opt_at = rest
    return QuickQuery(
        id=query_id,
        flags=flags,
        labels=tuple(labels),
        rdtype=rdtype,
        question_end=pos,
        edns=-1 if opt_at is None else (ednsflags >> 16) & 0xFF,
        ednsflags=ednsflags,
        payload=payload,
    )


def read_response(wire: bytes) -> QuickResponse | None:
    """An upstream's answer of the simple shape, or None (dnspython reads the rest)."""
    if len(wire) < HEADER.size:
        return None
    response_id, flags, questions, answers, authority, additional = HEADER.unpack_from(wire)
    if (
        not flags & QR
        or flags & (OPCODE | TC | RCODE)
        or questions != 1
        or not answers
        or authority
        or additional > 1
    ):
        return None
    name = read_name(wire, HEADER.size, len(wire))
    if name is None:
        return None
    question, pos = name
    if pos + QUESTION_TAIL.size > len(wire):
        return None
    rdtype, rdclass = QUESTION_TAIL.unpack_from(wire, pos)
    pos += QUESTION_TAIL.size
    records: list[Record] = []
    for _ in range(answers):
        owner = read_name(wire, pos, len(wire))
        if owner is None:
            return None
        labels, pos = owner
        if pos + RR_TAIL.size > len(wire):
            return None
        record_type, record_class, ttl, rdlength = RR_TAIL.unpack_from(wire, pos)
        ttl_at = pos + 4
        pos += RR_TAIL.size
        rdata_end = pos + rdlength
        if record_class != CLASS_IN or rdata_end > len(wire):
            return None
        if ttl > MAX_TTL:
            ttl = 0
        if record_type in ADDRESS_LENGTH:
            if rdlength != ADDRESS_LENGTH[record_type]:
                return None
            address = ipaddress.ip_address(wire[pos:rdata_end])
            records.append(Record(_lower(labels), record_type, ttl, ttl_at, address=address))
        elif record_type == TYPE_CNAME:
            target = read_name(wire, pos, rdata_end)
            if target is None or target[1] != rdata_end:
                return None
            records.append(
                Record(_lower(labels), record_type, ttl, ttl_at, target=_lower(target[0]))
            )
        else:
            return None
        pos = rdata_end
    rest = _opt_and_end(wire, pos, additional)
    if rest is None or rest[1] >> 24:  # an extended rcode: not NOERROR
        return None
    return QuickResponse(
        id=response_id,
        flags=flags,
        question=_lower(question),
        rdtype=rdtype,
        rdclass=rdclass,
        records=tuple(records),
        opt_at=rest[2],
    )


def with_ttls(wire: bytes, ttls: list[tuple[int, int]]) -> bytes:
    """``wire`` with the TTL fields at the given offsets set: (offset, ttl) each."""
    patched = bytearray(wire)
    for offset, ttl in ttls:
        struct.pack_into("!I", patched, offset, ttl)
    return bytes(patched)


def without_opt(wire: bytes, opt_at: int) -> bytes:
    """``wire`` without its OPT record (the last record, the only additional one)."""
    return wire[:10] + b"\0\0" + wire[12:opt_at]

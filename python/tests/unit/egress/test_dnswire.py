"""The quick wire readers against dnspython: whatever they accept, dnspython reads the same way.

Each generated or mutated message is read twice, once with the quick path and
once with it switched off (dnspython alone); the decisions (the question, the
chain, the addresses and their TTLs, the rcode, the cache's TTL, the reply's
records) must agree, and the quick path must never accept what dnspython
refuses.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from typing import Any
from unittest import mock

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keel.egress import answers, dnswire
from keel.egress.answers import (
    AnswerCache,
    Query,
    Refusal,
    Response,
    cache_ttl,
    matches_question,
    parse_response,
    read_answer,
    read_query,
    reply_wire,
)
from keel.testing import FakeClock


@contextlib.contextmanager
def dnspython_only() -> Iterator[None]:
    with (
        mock.patch.object(dnswire, "read_query", return_value=None),
        mock.patch.object(dnswire, "read_response", return_value=None),
    ):
        yield


# --- generators -------------------------------------------------------------------

LABEL = st.binary(min_size=1, max_size=8) | st.sampled_from(
    [b"www", b"WWW", b"Example", b"example", b"com", b"a-b", b"x_y", b"*", b"a.b", b"\\", b"\xff"]
)
NAMES = st.lists(LABEL, min_size=0, max_size=4).map(lambda labels: dns.name.Name([*labels, b""]))
TTLS = st.sampled_from([0, 1, 5, 60, 300, 86_400, 2**31 - 1, 2**31, 2**32 - 1])
TYPES = st.sampled_from(["A", "AAAA", "TXT", "HTTPS", "MX", "CNAME", "ANY", "AXFR"])


IDS = st.integers(0, 0xFFFF)


def mutate(wire: bytes, data: st.DataObject) -> bytes:
    """Flip, cut or extend the message a little (often not at all)."""
    kind = data.draw(st.sampled_from(["none", "none", "flip", "cut", "extend", "counts"]))
    if kind == "flip" and wire:
        at = data.draw(st.integers(0, len(wire) - 1))
        return wire[:at] + bytes([data.draw(st.integers(0, 255))]) + wire[at + 1 :]
    if kind == "cut":
        return wire[: data.draw(st.integers(0, len(wire)))]
    if kind == "extend":
        return wire + data.draw(st.binary(min_size=1, max_size=4))
    if kind == "counts" and len(wire) >= 12:
        counts = struct.pack("!HHHH", *(data.draw(st.integers(0, 3)) for _ in range(4)))
        return wire[:4] + counts + wire[12:]
    return wire


@st.composite
def queries(draw: st.DrawFn) -> bytes:
    name = draw(NAMES)
    rdtype = draw(TYPES)
    rdclass = draw(st.sampled_from(["IN", "IN", "CH"]))
    edns = draw(st.sampled_from([None, 0, 1]))
    message = dns.message.make_query(
        name,
        rdtype,
        rdclass,
        use_edns=edns,
        want_dnssec=draw(st.booleans()),
        payload=draw(st.sampled_from([0, 512, 1232, 4096, 65535])),
    )
    message.id = draw(IDS)  # drawn, not dnspython's random one: a failure must reproduce
    message.flags |= draw(st.sampled_from([0, dns.flags.CD, dns.flags.AD, dns.flags.TC]))
    if draw(st.booleans()):
        message.flags &= ~dns.flags.RD
    return bytes(message.to_wire())


def query_fields(parsed: Query | Refusal | None) -> Any:
    if not isinstance(parsed, Query):
        return parsed
    return (
        parsed.wire,
        parsed.id,
        parsed.flags,
        parsed.labels,
        parsed.sent_labels,
        parsed.rdtype,
        parsed.rdclass,
        parsed.question,
        parsed.edns,
        parsed.ednsflags,
        parsed.payload,
        parsed.text,
        parsed.max_reply,
        parsed.cache_key(),
        parsed.name,
    )


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queries(), st.data())
def test_a_query_reads_the_same_either_way(wire: bytes, data: st.DataObject) -> None:
    wire = mutate(wire, data)
    quick = dnswire.read_query(wire)
    fast = read_query(wire)
    with dnspython_only():
        slow = read_query(wire)
    if quick is not None:
        assert isinstance(slow, Query)  # dnspython accepts what the quick path accepts
    if isinstance(slow, Refusal):
        assert isinstance(fast, Refusal)
        assert fast.reply == slow.reply
    else:
        assert query_fields(fast) == query_fields(slow)
    if isinstance(fast, Query):
        assert fast.message.id == fast.id  # dnspython's reading is there when a reply needs it


NAME_POOL = [dns.name.from_text(n) for n in ("www.example.com", "edge.cdn.test", "e1.cdn.test")]
ADDRESSES = ["192.0.2.1", "192.0.2.2", "2001:db8::1"]


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(the client's query, the upstream's response) with records on and off the chain."""
    asked = draw(st.sampled_from(NAME_POOL))
    if draw(st.booleans()):
        asked = dns.name.from_text(asked.to_text().upper())
    rdtype = draw(st.sampled_from(["A", "AAAA"]))
    query = dns.message.make_query(asked, rdtype, use_edns=draw(st.sampled_from([None, 0])))
    upstream = dns.message.make_query(asked, rdtype, use_edns=0)
    query.id, upstream.id = draw(IDS), draw(IDS)  # drawn: a failure must reproduce
    response = dns.message.make_response(upstream)
    if not draw(st.booleans()):
        response.use_edns(False)
    response.set_rcode(draw(st.sampled_from([dns.rcode.NOERROR] * 9 + [dns.rcode.NXDOMAIN])))
    for _ in range(draw(st.integers(1, 6))):
        owner = draw(st.sampled_from([asked, asked, *NAME_POOL, dns.name.from_text("evil.test")]))
        if draw(st.booleans()):
            owner = dns.name.from_text(owner.to_text().upper())
        kind = draw(st.sampled_from(["A", "A", "AAAA", "CNAME", "CNAME", "A", "AAAA", "TXT"]))
        rdata: Any
        if kind == "A":
            rdata = dns.rdata.from_text("IN", "A", draw(st.sampled_from(ADDRESSES[:2])))
        elif kind == "AAAA":
            rdata = dns.rdata.from_text("IN", "AAAA", ADDRESSES[2])
        elif kind == "CNAME":
            rdata = dns.rdata.from_text("IN", "CNAME", draw(st.sampled_from(NAME_POOL)).to_text())
        else:
            rdata = dns.rdata.from_text("IN", "TXT", '"hello"')
        response.answer.append(dns.rrset.from_rdata(owner, draw(TTLS), rdata))
    if draw(st.integers(0, 7)) == 0:
        response.authority.append(
            dns.rrset.from_text("example.com.", 60, "IN", "SOA", "ns. admin. 1 60 60 600 30")
        )
    if draw(st.integers(0, 9)) == 0:
        response.flags |= dns.flags.TC
    return bytes(query.to_wire()), bytes(response.to_wire())


def answer_fields(response: Response, query: Query) -> Any:
    answer = read_answer(query, response)
    reply = dns.message.from_wire(reply_wire(answer, max_size=65535))
    records = sorted(
        (rrset.name.to_text().lower(), rrset.rdtype, rrset.ttl, sorted(r.to_text() for r in rrset))
        for rrset in reply.answer
    )
    return (
        answer.chain,
        answer.rcode,
        answer.addresses,
        reply.rcode(),
        records,
        reply.id == query.id,
        reply.edns,
        cache_ttl(response),
        matches_question(query, response, response.id),
    )


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses(), st.data())
def test_a_response_reads_the_same_either_way(
    pair: tuple[bytes, bytes], data: st.DataObject
) -> None:
    query_wire, wire = pair
    wire = mutate(wire, data)
    query = read_query(query_wire)
    assert isinstance(query, Query)
    quick = dnswire.read_response(wire)
    fast = parse_response(wire)
    with dnspython_only():
        slow = parse_response(wire)
    if quick is not None:
        assert slow is not None  # dnspython accepts what the quick path accepts
    assert (fast is None) == (slow is None)
    if fast is None or slow is None:
        return
    if fast.quick is None:  # both went through dnspython
        return
    assert answer_fields(fast, query) == answer_fields(slow, query)
    # And out of the cache, some seconds later.
    age = data.draw(st.integers(0, 90), label="age")
    aged = []
    for response in (fast, slow):
        clock = FakeClock()
        cache = AnswerCache(clock=clock)
        cache.put(query, response)
        clock.advance(age)
        hit = cache.get(query)
        aged.append(None if hit is None else answer_fields(hit, query)[:5])
    assert aged[0] == aged[1]


# --- the edges, one by one -------------------------------------------------------


def header(flags: int, qd: int, an: int, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 7, flags, qd, an, ns, ar)


QUESTION = b"\x03www\x07example\x03com\x00" + struct.pack("!HH", 1, 1)
ANSWER_FLAGS = 0x8180  # QR, RD, RA, NOERROR


def a_record(owner: bytes, ttl: int = 60, address: bytes = b"\xc0\x00\x02\x01") -> bytes:
    return owner + struct.pack("!HHIH", 1, 1, ttl, len(address)) + address


def test_a_compressed_name_is_followed_back_to_the_question() -> None:
    wire = header(ANSWER_FLAGS, 1, 1) + QUESTION + a_record(b"\xc0\x0c")
    quick = dnswire.read_response(wire)
    assert quick is not None
    assert quick.records[0].owner == (b"www", b"example", b"com")


@given(st.integers(12, 0x3FFF))
def test_pointers_forward_or_into_themselves_are_refused(target: int) -> None:
    owner_at = 12 + len(QUESTION)
    pointer = struct.pack("!H", 0xC000 | target)
    wire = header(ANSWER_FLAGS, 1, 1) + QUESTION + a_record(pointer)
    if target >= owner_at:
        assert dnswire.read_response(wire) is None
        with dnspython_only():
            assert parse_response(wire) is None


def test_a_pointer_loop_and_a_long_name_are_refused() -> None:
    owner_at = 12 + len(QUESTION)  # "a", then a pointer back to that "a"
    loop = header(ANSWER_FLAGS, 1, 1) + QUESTION + a_record(b"\x01a\xc0" + bytes([owner_at]))
    assert dnswire.read_response(loop) is None
    with dnspython_only():
        assert parse_response(loop) is None
    long_name = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"
    wire = header(0x0100, 1, 0) + long_name + struct.pack("!HH", 1, 1)
    assert dnswire.read_query(wire) is None
    assert read_query(wire) is None


def test_a_ttl_with_the_top_bit_set_reads_as_zero() -> None:
    wire = header(ANSWER_FLAGS, 1, 1) + QUESTION + a_record(b"\xc0\x0c", ttl=2**31)
    quick = dnswire.read_response(wire)
    assert quick is not None
    assert quick.records[0].ttl == 0
    with dnspython_only():
        slow = parse_response(wire)
    assert slow is not None
    assert slow.message.answer[0].ttl == 0


def test_two_cnames_for_one_owner_go_to_dnspython() -> None:
    query = read_query(dns.message.make_query("www.example.com", "A").to_wire())
    assert isinstance(query, Query)
    response = dns.message.make_response(query.message)
    for target in ("b.test.", "a.test."):
        response.answer.append(dns.rrset.from_text("www.example.com.", 60, "IN", "CNAME", target))
    response.answer.append(dns.rrset.from_text("b.test.", 60, "IN", "A", "192.0.2.9"))
    parsed = parse_response(response.to_wire())
    assert parsed is not None
    assert parsed.quick is not None
    answer = read_answer(query, parsed)
    assert answer.chain == ("www.example.com", "a.test")  # dnspython keeps the last CNAME
    assert answer.addresses == ()  # b.test is off that chain


def test_an_rrset_lives_as_long_as_its_shortest_record() -> None:
    query = read_query(dns.message.make_query("www.example.com", "A").to_wire())
    assert isinstance(query, Query)
    response = dns.message.make_response(query.message)
    for ttl, address in ((300, "192.0.2.1"), (60, "192.0.2.2")):
        response.answer.append(dns.rrset.from_text("www.example.com.", ttl, "IN", "A", address))
    parsed = parse_response(response.to_wire())
    assert parsed is not None
    assert parsed.quick is not None
    assert {str(a.address): a.ttl for a in read_answer(query, parsed).addresses} == {
        "192.0.2.1": 60,
        "192.0.2.2": 60,
    }


def test_a_pointer_to_labels_that_run_into_the_pointing_name_is_refused() -> None:
    # The owner is the label "\x00", then a pointer to the question's last
    # byte ("\x01" of its class): read from there, a one-byte label whose byte
    # is the owner's own first byte, then the owner's "\x00" as the root. The
    # pointed-to labels overlap the name that points to them: refused.
    owner_at = 12 + len(QUESTION)
    owner = b"\x01\x00\xc0" + bytes([owner_at - 1])
    wire = header(ANSWER_FLAGS, 1, 1) + QUESTION + a_record(owner)
    assert dnswire.read_response(wire) is None
    with dnspython_only():
        assert parse_response(wire) is None


def test_other_opcodes_never_take_the_fast_path() -> None:
    message = dns.message.make_query("www.example.com", "A")
    for opcode in range(1, 16):
        message.set_opcode(opcode)  # type: ignore[arg-type]
        assert dnswire.read_query(message.to_wire()) is None


def test_a_client_without_edns_gets_no_opt_record() -> None:
    for edns in (None, 0):
        query = read_query(dns.message.make_query("www.example.com", "A", use_edns=edns).to_wire())
        assert isinstance(query, Query)
        upstream = dns.message.make_response(
            dns.message.make_query("www.example.com", "A", use_edns=0)
        )
        upstream.answer.append(dns.rrset.from_text("www.example.com.", 60, "IN", "A", "192.0.2.1"))
        for quick in (True, False):
            with contextlib.nullcontext() if quick else dnspython_only():
                parsed = parse_response(upstream.to_wire())
                assert parsed is not None
                reply = dns.message.from_wire(reply_wire(read_answer(query, parsed), max_size=512))
            assert (reply.edns >= 0) == (edns is not None)
            assert [str(r) for r in reply.answer[0]] == ["192.0.2.1"]


def test_the_fast_path_takes_the_common_messages() -> None:
    query = dns.message.make_query("www.example.com", "A", use_edns=0, want_dnssec=True)
    assert dnswire.read_query(query.to_wire()) is not None
    assert dnswire.read_query(dns.message.make_query("www.example.com", "A").to_wire()) is not None
    response = dns.message.make_response(query)
    response.answer.append(
        dns.rrset.from_text("www.example.com.", 60, "IN", "CNAME", "e.cdn.test.")
    )
    response.answer.append(
        dns.rrset.from_text("e.cdn.test.", 20, "IN", "A", "192.0.2.1", "192.0.2.2")
    )
    assert dnswire.read_response(response.to_wire()) is not None
    assert answers.Response.of(response).quick is None


def test_a_name_pointing_into_the_header_is_left_to_dnspython() -> None:
    # A CNAME whose target points at offset 1 (the id's second byte, 00: the root name):
    # forwarding the answer as it came, under the client's id, would make it a name that
    # runs past the message. Found by test_a_response_reads_the_same_either_way in make test.
    query = dns.message.make_query("edge.cdn.test", "AAAA", use_edns=0)
    query.id = 0x340C  # its second byte reads as a label of 12 bytes
    upstream = bytes.fromhex("7a0081000001000100000001") + (  # 00 there: the root name
        b"\x04EDGE\x03CDN\x04TEST\x00\x00\x1c\x00\x01"
        b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x01\x2c\x00\x02\xc0\x01"
        b"\x00\x00\x29\x20\x00\x00\x00\x00\x00\x00\x00"
    )
    assert dnswire.read_name(upstream, 43, len(upstream)) is None
    assert dnswire.read_response(upstream) is None  # the quick path refuses it
    parsed = read_query(query.to_wire())
    assert isinstance(parsed, Query)
    response = parse_response(upstream)
    if response is not None:  # dnspython's path: the reply is encoded afresh, and parses
        answer = read_answer(parsed, response)
        dns.message.from_wire(reply_wire(answer, max_size=65535))

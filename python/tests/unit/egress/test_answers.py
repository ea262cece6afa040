"""Reading queries, shaping answers along the CNAME chain, the cache (with a fake clock)."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.egress.answers import (
    AnswerCache,
    Query,
    Refusal,
    cache_ttl,
    denial,
    matches_question,
    read_answer,
    read_query,
    reply_wire,
    upstream_query,
)
from keel.testing import FakeClock


def query(name: str = "www.example.com", rdtype: str = "A", **kwargs: object) -> Query:
    parsed = read_query(dns.message.make_query(name, rdtype, **kwargs).to_wire())  # type: ignore[arg-type]
    assert isinstance(parsed, Query)
    return parsed


def response(
    asked: Query, *records: tuple[str, int, str, str], rcode: int = 0
) -> dns.message.Message:
    message = dns.message.make_response(asked.message)
    message.set_rcode(dns.rcode.Rcode(rcode))
    for owner, ttl, rdtype, value in records:
        message.answer.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, value))
    return message


def addresses(answer_: object) -> dict[str, int]:
    return {str(a.address): a.ttl for a in answer_.addresses}  # type: ignore[attr-defined]


def test_a_query_is_read() -> None:
    q = query("WWW.Example.com.", "AAAA")
    assert q.labels == (b"www", b"example", b"com")
    assert q.text == "www.example.com"
    assert q.type_text == "AAAA"


def test_other_opcodes_are_refused() -> None:
    message = dns.message.make_query("example.com", "A")
    message.set_opcode(dns.opcode.NOTIFY)
    parsed = read_query(message.to_wire())
    assert isinstance(parsed, Refusal)
    assert dns.message.from_wire(parsed.reply).rcode() == dns.rcode.NOTIMP


def test_zone_transfers_and_other_classes_are_refused() -> None:
    for rdtype in ("AXFR", "IXFR"):
        parsed = read_query(dns.message.make_query("example.com", rdtype).to_wire())
        assert isinstance(parsed, Refusal)
    chaos = read_query(dns.message.make_query("version.bind", "TXT", "CH").to_wire())
    assert isinstance(chaos, Refusal)


def test_responses_and_garbage_are_dropped() -> None:
    reply = dns.message.make_response(dns.message.make_query("example.com", "A"))
    assert read_query(reply.to_wire()) is None
    assert read_query(b"") is None
    assert read_query(b"\x00" * 11) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_no_bytes_crash_the_reader(data: bytes) -> None:
    result = read_query(data)
    assert result is None or isinstance(result, Query | Refusal)


def test_denial_is_nxdomain_for_the_same_question() -> None:
    q = query()
    reply = dns.message.from_wire(denial(q))
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.id == q.message.id
    assert reply.question == q.message.question
    assert not reply.answer


def test_upstream_gets_only_the_question() -> None:
    q = query(want_dnssec=True)
    sent = dns.message.from_wire(upstream_query(q, 4242))
    assert sent.id == 4242
    assert sent.question == q.message.question
    assert sent.ednsflags & dns.flags.DO
    assert sent.payload == 1232


def test_an_upstream_answer_must_echo_the_question() -> None:
    q = query()
    good = response(q)
    good.id = 7
    assert matches_question(q, good, 7)
    assert not matches_question(q, good, 8)
    other = dns.message.make_response(dns.message.make_query("evil.test", "A"))
    other.id = 7
    assert not matches_question(q, other, 7)


def test_a_chain_from_the_asked_name_allows_its_final_addresses() -> None:
    q = query("www.example.com")
    upstream = response(
        q,
        ("www.example.com.", 300, "CNAME", "edge.cdn.test."),
        ("edge.cdn.test.", 60, "CNAME", "e1.cdn.test."),
        ("e1.cdn.test.", 20, "A", "192.0.2.1"),
        ("e1.cdn.test.", 20, "A", "192.0.2.2"),
    )
    shaped = read_answer(q, upstream)
    assert shaped.chain == ("www.example.com", "edge.cdn.test", "e1.cdn.test")
    assert addresses(shaped) == {"192.0.2.1": 20, "192.0.2.2": 20}
    assert all(a.name == "www.example.com" for a in shaped.addresses)
    assert {r.name.to_text() for r in shaped.reply.answer} == {
        "www.example.com.",
        "edge.cdn.test.",
        "e1.cdn.test.",
    }


def test_records_off_the_chain_are_neither_inserted_nor_passed_on() -> None:
    q = query("www.example.com")
    upstream = response(
        q,
        ("www.example.com.", 300, "A", "192.0.2.1"),
        ("evil.test.", 300, "A", "203.0.113.66"),
        ("other.example.com.", 300, "CNAME", "www.example.com."),
    )
    upstream.additional.append(dns.rrset.from_text("ns.evil.test.", 300, "IN", "A", "203.0.113.67"))
    shaped = read_answer(q, upstream)
    assert addresses(shaped) == {"192.0.2.1": 300}
    assert [r.name.to_text() for r in shaped.reply.answer] == ["www.example.com."]
    assert not shaped.reply.additional


def test_a_looping_chain_is_servfail_and_inserts_nothing() -> None:
    q = query("a.example.com")
    upstream = response(
        q,
        ("a.example.com.", 300, "CNAME", "b.example.com."),
        ("b.example.com.", 300, "CNAME", "a.example.com."),
        ("b.example.com.", 300, "A", "192.0.2.1"),
    )
    shaped = read_answer(q, upstream)
    assert shaped.rcode == dns.rcode.SERVFAIL
    assert shaped.addresses == ()


def test_https_address_hints_count_as_addresses() -> None:
    q = query("www.example.com", "HTTPS")
    upstream = response(
        q,
        (
            "www.example.com.",
            120,
            "HTTPS",
            '1 . alpn="h2" ipv4hint="192.0.2.7" ipv6hint="2001:db8::7"',
        ),
    )
    assert addresses(read_answer(q, upstream)) == {"192.0.2.7": 120, "2001:db8::7": 120}


def test_aaaa_and_a_negative_answer() -> None:
    q = query("www.example.com", "AAAA")
    shaped = read_answer(q, response(q, ("www.example.com.", 50, "AAAA", "2001:db8::1")))
    assert shaped.addresses[0].address == ipaddress.ip_address("2001:db8::1")
    negative = response(q, rcode=dns.rcode.NXDOMAIN)
    assert read_answer(q, negative).rcode == dns.rcode.NXDOMAIN
    assert read_answer(q, negative).addresses == ()


def test_a_reply_too_large_for_udp_is_truncated() -> None:
    q = query("www.example.com")
    upstream = response(q, *[("www.example.com.", 60, "A", f"192.0.2.{i}") for i in range(1, 100)])
    shaped = read_answer(q, upstream)
    small = dns.message.from_wire(reply_wire(shaped, max_size=q.max_reply))
    assert small.flags & dns.flags.TC
    assert not small.answer
    full = dns.message.from_wire(reply_wire(shaped, max_size=65535))
    assert sum(len(r) for r in full.answer) == 99


def test_cache_ttls_positive_and_negative() -> None:
    q = query()
    assert cache_ttl(response(q, ("www.example.com.", 40, "A", "192.0.2.1"))) == 40
    negative = response(q, rcode=dns.rcode.NXDOMAIN)
    negative.authority.append(
        dns.rrset.from_text("example.com.", 900, "IN", "SOA", "ns. admin. 1 60 60 600 30")
    )
    assert cache_ttl(negative) == 30
    assert cache_ttl(response(q, rcode=dns.rcode.SERVFAIL)) == 0


def test_the_cache_ages_answers_and_forgets_them() -> None:
    clock = FakeClock()
    cache = AnswerCache(clock=clock, max_entries=2)
    q = query()
    upstream = response(q, ("www.example.com.", 10, "A", "192.0.2.1"))
    cache.put(q, upstream, upstream.to_wire())
    clock.advance(4)
    hit = cache.get(query())
    assert hit is not None
    assert hit.message.answer[0].ttl == 6
    clock.advance(6)
    assert cache.get(q) is None
    assert (cache.hits, cache.misses) == (1, 1)


def test_the_cache_keeps_the_most_recently_used() -> None:
    clock = FakeClock()
    cache = AnswerCache(clock=clock, max_entries=2)
    for name in ("a.test", "b.test", "c.test"):
        q = query(name)
        r = response(q, (f"{name}.", 60, "A", "192.0.2.1"))
        cache.put(q, r, r.to_wire())
    assert len(cache) == 2
    assert cache.get(query("a.test")) is None
    assert cache.get(query("c.test")) is not None


def test_an_untouched_answer_goes_out_as_received_with_the_clients_id() -> None:
    q = query("www.example.com")
    upstream = response(q, ("www.example.com.", 60, "A", "192.0.2.1"))
    upstream.id = 999
    raw = upstream.to_wire()
    shaped = read_answer(q, upstream, raw)
    sent = reply_wire(shaped, max_size=q.max_reply)
    assert sent[2:] == raw[2:]
    assert dns.message.from_wire(sent).id == q.message.id


def test_a_shaped_answer_is_encoded_anew() -> None:
    q = query("www.example.com")
    upstream = response(
        q, ("www.example.com.", 60, "A", "192.0.2.1"), ("evil.test.", 60, "A", "203.0.113.9")
    )
    shaped = read_answer(q, upstream, upstream.to_wire())
    assert shaped.verbatim is None
    sent = dns.message.from_wire(reply_wire(shaped, max_size=q.max_reply))
    assert [r.name.to_text() for r in sent.answer] == ["www.example.com."]

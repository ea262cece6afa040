"""The DNS side of egress, with no I/O: read a query, decide, shape the answer.

The proxy (``keel.egress.proxy``) feeds this module bytes and gets bytes and
decisions back:

- :func:`read_query` turns a client's datagram into a :class:`Query`, or
  ``None`` for anything that is not a well-formed question (dropped, nothing
  inserted, no crash), or a :class:`Refusal` for a well-formed message the
  proxy does not serve (FORMERR, NOTIMP);
- :func:`upstream_query` is what goes upstream for an allowed name;
- :func:`read_answer` takes the upstream's response and follows the CNAME
  chain that starts at the asked name: the reply keeps only that chain, and
  the addresses (A, AAAA, and the address hints of HTTPS/SVCB records) of
  names on it are what the agent's sets must hold before the reply is sent;
- :class:`AnswerCache` keeps upstream answers for their TTL; a hit is
  answered with the remaining TTL and its addresses are inserted again, so a
  cached answer refreshes the sets exactly like a fresh one.

A chain that starts at an allowed name allows its final addresses; a chain
that starts elsewhere never gets here, because the question is decided on
the asked name alone (:func:`keel.egress.allowlist.Allowlist.allows`).
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.svcbbase
import dns.rrset

from keel.egress.allowlist import Labels, wire_labels

MAX_CHAIN = 16  # CNAME hops followed; a longer chain is answered SERVFAIL
UPSTREAM_PAYLOAD = 1232  # EDNS buffer size asked of upstreams (the DNS flag day value)
MIN_CLIENT_PAYLOAD = 512
ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
HINT_TYPES = (dns.rdatatype.HTTPS, dns.rdatatype.SVCB)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Query:
    """A client's question, parsed and checked."""

    message: dns.message.Message
    name: dns.name.Name
    labels: Labels
    rdtype: dns.rdatatype.RdataType
    rdclass: dns.rdataclass.RdataClass

    @property
    def text(self) -> str:
        """The asked name for people and the ledger (escaped, no trailing dot)."""
        return self.name.to_text(omit_final_dot=True).lower()

    @property
    def type_text(self) -> str:
        return dns.rdatatype.to_text(self.rdtype)

    @property
    def max_reply(self) -> int:
        """How large a UDP reply the client accepts."""
        if self.message.edns >= 0:
            return max(MIN_CLIENT_PAYLOAD, min(self.message.payload, 65535))
        return MIN_CLIENT_PAYLOAD

    @property
    def dnssec_ok(self) -> bool:
        return bool(self.message.ednsflags & dns.flags.DO)

    @property
    def checking_disabled(self) -> bool:
        return bool(self.message.flags & dns.flags.CD)

    def cache_key(self) -> tuple[Labels, int, int, bool, bool]:  # hashable, stable
        return (self.labels, self.rdtype, self.rdclass, self.dnssec_ok, self.checking_disabled)


@dataclass(frozen=True)
class Refusal:
    """A well-formed message the proxy answers with an error code, not a resolution."""

    reply: bytes
    reason: str


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    reply = dns.message.make_response(query, our_payload=UPSTREAM_PAYLOAD)
    reply.set_rcode(rcode)
    reply.flags |= dns.flags.RA
    return reply


def read_query(wire: bytes) -> Query | Refusal | None:
    """A client's message: a :class:`Query`, a :class:`Refusal`, or None to drop it.

    Dropped: anything that does not parse, responses (QR set, which would
    let a reflection loop run through the proxy), and messages whose header
    cannot even be answered.
    """
    try:
        message = dns.message.from_wire(wire, ignore_trailing=False)
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
        return None
    if message.flags & dns.flags.QR:
        return None
    if message.opcode() != dns.opcode.QUERY:
        return Refusal(_reply(message, dns.rcode.NOTIMP).to_wire(), "opcode is not QUERY")
    if len(message.question) != 1 or message.answer or message.authority:
        return Refusal(_reply(message, dns.rcode.FORMERR).to_wire(), "not exactly one question")
    question = message.question[0]
    if question.rdclass != dns.rdataclass.IN:
        return Refusal(_reply(message, dns.rcode.REFUSED).to_wire(), "class is not IN")
    if question.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR, dns.rdatatype.OPT):
        return Refusal(_reply(message, dns.rcode.REFUSED).to_wire(), "zone transfers are refused")
    return Query(
        message=message,
        name=question.name,
        labels=wire_labels(question.name.labels),
        rdtype=dns.rdatatype.RdataType(question.rdtype),
        rdclass=dns.rdataclass.RdataClass(question.rdclass),
    )


def denial(query: Query) -> bytes:
    """NXDOMAIN for a name the agent may not resolve."""
    return _reply(query.message, dns.rcode.NXDOMAIN).to_wire()


def server_failure(query: Query) -> bytes:
    """SERVFAIL: no upstream answered, or its answer could not be used."""
    return _reply(query.message, dns.rcode.SERVFAIL).to_wire()


def upstream_query(query: Query, query_id: int) -> bytes:
    """The question as keel asks it upstream: the client's name, type and DO/CD, nothing else.

    Nothing else of the client's message (its EDNS options, extra records)
    travels upstream. Written by hand (a header, the question, an OPT
    record): it is on every query's path.
    """
    flags = dns.flags.RD | (dns.flags.CD if query.checking_disabled else 0)
    header = struct.pack("!HHHHHH", query_id, flags, 1, 0, 0, 1)
    name = query.name.to_wire()
    assert name is not None  # (to_wire without a file returns the bytes)
    question = name + struct.pack("!HH", query.rdtype, query.rdclass)
    do_bit = dns.flags.DO if query.dnssec_ok else 0
    opt = b"\0" + struct.pack("!HHIH", dns.rdatatype.OPT, UPSTREAM_PAYLOAD, do_bit, 0)
    return header + question + opt


def matches_question(query: Query, response: dns.message.Message, query_id: int) -> bool:
    """Whether ``response`` answers what was asked (id, QR and the question echoed)."""
    if response.id != query_id or not response.flags & dns.flags.QR:
        return False
    if len(response.question) != 1:
        return False
    echoed = response.question[0]
    return (
        echoed.name == query.name
        and echoed.rdtype == query.rdtype
        and echoed.rdclass == query.rdclass
    )


def parse_response(wire: bytes) -> dns.message.Message | None:
    """An upstream's message, or None when it does not parse."""
    try:
        return dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
        return None


@dataclass(frozen=True)
class Address:
    """An address the agent may connect to, for ``ttl`` seconds, because of ``name``."""

    address: IPAddress
    ttl: int
    name: str  # the asked name (what the agent asked for, not the chain's end)


@dataclass(frozen=True)
class Answer:
    """The reply for the client and the addresses its sets must hold first.

    The reply message is built only when it is needed: an answer that lost
    nothing in shaping goes out as the upstream's own bytes (``verbatim``)
    with the client's id, which spares a decoding's worth of encoding.
    """

    query: Query
    response: dns.message.Message
    names: tuple[dns.name.Name, ...]  # the chain followed, the asked name first
    answer: tuple[dns.rrset.RRset, ...]  # what is kept of the answer section
    authority: tuple[dns.rrset.RRset, ...]
    rcode: int
    addresses: tuple[Address, ...]
    verbatim: bytes | None = None

    @functools.cached_property
    def chain(self) -> tuple[str, ...]:
        return tuple(name.to_text(omit_final_dot=True).lower() for name in self.names)

    @functools.cached_property
    def reply(self) -> dns.message.Message:
        reply = dns.message.make_response(self.query.message, our_payload=UPSTREAM_PAYLOAD)
        reply.flags |= self.response.flags & (dns.flags.RA | dns.flags.AD)
        reply.set_rcode(dns.rcode.Rcode(self.rcode))
        reply.answer = list(self.answer)
        reply.authority = list(self.authority)
        return reply


def _hints(rrset: dns.rrset.RRset) -> list[IPAddress]:
    found: list[IPAddress] = []
    for rdata in rrset:
        params = getattr(rdata, "params", {})
        for key in (dns.rdtypes.svcbbase.ParamKey.IPV4HINT, dns.rdtypes.svcbbase.ParamKey.IPV6HINT):
            hint = params.get(key)
            if hint is not None:
                found.extend(ipaddress.ip_address(a) for a in hint.addresses)
    return found


def follow_chain(
    start: dns.name.Name, answer: list[dns.rrset.RRset]
) -> tuple[list[dns.name.Name], bool]:
    """The names from ``start`` along the CNAMEs of ``answer``; False when it loops or is too long."""
    cnames = {rrset.name: rrset for rrset in answer if rrset.rdtype == dns.rdatatype.CNAME}
    chain = [start]
    seen = {start}
    current = start
    while current in cnames:
        target: dns.name.Name = cnames[current][0].target
        if target in seen or len(chain) > MAX_CHAIN:
            return chain, False
        chain.append(target)
        seen.add(target)
        current = target
    return chain, True


def read_answer(query: Query, response: dns.message.Message, wire: bytes | None = None) -> Answer:
    """Shape the upstream's response for the client and list the addresses it allows.

    Only records of names on the chain that starts at the asked name are
    kept (a resolver that adds records of other names does not get them
    into the sets, nor to the client); the authority section keeps SOA and
    NS (negative caching); additional records are dropped. ``wire`` is the
    response as received: when nothing is dropped it is what the client gets.
    """
    chain, complete = follow_chain(query.name, response.answer)
    if not complete:
        return Answer(query, response, tuple(chain), (), (), dns.rcode.SERVFAIL, ())
    on_chain = set(chain)
    addresses: dict[IPAddress, int] = {}
    kept: list[dns.rrset.RRset] = []
    for rrset in response.answer:
        if rrset.name not in on_chain:
            continue
        kept.append(rrset)
        found: list[IPAddress] = []
        if rrset.rdtype in ADDRESS_TYPES:
            found = [ipaddress.ip_address(rdata.address) for rdata in rrset]
        elif rrset.rdtype in HINT_TYPES:
            found = _hints(rrset)
        for address in found:
            addresses[address] = max(addresses.get(address, 0), int(rrset.ttl))
    authority = tuple(
        rrset
        for rrset in response.authority
        if rrset.rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS)
    )
    untouched = (
        len(kept) == len(response.answer)
        and len(authority) == len(response.authority)
        and not response.additional
    )
    asked = query.text
    return Answer(
        query=query,
        response=response,
        names=tuple(chain),
        answer=tuple(kept),
        authority=authority,
        rcode=int(response.rcode()),
        addresses=tuple(Address(a, ttl, asked) for a, ttl in addresses.items()),
        verbatim=wire if untouched else None,
    )


def reply_wire(answer: Answer, *, max_size: int) -> bytes:
    """The reply in at most ``max_size`` bytes; too large sets TC (the client retries over TCP)."""
    if answer.verbatim is not None and len(answer.verbatim) <= max_size:
        return answer.query.message.id.to_bytes(2, "big") + answer.verbatim[2:]
    try:
        return answer.reply.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        reply = answer.reply
        truncated = dns.message.Message(id=reply.id)
        truncated.flags = reply.flags | dns.flags.TC
        truncated.question = list(reply.question)
        truncated.set_rcode(reply.rcode())
        if reply.edns >= 0:
            truncated.use_edns(reply.edns, reply.ednsflags, reply.payload)
        return truncated.to_wire(max_size=max_size)


# --- the cache ---------------------------------------------------------------


def cache_ttl(response: dns.message.Message) -> int:
    """How long a response may be reused: its smallest TTL; negative answers by their SOA."""
    rcode = response.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or response.flags & dns.flags.TC:
        return 0
    if response.answer and rcode == dns.rcode.NOERROR:
        return min(int(rrset.ttl) for rrset in response.answer)
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(int(rrset.ttl), int(rrset[0].minimum))
    return 0


@dataclass
class _Cached:
    wire: bytes
    stored: float
    expires: float


class AnswerCache:
    """Upstream responses by question, for at most their TTL (and ``max_ttl``).

    ``get`` returns the response with every TTL lowered by the time it was
    kept, so the client (and the sets) see what is left of it. The least
    recently used entry goes first when ``max_entries`` is reached.
    """

    def __init__(
        self, *, clock: Callable[[], float], max_entries: int = 10_000, max_ttl: int = 86_400
    ) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self._entries: collections.OrderedDict[object, _Cached] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, query: Query, response: dns.message.Message, wire: bytes) -> None:
        ttl = min(cache_ttl(response), self.max_ttl)
        if ttl <= 0 or self.max_entries <= 0:
            return
        now = self.clock()
        key = query.cache_key()
        self._entries[key] = _Cached(wire, now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, query: Query) -> dns.message.Message | None:
        key = query.cache_key()
        entry = self._entries.get(key)
        now = self.clock()
        if entry is None or now >= entry.expires:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        message = parse_response(entry.wire)
        if message is None:  # cannot happen: only parsed responses are stored
            del self._entries[key]
            self.misses += 1
            return None
        age = int(now - entry.stored)
        for section in (message.answer, message.authority):
            for rrset in section:
                rrset.ttl = max(0, int(rrset.ttl) - age)
        self.hits += 1
        return message

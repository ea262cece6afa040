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

Messages of the common shapes are read by :mod:`keel.egress.dnswire` straight
from the wire; everything else by dnspython (exact, and ten times slower).
Both paths give the same decisions; dnspython's objects (``Query.message``,
``Response.message``) are built only when a reply needs them.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

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

from keel.egress import dnswire
from keel.egress.allowlist import Labels, wire_labels

MAX_CHAIN = 16  # CNAME hops followed; a longer chain is answered SERVFAIL
UPSTREAM_PAYLOAD = 1232  # EDNS buffer size asked of upstreams (the DNS flag day value)
MIN_CLIENT_PAYLOAD = 512
ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
HINT_TYPES = (dns.rdatatype.HTTPS, dns.rdatatype.SVCB)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# Labels whose text form needs no escaping (dnspython escapes anything else).
_PLAIN_TEXT = re.compile(rb"[A-Za-z0-9_*-]+(\.[A-Za-z0-9_*-]+)*\Z")


@dataclass(frozen=True)
class Query:
    """A client's question, parsed and checked."""

    wire: bytes
    id: int
    flags: int
    labels: Labels  # comparable: lowercased (allowlist.wire_labels)
    sent_labels: Labels  # as the client wrote them
    rdtype: dns.rdatatype.RdataType
    rdclass: dns.rdataclass.RdataClass
    question: bytes  # the question section as sent: name, type, class
    edns: int  # -1: no EDNS
    ednsflags: int
    payload: int
    parsed: dns.message.Message | None = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def message(self) -> dns.message.Message:
        """dnspython's reading of the question (built when a reply needs it)."""
        return self.parsed or dns.message.from_wire(self.wire, ignore_trailing=False)

    @functools.cached_property
    def name(self) -> dns.name.Name:
        return dns.name.Name((*self.sent_labels, b""))

    @functools.cached_property
    def text(self) -> str:
        """The asked name for people and the ledger (escaped, no trailing dot)."""
        joined = b".".join(self.labels)
        if _PLAIN_TEXT.match(joined):
            return joined.decode("ascii")
        return self.name.to_text(omit_final_dot=True).lower()

    @property
    def type_text(self) -> str:
        return dns.rdatatype.to_text(self.rdtype)

    @property
    def max_reply(self) -> int:
        """How large a UDP reply the client accepts."""
        if self.edns >= 0:
            return max(MIN_CLIENT_PAYLOAD, min(self.payload, 65535))
        return MIN_CLIENT_PAYLOAD

    @property
    def dnssec_ok(self) -> bool:
        return bool(self.ednsflags & dns.flags.DO)

    @property
    def checking_disabled(self) -> bool:
        return bool(self.flags & dns.flags.CD)

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
    quick = dnswire.read_query(wire)
    if quick is not None:
        return Query(
            wire=wire,
            id=quick.id,
            flags=quick.flags,
            labels=wire_labels(quick.labels),
            sent_labels=quick.labels,
            rdtype=dns.rdatatype.RdataType.make(quick.rdtype),
            rdclass=dns.rdataclass.IN,
            question=wire[dnswire.HEADER.size : quick.question_end],
            edns=quick.edns,
            ednsflags=quick.ednsflags,
            payload=quick.payload,
        )
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
    name = question.name.to_wire()
    assert name is not None  # (to_wire without a file returns the bytes)
    return Query(
        wire=wire,
        id=message.id,
        flags=int(message.flags),
        labels=wire_labels(question.name.labels),
        sent_labels=question.name.labels[:-1],
        rdtype=dns.rdatatype.RdataType(question.rdtype),
        rdclass=dns.rdataclass.RdataClass(question.rdclass),
        question=name + struct.pack("!HH", question.rdtype, question.rdclass),
        edns=message.edns,
        ednsflags=message.ednsflags,
        payload=message.payload,
        parsed=message,
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
    do_bit = dns.flags.DO if query.dnssec_ok else 0
    opt = b"\0" + struct.pack("!HHIH", dns.rdatatype.OPT, UPSTREAM_PAYLOAD, do_bit, 0)
    return header + query.question + opt


@dataclass(frozen=True)
class Response:
    """An upstream's message: its bytes and what keel reads of them.

    ``quick`` is :mod:`keel.egress.dnswire`'s reading when the message has the
    common shape; dnspython's (:attr:`message`) is built only when that is
    missing or a reply must be encoded anew. A response made from a
    dnspython message (tests, a cache entry) has no bytes to pass on.
    """

    wire: bytes | None
    quick: dnswire.QuickResponse | None = None
    parsed: dns.message.Message | None = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def message(self) -> dns.message.Message:
        if self.parsed is not None:
            return self.parsed
        assert self.wire is not None
        return dns.message.from_wire(self.wire)

    @property
    def id(self) -> int:
        return self.quick.id if self.quick is not None else self.message.id

    @property
    def flags(self) -> int:
        return self.quick.flags if self.quick is not None else int(self.message.flags)

    @property
    def rcode(self) -> int:
        return int(dns.rcode.NOERROR) if self.quick is not None else int(self.message.rcode())

    @classmethod
    def of(cls, response: Response | dns.message.Message, wire: bytes | None = None) -> Response:
        if isinstance(response, Response):
            return response
        return cls(wire, None, response)


def parse_response(wire: bytes) -> Response | None:
    """An upstream's message, or None when it does not parse."""
    quick = dnswire.read_response(wire)
    if quick is not None:
        return Response(wire, quick)
    try:
        message = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
        return None
    return Response(wire, None, message)


def matches_question(query: Query, response: Response | dns.message.Message, query_id: int) -> bool:
    """Whether ``response`` answers what was asked (id, QR and the question echoed)."""
    response = Response.of(response)
    if response.id != query_id or not response.flags & dns.flags.QR:
        return False
    quick = response.quick
    if quick is not None:
        return (quick.question, quick.rdtype, quick.rdclass) == (
            query.labels,
            query.rdtype,
            query.rdclass,
        )
    message = response.message
    if len(message.question) != 1:
        return False
    echoed = message.question[0]
    return (
        echoed.name == query.name
        and echoed.rdtype == query.rdtype
        and echoed.rdclass == query.rdclass
    )


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
    response: Response
    names: tuple[Labels, ...]  # the chain followed, the asked name first
    rcode: int
    addresses: tuple[Address, ...]
    verbatim: bytes | None = None
    # What is kept of the answer and authority sections (dnspython's reading);
    # None: all of the answer section, none of the authority (a quick answer).
    answer: tuple[dns.rrset.RRset, ...] | None = None
    authority: tuple[dns.rrset.RRset, ...] = ()

    @functools.cached_property
    def chain(self) -> tuple[str, ...]:
        return tuple(
            dns.name.Name((*labels, b"")).to_text(omit_final_dot=True).lower()
            for labels in self.names
        )

    @functools.cached_property
    def reply(self) -> dns.message.Message:
        reply = dns.message.make_response(self.query.message, our_payload=UPSTREAM_PAYLOAD)
        reply.flags |= self.response.flags & (dns.flags.RA | dns.flags.AD)
        reply.set_rcode(dns.rcode.Rcode(self.rcode))
        kept = self.answer if self.answer is not None else self.response.message.answer
        reply.answer = list(kept)
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


def follow_chain(start: Labels, cnames: dict[Labels, Labels]) -> tuple[list[Labels], bool]:
    """The names from ``start`` along ``cnames`` (owner -> target, comparable labels);
    False when the chain loops or is too long."""
    chain = [start]
    seen = {start}
    current = start
    while current in cnames:
        target = cnames[current]
        if target in seen or len(chain) > MAX_CHAIN:
            return chain, False
        chain.append(target)
        seen.add(target)
        current = target
    return chain, True


def _comparable(name: dns.name.Name) -> Labels:
    return wire_labels(name.labels)


def _verbatim(query: Query, wire: bytes, opt_at: int | None) -> bytes:
    """The upstream's bytes as the client may get them: without an OPT record
    when the client sent none (RFC 6891, section 7)."""
    if opt_at is not None and query.edns < 0:
        return dnswire.without_opt(wire, opt_at)
    return wire


def _quick_answer(query: Query, quick: dnswire.QuickResponse, wire: bytes) -> Answer | None:
    """The answer from a quick reading, or None when the slow path must shape it.

    Records are grouped as dnspython groups them into RRsets (by owner and
    type; an RRset's TTL is its smallest); only answers whose records all lie
    on a complete chain are taken here (the common case): the others lose
    records, or are SERVFAIL, and go through :func:`_slow_answer`.
    """
    groups: dict[tuple[Labels, int], list[dnswire.Record]] = {}
    for record in quick.records:
        groups.setdefault((record.owner, record.rdtype), []).append(record)
    cnames: dict[Labels, Labels] = {}
    for (owner, rdtype), records in groups.items():
        if rdtype == dnswire.TYPE_CNAME:
            if len(records) > 1:
                return None  # a CNAME RRset of several records: dnspython keeps the last
            assert records[0].target is not None
            cnames[owner] = records[0].target
    chain, complete = follow_chain(query.labels, cnames)
    on_chain = set(chain)
    if not complete or any(owner not in on_chain for owner, _ in groups):
        return None
    addresses: dict[IPAddress, int] = {}
    for (_owner, rdtype), records in groups.items():
        if rdtype == dnswire.TYPE_CNAME:
            continue
        ttl = min(record.ttl for record in records)
        for record in records:
            assert record.address is not None
            addresses[record.address] = max(addresses.get(record.address, 0), ttl)
    asked = query.text
    return Answer(
        query=query,
        response=Response(wire, quick),
        names=tuple(chain),
        rcode=int(dns.rcode.NOERROR),
        addresses=tuple(Address(a, ttl, asked) for a, ttl in addresses.items()),
        verbatim=_verbatim(query, wire, quick.opt_at),
    )


def _slow_answer(query: Query, response: Response) -> Answer:
    message = response.message
    cnames = {
        _comparable(rrset.name): _comparable(rrset[0].target)
        for rrset in message.answer
        if rrset.rdtype == dns.rdatatype.CNAME
    }
    chain, complete = follow_chain(query.labels, cnames)
    if not complete:
        return Answer(query, response, tuple(chain), dns.rcode.SERVFAIL, (), answer=())
    on_chain = set(chain)
    addresses: dict[IPAddress, int] = {}
    kept: list[dns.rrset.RRset] = []
    for rrset in message.answer:
        if _comparable(rrset.name) not in on_chain:
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
        for rrset in message.authority
        if rrset.rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS)
    )
    untouched = (
        response.wire is not None
        and len(kept) == len(message.answer)
        and len(authority) == len(message.authority)
        and not message.additional
        and (message.opt is None or query.edns >= 0)
        and _same_under(query.id, response.wire, message)
    )
    asked = query.text
    return Answer(
        query=query,
        response=response,
        names=tuple(chain),
        rcode=int(message.rcode()),
        addresses=tuple(Address(a, ttl, asked) for a, ttl in addresses.items()),
        verbatim=response.wire if untouched else None,
        answer=tuple(kept),
        authority=authority,
    )


def _same_under(query_id: int, wire: bytes | None, message: dns.message.Message) -> bool:
    """Whether ``wire`` says the same under the client's id (the reply's first two bytes).

    A name may point into the header (dnspython follows such a pointer), and
    there the id is part of the name: rewriting it would change, or break,
    what the answer says. Then the reply is encoded afresh instead.
    """
    if wire is None:
        return False
    rewritten = query_id.to_bytes(2, "big") + wire[2:]
    if rewritten == wire:
        return True
    try:
        again = dns.message.from_wire(rewritten)
    except (dns.exception.DNSException, ValueError):
        return False
    return (again.question, again.answer, again.authority) == (
        message.question,
        message.answer,
        message.authority,
    )


def read_answer(
    query: Query, response: Response | dns.message.Message, wire: bytes | None = None
) -> Answer:
    """Shape the upstream's response for the client and list the addresses it allows.

    Only records of names on the chain that starts at the asked name are
    kept (a resolver that adds records of other names does not get them
    into the sets, nor to the client); the authority section keeps SOA and
    NS (negative caching); additional records are dropped. ``wire`` is the
    response as received (given with a dnspython message): when nothing is
    dropped it is what the client gets.
    """
    response = Response.of(response, wire)
    if response.quick is not None and response.wire is not None:
        answer = _quick_answer(query, response.quick, response.wire)
        if answer is not None:
            return answer
    return _slow_answer(query, response)


def reply_wire(answer: Answer, *, max_size: int) -> bytes:
    """The reply in at most ``max_size`` bytes; too large sets TC (the client retries over TCP)."""
    if answer.verbatim is not None and len(answer.verbatim) <= max_size:
        return answer.query.id.to_bytes(2, "big") + answer.verbatim[2:]
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


def cache_ttl(response: Response | dns.message.Message) -> int:
    """How long a response may be reused: its smallest TTL; negative answers by their SOA."""
    response = Response.of(response)
    if response.quick is not None:  # NOERROR with answers, never truncated
        return min(record.ttl for record in response.quick.records)
    message = response.message
    rcode = message.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or message.flags & dns.flags.TC:
        return 0
    if message.answer and rcode == dns.rcode.NOERROR:
        return min(int(rrset.ttl) for rrset in message.answer)
    for rrset in message.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(int(rrset.ttl), int(rrset[0].minimum))
    return 0


@dataclass
class _Cached:
    wire: bytes
    quick: dnswire.QuickResponse | None
    stored: float
    expires: float


def _aged(wire: bytes, quick: dnswire.QuickResponse, age: int) -> Response | None:
    """A quick response with every TTL lowered by ``age`` (the RRset's, as dnspython would)."""
    smallest: dict[tuple[Labels, int], int] = {}
    for record in quick.records:
        key = (record.owner, record.rdtype)
        smallest[key] = min(smallest.get(key, record.ttl), record.ttl)
    patched = dnswire.with_ttls(
        wire,
        [
            (record.ttl_at, max(0, smallest[record.owner, record.rdtype] - age))
            for record in quick.records
        ],
    )
    again = dnswire.read_response(patched)
    return Response(patched, again) if again is not None else None


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

    def put(
        self, query: Query, response: Response | dns.message.Message, wire: bytes | None = None
    ) -> None:
        response = Response.of(response, wire)
        if response.wire is None:
            return
        ttl = min(cache_ttl(response), self.max_ttl)
        if ttl <= 0 or self.max_entries <= 0:
            return
        now = self.clock()
        key = query.cache_key()
        self._entries[key] = _Cached(response.wire, response.quick, now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, query: Query) -> Response | None:
        key = query.cache_key()
        entry = self._entries.get(key)
        now = self.clock()
        if entry is None or now >= entry.expires:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        age = int(now - entry.stored)
        if entry.quick is not None:
            aged = _aged(entry.wire, entry.quick, age)
            if aged is not None:
                self.hits += 1
                return aged
        message = parse_response(entry.wire)
        if message is None:  # cannot happen: only parsed responses are stored
            del self._entries[key]
            self.misses += 1
            return None
        parsed = message.message
        for section in (parsed.answer, parsed.authority):
            for rrset in section:
                rrset.ttl = max(0, int(rrset.ttl) - age)
        self.hits += 1
        return Response(None, None, parsed)

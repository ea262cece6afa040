"""The proxy's decisions end to end, with a fake upstream and a fake kernel set (no sockets)."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence

import dns.message
import dns.rcode
import dns.rrset
from keel.egress.allowlist import Allowlist
from keel.egress.answers import AnswerCache, Query, Response, parse_response
from keel.egress.config import AgentEgress
from keel.egress.denials import DeniedName
from keel.egress.netlink import NetlinkError
from keel.egress.proxy import Proxy
from keel.egress.sets import Insert, SetBook
from keel.testing import FakeClock


class Upstream:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def exchange(self, query: Query) -> tuple[Response, float] | None:
        self.asked.append(query.text)
        response = dns.message.make_response(query.message)
        response.answer.append(dns.rrset.from_text(query.name, 60, "IN", "A", "192.0.2.1"))
        parsed = parse_response(response.to_wire())
        assert parsed is not None
        return parsed, 0.0


class Kernel:
    """A set as the kernel keeps it: a batch is all or nothing; deleting what is absent fails."""

    def __init__(self) -> None:
        self.elements: dict[str, int] = {}
        self.comments: dict[str, str] = {}
        self.batches = 0

    def write(self, agent: str, inserts: Sequence[Insert]) -> None:
        staged = dict(self.elements)
        comments = dict(self.comments)
        for insert in inserts:
            key = str(insert.address)
            if insert.replace:
                if key not in staged:
                    raise NetlinkError("absent", errno.ENOENT)
                del staged[key]
            if key not in staged:  # adding an existing element changes nothing
                staged[key] = insert.timeout
                comments[key] = insert.comment
        self.elements, self.comments = staged, comments
        self.batches += 1

    def read(self, agent: str, address: object) -> tuple[float, str] | None:
        key = str(address)
        if key not in self.elements:
            return None
        return float(self.elements[key]), self.comments.get(key, "")


def make(
    allow: list[str], mode: str = "enforce"
) -> tuple[Proxy, Kernel, Upstream, list[DeniedName]]:
    clock = FakeClock()
    kernel, upstream = Kernel(), Upstream()
    denied: list[DeniedName] = []
    proxy = Proxy(
        upstream=upstream,  # type: ignore[arg-type]
        cache=AnswerCache(clock=clock),
        book=SetBook(clock=clock, min_ttl=30, grace=5),
        inserter=kernel,
        on_denied=denied.append,
        on_asked=lambda agent, name: None,
    )
    return proxy, kernel, upstream, denied


AGENT = AgentEgress("scout", 5301, "enforce", Allowlist.parse(["*.example.com"]), uid=1001)


def ask(proxy: Proxy, name: str, agent: AgentEgress = AGENT) -> dns.message.Message:
    wire = asyncio.run(proxy.answer(agent, dns.message.make_query(name, "A").to_wire(), tcp=False))
    assert wire is not None
    return dns.message.from_wire(wire)


def test_allowed_names_are_inserted_before_the_answer() -> None:
    proxy, kernel, upstream, denied = make([])
    reply = ask(proxy, "www.example.com")
    assert reply.rcode() == dns.rcode.NOERROR
    assert kernel.elements == {"192.0.2.1": 65}
    assert upstream.asked == ["www.example.com"]
    assert denied == []


def test_denied_names_never_go_upstream() -> None:
    proxy, kernel, upstream, denied = make([])
    assert ask(proxy, "example.com").rcode() == dns.rcode.NXDOMAIN
    assert upstream.asked == []
    assert kernel.elements == {}
    assert denied == [DeniedName("scout", "example.com", "A", True)]


def test_audit_answers_denied_names_without_inserting() -> None:
    proxy, kernel, _upstream, denied = make([])
    audited = AgentEgress("scout", 5301, "audit", Allowlist.parse(["*.example.com"]), uid=1001)
    assert ask(proxy, "other.test", audited).rcode() == dns.rcode.NOERROR
    assert kernel.elements == {}
    assert denied == [DeniedName("scout", "other.test", "A", False)]


def test_after_a_restart_an_element_already_there_is_refreshed_not_left_as_it_was() -> None:
    proxy, kernel, _upstream, _ = make([])
    kernel.elements = {"192.0.2.1": 3}  # left by the previous daemon, about to expire
    proxy.book.expect("scout")
    ask(proxy, "www.example.com")
    assert kernel.elements == {"192.0.2.1": 65}


def test_after_a_restart_an_unknown_address_is_added_after_a_failed_replace() -> None:
    proxy, kernel, _upstream, _ = make([])
    proxy.book.expect("scout")
    ask(proxy, "www.example.com")
    assert kernel.elements == {"192.0.2.1": 65}


def test_malformed_input_is_dropped_and_counted() -> None:
    proxy, kernel, _upstream, _ = make([])
    assert asyncio.run(proxy.answer(AGENT, b"\x00\x01garbage", tcp=False)) is None
    assert proxy.counters_of("scout").malformed == 1
    assert kernel.batches == 0

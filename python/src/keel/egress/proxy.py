"""The DNS proxy: one UDP and one TCP listener per agent, and the upstream client.

An agent's DNS (any resolver, port 53, UDP or TCP) is redirected by the
kernel to its own port on loopback, so the port says which agent asks. For
each question :meth:`Proxy.answer` asks the cores what to do
(:mod:`keel.egress.answers`, :mod:`keel.egress.sets`), asks upstream (or the
cache), writes the addresses to the agent's sets and only then returns the
reply: the agent cannot hold an address its sets do not. When the kernel
refuses an insertion the agent gets SERVFAIL, never an answer it could not
use.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import dns.flags
import dns.rcode

from keel.egress.answers import (
    AnswerCache,
    IPAddress,
    Query,
    Refusal,
    Response,
    denial,
    matches_question,
    parse_response,
    read_answer,
    read_query,
    reply_wire,
    server_failure,
    upstream_query,
)
from keel.egress.config import AgentEgress, Upstream
from keel.egress.denials import DeniedName
from keel.egress.netlink import NetlinkError
from keel.egress.sets import Insert, SetBook, names_of

log = logging.getLogger("keel.egress.proxy")

MAX_INFLIGHT = 256  # UDP questions one agent may have open; more are dropped
MAX_TCP_CLIENTS = 64  # TCP connections per agent
TCP_IDLE = 10.0  # seconds a TCP client may stay silent
MAX_MESSAGE = 65535


TIMINGS = 1024  # recent answers whose timings status reports


@dataclass
class Counters:
    queries: int = 0
    denied: int = 0
    malformed: int = 0
    refused: int = 0
    upstream_failures: int = 0
    insert_failures: int = 0
    dropped: int = 0  # over MAX_INFLIGHT
    # Seconds per recent answer: keel's own work (all but the wait for the
    # upstream) and the upstream's part.
    work: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=TIMINGS)
    )
    upstream: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=TIMINGS)
    )

    def as_dict(self) -> dict[str, Any]:
        counts: dict[str, Any] = {k: v for k, v in vars(self).items() if isinstance(v, int)}
        counts["work_ms"] = _percentiles(self.work)
        counts["upstream_ms"] = _percentiles(self.upstream)
        return counts


def _percentiles(samples: collections.deque[float]) -> dict[str, float] | None:
    if not samples:
        return None
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50": pick(0.5), "p99": pick(0.99), "samples": len(ordered)}


class SetInserter(Protocol):
    """What the proxy needs of the kernel (:class:`keel.egress.netlink.SetWriter`): write
    one agent's elements, atomically; read one element (seconds left, comment; None
    when absent). Both raise NetlinkError when refused."""

    def write(self, agent: str, inserts: Sequence[Insert]) -> None: ...

    def read(self, agent: str, address: IPAddress) -> tuple[float, str] | None: ...


@dataclass
class Waited:
    """Seconds one exchange spent waiting for resolvers (keel's own time is the rest)."""

    seconds: float = 0.0


class UpstreamClient:
    """Asks the configured resolvers in order: UDP, then TCP when the answer is truncated."""

    def __init__(
        self, servers: Sequence[Upstream], *, timeout: float, rng: random.Random | None = None
    ) -> None:
        self.servers = list(servers)
        self.timeout = timeout
        self.rng = rng or random.SystemRandom()
        self.preferred = 0

    async def exchange(self, query: Query) -> tuple[Response, float] | None:
        """The first usable answer from a resolver and the seconds spent waiting for
        resolvers, or None when none gave one."""
        count = len(self.servers)
        waited = Waited()
        for step in range(count):
            index = (self.preferred + step) % count
            server = self.servers[index]
            try:
                result = await self._ask(server, query, waited)
            except (OSError, TimeoutError, EOFError, asyncio.IncompleteReadError) as exc:
                log.debug("upstream %s: %s", server, exc)
                continue
            if result is not None:
                self.preferred = index
                return result, waited.seconds
        return None

    async def _ask(self, server: Upstream, query: Query, waited: Waited) -> Response | None:
        query_id = self.rng.randrange(65536)
        wire = upstream_query(query, query_id)
        response = await self._udp(server, query, wire, query_id, waited)
        if response is not None and response.flags & dns.flags.TC:
            response = await self._tcp(server, query, wire, query_id, waited)
        if response is not None and response.rcode in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
            return None
        return response

    async def _udp(
        self, server: Upstream, query: Query, wire: bytes, query_id: int, waited: Waited
    ) -> Response | None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect((server.host, server.port))  # replies from elsewhere never reach us
            await loop.sock_sendall(sock, wire)
            async with asyncio.timeout(self.timeout):
                while True:
                    began = time.perf_counter()
                    try:
                        data = await loop.sock_recv(sock, MAX_MESSAGE)
                    finally:
                        waited.seconds += time.perf_counter() - began
                    response = parse_response(data)
                    if response is not None and matches_question(query, response, query_id):
                        return response

    async def _tcp(
        self, server: Upstream, query: Query, wire: bytes, query_id: int, waited: Waited
    ) -> Response | None:
        began = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(server.host, server.port)
                try:
                    writer.write(struct.pack("!H", len(wire)) + wire)
                    await writer.drain()
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(length)
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        finally:
            waited.seconds += time.perf_counter() - began
        response = parse_response(data)
        if response is None or not matches_question(query, response, query_id):
            return None
        return response


@dataclass
class Proxy:
    """Answers agents' questions; shared by every agent's listeners."""

    upstream: UpstreamClient
    cache: AnswerCache
    book: SetBook
    inserter: SetInserter
    on_denied: Callable[[DeniedName], None]
    on_asked: Callable[[str, str], None]
    counters: dict[str, Counters] = field(default_factory=dict)

    def counters_of(self, agent: str) -> Counters:
        return self.counters.setdefault(agent, Counters())

    async def answer(self, agent: AgentEgress, wire: bytes, *, tcp: bool) -> bytes | None:
        """The reply to one message from ``agent``, or None to drop it."""
        began = time.perf_counter()
        waited = 0.0
        counters = self.counters_of(agent.name)
        parsed = read_query(wire)
        if parsed is None:
            counters.malformed += 1
            return None
        if isinstance(parsed, Refusal):
            counters.refused += 1
            return parsed.reply
        query = parsed
        counters.queries += 1
        self.on_asked(agent.name, query.text)
        allowed = agent.allow.allows(query.labels)
        if not allowed:
            counters.denied += 1
            self.on_denied(DeniedName(agent.name, query.text, query.type_text, agent.enforced))
            if agent.enforced:
                return denial(query)
        response = self.cache.get(query)
        if response is None:
            asked = time.perf_counter()
            fetched = await self.upstream.exchange(query)
            if fetched is None:
                counters.upstream.append(time.perf_counter() - asked)
                counters.upstream_failures += 1
                return server_failure(query)
            response, waited = fetched
            counters.upstream.append(waited)
            self.cache.put(query, response)
        answer = read_answer(query, response)
        if allowed and answer.addresses:
            self._learn(agent.name, [a.address for a in answer.addresses])
            inserts = self.book.plan(agent.name, answer.addresses)
            if not self._insert(agent.name, inserts):
                counters.insert_failures += 1
                return server_failure(query)
        reply = reply_wire(answer, max_size=MAX_MESSAGE if tcp else query.max_reply)
        counters.work.append(time.perf_counter() - began - waited)
        return reply

    def _learn(self, agent: str, addresses: list[IPAddress]) -> None:
        """Read from the kernel what a restart left of addresses the book does not know yet,
        so that rewriting them keeps the names they were opened for."""
        for address in self.book.unknown(agent, addresses):
            try:
                found = self.inserter.read(agent, address)
            except NetlinkError as exc:
                log.warning("cannot read %s for %s: %s", address, agent, exc)
                continue
            self.book.learn(
                agent, address, None if found is None else (found[0], names_of(found[1])[0])
            )

    def _insert(self, agent: str, inserts: list[Insert]) -> bool:
        if not inserts:
            return True
        try:
            self.inserter.write(agent, inserts)
        except NetlinkError as exc:
            if exc.errno != errno.ENOENT or not any(i.replace for i in inserts):
                log.error("cannot insert addresses for %s: %s", agent, exc)  # noqa: TRY400
                return False
            # An element to replace was not there (it expired just now, or
            # a restarted daemon did not know): each one on its own.
            try:
                for insert in inserts:
                    self._insert_one(agent, insert)
            except NetlinkError as again:
                log.error("cannot insert addresses for %s: %s", agent, again)  # noqa: TRY400
                return False
        self.book.committed(agent, inserts)
        return True

    def _insert_one(self, agent: str, insert: Insert) -> None:
        if insert.replace:
            try:
                self.inserter.write(agent, [insert])
            except NetlinkError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                return
        self.inserter.write(agent, [replace(insert, replace=False)])


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, proxy: Proxy, agent: Callable[[], AgentEgress]) -> None:
        self.proxy = proxy
        self.agent = agent
        self.transport: asyncio.DatagramTransport | None = None
        self.inflight: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (CPython's datagram transport does not derive from DatagramTransport.)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        agent = self.agent()
        if len(self.inflight) >= MAX_INFLIGHT:
            self.proxy.counters_of(agent.name).dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._answer(agent, data, addr))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def _answer(self, agent: AgentEgress, data: bytes, addr: Any) -> None:
        try:
            reply = await self.proxy.answer(agent, data, tcp=False)
        except Exception:
            log.exception("answering %s failed (a keel bug); the question is dropped", agent.name)
            return
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp listener: %s", exc)


class AgentListeners:
    """An agent's UDP and TCP listeners on 127.0.0.1 and ::1 (its redirect target)."""

    def __init__(self, proxy: Proxy, agent: AgentEgress) -> None:
        self.proxy = proxy
        self.agent = agent
        self._udp: list[tuple[asyncio.DatagramTransport, _UdpListener]] = []
        self._tcp: list[asyncio.AbstractServer] = []
        self._clients: set[asyncio.Task[Any]] = set()
        self.addresses: list[str] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host in ("127.0.0.1", "::1"):
            try:
                transport, protocol = await loop.create_datagram_endpoint(
                    lambda: _UdpListener(self.proxy, lambda: self.agent),
                    local_addr=(host, self.agent.port),
                )
                server = await asyncio.start_server(
                    self._serve_tcp,
                    host,
                    self.agent.port,
                    reuse_address=True,
                    limit=MAX_MESSAGE + 2,
                )
            except OSError as exc:
                if host == "::1" and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    log.warning(
                        "%s: no IPv6 loopback here; its DNS over IPv6 cannot be answered",
                        self.agent.name,
                    )
                    continue
                await self.close()
                raise OSError(
                    exc.errno,
                    f"cannot listen on {host} port {self.agent.port} for agent {self.agent.name}: {exc.strerror}",
                ) from None
            self._udp.append((transport, protocol))
            self._tcp.append(server)
            self.addresses.append(host)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._clients) >= MAX_TCP_CLIENTS or task is None:
            writer.close()
            return
        self._clients.add(task)
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(length)
                reply = await self.proxy.answer(self.agent, data, tcp=True)
                if reply is None:
                    return  # a malformed message ends the connection
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, struct.error):
            pass
        except Exception:
            log.exception("answering %s over TCP failed (a keel bug)", self.agent.name)
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        for transport, protocol in self._udp:
            transport.close()
            for task in list(protocol.inflight):
                task.cancel()
        for server in self._tcp:
            server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        for server in self._tcp:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._udp.clear()
        self._tcp.clear()

"""The mesh's listener on real loopback sockets, with a stand-in protocol (no daemon, no crypto).

What the daemon tests show end to end, here one behaviour at a time:
refusals are closed at once and never get a protocol, evictions and
deadlines close the right connection, and running out of descriptors
pauses accepting (no busy loop) until the reserve can be taken back.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from keel.mesh.intake import Intake
from keel.mesh.listener import Listener, listening_socket
from keel.service import Reserve


class Conn(asyncio.Protocol):
    def __init__(self, listener: Listener[Conn] | None, ticket: int) -> None:
        self.listener = listener
        self.ticket = ticket
        self.transport: asyncio.Transport | None = None
        self.dropped: tuple[str, bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.listener is not None:
            self.listener.closed(self.ticket)

    def drop(self, reason: str, quietly: bool) -> None:
        self.dropped = (reason, quietly)
        if self.transport is not None:
            self.transport.abort()


class FlakySocket:
    """A listening socket whose ``accept`` fails with ``errno`` while ``failing``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failing = 0

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failing:
            raise OSError(self.failing, "out of it")
        return self.sock.accept()

    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()


async def until(predicate: Callable[[], object], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def run(
    scenario: Callable[[Listener[Conn], list[Conn]], Awaitable[None]],
    *,
    total: int = 64,
    per_source: int = 2,
    timeout: float = 30,
    flaky: bool = False,
) -> None:
    async def main() -> None:
        made: list[Conn] = []
        sock: Any = listening_socket("127.0.0.1", 0)
        if flaky:
            sock = FlakySocket(sock)
        intake = Intake(total=total, per_source=per_source, timeout=timeout, clock=time.monotonic)
        holder: list[Listener[Conn]] = []

        def make(ticket: int) -> Conn:
            conn = Conn(holder[0], ticket)
            made.append(conn)
            return conn

        listener = Listener(sock, intake, make, Conn.drop, reserve=Reserve())
        holder.append(listener)
        listener.start()
        try:
            await scenario(listener, made)
        finally:
            listener.close()

    asyncio.run(main())


def test_a_refused_connection_is_closed_at_once_and_never_gets_a_protocol(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(listener: Listener[Conn], made: list[Conn]) -> None:
        first = connect(listener.port, "127.0.0.2")
        second = connect(listener.port, "127.0.0.2")
        await until(lambda: len(made) == 2, "two admitted")
        third = connect(listener.port, "127.0.0.2")
        assert await asyncio.to_thread(closed_by_peer, third)
        assert len(made) == 2
        other = connect(listener.port, "127.0.0.3")  # another address is not affected
        await until(lambda: len(made) == 3, "the other address admitted")
        for sock in (first, second, third, other):
            sock.close()
        await until(lambda: len(listener.intake) == 0, "the handshakes to be over")

    with caplog.at_level(logging.WARNING, logger="keel.mesh"):
        run(scenario)
    assert "refusing a connection from 127.0.0.2: 2 handshakes from 127.0.0.2" in caplog.text


def test_a_quieter_address_takes_the_busiest_ones_oldest_place() -> None:
    async def scenario(listener: Listener[Conn], made: list[Conn]) -> None:
        busy = [connect(listener.port, "127.0.0.2") for _ in range(2)]
        await until(lambda: len(made) == 2, "two admitted")
        newcomer = connect(listener.port, "127.0.0.3")
        await until(lambda: len(made) == 3, "the newcomer admitted")
        assert made[0].dropped == ("handshake closed to make room for another address's", True)
        assert made[1].dropped is None
        assert await asyncio.to_thread(closed_by_peer, busy[0])
        for sock in (*busy, newcomer):
            sock.close()

    run(scenario, total=2, per_source=2)


def test_a_handshake_past_its_deadline_is_dropped() -> None:
    async def scenario(listener: Listener[Conn], made: list[Conn]) -> None:
        idle = connect(listener.port, "127.0.0.2")
        await until(lambda: made and made[0].dropped, "the deadline")
        assert made[0].dropped == ("handshake not finished after 0.2 s", False)
        assert await asyncio.to_thread(closed_by_peer, idle)
        assert len(listener.intake) == 0
        idle.close()

    run(scenario, timeout=0.2)


def test_accepted_connections_do_not_wait_for_delayed_acks() -> None:
    """TCP_NODELAY on what is accepted (asyncio sets it only where proto is IPPROTO_TCP):
    with Nagle on, a request answered at once by a reply waited 40 ms for a delayed ACK."""

    async def scenario(listener: Listener[Conn], made: list[Conn]) -> None:
        client = connect(listener.port, "127.0.0.2")
        await until(lambda: made and made[0].transport is not None, "the connection")
        transport = made[0].transport
        assert transport is not None
        accepted = transport.get_extra_info("socket")
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        client.close()

    run(scenario)


def holding(reserve: Reserve) -> bool:
    return reserve.held


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
def test_out_of_descriptors_it_pauses_hands_back_the_reserve_and_resumes(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(listener: Listener[Conn], made: list[Conn]) -> None:
        flaky = listener.sock
        assert isinstance(flaky, FlakySocket)
        assert holding(listener.reserve)
        flaky.failing = code
        waiting = connect(listener.port, "127.0.0.2")
        await until(lambda: listener.paused, "the pause")
        assert not holding(listener.reserve)  # handed back for the control socket
        flaky.failing = 0
        await until(lambda: not listener.paused, "accepting again", timeout=10)
        assert holding(listener.reserve)
        await until(lambda: len(made) == 1, "the waiting connection taken")
        waiting.close()

    with caplog.at_level(logging.INFO, logger="keel.mesh"):
        run(scenario, flaky=True)
    assert "not accepting peer connections until some close" in caplog.text
    assert "accepting peer connections again" in caplog.text
    assert "Traceback" not in caplog.text

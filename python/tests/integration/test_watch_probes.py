"""Probe runners against real sockets and processes on loopback."""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from collections.abc import Awaitable, Callable

import pytest
from keel.watch.children import pidfd_supported
from keel.watch.httpwire import parse_url
from keel.watch.probes import ExecCheck, HttpCheck, Outcome, TcpCheck, run_check

from tests.integration.watch_support import cleaned_up, tagged, until

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not pidfd_supported(),
    reason="exec probes need Linux 5.3+ (pidfd_open)",
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def stand_in(handler: Handler) -> Handler:
    """A stand-in server's handler, quiet when the probe goes away or the test ends.

    A probe that timed out closes its connection, and handlers still waiting when
    the test's event loop ends are cancelled: neither is an error of the stand-in,
    and neither may print a traceback (tests/tracebacks.py).
    """

    async def quiet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    return quiet


async def with_server(handler: Handler, check: Callable[[int], Awaitable[Outcome]]) -> Outcome:
    server = await asyncio.start_server(stand_in(handler), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await check(port)
    finally:
        server.close()


def reply(raw: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        writer.close()

    return handler


def http(port: int, **kwargs: object) -> HttpCheck:
    return HttpCheck(parse_url(f"http://127.0.0.1:{port}/health"), **kwargs)  # type: ignore[arg-type]


def test_http_probe_outcomes() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhealthy"
    busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

    async def scenario() -> None:
        assert await with_server(reply(ok), lambda p: run_check(http(p), 1)) == Outcome(
            True, "HTTP 200"
        )
        assert await with_server(reply(busy), lambda p: run_check(http(p), 1)) == Outcome(
            False, "HTTP 503"
        )
        wanted = await with_server(reply(ok), lambda p: run_check(http(p, expect_status=(204,)), 1))
        assert wanted == Outcome(False, "HTTP 200 (expected 204)")
        body = await with_server(reply(ok), lambda p: run_check(http(p, expect_body="healthy"), 1))
        assert body.ok
        lacking = await with_server(reply(ok), lambda p: run_check(http(p, expect_body="ready"), 1))
        assert lacking == Outcome(False, "HTTP 200, body lacks 'ready'")
        garbage = await with_server(reply(b"SSH-2.0-x\r\n\r\n"), lambda p: run_check(http(p), 1))
        assert not garbage.ok
        assert garbage.detail.startswith("bad HTTP response: not an HTTP/1.x response")

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(5)
            writer.close()

        # The server would answer (by closing) after 5 s: the timeout answers first.
        hung = await with_server(silent, lambda p: run_check(http(p), 0.3))
        assert hung == Outcome(False, "timeout after 0.3s")

    asyncio.run(scenario())


def test_tcp_probe_and_refused_connections() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]

    async def scenario() -> None:
        ok = await with_server(reply(b""), lambda p: run_check(TcpCheck("127.0.0.1", p), 1))
        assert ok == Outcome(True, "connected")
        assert await run_check(TcpCheck("127.0.0.1", port), 1) == Outcome(
            False, "connection refused"
        )
        assert await run_check(http(port), 1) == Outcome(False, "connection refused")
        unresolvable = await run_check(TcpCheck("no-such-host.invalid", 80), 2)
        assert not unresolvable.ok

    asyncio.run(scenario())


def test_exec_probe_outcomes() -> None:
    async def scenario(marker: int) -> None:
        assert await run_check(ExecCheck(("sh", "-c", "echo fine")), 2) == Outcome(True, "fine")
        failed = await run_check(
            ExecCheck(("sh", "-c", "echo first; echo 'db down' >&2; exit 3")), 2
        )
        assert failed == Outcome(False, "exited with status 3: db down")
        slow = await run_check(
            ExecCheck(("sh", "-c", f"sleep 600.{marker} & exec sleep 600.{marker}")), 0.3
        )
        assert slow == Outcome(False, "timeout after 0.3s")
        await until(lambda: not tagged(marker), what="the timed-out probe's processes gone")
        missing = await run_check(ExecCheck(("/nonexistent/check",)), 1)
        assert missing == Outcome(
            False, "cannot run '/nonexistent/check': No such file or directory"
        )

    with cleaned_up(random.randrange(10**8, 10**9)) as marker:
        asyncio.run(scenario(marker))


def test_exec_probe_leaves_no_process_behind() -> None:
    async def scenario(marker: int) -> None:
        inner = f"sh -c 'sleep 600.{marker}' & sleep 600.{marker}"
        outcome = await run_check(ExecCheck(("sh", "-c", inner)), 0.5)
        assert outcome == Outcome(False, "timeout after 0.5s")
        await until(lambda: not tagged(marker), what="every process of the probe gone")

    with cleaned_up(random.randrange(10**8, 10**9)) as marker:
        asyncio.run(scenario(marker))


# --- the probe engine (the thread that runs plain-HTTP and TCP probes) ------------------


def test_probe_engine_runs_checks_on_schedule_and_cancels() -> None:
    from keel.watch.probe_engine import ProbeEngine, Result, supported

    assert supported(TcpCheck("127.0.0.1", 1))
    assert supported(http(80))
    assert not supported(TcpCheck("localhost", 1))
    assert not supported(HttpCheck(parse_url("https://127.0.0.1/")))
    assert not supported(ExecCheck(("true",)))

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]

    async def scenario() -> dict[str, list[Result]]:
        results: dict[str, list[Result]] = {}

        def deliver(batch: list[Result]) -> None:
            for result in batch:
                results.setdefault(str(result.key), []).append(result)

        async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()

        async def busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            await writer.drain()
            writer.close()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(30)

        servers = [
            await asyncio.start_server(stand_in(h), "127.0.0.1", 0) for h in (ok, busy, silent)
        ]
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        engine = ProbeEngine(deliver)
        engine.start()
        now = time.monotonic()
        common = {"interval": 0.2, "timeout": 0.15, "grace": 0.0, "started": now}
        engine.schedule("ok", http(ports[0], expect_body="ok"), **common)
        engine.schedule("busy", http(ports[1]), **common)
        engine.schedule("silent", http(ports[2]), **common)
        engine.schedule("refused", TcpCheck("127.0.0.1", refused_port), **common)
        engine.schedule("tcp", TcpCheck("127.0.0.1", ports[0]), **common)
        engine.schedule("cancelled", http(ports[0]), **common)
        engine.cancel("cancelled")

        def ran(key: str, times: int) -> Callable[[], bool]:
            return lambda: len(results.get(key, [])) >= times

        for key in ("ok", "busy", "silent", "refused", "tcp"):
            await until(ran(key, 3), what=f"three {key} runs")
        engine.cancel("ok")
        # Commands apply in order and results arrive in order: once a probe
        # scheduled after the cancel has run, every run of "ok" is in.
        engine.schedule("after", TcpCheck("127.0.0.1", ports[0]), **common)
        await until(ran("after", 1), what="a run after the cancel")
        count = len(results["ok"])
        await until(ran("after", 4), what="three more runs")
        assert len(results["ok"]) == count  # cancelled: no more runs
        await engine.close()
        for server in servers:
            server.close()
        return results

    results = asyncio.run(scenario())
    assert {r.outcome for r in results["ok"]} == {Outcome(True, "HTTP 200")}
    assert {r.outcome for r in results["busy"]} == {Outcome(False, "HTTP 503")}
    assert {r.outcome for r in results["silent"]} == {Outcome(False, "timeout after 0.15s")}
    assert {r.outcome for r in results["refused"]} == {Outcome(False, "connection refused")}
    assert {r.outcome for r in results["tcp"]} == {Outcome(True, "connected")}
    assert "cancelled" not in results

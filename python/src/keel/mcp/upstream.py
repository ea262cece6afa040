"""The gateway's side of one MCP server: one connection, kept up, shared by every agent.

An :class:`Upstream` holds one MCP client session (the SDK's
``ClientSession``) to its server, whichever way the server is reached:

- a stdio server keel runs: a Unix socket whose other end is the server's
  stdin and stdout (:mod:`keel.mcp.attach`), at ``<sockets>/<name>.sock``;
- a Streamable HTTP server: its ``url``.

It connects, initialises, lists the server's tools and serves calls from any
number of agents over that one session (JSON-RPC ids keep them apart). When
the connection ends (the server crashed, was restarted, the unit was
stopped), every call in flight fails at once (the SDK fails pending requests
when the stream closes), new calls fail within ``unavailable_wait`` seconds
instead of waiting, and the upstream reconnects with a short back-off; once
the server answers ``initialize`` again, calls work again. Nobody needs to do
anything: not the agent, not the operator.

Reconnecting is cheap and quiet; restarting the server is not the gateway's
job (systemd and keel watch do that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp import ClientSession, MCPError
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client

from keel import __version__
from keel.mcp.spec import ServerSpec
from keel.mcp.wire import DEFAULT_MAX_MESSAGE, message_streams

log = logging.getLogger("keel.mcp")

UNAVAILABLE = -32051  # keel's JSON-RPC code: the server is down or restarting
TIMEOUT = types.REQUEST_TIMEOUT

CLIENT_INFO = types.Implementation(name="keel-mcp-gateway", version=__version__)


class CallFailed(Exception):
    """A call did not get a result from the server: ``kind`` says why (for the ledger)."""

    def __init__(self, kind: str, code: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # unavailable, timeout, error
        self.code = code
        self.message = message


class Upstream:
    """One MCP server as the gateway sees it: state, tools, and calls."""

    def __init__(
        self,
        spec: ServerSpec,
        *,
        socket_path: Path | None,
        on_change: Callable[[Upstream], None] | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        unavailable_wait: float = 0.5,
        init_timeout: float = 30.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 1.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.socket_path = socket_path
        self.on_change = on_change
        self.max_message = max_message
        self.unavailable_wait = unavailable_wait
        self.init_timeout = init_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.wall = wall
        self.state = "starting"
        self.since = wall()
        self.last_error: str | None = None
        self.tools: list[types.Tool] = []  # the last listing, kept while the server is down
        self.connections = 0
        self.calls = 0
        self.failed_calls = 0
        self.server_info: types.Implementation | None = None
        self._session: ClientSession | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._refresh = asyncio.Event()
        self._logged: str | None = None  # the last failure logged, said once until it changes

    # --- status ------------------------------------------------------------------------

    def describe_target(self) -> str:
        return self.spec.url or str(self.socket_path)

    def status(self) -> dict[str, Any]:
        return {
            "transport": self.spec.transport,
            "target": self.describe_target(),
            "state": self.state,
            "since": round(self.since, 3),
            "last_error": self.last_error,
            "tools": [tool.name for tool in self.tools],
            "connections": self.connections,
            "calls": self.calls,
            "failed_calls": self.failed_calls,
            "server_info": None
            if self.server_info is None
            else {"name": self.server_info.name, "version": self.server_info.version},
        }

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.state = state
            self.since = self.wall()
        if error is not None:
            self.last_error = error
        if self.on_change is not None:
            self.on_change(self)

    # --- the connection ---------------------------------------------------------------

    async def run(self) -> None:
        """Keep a session to the server until cancelled; never raises otherwise."""
        delay = self.backoff_initial
        while True:
            self._lost.clear()
            try:
                was_ready = await self._session_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the server's or the network's failure, never ours to die of
                was_ready = self._session is not None
                reason = _reason(exc)
                if reason != self._logged:
                    log.info("MCP server %s: %s", self.name, reason)
                    self._logged = reason
                self._down(reason)
            else:
                self._down(self.last_error or "the connection ended")
            if was_ready:
                delay = self.backoff_initial
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _down(self, reason: str) -> None:
        self._session = None
        self._ready.clear()
        self._set_state("down", reason)

    @contextlib.asynccontextmanager
    async def _transport(self) -> AsyncIterator[tuple[Any, Any]]:
        if self.spec.url is not None:
            async with streamable_http_client(self.spec.url) as (read, write):
                yield read, write
            return
        assert self.socket_path is not None
        try:
            reader, writer = await asyncio.open_unix_connection(
                str(self.socket_path), limit=self.max_message + 1
            )
        except FileNotFoundError:
            raise ConnectionError(
                f"{self.socket_path} does not exist (is the server running?)"
            ) from None
        except ConnectionRefusedError:
            raise ConnectionError(
                f"{self.socket_path} refuses connections (server not running)"
            ) from None
        async with message_streams(
            reader,
            writer,
            max_message=self.max_message,
            answer_errors=False,
            on_closed=self._closed,
        ) as streams:
            yield streams

    def _closed(self, reason: str) -> None:
        self.last_error = f"the server's connection ended: {reason}"
        self._lost.set()

    async def _session_once(self) -> bool:
        self._set_state("starting")
        async with (
            self._transport() as (read, write),
            ClientSession(
                read, write, client_info=CLIENT_INFO, message_handler=self._message
            ) as session,
        ):
            with anyio.fail_after(self.init_timeout):
                result = await session.initialize()
                tools = await _list_tools(session)
            self.server_info = result.server_info
            self.tools = tools
            self.connections += 1
            self._session = session
            self._ready.set()
            self.last_error = None
            self._logged = None
            self._set_state("ready")
            log.info("MCP server %s: ready, %d tools", self.name, len(tools))
            while not self._lost.is_set():
                waiters = {
                    asyncio.ensure_future(self._lost.wait()),
                    asyncio.ensure_future(self._refresh.wait()),
                }
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
                if self._refresh.is_set() and not self._lost.is_set():
                    self._refresh.clear()
                    with anyio.fail_after(self.init_timeout):
                        self.tools = await _list_tools(session)
                    self._set_state("ready")
            return True

    async def _message(self, message: IncomingMessage) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self._refresh.set()

    # --- calls ----------------------------------------------------------------------------

    async def call(
        self, tool: str, arguments: dict[str, Any] | None, *, timeout: float | None = None
    ) -> types.CallToolResult:
        """Call ``tool``; :class:`CallFailed` when no result came back."""
        session = self._session
        if session is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.unavailable_wait):
                    await self._ready.wait()
            session = self._session
        if session is None:
            self.failed_calls += 1
            reason = f": {self.last_error}" if self.last_error else ""
            raise CallFailed(
                "unavailable",
                UNAVAILABLE,
                f"MCP server {self.name} is {self.state} (restarting or down){reason}; "
                "try again shortly",
            )
        self.calls += 1
        limit = timeout if timeout is not None else self.spec.call_timeout
        try:
            # send_request, not call_tool: the result is relayed as the server
            # gave it; checking it against the tool's output schema is the
            # calling agent's client's job, not the relay's.
            result = await session.send_request(
                types.CallToolRequest(
                    params=types.CallToolRequestParams(name=tool, arguments=arguments)
                ),
                types.CallToolResult,
                request_read_timeout_seconds=limit,
            )
        except MCPError as exc:
            self.failed_calls += 1
            if exc.code == types.CONNECTION_CLOSED:
                self._lost.set()
                raise CallFailed(
                    "unavailable",
                    UNAVAILABLE,
                    f"MCP server {self.name} went away during the call ({exc.message}); "
                    "it is being restarted, try again shortly",
                ) from None
            if exc.code == types.REQUEST_TIMEOUT:
                raise CallFailed(
                    "timeout", TIMEOUT, f"MCP server {self.name} did not answer within {limit:g} s"
                ) from None
            raise CallFailed("error", exc.code, exc.message) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, ConnectionError) as exc:
            self.failed_calls += 1
            self._lost.set()
            raise CallFailed(
                "unavailable", UNAVAILABLE, f"MCP server {self.name} went away: {_reason(exc)}"
            ) from None
        except Exception as exc:  # a malformed answer from the server
            self.failed_calls += 1
            raise CallFailed(
                "error",
                types.INTERNAL_ERROR,
                f"MCP server {self.name} sent an answer keel cannot use: {_reason(exc)}",
            ) from None
        return result


async def _list_tools(session: ClientSession) -> list[types.Tool]:
    """Every page of ``tools/list`` (bounded: a server cannot page forever)."""
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(1000):
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer to initialize in time"
    if isinstance(exc, BaseExceptionGroup):
        inner = exc.exceptions[0] if exc.exceptions else exc
        return _reason(inner)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

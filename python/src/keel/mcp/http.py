"""Streamable HTTP for agents, on a Unix socket, with the caller named by the kernel.

Some MCP clients speak only Streamable HTTP. The gateway serves it with the
SDK's own transport (``StreamableHTTPSessionManager``, stateless, JSON
responses: one POST, one answer) under uvicorn, bound to a Unix socket
(``http`` in mcp.json) rather than a TCP port, so that the kernel can say who
is calling: uvicorn's h11 protocol is subclassed to read ``SO_PEERCRED``
when a connection is accepted and to hand that identity to the gateway's
handlers in the request's ASGI scope. Nothing in the request (headers,
session ids) can change it. Stateless mode also means there is no session to
take over: every request is judged on its own connection's credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from uvicorn.protocols.http.h11_impl import H11Protocol

from keel.api import peer_of_socket, remove_stale_socket
from keel.errors import KeelError

if TYPE_CHECKING:
    from keel.mcp.gateway import McpGateway
    from keel.service import Shell

log = logging.getLogger("keel.mcp")

PATH = "/mcp"


def _protocol_class(gateway: McpGateway) -> type[H11Protocol]:
    class PeerCredentialsProtocol(H11Protocol):
        """uvicorn's h11 protocol, with the connection's identity in every request's scope."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            from keel.mcp.gateway import MAX_CALLS_PER_CONNECTION, Connection

            peer = peer_of_socket(transport.get_extra_info("socket"))
            connection = Connection(
                gateway.principal_of(peer), peer, asyncio.Semaphore(MAX_CALLS_PER_CONNECTION)
            )
            app = self.app

            async def with_identity(scope: Any, receive: Any, send: Any) -> None:
                scope["keel.connection"] = connection
                await app(scope, receive, send)

            self.app = with_identity

    return PeerCredentialsProtocol


class HttpFront:
    """Streamable HTTP on ``path`` for the gateway's lifetime."""

    def __init__(self, gateway: McpGateway, path: Path) -> None:
        self.gateway = gateway
        self.path = path
        self.manager = StreamableHTTPSessionManager(
            app=gateway.server, stateless=True, json_response=True
        )
        self._server: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._manager_done = asyncio.Event()
        self._manager_stop = asyncio.Event()

    async def start(self, shell: Shell) -> None:
        app = StreamableHTTPASGIApp(self.manager)

        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] != PATH:
                await send({"type": "http.response.start", "status": 404, "headers": []})
                await send({"type": "http.response.body", "body": b"the MCP endpoint is /mcp\n"})
                return
            await app(scope, receive, send)

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_socket(self.path)
        except OSError as exc:
            raise KeelError(f"cannot serve HTTP at {self.path}: {exc.strerror}") from None
        ready = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._run_manager(ready), name="mcp:http-sessions"))
        await ready.wait()
        config = uvicorn.Config(
            asgi,
            uds=str(self.path),
            http=_protocol_class(self.gateway),
            lifespan="off",
            log_config=None,
            access_log=False,
            log_level="warning",
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup()
        if server.should_exit:
            raise KeelError(f"cannot serve HTTP at {self.path} (see the log)")
        os.chmod(self.path, 0o666)  # noqa: S103 - who may do what is decided per caller
        self._server = server
        self._tasks.append(asyncio.create_task(server.main_loop(), name="mcp:http"))

    async def _run_manager(self, ready: asyncio.Event) -> None:
        async with self.manager.run():
            ready.set()
            await self._manager_stop.wait()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
            with contextlib.suppress(Exception):
                await self._server.shutdown()
        self._manager_stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

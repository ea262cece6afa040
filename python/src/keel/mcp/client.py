"""For agents: an MCP session with the gateway, and a stdio bridge for clients that need one.

Python agents open the SDK's ``ClientSession`` on the gateway's socket::

    async with open_session(Path("/run/keel-mcp/mcp.sock")) as session:
        tools = await session.list_tools()
        result = await session.call_tool("files.read", {"path": "/srv/a.txt"})

An MCP client that can only start stdio servers runs ``keel mcp connect`` as
its server command: that process (running as the agent, so the gateway still
names the agent from the kernel) copies stdin to the socket and the socket to
stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from mcp import ClientSession

from keel.errors import KeelError
from keel.mcp.wire import DEFAULT_MAX_MESSAGE, ReadStream, WriteStream, message_streams


@contextlib.asynccontextmanager
async def unix_transport(
    path: Path, *, max_message: int = DEFAULT_MAX_MESSAGE
) -> AsyncIterator[tuple[ReadStream, WriteStream]]:
    """The SDK's transport streams on the gateway's socket (for ``mcp.Client`` or a session)."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=max_message + 1)
    except OSError as exc:
        raise KeelError(
            f"cannot reach the MCP gateway at {path}: {exc.strerror or exc} "
            "(is `keel mcp serve` running?)"
        ) from None
    async with message_streams(
        reader, writer, max_message=max_message, answer_errors=False
    ) as streams:
        yield streams


@contextlib.asynccontextmanager
async def open_session(
    path: Path, *, initialize: bool = True, max_message: int = DEFAULT_MAX_MESSAGE
) -> AsyncIterator[ClientSession]:
    """A ``ClientSession`` with the gateway at ``path`` (initialised unless told not to)."""
    async with (
        unix_transport(path, max_message=max_message) as (read, write),
        ClientSession(read, write) as session,
    ):
        if initialize:
            await session.initialize()
        yield session


def bridge(path: Path) -> int:
    """``keel mcp connect``: stdin -> the gateway, the gateway -> stdout, until either ends."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise KeelError(f"cannot reach the MCP gateway at {path}: {exc.strerror}") from None
    stdin, stdout = sys.stdin.buffer.fileno(), sys.stdout.buffer.fileno()
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ, "in")
    selector.register(sock, selectors.EVENT_READ, "sock")
    try:
        while True:
            for key, _ in selector.select():
                if key.data == "in":
                    data = os.read(stdin, 1 << 16)
                    if not data:
                        sock.shutdown(socket.SHUT_WR)
                        selector.unregister(stdin)
                        continue
                    sock.sendall(data)
                else:
                    data = sock.recv(1 << 16)
                    if not data:
                        return 0
                    view = memoryview(data)
                    while view:
                        view = view[os.write(stdout, view) :]
    except (BrokenPipeError, ConnectionError):
        return 0
    finally:
        selector.close()
        sock.close()
